"""The one-sweep loss of the cuBLAS backend: Σ_n w_n·D_n and its gradients, formed in the forward.

Blocks hold whole vocabulary rows (``_blocks.full_row_plan``): a row's divergence, hence its ∂D/∂z, is
known only once all of its logits have been seen. Per row block:

- Top-K JSD: the teacher is reduced first, by its own forward sweep (``row_stats``: 1 GEMM, its lse and
  top-k), so that only the student's float32 block must fit. Then one GEMM writes the student's rows;
  ``stats_kernel`` reads them once (lse, top-k); the support's logits are read from the block
  (``block_gather_kernel``) and, on the teacher's side, taken from its sweep or gathered from its weights
  (``gather_kernel``: the student's top-k ids outside the teacher's); ``rowmath.topk_jsd_terms`` forms the
  value and the gradient coefficients on the support ([rows, ≤ 2K], torch); ``grad_kernel`` reads the
  block again and writes da = w_n·(p·row_coef + support terms)·∂z/∂a over it; two GEMMs contract it.
- full JSD: both sides' rows are needed per logit, so both blocks are held (two GEMMs); per side one
  read for the lse (``stats_kernel``), one read of both for value and Σ w (``jsd_stats_kernel``), one
  for da (``jsd_grad_kernel``); two GEMMs.

Work: 4 logits-GEMM equivalents (student, teacher, d hidden, d weight), where the per-row path needs 5
(Top-K) or 6 (full JSD). d hidden of a row block is written once; d weight [V, H] (float32) is
accumulated once per row block — the reason for few, large row blocks.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import triton

from ... import config, rowmath
from ..base import DivergenceSpec, GradNeeds, Head, HeadGrads
from ..triton._launch import interpreting
from . import _work
from ._blocks import MAX_K, Side, block_view, full_row_plan, operand_view, tiles
from .block_gather_kernel import block_gather
from .gather_kernel import gather_head_logits
from .grad_kernel import head_grad
from .head_backward import new_grads
from .jsd import jsd_scalars, row_lse, two_sided_buffers
from .jsd_grad_kernel import jsd_grad
from .jsd_stats_kernel import jsd_stats
from .keys import SENTINEL, unpack_keys
from .row_stats import row_stats
from .stats_kernel import block_stats, scratch_width

#: Fewest rows per block of whole rows (both sides) for the one-sweep loss to beat the per-row path: it saves
#: one GEMM of 4-5 but accumulates the float32 d weight once per row block (a read and a write of V·H·4
#: bytes), which stays under the saved GEMM's time from about 2·peak FLOPs / memory bandwidth ≈ 600 rows
#: per block on an H100 when that traffic does not overlap the GEMM at all, and far fewer when it does.
FUSED_MIN_ROWS = 256


def fused_loss_pays(student: Head) -> bool:
    """Whether the two-sided blocks of whole rows hold at least ``FUSED_MIN_ROWS`` rows (a model, see above)."""
    row_bytes = student.vocab * 2 * _work.itemsize(student.dtype)
    return config.CUDA_BLOCK_BYTES // row_bytes >= FUSED_MIN_ROWS


def fused_loss(student: Head, teacher: Head, divergence: DivergenceSpec, row_weights: torch.Tensor,
               needs: GradNeeds) -> tuple[torch.Tensor, HeadGrads]:
    """``Backend.fused_loss``: per-row divergences and the gradients of Σ_n row_weights_n·D_n (compute dtype).
    ``divergence.k`` is None (the full JSD) or < V."""
    s_side, t_side = Side.of(student), Side.of(teacher)
    needs = needs.of(student)
    grads = new_grads(s_side, needs)
    value = torch.zeros(student.rows, dtype=s_side.dtype, device=student.hidden.device)
    if student.rows == 0:
        return value, grads
    weights = row_weights.to(s_side.dtype).contiguous()
    if divergence.k is None:
        _full_jsd_loss(s_side, t_side, divergence.beta, weights, value, grads, needs)
    else:
        _topk_jsd_loss(s_side, t_side, divergence, weights, value, grads, needs)
    return value, grads


def _full_jsd_loss(s_side: Side, t_side: Side, beta: float, weights, value, grads: HeadGrads, needs: GradNeeds):
    n, v = s_side.head.rows, s_side.head.vocab
    device = s_side.hidden.device
    scalars = jsd_scalars(beta, s_side, t_side)
    caps = (s_side.has_cap, t_side.has_cap)
    with _work.sweep("fused_loss"):
        plan = full_row_plan(n, v, s_side.itemsize + t_side.itemsize)
        s_buffer, t_buffer = two_sided_buffers(s_side, t_side, plan.elements)
        m_s, sum_s = (_work.workspace(plan.rows, s_side.dtype, device) for _ in range(2))
        m_t, sum_t = (_work.workspace(plan.rows, t_side.dtype, device) for _ in range(2))
        w_sum = _work.workspace(plan.rows, s_side.dtype, device)
        for rows, cols in plan.blocks():
            r = rows.stop - rows.start
            a = s_side.logits(block_view(s_buffer, r, v), rows, cols)
            teacher_a = t_side.logits(block_view(t_buffer, r, v), rows, cols)
            lse = row_lse(s_side, a, m_s[:r], sum_s[:r])
            teacher_lse = row_lse(t_side, teacher_a, m_t[:r], sum_t[:r])
            w_sum[:r].zero_()
            jsd_stats(a, teacher_a, 0, s_side.bias, t_side.bias, scalars, caps, beta, lse, teacher_lse, value[rows],
                      w_sum[:r], tiles=tiles("jsd"))
            if needs.any:
                dz = operand_view(a, s_side.hidden.dtype)
                jsd_grad(a, teacher_a, dz, 0, s_side.bias, t_side.bias, scalars, caps, beta, lse, teacher_lse,
                         w_sum[:r], weights[rows], tiles=tiles("jsd"))
                s_side.grads_into(grads, dz, rows, cols, first_col=True, first_row=rows.start == 0)


def _topk_jsd_loss(s_side: Side, t_side: Side, divergence: DivergenceSpec, weights, value, grads: HeadGrads,
                   needs: GradNeeds):
    k, beta, support = divergence.k, divergence.beta, divergence.support
    n, v = s_side.head.rows, s_side.head.vocab
    device, dtype = s_side.hidden.device, s_side.dtype
    wide = torch.float64
    student_k = k if support in ("union", "student") else 0
    # the teacher's side, reduced by its own sweep: its lse and (unless the support is the student's) top-k
    teacher = row_stats(t_side.head, k=k if support != "student" else 0, with_mean_logit=False, lse_dtype=wide)
    # a k beyond the kernel's top set (or float64 logits, whose ties float32 keys would blur): torch ranks
    # the block's logits, as the row statistics' wide path does
    big_k = student_k > MAX_K or (student_k > 0 and dtype == torch.float64)
    kernel_k = 0 if big_k else student_k
    block_r, block_c, warps = tiles("stats_topk" if kernel_k else "stats")
    k_pad = max(2, triton.next_power_of_2(kernel_k)) if kernel_k else 0
    cap = scratch_width(k_pad, block_c) if k_pad else 0
    with _work.sweep("fused_loss"):
        plan = full_row_plan(n, v, s_side.itemsize, cap * 8)  # the block and the top-K scratch list per row
        buffer = _work.workspace(plan.elements, dtype, device)
        scratch = _work.workspace((plan.rows, cap), torch.int64, device) if k_pad else None
        m = _work.workspace(plan.rows, dtype, device)
        s = _work.workspace(plan.rows, dtype, device)
        top = _work.workspace((plan.rows, k_pad), torch.int64, device) if k_pad else None
        for rows, cols in plan.blocks():
            r = rows.stop - rows.start
            a = s_side.logits(block_view(buffer, r, v), rows, cols)
            m[:r].fill_(-math.inf)
            s[:r].zero_()
            if top is not None:
                top[:r].fill_(SENTINEL)
            block_stats(a, 0, s_side.bias, s_side.scalars, s_side.has_cap, m=m[:r], s=s[:r],
                        top=top[:r] if top is not None else None, k=kernel_k,
                        scratch=scratch[:r] if scratch is not None else None, tiles=(block_r, block_c, warps),
                        rank_select=interpreting())
            lse = m[:r].to(wide) + s[:r].log().to(wide)
            student_ids = None
            if kernel_k:
                student_ids, _ = unpack_keys(top[:r, :student_k])
            elif student_k:
                student_ids = _torch_topk_ids(a, s_side, student_k)
            ids, valid, student_z, teacher_z = _support_logits(a, s_side, t_side, rows, student_ids, teacher, support)
            student_logp = (student_z.to(wide) - lse[:, None]).to(dtype)
            teacher_logq = (teacher_z.to(wide) - teacher.lse[rows, None]).to(dtype)
            terms = rowmath.topk_jsd_terms(student_logp, teacher_logq, valid, beta, divergence.tail)
            value[rows] = terms.value
            if not needs.any:
                continue
            coef = weights[rows, None] * terms.support_coef
            if support != "union":  # the kernel finds a row's terms by binary search: ids ascending
                ids, order = ids.sort(dim=1)
                coef = coef.gather(1, order)
            dz = operand_view(a, s_side.hidden.dtype)
            head_grad(a, dz, 0, s_side.bias, s_side.scalars, s_side.has_cap, lse.to(dtype),
                      (weights[rows] * terms.row_coef).contiguous(), sparse=(ids.contiguous(), coef.contiguous()),
                      tiles=tiles("grad"))
            s_side.grads_into(grads, dz, rows, cols, first_col=True, first_row=rows.start == 0)


def _torch_topk_ids(a: torch.Tensor, side: Side, k: int) -> torch.Tensor:
    """Top-k ids of a block of whole rows ranked by torch (``rowmath.topk_ids``: the same tie rule), the
    logits formed by torch row chunk by row chunk (a quarter of the budget at a time)."""
    from ..torch._blocks import to_logits_

    ids = torch.empty((a.shape[0], k), dtype=torch.int64, device=a.device)
    step = max(1, config.CUDA_BLOCK_BYTES // 4 // max(1, a.shape[1] * a.element_size()))
    for r0 in range(0, a.shape[0], step):
        z = a[r0:r0 + step].clone()
        if side.bias is not None:
            z += side.bias.to(z.dtype)
        to_logits_(z, side.head)
        ids[r0:r0 + step] = rowmath.topk_ids(z, k)
    _work.torch_pass("topk_ids", a.numel(), a.numel() * a.element_size() * 4)
    return ids


def _support_logits(a: torch.Tensor, s_side: Side, t_side: Side, rows: slice, student_ids, teacher, support: str):
    """The support of the rows (ids [r, M], valid [r, M]) and both sides' logits on it: the student's read
    from its block; the teacher's from its sweep where the id is in its top-k, else gathered."""
    teacher_ids = teacher.topk_indices[rows] if teacher.topk_indices is not None else None
    teacher_top = teacher.topk_logits[rows] if teacher.topk_logits is not None else None
    teacher_head = replace(t_side.head, hidden=t_side.hidden[rows])
    if support == "union":
        ids, valid, order = rowmath.union_support(student_ids, teacher_ids, return_order=True)
        gathered = gather_head_logits(teacher_head, student_ids, t_side.dtype, tiles=tiles("gather"))
        teacher_z = torch.cat([gathered, teacher_top.to(t_side.dtype)], dim=1).gather(1, order)
        # an id in both top-k sits twice, the student's copy first and valid: give it the teacher's own value
        both = ids[:, :-1] == ids[:, 1:]
        teacher_z[:, :-1] = torch.where(both, teacher_z[:, 1:], teacher_z[:, :-1])
    elif support == "teacher":
        ids, teacher_z = teacher_ids, teacher_top.to(t_side.dtype)
        valid = torch.ones_like(ids, dtype=torch.bool)
    else:
        ids = student_ids
        teacher_z = gather_head_logits(teacher_head, ids, t_side.dtype, tiles=tiles("gather"))
        valid = torch.ones_like(ids, dtype=torch.bool)
    ids = ids.contiguous()
    student_z = torch.empty(ids.shape, dtype=s_side.dtype, device=a.device)
    block_gather(a, s_side.bias, s_side.scalars, s_side.has_cap, ids, student_z, tiles=tiles("block_gather"))
    return ids, valid, student_z, teacher_z
