"""The chunked PyTorch backend (CPU, and the fallback everywhere).

Same memory rule as the Triton kernels: logits exist only as bounded blocks of at most
``CHUNK_BYTES`` (``FUSED_BLOCK_BYTES`` for the two-sided JSD forward, ``LOSS_BLOCK_BYTES``
for the one-sweep loss), recomputed in the backward pass. Nothing grows with N·V.

Two block levels, because a CPU has two speeds: each block is as large as the budget allows,
so its GEMMs run at full speed (a thin block re-streams the whole weight per call); the
elementwise math then walks it in sub-blocks of ``SUB_BLOCK_BYTES`` per buffer, which stay in
the core's cache (a dozen passes over a DRAM-sized block cost more than the GEMMs saved).
Temporaries are therefore sub-block-sized; a block holds just the logits (one side or two).

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

CHUNK_BYTES = 32 << 20  # one-sided logits block (per-row forward and backward sweeps)
FUSED_BLOCK_BYTES = 48 << 20  # both sides' full-row logits blocks of the per-row JSD forward
# The one-sweep loss's blocks (both sides, full rows). A GEMM whose M (rows) is small re-streams the
# whole weight per call: measured on 2 threads at V = 32000, H = 1024, the four GEMMs of the loss
# cost 3.63 s in 196-row blocks, 3.25 s in 256-row and 3.03 s in 342-row blocks vs 3.00 s unblocked.
# The loss trades this constant (not N·V) memory for speed; the per-row paths keep the smaller blocks.
LOSS_BLOCK_BYTES = 88 << 20
SUB_BLOCK_BYTES = 1 << 20  # elementwise sub-blocks, per buffer (a few of them stay in a 1-2 MiB L2)
ROW_BLOCK = 1024  # rows per forward block of row_stats: each weight block is read once per row block
FUSED_LOSS_MIN_ROWS = 128  # below this many rows per two-sided block, re-reading the weights costs more than it saves


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


def _sub_blocks(rows: int, cols: int, itemsize: int):
    """Row slices of a [rows, cols] block, each ~SUB_BLOCK_BYTES (cache-resident elementwise work)."""
    step = max(1, SUB_BLOCK_BYTES // max(1, cols * itemsize))
    return [slice(s0, min(rows, s0 + step)) for s0 in range(0, rows, step)]


def _view(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] block over a reused flat buffer (a new block per loop would keep
    two alive while the next GEMM writes)."""
    return flat[: rows * cols].view(rows, cols)


def _shift(rows: slice, offset: int) -> slice:
    return slice(rows.start + offset, rows.stop + offset)


def _logits_into(out, hidden, weight, bias) -> torch.Tensor:
    """hidden @ weightᵀ (+ bias) written into ``out``; no 1/τ (callers scale sub-blocks in cache)."""
    if bias is None:
        return torch.mm(hidden, weight.T, out=out)
    return torch.addmm(bias, hidden, weight.T, out=out)


def _prepare(hidden, weight, bias):
    dtype = compute_dtype(weight.dtype)
    return dtype, hidden.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def _same(a, b) -> bool:
    """The same tensor data (``detach()`` and autograd make new tensor objects of one storage)."""
    if a is None or b is None:
        return a is b
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _prepare_pair(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias):
    """Both sides in the compute dtype; ``shared`` when the teacher uses the student's output layer."""
    shared = _same(weight, teacher_weight) and _same(bias, teacher_bias)
    dtype, hidden, weight, bias = _prepare(hidden, weight, bias)
    if shared:
        return dtype, hidden, weight, bias, teacher_hidden.to(dtype), weight, bias, True
    _, teacher_hidden, teacher_weight, teacher_bias = _prepare(teacher_hidden, teacher_weight, teacher_bias)
    return dtype, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, False


