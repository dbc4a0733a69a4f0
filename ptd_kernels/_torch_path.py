"""The chunked PyTorch backend (CPU, and the fallback everywhere).

Same memory rule as the Triton kernels: logits exist only as bounded blocks, one
[rows, V] (forward) or [N, cols] / [rows, V] (backward) float32 block of at most
``CHUNK_BYTES`` at a time, recomputed in the backward pass. Nothing grows with N·V.

Backward passes tile along whichever axis makes the accumulated gradient the smaller one:
vocabulary blocks (accumulating d hidden, [N, H]) when N ≤ V, row blocks (accumulating
d weight, [V, H]) otherwise.

All functions take only live rows (the functional layer strips masked rows first) and
return float32 statistics (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _rowmath

CHUNK_BYTES = 32 << 20  # all live temporaries of one logits block (each op divides by its buffer count)


class RowStats(NamedTuple):
    lse: torch.Tensor
    mean_logit: torch.Tensor | None
    target_logit: torch.Tensor | None
    topk_indices: torch.Tensor | None
    topk_logits: torch.Tensor | None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(count: int, other: int, itemsize: int) -> int:
    """How many rows (or columns) of a [count, other] block fit in CHUNK_BYTES."""
    return max(1, min(count, CHUNK_BYTES // max(1, other * itemsize)))


def _logits(hidden, weight, bias, temperature: float) -> torch.Tensor:
    z = hidden @ weight.T
    if bias is not None:
        z += bias
    if temperature != 1.0:
        z /= temperature
    return z


def _logits_into(out, hidden, weight, bias) -> torch.Tensor:
    """hidden @ weightᵀ (+ bias) written into ``out`` (no 1/τ: callers scale sub-blocks in cache)."""
    if bias is None:
        return torch.mm(hidden, weight.T, out=out)
    return torch.addmm(bias, hidden, weight.T, out=out)


def _prepare(hidden, weight, bias):
    dtype = compute_dtype(weight.dtype)
    return dtype, hidden.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)


# ----------------------------------------------------------------------------- forward


ROW_BLOCK = 1024  # rows per forward block: large enough that each weight block is read few times


def _merge_topk(values, ids, k):
    """Top-k of [n, m] candidates with ties to the smaller id (exact in any dtype: two stable sorts)."""
    by_id = ids.argsort(dim=-1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = values.argsort(dim=-1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), ids.gather(1, by_value)


@torch.no_grad()
def row_stats(hidden, weight, bias, temperature, targets=None, k=0, *, with_mean_logit=True) -> RowStats:
    """Per-row logsumexp, Σ p·z, target logit and top-k (ids, logits) in one sweep.

    Blocks of up to ROW_BLOCK rows × as many vocabulary columns as CHUNK_BYTES allows, with an
    online logsumexp (running max m, Σ e^{z−m}, Σ e^{z−m}·z) and a running top-k merged block by
    block, so each weight block is read once per row block (not once per small row chunk).
    """
    dtype, hidden, weight, bias = _prepare(hidden, weight, bias)
    n, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    lse = torch.empty(n, dtype=dtype, device=device)
    mean_logit = torch.empty_like(lse) if with_mean_logit else None
    target_logit = torch.empty_like(lse) if targets is not None else None
    top_ids = torch.empty((n, k), dtype=torch.int64, device=device) if k else None
    top_logits = torch.empty((n, k), dtype=dtype, device=device) if k else None
    rows_step = min(n, ROW_BLOCK) if n else 1
    cols_step = max(min(vocab, max(k, 128)), _block(vocab, rows_step, 4 * 5))
    for r0 in range(0, n, rows_step):
        rows = slice(r0, min(n, r0 + rows_step))
        h = hidden[rows]
        m = torch.full((h.shape[0], 1), -math.inf, dtype=dtype, device=device)
        e_sum = torch.zeros_like(m)
        ez_sum = torch.zeros_like(m)
        run_values = run_ids = None
        for c0 in range(0, vocab, cols_step):
            c1 = min(vocab, c0 + cols_step)
            z = _logits(h, weight[c0:c1], bias[c0:c1] if bias is not None else None, temperature)
            if targets is not None:
                local = targets[rows] - c0
                inside = (local >= 0) & (local < c1 - c0)
                picked = z.gather(1, local.clamp(0, c1 - c0 - 1)[:, None]).squeeze(1)
                target_logit[rows] = torch.where(inside, picked, target_logit[rows])
            if k:
                block_ids = _rowmath.topk_ids(z, min(k, c1 - c0))
                block_values = z.gather(1, block_ids)
                block_ids += c0
                if run_ids is not None:
                    block_values = torch.cat([run_values, block_values], dim=-1)
                    block_ids = torch.cat([run_ids, block_ids], dim=-1)
                run_values, run_ids = _merge_topk(block_values, block_ids, k)
            # Online logsumexp: rescale the running sums to the new max; one exp per element.
            # S = Σ e^{z−m}, T = Σ e^{z−m}·(z − m); on a new max m', S ← S·e^{m−m'} and
            # T ← (T + (m − m')·S)·e^{m−m'} (guarded for the first block, where S = 0 and m = −inf).
            m_new = torch.maximum(m, z.amax(-1, keepdim=True))
            seen = e_sum > 0
            scale = torch.where(seen, torch.exp(m - m_new), torch.zeros_like(m))
            if with_mean_logit:
                shift = torch.where(seen, m - m_new, torch.zeros_like(m))
                ez_sum = (ez_sum + shift * e_sum) * scale
            z -= m_new
            e = z.exp()
            e_sum = e_sum * scale + e.sum(-1, keepdim=True)
            if with_mean_logit:
                ez_sum += e.mul_(z).sum(-1, keepdim=True)
            m = m_new
        lse[rows] = (m + e_sum.log()).squeeze(-1)
        if with_mean_logit:
            mean_logit[rows] = (m + ez_sum / e_sum).squeeze(-1)
        if k:
            top_logits[rows], top_ids[rows] = run_values, run_ids
    return RowStats(lse, mean_logit, target_logit, top_ids, top_logits)


@torch.no_grad()
def jsd_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, beta):
    """Full-vocabulary JSD_β per row with Σw (for the backward) and both logsumexps."""
    dtype, hidden, weight, bias = _prepare(hidden, weight, bias)
    _, teacher_hidden, teacher_weight, teacher_bias = _prepare(teacher_hidden, teacher_weight, teacher_bias)
    n, vocab = hidden.shape[0], weight.shape[0]
    value, w_sum, lse, teacher_lse = (torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(4))
    step = _block(n, vocab, 4 * 10)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        z = _logits(hidden[r0:r1], weight, bias, temperature)
        teacher_z = _logits(teacher_hidden[r0:r1], teacher_weight, teacher_bias, temperature)
        lse[r0:r1] = torch.logsumexp(z, dim=-1)
        teacher_lse[r0:r1] = torch.logsumexp(teacher_z, dim=-1)
        # log_softmax rather than z − lse: a rounded lse would shift every log-prob of the row and
        # leave Σp ≠ 1, which shows as small negative divergences at LLM-sized logits.
        d, w = _rowmath.jsd_pointwise(torch.log_softmax(z, -1), torch.log_softmax(teacher_z, -1), beta)
        value[r0:r1], w_sum[r0:r1] = d.sum(-1), w.sum(-1)
    return value, w_sum, lse, teacher_lse


# ----------------------------------------------------------------------------- backward


def _add_sparse(dz, r0, r1, c0, c1, sparse):
    """Add the sparse terms (row_index [m], ids [m, M], coef [m, M]) that fall in the block rows
    [r0, r1) × columns [c0, c1) into dz, before the block's GEMMs (so that dense and sparse parts
    cancel before they multiply hidden, not after)."""
    for row_index, ids, coef in sparse:
        inside = (ids >= c0) & (ids < c1) & ((row_index >= r0) & (row_index < r1))[:, None]
        if bool(inside.any()):
            block_rows = row_index[:, None].expand_as(ids)[inside] - r0
            dz.index_put_((block_rows, ids[inside] - c0), coef[inside].to(dz.dtype), accumulate=True)


def _dense_backward(hidden, weight, bias, temperature, dz_block, need_hidden, need_weight, need_bias, buffers,
                    sparse=()):
    """Run ``dz_block(z, rows, cols) -> dz`` over bounded logits blocks, add the sparse terms, and
    contract into gradients.

    Returns compute-dtype (grad_hidden, grad_weight, grad_bias), the 1/τ applied.
    """
    dtype, hidden, weight, bias = _prepare(hidden, weight, bias)
    n, h = hidden.shape
    vocab = weight.shape[0]
    grad_hidden = torch.zeros((n, h), dtype=dtype, device=hidden.device) if need_hidden else None
    grad_weight = torch.zeros((vocab, h), dtype=dtype, device=hidden.device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=dtype, device=hidden.device) if need_bias else None
    itemsize = torch.finfo(dtype).bits // 8 * buffers
    if n <= vocab:  # vocabulary blocks over all rows: d weight is written once, d hidden accumulates
        step = _block(vocab, n, itemsize)
        for c0 in range(0, vocab, step):
            cols = slice(c0, min(vocab, c0 + step))
            z = _logits(hidden, weight[cols], bias[cols] if bias is not None else None, temperature)
            dz = dz_block(z, slice(None), cols)
            _add_sparse(dz, 0, n, cols.start, cols.stop, sparse)
            if need_hidden:
                grad_hidden.addmm_(dz, weight[cols])
            if need_weight:
                torch.mm(dz.T, hidden, out=grad_weight[cols])
            if need_bias:
                grad_bias[cols] = dz.sum(0)
    else:  # row blocks over the whole vocabulary: d hidden is written once, d weight accumulates
        step = _block(n, vocab, itemsize)
        for r0 in range(0, n, step):
            rows = slice(r0, min(n, r0 + step))
            z = _logits(hidden[rows], weight, bias, temperature)
            dz = dz_block(z, rows, slice(None))
            _add_sparse(dz, rows.start, rows.stop, 0, vocab, sparse)
            if need_hidden:
                torch.mm(dz, weight, out=grad_hidden[rows])
            if need_weight:
                grad_weight.addmm_(dz.T, hidden[rows])
            if need_bias:
                grad_bias += dz.sum(0)
    for g in (grad_hidden, grad_weight, grad_bias):
        if g is not None and temperature != 1.0:
            g /= temperature
    return grad_hidden, grad_weight, grad_bias


def head_backward(hidden, weight, bias, temperature, lse, row_coef, logit_coef=None, logit_shift=None, sparse=(),
                  *, need_hidden=True, need_weight=True, need_bias=True):
    """Gradients of dz = p·(row_coef + logit_coef·(z − logit_shift)) + Σ sparse terms, p = exp(z − lse).

    ``sparse``: (row_index [m], ids [m, M], coef [m, M]) triples (target one-hots, support
    corrections), added into each logits block before its GEMMs.
    """

    def dz_block(z, rows, cols):
        coef = row_coef[rows, None]
        if logit_coef is not None:
            shifted = z if logit_shift is None else z - logit_shift[rows, None]
            coef = coef + logit_coef[rows, None] * shifted
        z.sub_(lse[rows, None]).exp_()  # z now holds p (in place: one block alive)
        return z.mul_(coef)

    return _dense_backward(hidden, weight, bias, temperature, dz_block, need_hidden, need_weight, need_bias, 5,
                           sparse)


def jsd_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, beta, lse,
                 teacher_lse, w_sum, grad, *, need_hidden=True, need_weight=True, need_bias=True):
    """Gradients of Σ_n grad_n · JSD_n: dz = grad·(w − p·Σw), recomputing both sides' logits blockwise."""
    dtype, teacher_hidden, teacher_weight, teacher_bias = _prepare(teacher_hidden, teacher_weight, teacher_bias)

    def dz_block(z, rows, cols):
        teacher_z = _logits(teacher_hidden[rows], teacher_weight[cols],
                            teacher_bias[cols] if teacher_bias is not None else None, temperature)
        logp = z.sub_(lse[rows, None])
        _, w = _rowmath.jsd_pointwise(logp, teacher_z.sub_(teacher_lse[rows, None]), beta)
        return (w - logp.exp_() * w_sum[rows, None]).mul_(grad[rows, None])

    return _dense_backward(hidden, weight, bias, temperature, dz_block, need_hidden, need_weight, need_bias, 10)


