"""The one-sweep loss of the cuBLAS backend: Σ_n loss_n of per-row terms and its gradients, formed in the
forward.

Blocks hold whole vocabulary rows: a row's terms, hence its ∂L/∂z, are known only once all of its logits
have been seen. Per row block:

- the per-row terms (``linear_policy_loss``; the Top-K JSD loss is its case loss_n = w_n·D_n): the
  teacher is reduced first, by its own forward sweep over its rows (``row_stats``: 1 GEMM, its lse and
  top-k), so that only the student's float32 block must fit. Then one GEMM writes the student's rows;
  ``stats_kernel`` reads them once (lse, Σ p·z, the target logit, the top-k of the rows with a teacher);
  the support's logits are read from the block (``block_gather_kernel``) and, on the teacher's side, taken
  from its sweep or gathered from its weights (``gather_kernel``: the student's top-k ids outside the
  teacher's); ``rowmath.topk_jsd_terms`` forms the divergence and its coefficients on the support ([rows,
  ≤ 2K], torch); the row loss gives ∂loss_n/∂(logp, H, D) (``RowLoss``, once per block);
  ``grad_kernel`` reads the block again and writes da = (p·(row_coef + logit_coef·(z − Σp·z)) +
  target one-hot + support terms)·∂z/∂a over it; two GEMMs contract it;
- the full JSD loss (Σ w_n·JSD_n): both sides' rows are needed per logit, so both blocks are held (two
  GEMMs); per side one read for the lse (``stats_kernel``), one read of both for value and Σ w
  (``jsd_stats_kernel``), one for da (``jsd_grad_kernel``); two GEMMs.

Work: 4 logits-GEMM equivalents with a teacher (student, teacher, d hidden, d weight), 3 without, where the
per-row path needs 5 (Top-K), 6 (full JSD) or 4 (log-prob + entropy). d hidden of a row block is written
once; d weight [V, H] is accumulated once per row block, in float32: for a 16-bit weight that is a float32
buffer of V·H·4 bytes beside the gradient (2.32 GiB at V = 151936, H = 4096), read and written once per row
block. ``fused_loss_pays`` weighs it (see there).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import triton

from ... import config, rowmath
from ..base import DivergenceSpec, GradNeeds, Head, HeadGrads, RowGrads, RowLoss, RowTerms, as_row_loss
from ..triton._launch import interpreting
from . import _work
from ._blocks import MAX_K, Plan, Side, block_view, operand_view, tiles
from .block_gather_kernel import block_gather
from .gather_kernel import gather_head_logits
from .grad_kernel import head_grad
from .jsd import jsd_scalars, row_lse, two_sided_buffers
from .jsd_grad_kernel import jsd_grad
from .jsd_stats_kernel import jsd_stats
from .keys import SENTINEL, unpack_keys
from .row_stats import row_stats
from .stats_kernel import block_stats, scratch_width

#: Fewest rows per block of whole rows for the one-sweep loss to beat the per-row path: it saves one GEMM of
#: 4-5 (of 3-4 without a teacher) but accumulates d weight once per row block (a read and a write of V·H·4
#: bytes), which stays under the saved GEMM's time from about 2·peak FLOPs / memory bandwidth ≈ 600 rows per
#: block on an H100 when that traffic does not overlap the GEMM at all, and far fewer when it does.
FUSED_MIN_ROWS = 256
#: Whether the d weight accumulator counts against ``config.CUDA_BLOCK_BYTES`` (the working-memory budget).
#: Off, the one sweep runs wherever its blocks pay, holding the accumulator beyond the budget (the work
#: model's row "one sweep, budget + accumulator" counts it so).
ACCUMULATOR_IN_BUDGET = True


def accumulator_bytes(student: Head) -> int:
    """The float32 d weight buffer the one-sweep loss holds beside the gradient, as far as it counts against
    the budget: V·H·4 bytes for a weight in another dtype than its compute dtype (bf16, fp16), none for a
    float32/float64 weight (the gradient is the accumulator) or with ``ACCUMULATOR_IN_BUDGET`` off. The per-row
    path writes each d weight slice once and needs none."""
    weight = student.weight
    if weight.dtype == student.dtype or not ACCUMULATOR_IN_BUDGET:
        return 0
    return weight.shape[0] * weight.shape[1] * 4


def fused_loss_pays(student: Head, teacher: Head | None = None) -> bool:
    """Whether the one-sweep loss pays here: blocks of ≥ ``FUSED_MIN_ROWS`` whole rows fit the working-memory
    budget ``config.CUDA_BLOCK_BYTES`` beside its d weight accumulator (``accumulator_bytes``).

    A model, not a measurement. At N = 8192, V = 151936, H = 4096: with a bf16 weight the accumulator
    (2.32 GiB) alone exceeds the budget, and the per-row path runs (5 GEMMs with a teacher, 4 without, each
    d weight slice written once, ≤ 1 GiB); with a float32 weight the blocks hold 1,546 rows (773 with both
    sides) and the one sweep runs (4 GEMMs, 3). Holding the accumulator beyond the budget
    (``ACCUMULATOR_IN_BUDGET`` off) buys the one sweep for 16-bit weights: docs/gpu_model.md counts both.
    """
    sides = 1 if teacher is None else 2
    row_bytes = student.vocab * sides * _work.itemsize(student.dtype)
    budget = config.CUDA_BLOCK_BYTES - accumulator_bytes(student)
    return budget > 0 and budget // row_bytes >= FUSED_MIN_ROWS


def _plan(n: int, v: int, bytes_per_row: int, budget: int) -> Plan:
    """Blocks of whole rows within ``budget`` (at least one row), of equal size."""
    n1 = max(n, 1)
    rows = max(1, budget // max(1, bytes_per_row))
    parts = -(-n1 // min(n1, rows))
    return Plan(n, v, -(-n1 // parts), v)


def _new_grads(side: Side, needs: GradNeeds) -> HeadGrads:
    """Compute-dtype gradient buffers: d hidden written once per row block, d weight (the float32 accumulator
    of a 16-bit weight) written by the first block and accumulated by the others, d bias accumulated."""
    n, v, h = side.head.rows, side.head.vocab, side.hidden.shape[1]
    device = side.hidden.device
    grads = HeadGrads(torch.empty((n, h), dtype=side.dtype, device=device) if needs.hidden else None,
                      torch.empty((v, h), dtype=side.dtype, device=device) if needs.weight else None,
                      torch.zeros(v, dtype=side.dtype, device=device) if needs.bias else None)
    if n == 0 and grads.weight is not None:
        grads.weight.zero_()
    return grads


def fused_loss(student: Head, teacher: Head | None, divergence: DivergenceSpec | None, row_loss, needs: GradNeeds, *,
               targets: torch.Tensor | None = None) -> tuple[torch.Tensor, HeadGrads]:
    """``Backend.fused_loss``: the per-row divergence [n] and the gradients of Σ loss_n (compute dtype).
    ``divergence.k`` is None (the full JSD, in a weighted sum of divergences only) or < V."""
    row_loss = as_row_loss(row_loss)
    s_side = Side.of(student)
    needs = needs.of(student)
    grads = _new_grads(s_side, needs)
    value = torch.zeros(student.rows, dtype=s_side.dtype, device=student.hidden.device)
    if student.rows == 0:
        return value, grads
    if teacher is not None and divergence.k is None:
        if row_loss.logprobs or not row_loss.constant:
            raise NotImplementedError("the one-sweep loss takes the full JSD only in a weighted sum of divergences")
        weights = row_loss(slice(0, student.rows), RowTerms(None, None, value)).jsd.to(s_side.dtype).contiguous()
        _full_jsd_loss(s_side, Side.of(teacher), divergence.beta, weights, value, grads, needs)
    else:
        if row_loss.logprobs and targets is None:
            raise ValueError("a row loss that reads log-probs needs the targets")
        _row_loss_sweep(s_side, None if teacher is None else Side.of(teacher), divergence, row_loss, targets, value,
                        grads, needs)
    return value, grads


def _full_jsd_loss(s_side: Side, t_side: Side, beta: float, weights, value, grads: HeadGrads, needs: GradNeeds):
    n, v = s_side.head.rows, s_side.head.vocab
    device = s_side.hidden.device
    scalars = jsd_scalars(beta, s_side, t_side)
    caps = (s_side.has_cap, t_side.has_cap)
    with _work.sweep("fused_loss"):
        plan = _plan(n, v, v * (s_side.itemsize + t_side.itemsize), config.CUDA_BLOCK_BYTES - accumulator_bytes(
            s_side.head))
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


def _row_loss_sweep(s_side: Side, t_side: Side | None, divergence: DivergenceSpec | None, row_loss: RowLoss,
                    targets, value, grads: HeadGrads, needs: GradNeeds):
    """The one sweep of a row loss of (log-prob, entropy, Top-K JSD): see the module doc. The teacher's rows
    are the student's first ``t_side.head.rows``."""
    n, v = s_side.head.rows, s_side.head.vocab
    n_teacher = 0 if t_side is None else t_side.head.rows
    device, dtype = s_side.hidden.device, s_side.dtype
    wide = torch.float64
    k = 0 if t_side is None else divergence.k
    support = None if t_side is None else divergence.support
    # the top-k each side needs: its support's, and both for the overlap diagnostic
    student_k = k if support in ("union", "student") or (k and row_loss.overlap) else 0
    teacher_k = k if support in ("union", "teacher") or (k and row_loss.overlap) else 0
    # the teacher's side, reduced by its own sweep over its rows: its lse and top-k
    teacher = None
    if n_teacher:
        teacher = row_stats(t_side.head, k=teacher_k, with_mean_logit=False, lse_dtype=wide)
    # a k beyond the kernel's top set (or float64 logits, whose ties float32 keys would blur): torch ranks
    # the block's logits, as the row statistics' wide path does
    big_k = student_k > MAX_K or (student_k > 0 and dtype == torch.float64)
    kernel_k = 0 if big_k else student_k
    block_r, block_c, warps = tiles("stats_topk" if kernel_k else "stats")
    k_pad = max(2, triton.next_power_of_2(kernel_k)) if kernel_k else 0
    cap = scratch_width(k_pad, block_c) if k_pad else 0
    with_logprobs = row_loss.logprobs
    with _work.sweep("fused_loss"):
        # the block and the top-K scratch list per row, beside the d weight accumulator
        plan = _plan(n, v, v * s_side.itemsize + cap * 8, config.CUDA_BLOCK_BYTES - accumulator_bytes(s_side.head))
        buffer = _work.workspace(plan.elements, dtype, device)
        scratch = _work.workspace((plan.rows, cap), torch.int64, device) if k_pad else None
        m = _work.workspace(plan.rows, dtype, device)
        s = _work.workspace(plan.rows, dtype, device)
        t = _work.workspace(plan.rows, dtype, device) if with_logprobs else None
        target = _work.workspace(plan.rows, dtype, device) if with_logprobs else None
        top = _work.workspace((plan.rows, k_pad), torch.int64, device) if k_pad else None
        for rows, cols in plan.blocks():
            r = rows.stop - rows.start
            j = max(0, min(rows.stop, n_teacher) - rows.start)  # the block's rows with a teacher: its first j
            a = s_side.logits(block_view(buffer, r, v), rows, cols)
            m[:r].fill_(-math.inf)
            s[:r].zero_()
            if t is not None:
                t[:r].zero_()
            with_top = top is not None and j > 0
            if with_top:
                top[:r].fill_(SENTINEL)
            block_stats(a, 0, s_side.bias, s_side.scalars, s_side.has_cap, m=m[:r], s=s[:r],
                        t=t[:r] if t is not None else None,
                        targets=targets[rows] if with_logprobs else None,
                        target=target[:r] if with_logprobs else None,
                        top=top[:r] if with_top else None, k=kernel_k if with_top else 0,
                        scratch=scratch[:r] if with_top else None, tiles=(block_r, block_c, warps),
                        rank_select=interpreting())
            lse = m[:r].to(wide) + s[:r].log().to(wide)
            logp = entropy = mean = None
            if with_logprobs:
                mean = m[:r].to(wide) + (t[:r] / s[:r]).to(wide)
                logp = (target[:r].to(wide) - lse).to(dtype)
                entropy = (lse - mean).to(dtype)
            jsd = torch.zeros(r, dtype=dtype, device=device)
            overlap = teacher_mass = None
            if row_loss.overlap and n_teacher:
                overlap, teacher_mass = torch.zeros_like(jsd), torch.zeros_like(jsd)
            sparse = None
            row_coef_jsd = None
            if j:
                jsd_rows = slice(rows.start, rows.start + j)
                student_ids = None
                if student_k:
                    student_ids = (unpack_keys(top[:j, :student_k])[0] if kernel_k
                                   else _torch_topk_ids(a[:j], s_side, student_k))
                teacher_ids = teacher.topk_indices[jsd_rows] if teacher.topk_indices is not None else None
                ids, valid, student_z, teacher_z = _support_logits(a[:j], s_side, t_side, jsd_rows, student_ids,
                                                                   teacher, support)
                student_logp = (student_z.to(wide) - lse[:j, None]).to(dtype)
                teacher_logq = (teacher_z.to(wide) - teacher.lse[jsd_rows, None]).to(dtype)
                terms = rowmath.topk_jsd_terms(student_logp, teacher_logq, valid, divergence.beta, divergence.tail)
                jsd[:j] = terms.value
                if overlap is not None:
                    overlap[:j] = rowmath.overlap_fraction(student_ids, teacher_ids, dtype)
                    teacher_mass[:j] = terms.teacher_mass
                sparse = (ids, terms.support_coef)
                row_coef_jsd = terms.row_coef
            value[rows] = jsd
            g = row_loss(rows, RowTerms(logp, entropy, jsd, overlap, teacher_mass))
            if not needs.any:
                continue
            _block_grads(a, s_side, grads, rows, cols, lse.to(dtype), mean, g, j, sparse, row_coef_jsd,
                         targets[rows] if g.logp is not None else None, support, needs)


