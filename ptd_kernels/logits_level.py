"""Functions on logits the caller already has (SPEC §4): ``logprobs``, ``jsd``, ``topk_jsd``, ``topk_overlap``.

The logits exist already, so there is no GEMM to fuse: these run row block by row block in
float32 (float64 for float64 inputs) and allocate nothing N×V beyond the gradient itself. The
per-row math is the fused functions' own (``rowmath``), so on the same logits the two agree to
float rounding. Both backends share this path (a Triton kernel would only save the float32 upcast
of each block).
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import rowmath
from .autograd import logits as A
from .autograd.common import LogitsDivergenceConfig, live_index, put, take
from .backends.base import DivergenceSpec

__all__ = ["logprobs", "jsd", "topk_jsd", "topk_overlap"]


def logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, with_entropy=False, backend="auto"):
    """log p(target) [N] (and entropy [N]) of softmax(logits / τ); rows with ignore_index give 0."""
    V.check_backend(backend)
    n, vocab = V.check_logits("logits", logits)
    temperature = V.check_temperature(temperature)
    targets = V.check_targets(targets, n, vocab, ignore_index, logits.device)
    with_entropy = V.check_bool("with_entropy", with_entropy)
    index = live_index(targets != ignore_index)
    logp, entropy = A.LogProbs.apply(logits, take(targets, index), temperature, index)
    logp, entropy = put(logp, index, n), put(entropy, index, n)
    return (logp, entropy) if with_entropy else logp


def _check_pair(logits, teacher_logits, mask, temperature, beta, backend):
    V.check_backend(backend)
    n, vocab = V.check_logits_pair(logits, teacher_logits)
    V.check_mask("mask", mask, n, logits.device)
    return n, vocab, V.check_temperature(temperature), V.check_beta(beta), live_index(
        V.row_mask(n, logits.device, mask=mask))


def jsd(logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, backend="auto"):
    """Full-vocabulary JSD_β(softmax(logits/τ), softmax(teacher_logits/τ)) per row [N]; the teacher is detached."""
    n, _, temperature, beta, index = _check_pair(logits, teacher_logits, mask, temperature, beta, backend)
    cfg = LogitsDivergenceConfig(temperature, DivergenceSpec(beta))
    return put(A.JSD.apply(logits, teacher_logits.detach(), cfg, index), index, n)


def topk_jsd(logits, teacher_logits, k, *, beta=0.5, support="union", tail=True, temperature=1.0, mask=None,
             backend="auto"):
    """Top-K JSD_β with tail compensation (SPEC §2) per row [N] on given logits; K ≥ V gives the full JSD."""
    n, vocab, temperature, beta, index = _check_pair(logits, teacher_logits, mask, temperature, beta, backend)
    k, support, tail = V.check_k(k), V.check_support(support), V.check_bool("tail", tail)
    if k >= vocab:
        return jsd(logits, teacher_logits, beta=beta, temperature=temperature, mask=mask, backend=backend)
    cfg = LogitsDivergenceConfig(temperature, DivergenceSpec(beta, k, support, V.check_bool("tail", tail)))
    return put(A.TopKJSD.apply(logits, teacher_logits.detach(), cfg, index), index, n)


def topk_overlap(indices_a, indices_b, *, backend="auto"):
    """|A ∩ B| / k per row for two [N, k] sets of distinct ids (float32 [N]). ``backend`` is accepted
    for API uniformity: this is a small sort-based op with one implementation."""
    V.check_backend(backend)
    for name, t in (("indices_a", indices_a), ("indices_b", indices_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if indices_a.dim() != 2 or indices_a.shape != indices_b.shape:
        raise ValueError(f"indices_a {tuple(indices_a.shape)} and indices_b {tuple(indices_b.shape)} must be "
                         "[N, k] tensors of the same shape")
    if indices_a.device != indices_b.device:
        raise ValueError(f"indices_b is on {indices_b.device} but indices_a is on {indices_a.device}")
    for name, t in (("indices_a", indices_a), ("indices_b", indices_b)):
        ordered = t.long().sort(dim=-1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError(f"{name} repeats an id within a row: the overlap is defined for sets of distinct ids")
    return rowmath.overlap_fraction(indices_a.long(), indices_b.long())
