"""``@triton.jit`` helpers shared by the output-layer kernels (``row_stats``, ``head_backward``,
``jsd_forward``, ``jsd_backward``).

- ``logits_tile``: the one tile a = x @ wᵀ + b of every kernel — and, for a shared output layer, a
  second side's tile from the same weight loads; ``to_logits`` turns it into z = cap_c(s·a)/τ;
- ``store_chunk_tile`` and ``add_chunk_product``: a backward program's chunk buffer of da tiles, and
  buffer @ operand added into the gradient rows the program owns (no atomics);
- ``add_sparse_terms``: the few per-row sparse terms of ∂L/∂z added into a dz tile.

Every ``tl.dot`` takes its ``input_precision`` from ``_launch.dot_precision`` (the launchers pass
it as the ``PRECISION`` constexpr), so all kernels see the same logits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import check_triton

check_triton(triton.__version__)  # before any kernel is defined: the version needed, on first use


@triton.jit
def logits_tile(
    x_ptr, w_ptr, b_ptr,
    offs_n, offs_v, mask_n, mask_v, K,
    stride_xn, stride_xk, stride_wv, stride_wk,
    tx_ptr, tb_ptr, stride_txn, stride_txk,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, PAIR: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """a = x[offs_n] @ w[offs_v]ᵀ + b[offs_v] as a [BLOCK_N, BLOCK_V] tile in the accumulator dtype
    (float64 for float64 operands, else float32).

    With ``PAIR`` also ta = tx[offs_n] @ w[offs_v]ᵀ + tb[offs_v] from the same weight loads (a shared
    output layer: tx has x's dtype and K); without it, ta is a and the ``t*`` arguments are not read.
    Returns (a, ta). Out-of-range rows/columns come out finite (their operands load as 0); callers
    mask them.
    """
    # tl.dot accumulates float64 operands in float64 and everything else in float32.
    if x_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float64)
        t_acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        t_acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask_nk = mask_n[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + offs_n[:, None] * stride_xn + offs_k[None, :] * stride_xk, mask=mask_nk, other=0.0)
        # The weight tile is loaded transposed ([BLOCK_K, BLOCK_V]) so the dot needs no transpose.
        wt = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_v[None, :] * stride_wv,
                     mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        if DOT_UPCAST:  # the interpreter's bf16 tl.dot is wrong; upcast there only
            x = x.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(x, wt, acc, input_precision=PRECISION)
        if PAIR:
            tx = tl.load(tx_ptr + offs_n[:, None] * stride_txn + offs_k[None, :] * stride_txk, mask=mask_nk,
                         other=0.0)
            if DOT_UPCAST:
                tx = tx.to(tl.float32)
            t_acc = tl.dot(tx, wt, t_acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(acc.dtype)[None, :]
    if PAIR:
        if HAS_TEACHER_BIAS:
            t_acc = t_acc + tl.load(tb_ptr + offs_v, mask=mask_v, other=0.0).to(t_acc.dtype)[None, :]
    else:
        t_acc = acc
    return acc, t_acc


@triton.jit
def tanh(x):
    """tanh(x) to float rounding in x's dtype (the interpreter has no libdevice).

    Away from 0: sign(x)·(1 − e)/(1 + e) with e = exp(−2|x|) (no overflow). Near 0, in float32,
    the odd series to x⁹ (relative error < 1e-8 below |x| = 1/4), where 1 − e would cancel; float64
    keeps the quotient (its absolute error, ~1e-16, is all a logit needs).
    """
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    if x.dtype != tl.float64:
        x2 = x * x
        small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
        t = tl.where(tl.abs(x) < 0.25, small, t)
    return t


@triton.jit
def to_logits(a, transform_ptr, HAS_CAP: tl.constexpr):
    """z = cap_c(s·a)/τ from a = x·w + b, with ``transform_ptr`` → [s/τ, s/c, c/τ] (``Head.transform_scalars``)
    in a's dtype. Returns (z, t): t = tanh(s·a/c) with a cap (∂z/∂a = (1 − t²)·s/τ), else z."""
    if HAS_CAP:
        t = tanh(a * tl.load(transform_ptr + 1))
        z = t * tl.load(transform_ptr + 2)
    else:
        z = a * tl.load(transform_ptr)
        t = z
    return z, t


@triton.jit
def store_chunk_tile(scratch_ptr, dz, first, OWN_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     CHUNK: tl.constexpr):
    """Write a [BLOCK_N, BLOCK_V] tile of da = ∂L/∂a into a program's chunk buffer, in the buffer's dtype.

    The buffer is [owned, CHUNK] (row-major): with ``OWN_ROWS`` the owned axis is the tile's rows and the
    tile goes to columns [first, first + BLOCK_V); otherwise the owned axis is the tile's vocabulary
    columns and the tile goes, transposed, to columns [first, first + BLOCK_N).
    """
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_V)
    if OWN_ROWS:
        ptrs = scratch_ptr + rows[:, None] * CHUNK + (first + cols)[None, :]
    else:
        ptrs = scratch_ptr + cols[None, :] * CHUNK + (first + rows)[:, None]
    tl.store(ptrs, dz.to(scratch_ptr.dtype.element_ty))


