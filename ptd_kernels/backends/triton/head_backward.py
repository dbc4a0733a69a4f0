"""Backward sweep of the output layer: gradients of hidden, weight and bias from per-row coefficients.

Math (docs/method.md §2; every loss of the library reduces to it). With the student logits

    a[n, v] = hidden[n] · weight[v] + bias[v],   z[n, v] = cap_c(s · a[n, v]) / τ,   p[n, v] = exp(z[n, v] − lse[n])

and the per-row coefficients of ``HeadGradCoefs``,

    dz[n, v] = p[n, v] · (row_coef[n] + logit_coef[n] · (z[n, v] − logit_shift[n])) + target_coef[n] · [v = targets[n]]
               + Σ_m sparse_coef[n, m] · [v = sparse_ids[n, m]]
    da = dz · ∂z/∂a = dz · (1 − tanh²(s·a/c)) · s/τ        (dz · s/τ without a cap)
    grad_hidden = da @ weight,   grad_weight = daᵀ @ hidden,   grad_bias = Σ_n da[n, :].

How: one kernel, launched as two sweeps that differ in what a program owns (``OWN_ROWS``):

- rows: a program owns a block of BLOCK_N rows of grad_hidden and sweeps the vocabulary;
- vocabulary: a program owns a block of BLOCK_V rows of grad_weight (and of grad_bias) and sweeps
  the rows.

Either way it recomputes logits tiles (``tiles.logits_tile``), forms da tiles in registers and
writes them into its own chunk buffer, CHUNK entries of the swept axis at a time; then it adds
buffer @ operand into the rows it owns with a plain read-modify-write (``tiles.add_chunk_product``:
weight rows for grad_hidden, hidden rows for grad_weight). No two programs write the same gradient
entry, so there is no atomic, and the sums are formed in a fixed order (the same bits run to run).
The price of owning both gradients this way is one more recomputation of the logits than a single
sweep with atomics: a program that owns BLOCK_N rows sees only those rows, so its share of
grad_weight would be one of N / BLOCK_N partial sums of every weight entry. The chunk buffer, not
the gradient, takes the per-tile traffic: the owned gradient rows are read and written once per
CHUNK entries of the sweep. A persistent grid (about one program per SM) bounds the buffers;
when the owned axis has too few blocks to fill the GPU, the swept axis is split into segments
whose partial gradients a torch sum adds (``_launch.GradSweep``).

The sparse terms (all triples merged into one sorted, padded array per row by ``pad_sparse``) are
added into the dz tile before its dot products, so that a dense part and a sparse part of one
logit cancel in dz first, at |dz| magnitude, and not after both have been multiplied by a
possibly huge hidden row.

Dtypes: float32, bfloat16, float16 (fp32 accumulation) and float64 (fp64 accumulation). The
gradient dots take da in the operands' dtype (bf16 tensor cores on a GPU), like torch's backward of
a bf16 linear layer, with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import ALL_GRADS, GradNeeds, Head, HeadGradCoefs, HeadGrads
from ..sparse_layout import pad_sparse
from . import _launch
from .tiles import add_chunk_product, add_sparse_terms, logits_tile, store_chunk_tile, to_logits


@triton.jit
def _head_da_tile(
    x_ptr, w_ptr, b_ptr, scalars_ptr,
    lse_ptr, row_coef_ptr, logit_coef_ptr, logit_shift_ptr, targets_ptr, target_coef_ptr,
    sparse_ids_ptr, sparse_coef_ptr,
    offs_n, offs_v, mask_n, mask_v, v_start, H, M, search_steps,
    stride_xn, stride_xh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_LOGIT_COEF: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_SPARSE: tl.constexpr, DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """da = ∂L/∂a on the tile (rows offs_n, columns offs_v = v_start + 0..BLOCK_V−1), zero outside the
    valid rows and columns."""
    a, _ = logits_tile(x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H,
                       stride_xn, stride_xh, stride_wv, stride_wh, x_ptr, b_ptr, 0, 0,
                       HAS_BIAS, False, False, DOT_UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    z, t = to_logits(a, scalars_ptr, HAS_CAP)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    # Padding rows/columns have finite but meaningless z (exp(bias/τ) may even overflow there):
    # give them log p = 0 here and zero their da below, before any reduction.
    valid = mask_n[:, None] & mask_v[None, :]
    p = tl.exp(tl.where(valid, z - lse[:, None], 0.0))
    coef = tl.load(row_coef_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    if HAS_LOGIT_COEF:
        shift = tl.load(logit_shift_ptr + offs_n, mask=mask_n, other=0.0)
        coef = coef + tl.load(logit_coef_ptr + offs_n, mask=mask_n, other=0.0)[:, None] * (z - shift[:, None])
    dz = p * coef
    if HAS_TARGETS:
        target = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)
        target_coef = tl.load(target_coef_ptr + offs_n, mask=mask_n, other=0.0)
        dz += tl.where(offs_v[None, :] == target[:, None], target_coef[:, None], 0.0)
    if HAS_SPARSE:
        dz = add_sparse_terms(dz, sparse_ids_ptr, sparse_coef_ptr, offs_n, offs_v, mask_n,
                              v_start, M, search_steps, BLOCK_N, BLOCK_V)
    if HAS_CAP:  # ∂z/∂a = (1 − t²)·s/τ
        dz = dz * (1.0 - t * t)
    return tl.where(valid, dz * tl.load(scalars_ptr), 0.0)


@triton.jit
def _head_backward_kernel(
    x_ptr, w_ptr, b_ptr, scalars_ptr,
    lse_ptr, row_coef_ptr, logit_coef_ptr, logit_shift_ptr, targets_ptr, target_coef_ptr,
    sparse_ids_ptr, sparse_coef_ptr,
    out_ptr, out_bias_ptr, scratch_ptr,
    N, V, H, M, search_steps, TILES_PER_SEG,
    stride_xn, stride_xh, stride_wv, stride_wh,
    OWN_ROWS: tl.constexpr, NEED_OUT: tl.constexpr, NEED_BIAS_GRAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_LOGIT_COEF: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_SPARSE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (pid, segment): owned blocks pid, pid + programs, ...; the swept axis' tiles of its segment.

    OWN_ROWS: out = grad_hidden [segments, N, H] (partial per segment). Else: out = grad_weight
    [segments, V, H] and out_bias = grad_bias [segments, V]. scratch: one [BLOCK_own, CHUNK] buffer
    per program, in the operands' dtype.
    """
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
                    da = _head_da_tile(
                        x_ptr, w_ptr, b_ptr, scalars_ptr, lse_ptr, row_coef_ptr, logit_coef_ptr, logit_shift_ptr,
                        targets_ptr, target_coef_ptr, sparse_ids_ptr, sparse_coef_ptr,
                        offs_own, offs_sweep, mask_own, mask_sweep, chunk + first, H, M, search_steps,
                        stride_xn, stride_xh, stride_wv, stride_wh,
                        HAS_BIAS, HAS_CAP, HAS_LOGIT_COEF, HAS_TARGETS, HAS_SPARSE, DOT_UPCAST, PRECISION,
                        BLOCK_N, BLOCK_V, BLOCK_H)
                else:
                    da = _head_da_tile(
                        x_ptr, w_ptr, b_ptr, scalars_ptr, lse_ptr, row_coef_ptr, logit_coef_ptr, logit_shift_ptr,
                        targets_ptr, target_coef_ptr, sparse_ids_ptr, sparse_coef_ptr,
                        offs_sweep, offs_own, mask_sweep, mask_own, block * BLOCK_V, H, M, search_steps,
                        stride_xn, stride_xh, stride_wv, stride_wh,
                        HAS_BIAS, HAS_CAP, HAS_LOGIT_COEF, HAS_TARGETS, HAS_SPARSE, DOT_UPCAST, PRECISION,
                        BLOCK_N, BLOCK_V, BLOCK_H)
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


