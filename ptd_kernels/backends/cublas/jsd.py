"""The full-vocabulary JSD_β by the cuBLAS backend: a forward in blocks of whole rows of both sides, and
a recomputing backward in vocabulary blocks of both sides.

Forward (``_blocks.full_row_plan`` of both sides' float32 logits): per row block, two GEMMs (student,
teacher), the logsumexps of the rows by ``stats_kernel`` (one read of each side; skipped for a side
whose lse the caller gives), then value and Σ w by ``jsd_stats_kernel`` (one read of each side).
Backward (``vocab_plan``): per block, two GEMMs recompute both sides, ``jsd_grad_kernel`` writes
da over the student block (one read of each side, a 2-byte write), two GEMMs contract it.
Work: 2 + 4 = 6 logits-GEMM equivalents per row (the per-row form's least: the divergence needs both
logsumexps before any of its terms).
"""

from __future__ import annotations

import math

import torch

from ..base import GradNeeds, Head, HeadGrads, JSDStats
from ..triton._launch import interpreting
from . import _work
from ._blocks import Side, block_view, full_row_plan, operand_view, slice_bytes, tiles, vocab_plan
from .head_backward import SweepGrads
from .jsd_grad_kernel import jsd_grad
from .jsd_stats_kernel import jsd_stats
from .stats_kernel import block_stats
from .transform import pack


def jsd_scalars(beta: float, student: Side, teacher: Side) -> tuple[int, ...]:
    """β, log β, log(1 − β), the student's (s/τ, s/c, c/τ) and the teacher's, as the JSD kernels' arguments
    (``transform.pack``; log β and log(1 − β) in double precision on the host; only 0 < β < 1 reads them)."""
    log_beta = math.log(beta) if beta > 0.0 else 0.0
    log1m_beta = math.log1p(-beta) if beta < 1.0 else 0.0
    return pack(beta, log_beta, log1m_beta, *student.head.transform_scalars(), *teacher.head.transform_scalars())


def row_lse(side: Side, block: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float64 logsumexps of a block of whole rows (``m``, ``s``: the rows' fresh statistics buffers)."""
    m.fill_(-math.inf)
    s.zero_()
    block_stats(block, 0, side.bias, side.scalars, side.has_cap, m=m, s=s, tiles=tiles("stats"),
                rank_select=interpreting())
    return m.to(torch.float64) + s.log().to(torch.float64)


def two_sided_buffers(student: Side, teacher: Side, elements: int):
    device = student.hidden.device
    return (_work.workspace(elements, student.dtype, device), _work.workspace(elements, teacher.dtype, device))


def jsd_forward(student: Head, teacher: Head, beta: float, *, lse: torch.Tensor | None = None,
                teacher_lse: torch.Tensor | None = None) -> JSDStats:
    """``Backend.jsd_forward``: value and Σ w per row (the student's compute dtype) and both lse (float64
    when computed here: z − lse is then exact before it is rounded)."""
    s_side, t_side = Side.of(student), Side.of(teacher)
    n, v = student.rows, student.vocab
    device = student.hidden.device
    value = torch.zeros(n, dtype=s_side.dtype, device=device)
    w_sum = torch.zeros_like(value)
    out_lse = torch.empty(n, dtype=torch.float64, device=device) if lse is None else lse
    out_teacher_lse = torch.empty(n, dtype=torch.float64, device=device) if teacher_lse is None else teacher_lse
    scalars = jsd_scalars(beta, s_side, t_side)
    with _work.sweep("jsd_forward"):
        plan = full_row_plan(n, v, s_side.itemsize + t_side.itemsize)
        s_buffer, t_buffer = two_sided_buffers(s_side, t_side, plan.elements if n else 0)
        m_s, sum_s = (_work.workspace(plan.rows, s_side.dtype, device) for _ in range(2))
        m_t, sum_t = (_work.workspace(plan.rows, t_side.dtype, device) for _ in range(2))
        for rows, cols in plan.blocks():
            r = rows.stop - rows.start
            a = s_side.logits(block_view(s_buffer, r, v), rows, cols)
            teacher_a = t_side.logits(block_view(t_buffer, r, v), rows, cols)
            if lse is None:
                out_lse[rows] = row_lse(s_side, a, m_s[:r], sum_s[:r])
            if teacher_lse is None:
                out_teacher_lse[rows] = row_lse(t_side, teacher_a, m_t[:r], sum_t[:r])
            jsd_stats(a, teacher_a, 0, s_side.bias, t_side.bias, scalars, (s_side.has_cap, t_side.has_cap), beta,
                      _normalizer(out_lse[rows], s_side.dtype), _normalizer(out_teacher_lse[rows], s_side.dtype),
                      value[rows], w_sum[rows], tiles=tiles("jsd"))
    return JSDStats(value, w_sum, out_lse, out_teacher_lse)


def _normalizer(lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """lse as the kernels read it: float64 stays float64 (an exact normalizer), else the block dtype."""
    return (lse if lse.dtype == torch.float64 else lse.to(dtype)).contiguous()


def jsd_backward(student: Head, teacher: Head, beta: float, stats: JSDStats, grad: torch.Tensor,
                 needs: GradNeeds) -> HeadGrads:
    """``Backend.jsd_backward``: gradients of Σ_n grad_n·JSD_n, ∂/∂z = grad·(w − p·Σw); d weight and d bias
    in their inputs' dtypes, d hidden in the compute dtype (``SweepGrads``)."""
    s_side, t_side = Side.of(student), Side.of(teacher)
    needs = needs.of(student)
    n, v = student.rows, student.vocab
    with _work.sweep("jsd_backward"):
        plan = vocab_plan(n, v, s_side.itemsize + t_side.itemsize, slice_bytes(student))
        grads = SweepGrads(s_side, needs, plan)
        if n == 0 or not needs.any:
            return grads.result()
        scalars = jsd_scalars(beta, s_side, t_side)
        lse, teacher_lse = _normalizer(stats.lse, s_side.dtype), _normalizer(stats.teacher_lse, s_side.dtype)
        w_sum, grad = stats.w_sum.to(s_side.dtype).contiguous(), grad.to(s_side.dtype).contiguous()
        s_buffer, t_buffer = two_sided_buffers(s_side, t_side, plan.elements)
        for rows, cols in plan.blocks(columns_outer=True):
            r, c = rows.stop - rows.start, cols.stop - cols.start
            a = s_side.logits(block_view(s_buffer, r, c), rows, cols)
            teacher_a = t_side.logits(block_view(t_buffer, r, c), rows, cols)
            dz = operand_view(a, student.hidden.dtype)
            jsd_grad(a, teacher_a, dz, cols.start, s_side.bias, t_side.bias, scalars, (s_side.has_cap, t_side.has_cap),
                     beta, lse[rows], teacher_lse[rows], w_sum[rows], grad[rows], tiles=tiles("jsd"))
            grads.add(dz, rows, cols)
    return grads.result()
