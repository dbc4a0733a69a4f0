"""The fused functions of SPEC §4: each validates its arguments, builds its typed config and
dispatches to the autograd layer (``ptd_kernels.autograd``) with the selected backend.

None of them allocates a tokens×vocabulary tensor: the logits exist only as bounded tiles or
blocks, recomputed in the backward pass.
"""

from __future__ import annotations

import torch

from . import _validate as V
from ._types import PTDTerms
from .autograd import linear as A
from .autograd.common import JSDConfig, PTDHeadConfig, SparseJSDConfig
from .backends import select_backend
from .backends.base import DivergenceSpec

__all__ = [
    "linear_logprobs",
    "linear_topk",
    "linear_topk_jsd",
    "linear_sparse_jsd",
    "linear_jsd",
    "linear_ptd_terms",
    "linear_jsd_loss",
    "linear_topk_jsd_loss",
]


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100, with_entropy=False,
                    backend="auto"):
    """log p(target) per row — and the exact entropy H(p) with ``with_entropy=True`` — of
    p = softmax((hidden @ weight.T + bias) / temperature), without materializing the logits.

    Args:
        hidden: [N, H] float (fp32/bf16/fp16/fp64). weight: [V, H], bias: [V] or None, same dtype.
        targets: [N] integer ids in [0, V), or ``ignore_index`` for rows that yield 0.
    Returns:
        logp [N] (float32; float64 for float64 inputs), or (logp, entropy).
    Differentiable w.r.t. hidden, weight and bias.
    """
    V.check_backend(backend)
    n, vocab, temperature = V.check_student(hidden, weight, bias, temperature)
    V.check_targets(targets, n, vocab, ignore_index, hidden.device)
    live = V.row_mask(n, hidden.device, targets, ignore_index)
    logp, entropy, *_ = A.ptd_head(hidden, weight, bias, targets.long(), None, None, None, live,
                                   torch.zeros_like(live), PTDHeadConfig(temperature),
                                   select_backend(backend, hidden, weight, bias))
    return (logp, entropy) if with_entropy else logp


def linear_topk(hidden, weight, k, *, bias=None, temperature=1.0, targets=None, ignore_index=-100, backend="auto"):
    """Top-k of the output layer's logits per row, by streaming over vocabulary tiles. No gradient.

    Returns ``TopK(indices [N,k] int64 by descending logit with ties to the smaller id,
    logprobs [N,k] float32, lse [N], target_logprobs [N] or None)``.
    """
    V.check_backend(backend)
    n, vocab, temperature = V.check_student(hidden, weight, bias, temperature)
    k = V.check_k(k)
    if k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
    live = None
    if targets is not None:
        V.check_targets(targets, n, vocab, ignore_index, hidden.device)
        live = targets != ignore_index
        targets = torch.where(live, targets.long(), torch.zeros_like(targets.long()))
    return A.topk(hidden, weight, bias, k, temperature, targets, live, select_backend(backend, hidden, weight, bias))


def _check_pair(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, beta, temperature, mask,
                backend):
    """The checks every student/teacher function shares. Returns (N, V, τ, β, live rows)."""
    V.check_backend(backend)
    n, vocab, temperature = V.check_student(hidden, weight, bias, temperature)
    V.check_teacher(hidden, vocab, teacher_hidden, teacher_weight, teacher_bias)
    beta = V.check_beta(beta)
    V.check_mask("mask", mask, n, hidden.device)
    return n, vocab, temperature, beta, V.row_mask(n, hidden.device, mask=mask)


def linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union", tail=True,
                    bias=None, teacher_bias=None, temperature=1.0, mask=None, backend="auto"):
    """Top-K JSD_β with tail compensation (SPEC §2) between the student output layer and a detached
    teacher output layer, per row [N], never materializing either side's logits.

    support: "union" (TopK(p) ∪ TopK(q)), "teacher" or "student". tail=True adds one tail atom
    per side; tail=False renormalizes over S. K ≥ V gives the full-vocabulary JSD.
    """
    _, _, temperature, beta, live = _check_pair(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                                beta, temperature, mask, backend)
    divergence = DivergenceSpec(beta, V.check_k(k), V.check_support(support), bool(tail))
    return A.ptd_head(hidden, weight, bias, None, teacher_hidden, teacher_weight, teacher_bias, live, live,
                      PTDHeadConfig(temperature, divergence),
                      select_backend(backend, hidden, weight, bias, teacher_hidden, teacher_weight))[2]


def linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union",
                     tail=True, bias=None, teacher_bias=None, temperature=1.0, ignore_index=-100, mask=None,
                     jsd_mask=None, backend="auto") -> PTDTerms:
    """PTD-PO's per-token terms from one sweep over the vocabulary per side.

    Returns ``PTDTerms(logp, entropy, jsd, overlap)`` (each [N]) with the attribute
    ``teacher_mass`` (Σ_S q). Rows with target == ignore_index or mask False give 0 everywhere;
    rows with ``jsd_mask`` False give jsd = overlap = teacher_mass = 0 and their teacher rows
    are never read. Equal to the separate functions.
    """
    n, vocab, temperature, beta, _ = _check_pair(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                                 beta, temperature, mask, backend)
    divergence = DivergenceSpec(beta, V.check_k(k), V.check_support(support), bool(tail))
    V.check_targets(targets, n, vocab, ignore_index, hidden.device)
    V.check_mask("jsd_mask", jsd_mask, n, hidden.device)
    live = V.row_mask(n, hidden.device, targets, ignore_index, mask)
    jsd_live = live if jsd_mask is None else live & jsd_mask
    logp, entropy, jsd, overlap, teacher_mass = A.ptd_head(
        hidden, weight, bias, torch.where(live, targets.long(), 0), teacher_hidden, teacher_weight, teacher_bias, live,
        jsd_live, PTDHeadConfig(temperature, divergence, want_overlap=True),
        select_backend(backend, hidden, weight, bias, teacher_hidden, teacher_weight))
    return PTDTerms.build(logp, entropy, jsd, overlap, teacher_mass)


def linear_sparse_jsd(hidden, weight, teacher_indices, teacher_logprobs, *, beta=0.5, tail=True, bias=None,
                      temperature=1.0, mask=None, backend="auto"):
    """Top-K JSD_β against a sparse teacher (its top-K ids and their log-probs, e.g. an offline cache).

    The support is the teacher's ids; q_tail = 1 − Σ exp(teacher_logprobs) (floored at 1e-12).
    """
    V.check_backend(backend)
    n, vocab, temperature = V.check_student(hidden, weight, bias, temperature)
    V.check_sparse_teacher(teacher_indices, teacher_logprobs, n, vocab, hidden.device)
    cfg = SparseJSDConfig(temperature, V.check_beta(beta), bool(tail))
    V.check_mask("mask", mask, n, hidden.device)
    live = V.row_mask(n, hidden.device, mask=mask)
    return A.sparse_jsd(hidden, weight, bias, teacher_indices, teacher_logprobs, live, cfg,
                        select_backend(backend, hidden, weight, bias))


def linear_jsd(hidden, weight, teacher_hidden, teacher_weight, *, beta=0.5, bias=None, teacher_bias=None,
               temperature=1.0, mask=None, backend="auto"):
    """Full-vocabulary generalized JSD_β (β=0: KL(Q‖P), β=1: KL(P‖Q)) per row [N], fused with the
    output layers: logsumexps first, then the divergence tile by tile, recomputed in backward."""
    _, _, temperature, beta, live = _check_pair(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                                beta, temperature, mask, backend)
    return A.full_jsd(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, live,
                      JSDConfig(temperature, beta),
                      select_backend(backend, hidden, weight, bias, teacher_hidden, teacher_weight))


def linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, *, beta=0.5, bias=None, teacher_bias=None,
                    temperature=1.0, mask=None, weights=None, backend="auto"):
    """Σ_n weights_n · JSD_β,n (default weights: 1 / number of unmasked rows), a scalar.

    Gradients equal those of ``linear_jsd``; the chunked path forms them during the forward sweep
    and hands them over on the first backward (a second backward through the same graph raises).
    """
    n, _, temperature, beta, live = _check_pair(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                                beta, temperature, mask, backend)
    V.check_weights(weights, n, hidden.device)
    return A.weighted_loss(
        lambda: linear_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=beta, bias=bias,
                           teacher_bias=teacher_bias, temperature=temperature, mask=mask, backend=backend),
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, weights, live, DivergenceSpec(beta),
        temperature, select_backend(backend, hidden, weight, bias, teacher_hidden, teacher_weight))


def linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union", tail=True,
                         bias=None, teacher_bias=None, temperature=1.0, mask=None, weights=None, backend="auto"):
    """Σ_n weights_n · D_K,n (default weights: 1 / number of unmasked rows), a scalar.

    Gradients equal those of ``linear_topk_jsd``; the chunked path forms them during the forward
    sweep and hands them over on the first backward (a second backward through the same graph raises).
    """
    n, _, temperature, beta, live = _check_pair(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                                beta, temperature, mask, backend)
    V.check_weights(weights, n, hidden.device)
    divergence = DivergenceSpec(beta, V.check_k(k), V.check_support(support), bool(tail))
    return A.weighted_loss(
        lambda: linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, beta=beta, support=support,
                                tail=tail, bias=bias, teacher_bias=teacher_bias, temperature=temperature, mask=mask,
                                backend=backend),
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, weights, live, divergence, temperature,
        select_backend(backend, hidden, weight, bias, teacher_hidden, teacher_weight))
