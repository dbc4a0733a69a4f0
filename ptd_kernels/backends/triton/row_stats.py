"""Forward sweep over the vocabulary: per-row log-sum-exp, mean logit, target logit and top-K.

For rows n and vocabulary ids v, with hidden h [N, H], weight W [V, H], optional bias b [V],
logit scale s, optional soft-cap c and temperature τ,

    z[n, v]        = cap_c(s · (h[n] · W[v] + b[v])) / τ
    lse[n]         = log Σ_v exp(z[n, v])
    mean_logit[n]  = Σ_v p[n, v] z[n, v],      p = softmax(z)     (entropy = lse − mean_logit)
    target_logit[n] = z[n, y[n]]
    topk_indices[n] = the k ids with the largest z[n, ·], descending, ties → smaller id

z is never stored: each program owns a block of BLOCK_N rows and one *segment* of the
vocabulary (a run of BLOCK_V tiles; the split-K idea of decoding kernels, so that small N still
fills the GPU). It sweeps its tiles once, keeping for every row

    m = max z,   s = Σ exp(z − m),   t = Σ exp(z − m) · z        (online, rescaled when m grows)

and a running top-K of packed int64 keys (see ``_pack_keys``): a key orders by (float32 logit
descending, id ascending), so comparing keys is the whole tie rule and the id and the logit
decode back out of the key. A tile's keys above a row's smallest kept key replace it one at a
time (``_merge_topk``; no sorting network, whose registers would crowd out the tile). A second,
tiny step in torch merges the per-segment partials:

    M = max_s m_s,   S = Σ_s s_s e^{m_s − M},   lse = M + log S,   mean = Σ_s t_s e^{m_s − M} / S
    top-K = top-k of the [N, segments · K_PAD] partial keys (sorted there).

Extra memory is O(N · segments · K_PAD + tiles), never O(N · V).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..base import Head, RowStats
from . import _launch
from .tiles import logits_tile, to_logits

MAX_K = 256  # largest k this kernel keeps in registers; the backend uses the torch path above it

_KEY_SENTINEL = tl.constexpr(-(2**63))  # below every real key: masked vocabulary entries and empty top-K slots


@triton.jit
def _pack_keys(z, cols):
    """int64 keys ordered by (float32 z descending, id ascending), as ``rowmath.pack_topk_keys``.

    key = (order-preserving int32 bits of z) << 32 | (2^32 − 1 − id). NaN (positive) sorts above +inf.
    """
    z32 = z.to(tl.float32)
    z32 = tl.where(z32 == 0.0, 0.0, z32)  # −0.0 → +0.0: the two zeros tie and fall back to the id
    bits = z32.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flip their magnitude bits.
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    low = tl.full((), 4294967295, tl.int64) - cols.to(tl.int64)  # 2^32 − 1 − id
    return (ordered << 32) | low[None, :]


@triton.jit
def _merge_topk(top, keys, K_PAD: tl.constexpr):
    """The K_PAD largest of ``top`` (the running top-K, in no order) and ``keys`` (a tile), in no order.

    Candidates are the tile's keys above the row's smallest kept key; each step moves every row's
    largest candidate into the slot of its smallest kept key, until no row has a candidate. After the
    first tiles few keys qualify (about K·BLOCK_V / (tiles seen) per row), so a step or two per tile
    does, and no sorting network is built: the registers stay with the tiles. Real keys are distinct
    (the id is in them), so a key moved is a key removed from the tile.
    """
    slots = tl.arange(0, K_PAD)
    threshold = tl.min(top, axis=1)
    n_better = tl.sum((keys > threshold[:, None]).to(tl.int32))
    while n_better > 0:
        best = tl.max(keys, axis=1)
        slot = tl.argmin(top, axis=1)
        top = tl.where((best > threshold)[:, None] & (slots[None, :] == slot[:, None]), best[:, None], top)
        # Drop it from the tile; where it was not moved it is below the threshold, which only rises.
        keys = tl.where(keys == best[:, None], _KEY_SENTINEL, keys)
        threshold = tl.min(top, axis=1)
        n_better = tl.sum((keys > threshold[:, None]).to(tl.int32))
    return top


@triton.jit
def _merge_topk_rank(top, keys, K_PAD: tl.constexpr):
    """Same set as ``_merge_topk`` (sorted ascending), by ranking: the interpreter's path.

    The interpreter runs every step of ``_merge_topk``'s loop as separate array operations
    (tens of microseconds each, and the first tiles take up to K_PAD steps); here the merge is a
    fixed handful of whole-array compare/sum/max. rank(x) = how many keys of both lists are
    strictly greater; a key of rank r < K_PAD goes to ascending slot K_PAD − 1 − r. Real keys are
    distinct (the id is in them); equal sentinels share one rank, and slots nobody claims stay
    sentinels, which is what they would hold anyway.
    """
    rank_top = tl.sum((top[:, None, :] > top[:, :, None]).to(tl.int32), axis=2)
    rank_top += tl.sum((keys[:, None, :] > top[:, :, None]).to(tl.int32), axis=2)
    rank_keys = tl.sum((top[:, None, :] > keys[:, :, None]).to(tl.int32), axis=2)
    rank_keys += tl.sum((keys[:, None, :] > keys[:, :, None]).to(tl.int32), axis=2)
    slot = (K_PAD - 1 - tl.arange(0, K_PAD))[None, None, :]
    from_top = tl.max(tl.where(rank_top[:, :, None] == slot, top[:, :, None], _KEY_SENTINEL), axis=1)
    from_keys = tl.max(tl.where(rank_keys[:, :, None] == slot, keys[:, :, None], _KEY_SENTINEL), axis=1)
    return tl.maximum(from_top, from_keys)


@triton.jit
def _row_stats_kernel(
    h_ptr, w_ptr, b_ptr, scalars_ptr, y_ptr,
    part_m_ptr, part_s_ptr, part_t_ptr, part_keys_ptr, target_out_ptr,
    N, V, H, TILES_PER_SEG, NUM_SEG,
    stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    WITH_MEAN: tl.constexpr,
    TOPK: tl.constexpr,
    K_PAD: tl.constexpr,
    RANK_MERGE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)  # int64 offsets: N·H and V·H may exceed 2^31
    offs_v = tl.arange(0, BLOCK_V)

    num_tiles = tl.cdiv(V, BLOCK_V)
    tile_lo = seg * TILES_PER_SEG
    tile_hi = tl.minimum(tile_lo + TILES_PER_SEG, num_tiles)

    m = tl.full((BLOCK_N,), float("-inf"), ACC_DTYPE)
    s = tl.zeros((BLOCK_N,), ACC_DTYPE)
    t = tl.zeros((BLOCK_N,), ACC_DTYPE)
    if HAS_TARGETS:
        y = tl.load(y_ptr + rows64, mask=row_mask, other=-1)
        z_target = tl.zeros((BLOCK_N,), ACC_DTYPE)
    if TOPK:
        top = tl.full((BLOCK_N, K_PAD), _KEY_SENTINEL, tl.int64)

    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + offs_v
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        a, _ = logits_tile(h_ptr, w_ptr, b_ptr, rows64, cols64, row_mask, col_mask, H,
                           stride_hn, stride_hh, stride_wv, stride_wh, h_ptr, b_ptr, 0, 0,
                           HAS_BIAS, False, False, DOT_UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        z, _ = to_logits(a, scalars_ptr, HAS_CAP)

        # Online logsumexp. Masked columns are −inf so they add exp(−inf) = 0; NaN propagates to s.
        z_lse = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_lse, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z_lse - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        if WITH_MEAN:
            # where, not e·z: a masked entry would give 0 · (−inf) = NaN.
            t = t * alpha + tl.sum(tl.where(col_mask[None, :], e * z, 0.0), axis=1)
        m = m_new

        if HAS_TARGETS:
            hit = cols64[None, :] == y[:, None]
            z_target += tl.sum(tl.where(hit, z, 0.0), axis=1)

        if TOPK:
            keys = tl.where(col_mask[None, :], _pack_keys(z, cols), _KEY_SENTINEL)
            if RANK_MERGE:
                # Skip the merge when no key of the tile beats any row's current K_PAD-th key.
                n_better = tl.sum((keys > tl.min(top, axis=1)[:, None]).to(tl.int32))
                if n_better > 0:
                    top = _merge_topk_rank(top, keys, K_PAD)
            else:
                top = _merge_topk(top, keys, K_PAD)

    part = seg.to(tl.int64) * N + rows64
    tl.store(part_m_ptr + part, m, mask=row_mask)
    tl.store(part_s_ptr + part, s, mask=row_mask)
    if WITH_MEAN:
        tl.store(part_t_ptr + part, t, mask=row_mask)
    if HAS_TARGETS:
        # Only the segment that holds the target column writes it.
        owns = (y >= tile_lo * BLOCK_V) & (y < tl.minimum(tile_hi * BLOCK_V, V))
        tl.store(target_out_ptr + rows64, z_target, mask=row_mask & owns)
    if TOPK:
        offs_k = tl.arange(0, K_PAD)
        key_ptrs = part_keys_ptr + (rows64[:, None] * NUM_SEG + seg) * K_PAD + offs_k[None, :]
        tl.store(key_ptrs, top, mask=row_mask[:, None])


def _unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``_pack_keys``: (ids int64, float32 logits)."""
    ids = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    ordered = keys >> 32  # arithmetic shift: back to the signed int32 range
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    return ids, bits.view(torch.float32)