def _block_grads(a, s_side: Side, grads, rows, cols, lse, mean, g: RowGrads, j: int, sparse, row_coef_jsd, targets,
                 support, needs):
    """da of a block of whole rows over the block (``grad_kernel``), then its two gradient GEMMs."""
    r = rows.stop - rows.start
    dtype = a.dtype
    row_coef = torch.zeros(r, dtype=dtype, device=a.device)
    if g.logp is not None:
        row_coef -= g.logp.to(dtype)
    sparse_args = None
    if sparse is not None and g.jsd is not None:
        ids, support_coef = sparse
        g_jsd = g.jsd[:j].to(dtype)
        row_coef[:j] += g_jsd * row_coef_jsd
        coef = g_jsd[:, None] * support_coef
        if support != "union":  # the kernel finds a row's terms by binary search: ids ascending
            ids, order = ids.sort(dim=1)
            coef = coef.gather(1, order)
        if j < r:  # rows without a teacher: no terms (id 0, coefficient 0)
            ids = torch.cat([ids, ids.new_zeros((r - j, ids.shape[1]))])
            coef = torch.cat([coef, coef.new_zeros((r - j, coef.shape[1]))])
        sparse_args = (ids.contiguous(), coef.contiguous())
    logit_coef = logit_shift = None
    if g.entropy is not None:  # ∂H/∂z = −p·(z − Σ p·z)
        logit_coef = (-g.entropy).to(dtype).contiguous()
        logit_shift = mean.to(dtype).contiguous()
    dz = operand_view(a, s_side.hidden.dtype)
    head_grad(a, dz, 0, s_side.bias, s_side.scalars, s_side.has_cap, lse.contiguous(), row_coef.contiguous(),
              logit_coef=logit_coef, logit_shift=logit_shift, targets=targets,
              target_coef=None if targets is None else g.logp.to(dtype).contiguous(), sparse=sparse_args,
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
