"""Functions on logits the caller already has (docs/api.md): ``logprobs``, ``jsd``, ``topk_jsd``, ``topk_overlap``.

The logits exist already, so there is no GEMM to fuse: these run row block by row block in
float32 (float64 for float64 inputs) and allocate nothing N×V beyond the gradient itself. The
per-row math is the fused functions' own (``rowmath``), so on the same logits the two agree to
float rounding. Both backends share this path (a Triton kernel would only save the float32 upcast
of each block).
"""

from __future__ import annotations

import torch

from . import _validate as validate
from . import config, rowmath
from ._prepare import prepared
from .autograd import logits as logits_functions
from .autograd.common import Call

__all__ = ["logprobs", "jsd", "topk_jsd", "topk_overlap"]


def _run(function, call: Call):
    rows = call.rows
    live = rows.live if rows.index is None else None  # masked rows zeroed in the blocks (sync-free path)
    return rows.put(function.apply(call.logits, *([call.teacher_logits.detach()] if call.teacher_logits is not None
                                                  else []), call.config, rows.index, live))


def logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, with_entropy=False, backend="auto"):
    """log p(target) [N] (and entropy [N]) of softmax(logits / τ); rows with ignore_index give 0."""
    with prepared("logprobs", locals()) as call:
        rows = call.rows
        live = rows.live if rows.index is None else None
        logp, entropy = logits_functions.LogProbs.apply(call.logits, rows.take(call.targets),
                                                        call.config.student.temperature, rows.index, live)
        logp, entropy = rows.put(logp), rows.put(entropy)
    return (logp, entropy) if call.with_entropy else logp


def jsd(logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, backend="auto"):
    """Full-vocabulary JSD_β(softmax(logits/τ), softmax(teacher_logits/τ)) per row [N]; the teacher is detached."""
    with prepared("jsd", locals()) as call:
        return _run(logits_functions.JSD, call)


def topk_jsd(logits, teacher_logits, k, *, beta=0.5, support="union", tail=True, temperature=1.0, mask=None,
             backend="auto"):
    """Top-K JSD_β with tail compensation (docs/method.md §2) per row [N] on given logits; K ≥ V gives the full JSD."""
    with prepared("topk_jsd", locals()) as call:
        full = call.config.divergence.k is None
        return _run(logits_functions.JSD if full else logits_functions.TopKJSD, call)


def topk_overlap(indices_a, indices_b, *, backend="auto"):
    """|A ∩ B| / k per row for two [N, k] sets of distinct ids (float32 [N]). ``backend`` is accepted
    for API uniformity: this is a small sort-based op with one implementation. The check that no row
    repeats an id reads the device once (not under ``config.SYNC_FREE``)."""
    validate.check_backend(backend)
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
    if not config.SYNC_FREE and indices_a.shape[1] > 1:
        ordered = [t.long().sort(dim=-1).values for t in (indices_a, indices_b)]
        repeats = torch.stack([(o[:, 1:] == o[:, :-1]).any() for o in ordered]).tolist()  # one read
        for name, repeated in zip(("indices_a", "indices_b"), repeats):
            if repeated:
                raise ValueError(f"{name} repeats an id within a row: the overlap is defined for sets of distinct "
                                 "ids")
    return rowmath.overlap_fraction(indices_a.long(), indices_b.long())