def row_stats(
    head: Head,
    *,
    targets: torch.Tensor | None = None,
    k: int = 0,
    with_mean_logit: bool = True,
    lse_dtype: torch.dtype | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
    num_segments: int | None = None,
    num_warps: int | None = None,
    topk_merge: str | None = None,
) -> RowStats:
    """One sweep over the vocabulary per row block: lse, mean logit, target logit, top-k (``Backend.row_stats``).

    Args:
        head: hidden [N, H] and weight [V, H] of one dtype (float16/bfloat16/float32/float64),
            bias [V] or None, temperature τ > 0.
        targets: int64 [N] ids in [0, V) (the caller strips ignored rows), or None.
        k: top-k size, 0 ≤ k ≤ min(V, MAX_K).
        with_mean_logit: also return Σ_v p_v z_v (needed for the entropy).
        lse_dtype: dtype of the returned lse (default: the accumulator's); float64 makes z − lse
            exact for callers that normalize logits by it (the JSD kernels).
        block_n, block_v, block_h, num_segments, num_warps: tuning overrides (tests use small tiles;
            the JSD forward passes its own tiles, so that both sweeps round the logits alike).
        topk_merge: "insert" (``_merge_topk``, the GPU's path) or "rank" (``_merge_topk_rank``, the
            default under the interpreter, where "insert" is slow); both keep the same keys.

    Returns RowStats with float32 statistics (float64 for float64 inputs) and float32 top-k logits.
    """
    n, v, hdim = _launch.check_head(head)
    hidden, weight = head.hidden, head.weight
    bias = head.bias.contiguous() if head.bias is not None else None
    dtype = hidden.dtype
    if not 0 <= k <= min(v, MAX_K):
        raise ValueError(f"k must be in [0, min(V={v}, MAX_K={MAX_K})], got {k}")
    if targets is not None:
        if targets.shape != (n,):
            raise ValueError(f"targets must have shape ({n},), got {tuple(targets.shape)}")
        if targets.dtype != torch.int64:
            raise TypeError(f"targets must be int64, got {targets.dtype}")
        targets = targets.contiguous()

    if topk_merge is None:
        topk_merge = "rank" if _launch.interpreting() else "insert"
    if topk_merge not in ("insert", "rank"):
        raise ValueError(f"topk_merge must be 'insert' or 'rank', got {topk_merge!r}")

    device = hidden.device
    acc_dtype = _launch.accumulator_dtype(dtype)
    out_lse = torch.empty(n, dtype=acc_dtype, device=device)
    out_target = None if targets is None else torch.full((n,), math.nan, dtype=acc_dtype, device=device)
    if n == 0:
        return RowStats(
            out_lse.to(lse_dtype or acc_dtype),
            out_lse.clone() if with_mean_logit else None,
            out_target,
            torch.empty(0, k, dtype=torch.int64, device=device) if k else None,
            torch.empty(0, k, dtype=torch.float32, device=device) if k else None,
        )

    k_pad = max(2, triton.next_power_of_2(k)) if k else 0
    tiles = _launch.forward_tiles(dtype, k_pad)
    num_warps = num_warps or tiles.num_warps
    # Few rows: a smaller row block wastes less of the tile (16 is tl.dot's minimum on a GPU).
    block_n = block_n or min(tiles.block_n, max(16, triton.next_power_of_2(n)))
    block_v = block_v or tiles.block_v
    block_h = block_h or tiles.block_h
    if not _launch.interpreting() and min(block_n, block_h) < 16:
        raise ValueError("block_n and block_h must be ≥ 16 on a GPU (tl.dot)")
    row_blocks = triton.cdiv(n, block_n)
    num_tiles = triton.cdiv(v, block_v)
    num_seg = num_segments or _launch.segments_to_fill(row_blocks, num_tiles)
    num_seg = max(1, min(num_seg, num_tiles))
    tiles_per_seg = triton.cdiv(num_tiles, num_seg)
    num_seg = triton.cdiv(num_tiles, tiles_per_seg)  # no empty segment

    part_m = torch.empty(num_seg, n, dtype=acc_dtype, device=device)
    part_s = torch.empty_like(part_m)
    part_t = torch.empty_like(part_m) if with_mean_logit else part_m
    part_keys = torch.empty(n, num_seg, k_pad, dtype=torch.int64, device=device) if k else part_m
    # the logit transform's scalars in the accumulator dtype (a float argument would be float32)
    scalars = _launch.device_scalars(head.transform_scalars(), acc_dtype, device)

    _row_stats_kernel[(row_blocks, num_seg)](
        hidden, weight, bias if bias is not None else hidden, scalars,
        targets if targets is not None else part_m,
        part_m, part_s, part_t, part_keys, out_target if out_target is not None else part_m,
        n, v, hdim, tiles_per_seg, num_seg,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None,
        HAS_CAP=head.softcap is not None,
        HAS_TARGETS=targets is not None,
        WITH_MEAN=with_mean_logit,
        TOPK=k > 0,
        K_PAD=max(k_pad, 2),
        RANK_MERGE=topk_merge == "rank",
        ACC_DTYPE=_launch.tl_dtype(acc_dtype),
        **_launch.dot_meta(dtype),
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_H=block_h,
        num_warps=num_warps,
        num_stages=tiles.num_stages,
    )

    if num_seg == 1:
        big_m, s = part_m[0], part_s[0]
        mean = part_t[0] / s if with_mean_logit else None
    else:
        big_m = part_m.amax(dim=0)
        scale = torch.exp(part_m - big_m)
        s = (part_s * scale).sum(dim=0)
        mean = (part_t * scale).sum(dim=0) / s if with_mean_logit else None
    # M + log S: with lse_dtype=float64 the sum is exact (M is a float32 logit, log S is small), so
    # z − lse loses nothing to the rounding of lse at its own magnitude.
    wide = lse_dtype or acc_dtype
    lse = big_m.to(wide) + s.log().to(wide)

    top_ids = top_logits = None
    if k:
        keys = part_keys.view(n, num_seg * k_pad)
        keys = torch.topk(keys, k, dim=1, sorted=True).values
        top_ids, top_logits = _unpack_keys(keys)
    return RowStats(lse, mean, out_target, top_ids, top_logits)