def _two_sided_row_blocks(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, shared, budget):
    """Yield (r0, r1, z, teacher_z): both sides' full-row logits (no 1/τ) for blocks of rows,
    in one reused buffer of ``budget`` bytes. With a shared output layer, one GEMM over the
    stacked rows reads each weight block once for both sides."""
    n, vocab = hidden.shape[0], weight.shape[0]
    itemsize = hidden.element_size()
    step = max(1, min(n, budget // (vocab * 2 * itemsize)))
    step = -(-n // -(-n // step)) if n else 1  # equal blocks: no thin last block (thin GEMMs are slow)
    buffer = torch.empty(2 * step * vocab, dtype=hidden.dtype, device=hidden.device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        m = r1 - r0
        both = buffer[: 2 * m * vocab].view(2 * m, vocab)
        if shared:
            _logits_into(both, torch.cat([hidden[r0:r1], teacher_hidden[r0:r1]]), weight, bias)
        else:
            _logits_into(both[:m], hidden[r0:r1], weight, bias)
            _logits_into(both[m:], teacher_hidden[r0:r1], teacher_weight, teacher_bias)
        yield r0, r1, both[:m], both[m:]


# ----------------------------------------------------------------------------- forward


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
    itemsize = torch.finfo(dtype).bits // 8
    lse = torch.empty(n, dtype=dtype, device=device)
    mean_logit = torch.empty_like(lse) if with_mean_logit else None
    target_logit = torch.empty_like(lse) if targets is not None else None
    top_ids = torch.empty((n, k), dtype=torch.int64, device=device) if k else None
    top_logits = torch.empty((n, k), dtype=dtype, device=device) if k else None
    rows_step = min(n, ROW_BLOCK) if n else 1
    cols_step = max(min(vocab, max(k, 128)), _block(vocab, rows_step, itemsize))
    flat = torch.empty(rows_step * cols_step, dtype=dtype, device=device)
    for r0 in range(0, n, rows_step):
        rows = slice(r0, min(n, r0 + rows_step))
        h = hidden[rows]
        m = torch.full((h.shape[0], 1), -math.inf, dtype=dtype, device=device)
        e_sum = torch.zeros_like(m)
        ez_sum = torch.zeros_like(m)
        run_values = run_ids = None
        for c0 in range(0, vocab, cols_step):
            c1 = min(vocab, c0 + cols_step)
            z = _logits_into(_view(flat, h.shape[0], c1 - c0), h, weight[c0:c1],
                             bias[c0:c1] if bias is not None else None)
            if temperature != 1.0:  # before the top-k: its ties are those of the scaled logits
                z /= temperature
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
            for sub in _sub_blocks(z.shape[0], c1 - c0, itemsize):
                z_sub, m_sub, e_sub = z[sub], m[sub], e_sum[sub]
                m_new = torch.maximum(m_sub, z_sub.amax(-1, keepdim=True))
                seen = e_sub > 0
                scale = torch.where(seen, torch.exp(m_sub - m_new), torch.zeros_like(m_sub))
                if with_mean_logit:
                    shift = torch.where(seen, m_sub - m_new, torch.zeros_like(m_sub))
                    ez_sum[sub] = (ez_sum[sub] + shift * e_sub) * scale
                z_sub -= m_new
                e = z_sub.exp()
                e_sum[sub] = e_sub * scale + e.sum(-1, keepdim=True)
                if with_mean_logit:
                    ez_sum[sub] += torch.linalg.vecdot(e, z_sub)[:, None]
                m[sub] = m_new
        lse[rows] = (m + e_sum.log()).squeeze(-1)
        if with_mean_logit:
            mean_logit[rows] = (m + ez_sum / e_sum).squeeze(-1)
        if k:
            top_logits[rows], top_ids[rows] = run_values, run_ids
    return RowStats(lse, mean_logit, target_logit, top_ids, top_logits)


@torch.no_grad()
def jsd_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, beta):
    """Full-vocabulary JSD_β per row with Σw (for the backward) and both logsumexps."""
    dtype, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, shared = _prepare_pair(
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
    n, vocab = hidden.shape[0], weight.shape[0]
    value, w_sum, lse, teacher_lse = (torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(4))
    for r0, r1, z, teacher_z in _two_sided_row_blocks(hidden, weight, bias, teacher_hidden, teacher_weight,
                                                      teacher_bias, shared, FUSED_BLOCK_BYTES):
        for sub in _sub_blocks(r1 - r0, vocab, z.element_size()):
            z_sub, teacher_sub = z[sub], teacher_z[sub]
            if temperature != 1.0:
                z_sub /= temperature
                teacher_sub /= temperature
            rows = _shift(sub, r0)
            terms = _rowmath.full_jsd_from_logits_(z_sub, teacher_sub, beta, grad=False)
            value[rows], w_sum[rows], lse[rows], teacher_lse[rows] = (terms.value, terms.w_sum, terms.lse,
                                                                      terms.teacher_lse)
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


def _dense_backward(hidden, weight, bias, temperature, dz_rows, need_hidden, need_weight, need_bias, sparse=(),
                    teacher=None):
    """Sweep bounded logits blocks, write dz over each (``dz_rows`` per cache sub-block), add the
    sparse terms, and contract into gradients.

    ``dz_rows(z, teacher_z, rows, cols)`` gets a sub-block of logits (1/τ applied; ``teacher_z``
    the teacher's same sub-block when ``teacher`` = (hidden, weight, bias) is given, else None)
    and must write dz over ``z``. Returns compute-dtype (grad_hidden, grad_weight, grad_bias),
    the 1/τ applied.
    """
    dtype, hidden, weight, bias = _prepare(hidden, weight, bias)
    if teacher is not None:
        teacher_hidden, teacher_weight, teacher_bias = (t.to(dtype) if t is not None else None for t in teacher)
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    grad_hidden = torch.zeros((n, h), dtype=dtype, device=device) if need_hidden else None
    grad_weight = torch.zeros((vocab, h), dtype=dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=dtype, device=device) if need_bias else None
    itemsize = torch.finfo(dtype).bits // 8
    sides = 1 if teacher is None else 2
    by_vocab = n <= vocab  # vocab blocks over all rows: d weight written once, d hidden accumulates
    if by_vocab:
        step = _block(vocab, n, itemsize * sides)
        blocks = [(slice(0, n), slice(c0, min(vocab, c0 + step))) for c0 in range(0, vocab, step)]
    else:  # row blocks over the whole vocabulary: d hidden written once, d weight accumulates
        step = _block(n, vocab, itemsize * sides)
        blocks = [(slice(r0, min(n, r0 + step)), slice(0, vocab)) for r0 in range(0, n, step)]
    block_elems = (blocks[0][0].stop - blocks[0][0].start) * (blocks[0][1].stop - blocks[0][1].start) if blocks else 0
    flats = [torch.empty(block_elems, dtype=dtype, device=device) for _ in range(sides)]
    for rows, cols in blocks:
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        z = _logits_into(_view(flats[0], *shape), hidden[rows], weight[cols], bias[cols] if bias is not None else None)
        teacher_z = None if teacher is None else _logits_into(
            _view(flats[1], *shape), teacher_hidden[rows], teacher_weight[cols],
            teacher_bias[cols] if teacher_bias is not None else None)
        for sub in _sub_blocks(z.shape[0], z.shape[1], itemsize):
            z_sub = z[sub]
            teacher_sub = None if teacher_z is None else teacher_z[sub]
            if temperature != 1.0:
                z_sub /= temperature
                if teacher_sub is not None:
                    teacher_sub /= temperature
            dz_rows(z_sub, teacher_sub, _shift(sub, rows.start), cols)
        _add_sparse(z, rows.start, rows.stop, cols.start, cols.stop, sparse)
        if need_hidden:
            if by_vocab:
                grad_hidden.addmm_(z, weight[cols])
            else:
                torch.mm(z, weight, out=grad_hidden[rows])
        if need_weight:
            if by_vocab:
                torch.mm(z.T, hidden, out=grad_weight[cols])
            else:
                grad_weight.addmm_(z.T, hidden[rows])
        if need_bias:
            grad_bias[cols] += z.sum(0)
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

    def dz_rows(z, _teacher_z, rows, _cols):
        coef = row_coef[rows, None]
        if logit_coef is not None:  # one temporary: (z − shift)·logit_coef + row_coef
            shifted = z.clone() if logit_shift is None else z - logit_shift[rows, None]
            coef = shifted.mul_(logit_coef[rows, None]).add_(coef)
        z.sub_(lse[rows, None]).exp_().mul_(coef)  # z: p, then dz

    return _dense_backward(hidden, weight, bias, temperature, dz_rows, need_hidden, need_weight, need_bias, sparse)


def jsd_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, beta, lse,
                 teacher_lse, w_sum, grad, *, need_hidden=True, need_weight=True, need_bias=True):
    """Gradients of Σ_n grad_n · JSD_n: dz = grad·(w − p·Σw), recomputing both sides' logits blockwise."""

    def dz_rows(z, teacher_z, rows, _cols):
        logp = z.sub_(lse[rows, None])
        logq = teacher_z.sub_(teacher_lse[rows, None])
        p = logp.exp()
        if not _rowmath.mixture_from_probs(beta):  # the forward's choice (full_jsd_from_logits_)
            w = z.copy_(_rowmath.jsd_pointwise(logp, logq, beta)[1])
        else:  # the forward's expression (full_jsd_from_logits_), written over z
            w = logp.sub_(_rowmath.log_mixture_(p, logq.exp_(), beta)).mul_(p).mul_(1.0 - beta)
        w.addcmul_(p, w_sum[rows, None], value=-1.0).mul_(grad[rows, None])

    return _dense_backward(hidden, weight, bias, temperature, dz_rows, need_hidden, need_weight, need_bias,
                           teacher=(teacher_hidden, teacher_weight, teacher_bias))


# ----------------------------------------------------------------------------- loss level (grad in forward)


def fused_loss_pays(vocab: int) -> bool:
    """Whether the one-sweep loss (full rows per block) beats the per-row path (backward in vocab blocks).

    Its blocks hold whole rows, so at large V they hold few rows, and each block re-reads both
    output layers and rewrites all of d weight (measured with 26-row blocks at V = 32000: 24.8 s
    vs 12.2 s per row). With ≥ 128 rows per block (V ≲ 90k in float32) the GEMMs run near full
    speed and the sweep saves the recomputation: one GEMM in four.
    """
    return LOSS_BLOCK_BYTES // (vocab * 2 * 4) >= FUSED_LOSS_MIN_ROWS


def _loss_rows(z, teacher_z, beta, k, support, tail):
    """Per-row values and ∂D/∂z of full rows of logits (one sub-block); ∂D/∂z may alias z."""
    if k is None:
        terms = _rowmath.full_jsd_from_logits_(z, teacher_z, beta)
        return terms.value, terms.grad_logits
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
    Per row block: both sides' logits (one or two GEMMs), the divergence and
    dz = weights_n/τ · ∂D_n/∂z written over the student logits sub-block by sub-block, then the
    two gradient GEMMs. Returns (per-row values, grad_hidden, grad_weight, grad_bias) in the
    compute dtype.
    """
    dtype, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, shared = _prepare_pair(
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    row_scale = weights.to(dtype) / temperature
    value = torch.empty(n, dtype=dtype, device=device)
    grad_hidden = torch.empty((n, h), dtype=dtype, device=device) if need_hidden else None
    # d weight: written by the first block's GEMM, accumulated by the others (no zero fill of V×H)
    grad_weight = torch.empty((vocab, h), dtype=dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=dtype, device=device) if need_bias else None
    if n == 0 and need_weight:
        grad_weight.zero_()
    with torch.no_grad():
        for r0, r1, z, teacher_z in _two_sided_row_blocks(hidden, weight, bias, teacher_hidden, teacher_weight,
                                                          teacher_bias, shared, LOSS_BLOCK_BYTES):
            # Sub-blocks of 4× the elementwise budget: the Top-K branch runs ~40 small per-row ops
            # per sub-block, so fewer, larger ones; the full JSD keeps them cache-sized.
            for sub in _sub_blocks(r1 - r0, vocab // (1 if k is None else 4), z.element_size()):
                z_sub, teacher_sub = z[sub], teacher_z[sub]
                if temperature != 1.0:
                    z_sub /= temperature
                    teacher_sub /= temperature
                rows = _shift(sub, r0)
                value[rows], grad_logits = _loss_rows(z_sub, teacher_sub, beta, k, support, tail)
                torch.mul(grad_logits, row_scale[rows, None], out=z_sub)  # dz, over the logits
            if need_hidden:
                torch.mm(z, weight, out=grad_hidden[r0:r1])
            if need_weight:
                if r0 == 0:
                    torch.mm(z.T, hidden[r0:r1], out=grad_weight)
                else:
                    grad_weight.addmm_(z.T, hidden[r0:r1])
            if need_bias:
                grad_bias += z.sum(0)
    return value, grad_hidden, grad_weight, grad_bias
