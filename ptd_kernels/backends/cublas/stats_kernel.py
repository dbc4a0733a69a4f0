"""Row statistics of one logits block, in one read of the block: the elementwise half of a forward sweep.

The block holds a[r, j] = hidden[r] · weight[col0 + j] for R rows and C vocabulary columns (the float32
output of one cuBLAS GEMM; float64 for float64 inputs). Per row, with z = cap_c(s·(a + bias))/τ:

    m = max z,   S = Σ e^{z − m},   T = Σ e^{z − m}·(z − m)        (lse = m + log S, Σ p·z = m + T/S)
    target = z at the row's target id (when it falls in this block's columns)
    top    = the k largest keys (``keys.pack_keys``: larger logit first, ties to the smaller id)

merged into the row's running state from earlier blocks, so that a sweep over vocabulary blocks (or
one block of whole rows) ends with the row's statistics.

How: one program per BLOCK_R rows walks the block's columns in BLOCK_C tiles. The logsumexp and T
are kept per lane (one m, S, T per position of the tile, rescaled when that lane's m grows: two
exps per logit, no cross-thread reduction per tile) and folded once at the end. The top-k keeps the
row's current top set (sorted, in registers) and its k-th key as a threshold; a tile's keys above the
threshold are appended to a per-row scratch list (a prefix sum gives their slots), and only when the
list would overflow is it cut back to the K_PAD best (``keys.select_top``) and the threshold raised.
After the first cut a candidate is a logit that beats the k-th best seen so far, so appends are few
(≈ k·ln(V/k) per row for logits in random order) and the sort runs a few times per row, not per tile.

``WRITE_Z`` also writes z over the block (the wide top-K path sorts it with torch). Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _work
from .keys import KEY_SENTINEL, kth_key, pack_keys, select_top
from .transform import to_logits, unpack


@triton.jit(do_not_specialize=["scale_bits", "cap_in_bits", "cap_out_bits"])
def _block_stats_kernel(
    a_ptr, bias_ptr, targets_ptr,
    m_ptr, s_ptr, t_ptr, target_ptr, top_ptr, scratch_ptr,
    rows, cols, col0, k, stride_a, scale_bits, cap_in_bits, cap_out_bits,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, WITH_MEAN: tl.constexpr, HAS_TARGETS: tl.constexpr,
    TOPK: tl.constexpr, WRITE_Z: tl.constexpr, K_PAD: tl.constexpr, CAP: tl.constexpr,
    RANK_SELECT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rows
    row_base = offs_r * stride_a  # int64: rows · C may exceed 2^31
    acc_ty = a_ptr.dtype.element_ty
    scale, cap_in, cap_out = unpack(scale_bits, acc_ty), unpack(cap_in_bits, acc_ty), unpack(cap_out_bits, acc_ty)

    # per-lane running statistics (lane = position within the tile)
    m_l = tl.full((BLOCK_R, BLOCK_C), float("-inf"), acc_ty)
    s_l = tl.zeros((BLOCK_R, BLOCK_C), acc_ty)
    t_l = tl.zeros((BLOCK_R, BLOCK_C), acc_ty)
    target_l = tl.zeros((BLOCK_R, BLOCK_C), acc_ty)
    if HAS_TARGETS:
        y = tl.load(targets_ptr + offs_r, mask=mask_r, other=-1)
    if TOPK:
        offs_k = tl.arange(0, K_PAD)
        scratch_row = scratch_ptr + offs_r[:, None] * CAP
        top = tl.load(top_ptr + offs_r[:, None] * K_PAD + offs_k[None, :], mask=mask_r[:, None], other=KEY_SENTINEL)
        tl.store(scratch_row + offs_k[None, :], top, mask=mask_r[:, None])
        count = tl.zeros((BLOCK_R,), tl.int32) + K_PAD
        threshold = kth_key(top, k, K_PAD)

    for c0 in range(0, cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < cols
        valid = mask_r[:, None] & mask_c[None, :]
        ptrs = a_ptr + row_base[:, None] + offs_c[None, :]
        a = tl.load(ptrs, mask=valid, other=0.0)
        if HAS_BIAS:
            a += tl.load(bias_ptr + col0 + offs_c, mask=mask_c, other=0.0).to(acc_ty)[None, :]
        z, _ = to_logits(a, scale, cap_in, cap_out, HAS_CAP)
        if WRITE_Z:
            tl.store(ptrs, z, mask=valid)

        # Online logsumexp per lane, relative to a finite reference (the lane's max, or 0 while the lane
        # is empty) so that empty lanes and padding give exact zeros, not e^{−inf + inf}; a NaN or +inf
        # logit makes S NaN in its row.
        z_in = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m_l, z_in)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_l - ref)
        e = tl.exp(z_in - ref)
        if WITH_MEAN:
            shift = tl.where(m_l == float("-inf"), 0.0, m_l - ref)
            t_l = (t_l + shift * s_l) * alpha + tl.where(valid, e * (z - ref), 0.0)
        s_l = s_l * alpha + e
        m_l = m_new
        if HAS_TARGETS:
            hit = valid & ((col0 + offs_c)[None, :] == y[:, None])
            target_l += tl.where(hit, z, 0.0)

        if TOPK:
            keys = tl.where(valid, pack_keys(z, col0 + offs_c), KEY_SENTINEL)
            cand = keys > threshold[:, None]
            n_cand = tl.sum(cand.to(tl.int32), axis=1)
            if tl.max(count + n_cand, axis=0) > CAP:  # the list would overflow: cut it back to the best K_PAD
                tl.debug_barrier()  # every thread's appends are in memory
                top = select_top(scratch_row, count, mask_r, K_PAD, CAP, BLOCK_R, RANK_SELECT)
                tl.debug_barrier()  # every thread has read the list before it is overwritten
                tl.store(scratch_row + offs_k[None, :], top, mask=mask_r[:, None])
                count = tl.zeros((BLOCK_R,), tl.int32) + K_PAD
                threshold = kth_key(top, k, K_PAD)
                cand = keys > threshold[:, None]
                n_cand = tl.sum(cand.to(tl.int32), axis=1)
            if tl.max(n_cand, axis=0) > 0:
                slot = count[:, None] + tl.cumsum(cand.to(tl.int32), axis=1) - 1
                tl.store(scratch_row + slot, keys, mask=cand)
                count += n_cand

    # Fold the lanes, then the row's state from earlier blocks (m = −inf, S = T = 0 before the first).
    m_blk = tl.max(m_l, axis=1)
    ref_blk = tl.where(m_blk == float("-inf"), 0.0, m_blk)
    lane_weight = tl.exp(m_l - ref_blk[:, None])
    s_blk = tl.sum(s_l * lane_weight, axis=1)
    m_old = tl.load(m_ptr + offs_r, mask=mask_r, other=float("-inf"))
    s_old = tl.load(s_ptr + offs_r, mask=mask_r, other=0.0)
    m_row = tl.maximum(m_old, m_blk)
    ref_row = tl.where(m_row == float("-inf"), 0.0, m_row)
    w_old = tl.exp(m_old - ref_row)
    w_blk = tl.exp(m_blk - ref_row)
    tl.store(m_ptr + offs_r, m_row, mask=mask_r)
    tl.store(s_ptr + offs_r, s_old * w_old + s_blk * w_blk, mask=mask_r)
    if WITH_MEAN:
        lane_shift = tl.where(m_l == float("-inf"), 0.0, m_l - ref_blk[:, None])
        t_blk = tl.sum((t_l + lane_shift * s_l) * lane_weight, axis=1)
        t_old = tl.load(t_ptr + offs_r, mask=mask_r, other=0.0)
        old_shift = tl.where(m_old == float("-inf"), 0.0, m_old - ref_row)
        blk_shift = tl.where(m_blk == float("-inf"), 0.0, m_blk - ref_row)
        t_row = (t_old + old_shift * s_old) * w_old + (t_blk + blk_shift * s_blk) * w_blk
        tl.store(t_ptr + offs_r, t_row, mask=mask_r)
    if HAS_TARGETS:
        owned = (y >= col0) & (y < col0 + cols)
        tl.store(target_ptr + offs_r, tl.sum(target_l, axis=1), mask=mask_r & owned)
    if TOPK:
        tl.debug_barrier()
        top = select_top(scratch_row, count, mask_r, K_PAD, CAP, BLOCK_R, RANK_SELECT)
        tl.store(top_ptr + offs_r[:, None] * K_PAD + offs_k[None, :], top, mask=mask_r[:, None])


def scratch_width(k_pad: int, block_c: int) -> int:
    """Slots of a row's candidate list: its top set plus one whole tile of candidates after a cut."""
    return triton.next_power_of_2(k_pad + block_c)