def head_backward(
    head: Head,
    lse: torch.Tensor,
    coefs: HeadGradCoefs,
    needs: GradNeeds = ALL_GRADS,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
    chunk: int | None = None,
) -> HeadGrads:
    """Gradients of the loss whose ∂L/∂z is ``coefs`` (see module doc; ``Backend.head_backward``).

    Args:
        head: hidden [N, H] and weight [V, H] of one dtype (float32 / bfloat16 / float16 /
            float64), bias [V] or None, temperature τ > 0.
        lse: [N] logsumexp of z (any float dtype; converted to the accumulator's).
        coefs: the per-row coefficients; target ids in [0, V) (masked rows removed by the caller),
            sparse ids in any order (an id outside [0, V) matches no column; repeated ids add up).
        needs: the gradients to form (a head without bias forms no bias gradient).
        block_n, block_v, block_h, chunk: tile and chunk overrides (powers of 2, ≥ 16), for tests
            and tuning.

    Returns:
        HeadGrads in the accumulator dtype (float32; float64 for float64 inputs), None where not needed.
    """
    n, v, h = _launch.check_head(head)
    device = head.hidden.device
    acc_dtype = _launch.accumulator_dtype(head.hidden.dtype)
    for name, vec in (("lse", lse), ("row_coef", coefs.row_coef), ("logit_coef", coefs.logit_coef),
                      ("target_coef", coefs.target_coef), ("logit_shift", coefs.logit_shift),
                      ("targets", coefs.targets)):
        if vec is not None:
            _launch.check_row_vector(name, vec, n)
    needs = needs.of(head)
    if n == 0 or v == 0 or not needs.any:
        return _launch.gradient_buffers(head, needs, acc_dtype)

    def vec(t):
        return t.to(acc_dtype).contiguous()

    scalars = _launch.device_scalars(head.transform_scalars(), acc_dtype, device)
    dummy = scalars  # stands in for absent optional pointers (never read: constexpr flags)
    padded = pad_sparse(n, v, coefs.sparse, acc_dtype)
    sparse_ids, sparse_coef = padded if padded is not None else (dummy, dummy)
    m = sparse_ids.shape[1] if padded is not None else 0
    bias = head.bias.contiguous() if head.bias is not None else None
    hidden, weight = head.hidden, head.weight

    def tile_for(own_rows):
        return _launch.backward_tiles(hidden.dtype, block_n, block_v, block_h, chunk, dense=padded is None,
                                      own_rows=own_rows)

    inputs = (
        hidden, weight, bias if bias is not None else dummy, scalars,
        vec(lse), vec(coefs.row_coef),
        vec(coefs.logit_coef) if coefs.logit_coef is not None else dummy,
        vec(coefs.logit_shift) if coefs.logit_shift is not None else torch.zeros(n, dtype=acc_dtype, device=device),
        coefs.targets.to(torch.int64).contiguous() if coefs.targets is not None else dummy,
        vec(coefs.target_coef) if coefs.target_coef is not None else dummy,
        sparse_ids, sparse_coef,
    )
    meta = dict(
        HAS_BIAS=bias is not None, HAS_CAP=head.softcap is not None, HAS_LOGIT_COEF=coefs.logit_coef is not None,
        HAS_TARGETS=coefs.targets is not None, HAS_SPARSE=padded is not None,
        ACC_DTYPE=_launch.tl_dtype(acc_dtype), **_launch.dot_meta(hidden.dtype),
    )
    grads = HeadGrads()
    for sweep in _launch.grad_sweeps(tile_for, n, v, h, needs, acc_dtype, hidden.dtype, device):
        _head_backward_kernel[sweep.grid](
            *inputs, sweep.out, sweep.out_bias, sweep.scratch,
            n, v, h, m, m.bit_length(), sweep.tiles_per_segment,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            OWN_ROWS=sweep.own_rows, NEED_OUT=sweep.need_out, NEED_BIAS_GRAD=sweep.need_bias, **meta,
            **sweep.tiles.meta(), num_warps=sweep.tiles.num_warps, num_stages=sweep.tiles.num_stages,
        )
        sweep.collect(grads)
    return grads
