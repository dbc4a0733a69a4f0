"""Result types of the public API."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TopK(NamedTuple):
    """Top-k of the output layer's logits per row (no gradient).

    indices: int64 [N, k], by descending logit, ties to the smaller id.
    logprobs: float32 [N, k], exact full-vocabulary log-probabilities at ``indices``.
    lse: float32 [N], logsumexp of the row's logits.
    target_logprobs: float32 [N] (0 at ignored rows), or None without targets.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    lse: torch.Tensor
    target_logprobs: torch.Tensor | None


class _PTDTermsFields(NamedTuple):
    logp: torch.Tensor
    entropy: torch.Tensor
    jsd: torch.Tensor
    overlap: torch.Tensor


class PTDTerms(_PTDTermsFields):
    """Per-row PTD-PO terms: (logp, entropy, jsd, overlap), a 4-field named tuple.

    Also carries ``teacher_mass`` (Σ_S q, the teacher mass the support covers; a logged
    metric of docs/method.md §3) as an attribute outside the tuple, so that 4-way unpacking still works.
    """

    teacher_mass: torch.Tensor | None = None

    @classmethod
    def build(cls, logp, entropy, jsd, overlap, teacher_mass) -> PTDTerms:
        out = cls(logp, entropy, jsd, overlap)
        out.teacher_mass = teacher_mass
        return out
