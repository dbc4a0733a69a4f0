"""Backward sweep of the full-vocabulary generalized JSD: gradients of the student's hidden, weight and bias.

Math (see ``jsd``): for the loss Σ_n grad[n]·JSD_β(n), with w from ``jsd_pointwise`` and
w_sum[n] = Σ_v w[n, v] from the forward,

    dz[n, v] = grad[n] · (w[n, v] − p[n, v] · w_sum[n]),   p = exp(logp)       (the softmax chain rule)
    da = dz · ∂z/∂a = dz · (1 − tanh²(s·a/c)) · s/τ        (dz · s/τ without a cap)
    grad_hidden = da @ weight,   grad_weight = daᵀ @ hidden,   grad_bias = Σ_n da[n, :].

How: the two sweeps of ``head_backward`` (a program owns rows of grad_hidden and sweeps the
vocabulary, then a program owns rows of grad_weight and grad_bias and sweeps the rows; chunk
buffers, no atomics), with the student's and the teacher's logits tiles recomputed in each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import ALL_GRADS, GradNeeds, Head, HeadGrads, JSDStats
from . import _launch
from .jsd import jsd_tile, operand_dtype, prepare
from .tiles import add_chunk_product, store_chunk_tile


@triton.jit
def _jsd_da_tile(
    x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr, w_sum_ptr, grad_ptr,
    offs_n, offs_v, mask_n, mask_v, H, TH,
    stride_xn, stride_xh, stride_wv, stride_wh,
    stride_txn, stride_txh, stride_twv, stride_twh,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr, BETA_CASE: tl.constexpr,
    HAS_CAP: tl.constexpr, T_HAS_CAP: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, T_DOT_UPCAST: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """da = ∂L/∂a on the tile, zero outside the valid rows and columns."""
    valid, logp, t, _, w = jsd_tile(
        x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
        offs_n, offs_v, mask_n, mask_v, H, TH,
        stride_xn, stride_xh, stride_wv, stride_wh,
        stride_txn, stride_txh, stride_twv, stride_twh,
        HAS_BIAS, HAS_TEACHER_BIAS, SHARED_WEIGHT, BETA_CASE, HAS_CAP, T_HAS_CAP,
        DOT_UPCAST, PRECISION, T_DOT_UPCAST, T_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    w_sum = tl.load(w_sum_ptr + offs_n, mask=mask_n, other=0.0)
    grad = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0)
    dz = grad[:, None] * (w - tl.exp(logp) * w_sum[:, None])
    if HAS_CAP:  # ∂z/∂a = (1 − t²)·s/τ
        dz = dz * (1.0 - t * t)
    return tl.where(valid, dz * tl.load(scalars_ptr + 3), 0.0)


@triton.jit
def _jsd_backward_kernel(
    x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
    w_sum_ptr, grad_ptr, out_ptr, out_bias_ptr, scratch_ptr,
    N, V, H, TH,
    stride_xn, stride_xh, stride_wv, stride_wh,
    stride_txn, stride_txh, stride_twv, stride_twh,
    TILES_PER_SEG,
    OWN_ROWS: tl.constexpr, NEED_OUT: tl.constexpr, NEED_BIAS_GRAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr, BETA_CASE: tl.constexpr,
    HAS_CAP: tl.constexpr, T_HAS_CAP: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, T_DOT_UPCAST: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (pid, segment): the loop of ``head_backward._head_backward_kernel`` with the JSD's da tiles."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    programs = tl.num_programs(0)
    if OWN_ROWS:
        own_len = N
        sweep_len = V
        BLOCK_OWN: tl.constexpr = BLOCK_N
        BLOCK_SWEEP: tl.constexpr = BLOCK_V
    else:
        own_len = V
        sweep_len = N
        BLOCK_OWN: tl.constexpr = BLOCK_V
        BLOCK_SWEEP: tl.constexpr = BLOCK_N
    sweep_lo = seg * TILES_PER_SEG * BLOCK_SWEEP
    sweep_hi = tl.minimum(sweep_lo + TILES_PER_SEG * BLOCK_SWEEP, sweep_len)
    # int64 offsets: N·H, V·H and the buffers may exceed 2^31 entries.
    scratch_ptr += (seg * programs + pid).to(tl.int64) * (BLOCK_OWN * CHUNK)
    out_ptr += seg.to(tl.int64) * own_len * H
    out_bias_ptr += seg.to(tl.int64) * V
    arange_sweep = tl.arange(0, BLOCK_SWEEP)

    for block in range(pid, tl.cdiv(own_len, BLOCK_OWN), programs):
        offs_own = (block * BLOCK_OWN + tl.arange(0, BLOCK_OWN)).to(tl.int64)
        mask_own = offs_own < own_len
        bias_acc = tl.zeros((BLOCK_V,), ACC_DTYPE)
        for chunk in range(sweep_lo, sweep_hi, CHUNK):
            chunk_len = tl.minimum(sweep_hi - chunk, CHUNK)
            for first in range(0, chunk_len, BLOCK_SWEEP):
                offs_sweep = (chunk + first + arange_sweep).to(tl.int64)
                mask_sweep = offs_sweep < sweep_len
                if OWN_ROWS:
                    da = _jsd_da_tile(
                        x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr, w_sum_ptr,
                        grad_ptr, offs_own, offs_sweep, mask_own, mask_sweep, H, TH,
                        stride_xn, stride_xh, stride_wv, stride_wh, stride_txn, stride_txh, stride_twv, stride_twh,
                        HAS_BIAS, HAS_TEACHER_BIAS, SHARED_WEIGHT, BETA_CASE, HAS_CAP, T_HAS_CAP,
                        DOT_UPCAST, PRECISION, T_DOT_UPCAST, T_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
                else:
                    da = _jsd_da_tile(
                        x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr, w_sum_ptr,
                        grad_ptr, offs_sweep, offs_own, mask_sweep, mask_own, H, TH,
                        stride_xn, stride_xh, stride_wv, stride_wh, stride_txn, stride_txh, stride_twv, stride_twh,
                        HAS_BIAS, HAS_TEACHER_BIAS, SHARED_WEIGHT, BETA_CASE, HAS_CAP, T_HAS_CAP,
                        DOT_UPCAST, PRECISION, T_DOT_UPCAST, T_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
                    if NEED_BIAS_GRAD:
                        bias_acc += tl.sum(da, axis=0)
                if NEED_OUT:
                    store_chunk_tile(scratch_ptr, da, first, OWN_ROWS, BLOCK_N, BLOCK_V, CHUNK)
            if NEED_OUT:
                tl.debug_barrier()  # the chunk buffer is written by all threads before any reads it
                if OWN_ROWS:
                    add_chunk_product(out_ptr, offs_own, mask_own, scratch_ptr, chunk_len,
                                      w_ptr, chunk, stride_wv, stride_wh, H,
                                      ACC_DTYPE, DOT_UPCAST, PRECISION, BLOCK_OWN, CHUNK, BLOCK_C, BLOCK_K)
                else:
                    add_chunk_product(out_ptr, offs_own, mask_own, scratch_ptr, chunk_len,
                                      x_ptr, chunk, stride_xn, stride_xh, H,
                                      ACC_DTYPE, DOT_UPCAST, PRECISION, BLOCK_OWN, CHUNK, BLOCK_C, BLOCK_K)
                tl.debug_barrier()  # ... and read by all before the next chunk overwrites it
        if NEED_BIAS_GRAD:
            tl.store(out_bias_ptr + offs_own, bias_acc, mask=mask_own)


def jsd_backward(
    student: Head,
    teacher: Head,
    beta: float,
    stats: JSDStats,
    grad: torch.Tensor,
    needs: GradNeeds = ALL_GRADS,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
    chunk: int | None = None,
) -> HeadGrads:
    """Gradients of Σ_n grad[n]·JSD_β(n) w.r.t. the student hidden, weight and bias (``Backend.jsd_backward``).

    Args: those of ``jsd_forward``, with ``stats`` from it and ``grad`` [N] (∂L/∂value), the
    gradients to form, and the chunk of ``head_backward``. Returns HeadGrads in the accumulator
    dtype (float32; float64 for float64 inputs).
    """
    launch = prepare(student, teacher, beta, stats.lse, stats.teacher_lse)
    n, v, acc_dtype = launch.n, launch.v, launch.acc_dtype
    _launch.check_row_vector("w_sum", stats.w_sum, n)
    _launch.check_row_vector("grad", grad, n)
    needs = needs.of(student)
    if n == 0 or v == 0 or not needs.any:
        return _launch.gradient_buffers(student, needs, acc_dtype)
    dtype = operand_dtype(student, teacher)

    def tile_for(own_rows):
        return _launch.backward_tiles(dtype, block_n, block_v, block_h, chunk)

    hidden = student.hidden
    grads = HeadGrads()
    for sweep in _launch.grad_sweeps(tile_for, n, v, hidden.shape[1], needs, acc_dtype, hidden.dtype, hidden.device):
        _jsd_backward_kernel[sweep.grid](
            *launch.inputs, stats.w_sum.to(acc_dtype).contiguous(), grad.to(acc_dtype).contiguous(),
            sweep.out, sweep.out_bias, sweep.scratch, *launch.sizes, sweep.tiles_per_segment,
            OWN_ROWS=sweep.own_rows, NEED_OUT=sweep.need_out, NEED_BIAS_GRAD=sweep.need_bias, **launch.meta,
            **sweep.tiles.meta(), num_warps=sweep.tiles.num_warps, num_stages=sweep.tiles.num_stages,
        )
        sweep.collect(grads)
    return grads