@triton.jit
def add_chunk_product(
    out_ptr, out_offs, out_mask, scratch_ptr, chunk_len,
    m_ptr, m_first, stride_mr, stride_mk, K,
    ACC_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[out_offs, :K] += S[:, :chunk_len] @ m[m_first : m_first + chunk_len, :K], read-modify-write.

    S is the program's [BLOCK_O, CHUNK] chunk buffer (``store_chunk_tile``); out is a contiguous
    [·, K] accumulator whose rows ``out_offs`` (int64) this program owns, so no other program writes
    them and no atomic is needed. m is the operand the chunk's entries index (the weight rows of a
    vocabulary chunk, or the hidden rows of a row chunk), strides (stride_mr, stride_mk).
    """
    offs_o = tl.arange(0, BLOCK_O)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        out_ptrs = out_ptr + out_offs[:, None] * K + offs_k[None, :]
        out_tile_mask = out_mask[:, None] & mask_k[None, :]
        acc = tl.load(out_ptrs, mask=out_tile_mask, other=0.0).to(ACC_DTYPE)
        for c0 in range(0, chunk_len, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < chunk_len
            # Columns past chunk_len hold the previous chunk's entries: masked out on both sides.
            s = tl.load(scratch_ptr + offs_o[:, None] * CHUNK + offs_c[None, :], mask=mask_c[None, :], other=0.0)
            m_rows = (m_first + offs_c).to(tl.int64)
            m = tl.load(m_ptr + m_rows[:, None] * stride_mr + offs_k[None, :] * stride_mk,
                        mask=mask_c[:, None] & mask_k[None, :], other=0.0)
            if DOT_UPCAST:
                s = s.to(tl.float32)
                m = m.to(tl.float32)
            acc = tl.dot(s, m, acc, input_precision=PRECISION)
        tl.store(out_ptrs, acc, mask=out_tile_mask)


@triton.jit
def lower_bound_step(lo, hi, ids_ptr, row_base, target, mask_n):
    """One bisection step, per row, of lower_bound(ids[n, :], target) within [lo, hi)."""
    open_rows = mask_n & (lo < hi)
    mid = (lo + hi) // 2
    mid_id = tl.load(ids_ptr + row_base + mid, mask=open_rows, other=0)
    below = open_rows & (mid_id < target)
    return tl.where(below, mid + 1, lo), tl.where(open_rows & (mid_id >= target), mid, hi)


@triton.jit
def add_sparse_terms(
    dz, ids_ptr, coef_ptr, offs_n, offs_v, mask_n, v_start, M, search_steps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dz + Σ_m coef[n, m]·[ids[n, m] = v] over the [BLOCK_N, BLOCK_V] tile (rows offs_n, columns offs_v).

    ``ids``/``coef`` are contiguous [N, M] arrays whose ids are sorted ascending per row (ids
    outside [0, V) match no column; a repeated id adds each of its coefficients). The columns
    of the tile are [v_start, v_start + BLOCK_V). ``search_steps`` ≥ ⌈log2(M + 1)⌉. With the ids
    sorted, each row binary-searches the slots that fall in the tile and the loop runs over at
    most the largest such count in the tile (not over all M slots).
    """
    row_base = offs_n * M  # int64 (offs_n is int64): N·M may exceed 2^31
    v_end = v_start + BLOCK_V
    # Per row: first = #slots with id < v_start, last = #slots with id < v_end (two lower bounds).
    first = tl.zeros((BLOCK_N,), dtype=tl.int32)
    first_hi = tl.zeros((BLOCK_N,), dtype=tl.int32) + M
    last = tl.zeros((BLOCK_N,), dtype=tl.int32)
    last_hi = tl.zeros((BLOCK_N,), dtype=tl.int32) + M
    for _ in range(search_steps):
        first, first_hi = lower_bound_step(first, first_hi, ids_ptr, row_base, v_start, mask_n)
        last, last_hi = lower_bound_step(last, last_hi, ids_ptr, row_base, v_end, mask_n)
    count = tl.where(mask_n, last - first, 0)
    for j in range(0, tl.max(count, axis=0)):
        slot = first + j
        mask_slot = mask_n & (slot < last)
        ids = tl.load(ids_ptr + row_base + slot, mask=mask_slot, other=-1)
        coef = tl.load(coef_ptr + row_base + slot, mask=mask_slot, other=0.0)
        hit = mask_slot[:, None] & (offs_v[None, :] == ids[:, None])
        dz += tl.where(hit, coef[:, None], 0.0)
    return dz
