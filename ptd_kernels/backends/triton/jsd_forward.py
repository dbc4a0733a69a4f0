"""Forward sweep of the full-vocabulary generalized JSD fused with both output layers.

Math (see ``jsd``): per vocabulary entry (d, w) = jsd_pointwise(z − lse, z' − teacher_lse, β), and per row

    value[n] = Σ_v d[n, v] = JSD_β(P_n, Q_n),     w_sum[n] = Σ_v w[n, v]   (the backward's softmax term).

How: as ``row_stats``, each program owns a block of BLOCK_N rows and one segment of the vocabulary
(a run of BLOCK_V tiles; segments let few rows still fill the GPU). It recomputes the student's and
the teacher's logits tiles and keeps per-row running sums of d and w in registers; each segment
writes its partial sums and a torch sum over the segments finishes (no atomics: the same bits run to
run). Nothing of size N×V is allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import Head, JSDStats
from . import _launch
from .jsd import jsd_tile, operand_dtype, prepare
from .row_stats import row_stats


@triton.jit
def _jsd_forward_kernel(
    x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
    part_value_ptr, part_w_sum_ptr,
    N, V, H, TH,
    stride_xn, stride_xh, stride_wv, stride_wh,
    stride_txn, stride_txh, stride_twv, stride_twh,
    TILES_PER_SEG,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr, BETA_CASE: tl.constexpr,
    HAS_CAP: tl.constexpr, T_HAS_CAP: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, T_DOT_UPCAST: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (row block, segment): part_value[segment, rows] = Σ d, part_w_sum[segment, rows] = Σ w
    over the segment's columns."""
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    # int64 offsets: N·H and V·H may exceed 2^31.
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    tile_lo = seg * TILES_PER_SEG
    tile_hi = tl.minimum(tile_lo + TILES_PER_SEG, tl.cdiv(V, BLOCK_V))
    value = tl.zeros((BLOCK_N,), ACC_DTYPE)
    w_sum = tl.zeros((BLOCK_N,), ACC_DTYPE)
    for tile in range(tile_lo, tile_hi):
        offs_v = (tile * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < V
        _, _, _, d, w = jsd_tile(
            x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
            offs_n, offs_v, mask_n, mask_v, H, TH,
            stride_xn, stride_xh, stride_wv, stride_wh,
            stride_txn, stride_txh, stride_twv, stride_twh,
            HAS_BIAS, HAS_TEACHER_BIAS, SHARED_WEIGHT, BETA_CASE, HAS_CAP, T_HAS_CAP,
            DOT_UPCAST, PRECISION, T_DOT_UPCAST, T_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        value += tl.sum(d, axis=1)
        w_sum += tl.sum(w, axis=1)
    part = seg.to(tl.int64) * N + offs_n
    tl.store(part_value_ptr + part, value, mask=mask_n)
    tl.store(part_w_sum_ptr + part, w_sum, mask=mask_n)


def jsd_forward(
    student: Head,
    teacher: Head,
    beta: float,
    *,
    lse: torch.Tensor | None = None,
    teacher_lse: torch.Tensor | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
    segments: int | None = None,
) -> JSDStats:
    """Per-row full-vocabulary JSD_β, Σ_v w and both lse (``Backend.jsd_forward``).

    Args:
        student, teacher: the two output layers (any supported dtypes, possibly different; H' may
            differ from H; one temperature).
        beta: β in [0, 1] (0 → KL(Q ‖ P), 1 → KL(P ‖ Q)).
        lse, teacher_lse: [N] logsumexps of z and z' if known (pass float64 for an exact
            normalizer); else computed here by ``row_stats`` in float64.
        block_n, block_v, block_h, segments: tile and grid overrides (powers of 2, ≥ 16), for tests
            and tuning.

    Returns JSDStats with value and w_sum in float32 (float64 when hidden is float64).
    """
    tiles = _launch.backward_tiles(operand_dtype(student, teacher), block_n, block_v, block_h)
    # The logsumexps come from the JSD sweeps' own tiles: at large logits (|z| ~ 1e5 at τ = 1e-4) a
    # tile of another shape rounds z differently by more than the divergence's own precision.
    same_tiles = dict(block_n=tiles.block_n, block_v=tiles.block_v, block_h=tiles.block_h)
    if lse is None:
        lse = row_stats(student, with_mean_logit=False, lse_dtype=torch.float64, **same_tiles).lse
    if teacher_lse is None:
        teacher_lse = row_stats(teacher, with_mean_logit=False, lse_dtype=torch.float64, **same_tiles).lse
    launch = prepare(student, teacher, beta, lse, teacher_lse)
    n, v, acc_dtype = launch.n, launch.v, launch.acc_dtype
    device = student.hidden.device
    if n == 0 or v == 0:
        zeros = torch.zeros(n, dtype=acc_dtype, device=device)
        return JSDStats(zeros, zeros.clone(), lse, teacher_lse)
    row_blocks = triton.cdiv(n, tiles.block_n)
    num_tiles = triton.cdiv(v, tiles.block_v)
    num_seg = max(1, min(segments or _launch.segments_to_fill(row_blocks, num_tiles), num_tiles))
    tiles_per_seg = triton.cdiv(num_tiles, num_seg)
    num_seg = triton.cdiv(num_tiles, tiles_per_seg)  # no empty segment
    part_value = torch.empty(num_seg, n, dtype=acc_dtype, device=device)
    part_w_sum = torch.empty_like(part_value)
    _jsd_forward_kernel[(row_blocks, num_seg)](
        *launch.inputs, part_value, part_w_sum, *launch.sizes, tiles_per_seg, **launch.meta,
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_H=tiles.block_h,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return JSDStats(part_value.sum(0), part_w_sum.sum(0), lse, teacher_lse)
