"""The full-vocabulary JSD by the chunked PyTorch path: forward in two-sided full-row blocks,
backward in the recomputing sweep of ``head_backward.dense_backward``. The math is
``rowmath.full_jsd_rows_`` / ``jsd_backward_rows_``, shared with the logits-level functions."""

from __future__ import annotations

import torch

from ... import config, rowmath
from ..base import GradNeeds, Head, HeadGrads, JSDStats
from . import _blocks
from ._blocks import itemsize, shift, sub_blocks, to_logits_
from .head_backward import dense_backward


@torch.no_grad()
def jsd_forward(student: Head, teacher: Head, beta: float, *, lse: torch.Tensor | None = None,
                teacher_lse: torch.Tensor | None = None) -> JSDStats:
    """Full-vocabulary JSD_β per row with Σw (for the backward) and both logsumexps."""
    dtype = student.dtype
    n, vocab = student.rows, student.vocab
    device = student.hidden.device
    value, w_sum = (torch.empty(n, dtype=dtype, device=device) for _ in range(2))
    # given logsumexps keep their dtype: a float64 lse makes z − lse exact
    out_lse = torch.empty(n, dtype=dtype, device=device) if lse is None else lse
    out_teacher_lse = torch.empty(n, dtype=dtype, device=device) if teacher_lse is None else teacher_lse
    for r0, r1, z, teacher_z in _blocks.two_sided_row_blocks(student, teacher, config.FUSED_BLOCK_BYTES):
        for sub in sub_blocks(r1 - r0, vocab, itemsize(dtype)):
            z_sub, teacher_sub = z[sub], teacher_z[sub]
            to_logits_(z_sub, student)
            to_logits_(teacher_sub, teacher)
            rows = shift(sub, r0)
            terms = rowmath.full_jsd_rows_(
                z_sub, teacher_sub, beta, grad=False, lse=None if lse is None else out_lse[rows],
                teacher_lse=None if teacher_lse is None else out_teacher_lse[rows])
            value[rows], w_sum[rows], out_lse[rows], out_teacher_lse[rows] = (
                terms.value, terms.w_sum, terms.lse, terms.teacher_lse)
    return JSDStats(value, w_sum, out_lse, out_teacher_lse)


def jsd_backward(student: Head, teacher: Head, beta: float, stats: JSDStats, grad: torch.Tensor,
                 needs: GradNeeds) -> HeadGrads:
    """Gradients of Σ_n grad_n · JSD_n: ∂/∂z = grad·(w − p·Σw), recomputing both sides' logits blockwise."""
    lse, teacher_lse, w_sum = stats.lse, stats.teacher_lse, stats.w_sum

    def dz_rows(z, teacher_z, rows, _cols):
        dz = rowmath.jsd_backward_rows_(z, teacher_z, beta, lse[rows], teacher_lse[rows], w_sum[rows])
        dz.mul_(grad[rows, None])

    return dense_backward(student, dz_rows, needs, teacher=teacher)