# ----------------------------------------------------------------------------- loss level (grad in forward)


# The one-sweep loss keeps just two [rows, V] logits blocks (student, teacher) of CHUNK_BYTES in
# all; every elementwise step runs on sub-blocks of SUB_BLOCK_BYTES per buffer, which stay in the
# CPU caches (the ~12 passes of the JSD math then cost a fraction of what they cost on a 16 MiB
# block that lives in DRAM: measured 0.22 s vs 0.86 s for N=2048, V=32000 on 2 cores).
SUB_BLOCK_BYTES = 1 << 20
FUSED_BLOCK_BYTES = 48 << 20  # both logits blocks of a row block (~200 rows at V = 32k: the GEMMs run near full speed)
FUSED_LOSS_MIN_ROWS = 128  # below this many rows per block, re-reading the weights costs more than it saves


def _sub_rows(vocab: int, itemsize: int) -> int:
    return max(1, SUB_BLOCK_BYTES // max(1, vocab * itemsize))


def fused_loss_pays(vocab: int) -> bool:
    """Whether the one-sweep loss (full rows per block) beats the per-row path (backward in vocab blocks).

    Its blocks hold whole rows, so at large V they hold few rows, and each block re-reads both
    output layers and rewrites all of d weight (earlier measurement with 26-row blocks at V = 32000:
    24.8 s vs 12.2 s per row). With ≥ 128 rows per block (V ≲ 32k in float32) the GEMMs run at
    full speed and the sweep saves the recomputation: one GEMM in four.
    """
    return FUSED_BLOCK_BYTES // (vocab * 2 * 4) >= FUSED_LOSS_MIN_ROWS


def _loss_rows(z, teacher_z, beta, k, support, tail):
    """Per-row values and ∂D/∂z of full rows of logits (one sub-block); ∂D/∂z may alias z."""
    if k is None:
        return _rowmath.full_jsd_from_logits_(z, teacher_z, beta)
    ids, valid = _rowmath.support_ids(_rowmath.topk_ids(z, k), _rowmath.topk_ids(teacher_z, k), support)
    teacher_logq = teacher_z.gather(1, ids) - torch.logsumexp(teacher_z, dim=-1, keepdim=True)
    # p from one exp of the max-shifted logits; it is reused as the dense part of ∂D/∂z.
    row_max = z.amax(-1, keepdim=True)
    student_logp = z.gather(1, ids)
    p = z.sub_(row_max).exp_()
    p_sum = p.sum(-1, keepdim=True)
    student_logp -= row_max + p_sum.log()
    terms = _rowmath.topk_jsd_terms(student_logp, teacher_logq, valid, beta, tail)
    return terms.value, p.mul_(terms.row_coef[:, None] / p_sum).scatter_add_(1, ids, terms.support_coef)


def fused_loss(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, beta, weights, *,
               k=None, support="union", tail=True, need_hidden=True, need_weight=True, need_bias=True):
    """Σ_n weights_n · D_n and its gradients in one sweep of row blocks (no recomputation).

    ``k=None``: full-vocabulary JSD; else Top-K JSD with the given support and tail rule.
    Per row block: two GEMMs into the student and teacher logits buffers, the divergence and
    dz = weights_n/τ · ∂D_n/∂z written over the student logits sub-block by sub-block, then the
    two gradient GEMMs. Returns (per-row values, grad_hidden, grad_weight, grad_bias) in the
    compute dtype.
    """
    dtype, hidden, weight, bias = _prepare(hidden, weight, bias)
    _, teacher_hidden, teacher_weight, teacher_bias = _prepare(teacher_hidden, teacher_weight, teacher_bias)
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    itemsize = torch.finfo(dtype).bits // 8
    row_scale = weights.to(dtype) / temperature
    value = torch.empty(n, dtype=dtype, device=device)
    grad_hidden = torch.zeros((n, h), dtype=dtype, device=device) if need_hidden else None
    grad_weight = torch.zeros((vocab, h), dtype=dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=dtype, device=device) if need_bias else None
    step = max(1, min(n, FUSED_BLOCK_BYTES // (vocab * 2 * itemsize)))
    sub = _sub_rows(vocab, itemsize)
    z_buffer = torch.empty((min(n, step), vocab), dtype=dtype, device=device)
    teacher_buffer = torch.empty_like(z_buffer)
    with torch.no_grad():
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            z = _logits_into(z_buffer[: r1 - r0], hidden[r0:r1], weight, bias)
            teacher_z = _logits_into(teacher_buffer[: r1 - r0], teacher_hidden[r0:r1], teacher_weight, teacher_bias)
            for s0 in range(0, r1 - r0, sub):
                s1 = min(r1 - r0, s0 + sub)
                z_sub, teacher_sub = z[s0:s1], teacher_z[s0:s1]
                if temperature != 1.0:
                    z_sub /= temperature
                    teacher_sub /= temperature
                value[r0 + s0 : r0 + s1], grad_logits = _loss_rows(z_sub, teacher_sub, beta, k, support, tail)
                torch.mul(grad_logits, row_scale[r0 + s0 : r0 + s1, None], out=z_sub)  # dz, over the logits
            if need_hidden:
                torch.mm(z, weight, out=grad_hidden[r0:r1])
            if need_weight:
                grad_weight.addmm_(z.T, hidden[r0:r1])
            if need_bias:
                grad_bias += z.sum(0)
    return value, grad_hidden, grad_weight, grad_bias