def block_stats(a: torch.Tensor, col0: int, bias: torch.Tensor | None, scalars: tuple[int, ...], has_cap: bool, *,
                m: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, target: torch.Tensor | None = None,
                top: torch.Tensor | None = None, k: int = 0, scratch: torch.Tensor | None = None,
                write_z: bool = False, tiles: tuple[int, int, int], rank_select: bool) -> None:
    """Fold the block ``a`` [R, C] (columns col0 … col0 + C − 1 of the vocabulary) into the rows' state.

    m, s [R] (and t [R] with the mean logit): the running statistics, in a's dtype, initialized to
    −inf, 0, 0. targets [R] int64 with target [R]: the target logit is written where the target falls
    in the block. top [R, K_PAD] int64 (initialized to ``keys.SENTINEL``, sorted descending) with
    scratch [R, CAP]: the running top-k keys. ``scalars``: the transform's (s/τ, s/c, c/τ) as
    ``transform.pack`` gives them (``Side.scalars``). ``tiles`` = (BLOCK_R, BLOCK_C, num_warps).
    """
    rows, cols = a.shape
    block_r, block_c, warps = tiles
    topk = top is not None and k > 0
    k_pad = top.shape[1] if topk else 1
    cap = scratch.shape[1] if topk else 1
    if topk and cap < k_pad + block_c:
        raise ValueError(f"the top-K scratch has {cap} slots per row, needs {k_pad + block_c}")
    size = a.element_size()
    state_bytes = rows * size * (2 + (t is not None)) + (rows * (8 + size) if targets is not None else 0)
    state_bytes += rows * k_pad * 8 if topk else 0
    dummy = m
    _work.launch(
        "block_stats", _block_stats_kernel, (triton.cdiv(rows, block_r),),
        (a, bias if bias is not None else dummy, targets if targets is not None else dummy,
         m, s, t if t is not None else dummy, target if target is not None else dummy,
         top if topk else dummy, scratch if topk else dummy,
         rows, cols, col0, k, a.stride(0), *scalars),
        dict(HAS_BIAS=bias is not None, HAS_CAP=has_cap, WITH_MEAN=t is not None, HAS_TARGETS=targets is not None,
             TOPK=topk, WRITE_Z=write_z, K_PAD=k_pad, CAP=cap, RANK_SELECT=rank_select,
             BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps),
        elements=rows * cols,
        bytes_read=rows * cols * size + (cols * bias.element_size() if bias is not None else 0) + state_bytes,
        bytes_written=(rows * cols * size if write_z else 0) + state_bytes,
    )
