"""Backward sweep of the output layer: gradients of hidden, weight and bias from per-row coefficients.

Math (SPEC §2; every loss of the library reduces to it). With the student logits

    a[n, v] = hidden[n] · weight[v] + bias[v],   z[n, v] = cap_c(s · a[n, v]) / τ,   p[n, v] = exp(z[n, v] − lse[n])

and the per-row coefficients of ``HeadGradCoefs``,

    dz[n, v] = p[n, v] · (row_coef[n] + logit_coef[n] · (z[n, v] − logit_shift[n])) + target_coef[n] · [v = targets[n]]
               + Σ_m sparse_coef[n, m] · [v = sparse_ids[n, m]]
    da = dz · ∂z/∂a = dz · (1 − tanh²(s·a/c)) · s/τ        (dz · s/τ without a cap)
    grad_hidden = da @ weight,   grad_weight = daᵀ @ hidden,   grad_bias = Σ_n da[n, :].

How: one program per (BLOCK_N rows × BLOCK_V vocabulary) tile. It recomputes the logits tile
(``tiles.logits_tile``), forms dz in registers, then atomically adds dz @ weight-tile into a
float32 grad_hidden and dzᵀ @ hidden-tile into a float32 grad_weight (``accumulate_head_grads``;
the scheme of Apple's cut-cross-entropy). Nothing of size N×V is ever allocated; the extra memory
is the float32 accumulators of the gradients, returned as they are (the autograd layer casts once).

The sparse terms (all triples merged into one sorted, padded array per row by ``pad_sparse``) are
added into the dz tile before its dot products, so that a dense part and a sparse part of one
logit cancel in dz first, at |dz| magnitude, and not after both have been multiplied by a
possibly huge hidden row.

Dtypes: float32, bfloat16, float16 (fp32 accumulation) and float64 (fp64 accumulation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import ALL_GRADS, GradNeeds, Head, HeadGradCoefs, HeadGrads
from ..sparse_layout import pad_sparse
from . import _launch
from .tiles import accumulate_head_grads, add_sparse_terms, logits_tile, tile_ids, to_logits


@triton.jit
def _head_backward_kernel(
    x_ptr, w_ptr, b_ptr, scalars_ptr,
    lse_ptr, row_coef_ptr, logit_coef_ptr, logit_shift_ptr, targets_ptr, target_coef_ptr,
    sparse_ids_ptr, sparse_coef_ptr,
    gx_ptr, gw_ptr, gb_ptr,
    N, V, H, M, search_steps,
    stride_xn, stride_xh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_LOGIT_COEF: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_SPARSE: tl.constexpr,
    NEED_X_GRAD: tl.constexpr, NEED_W_GRAD: tl.constexpr, NEED_B_GRAD: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_v = tile_ids(N, V, BLOCK_N, BLOCK_V, GROUP_N)
    # int64 offsets: N·H and V·H may exceed 2^31.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V

    a, _ = logits_tile(x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H,
                       stride_xn, stride_xh, stride_wv, stride_wh, x_ptr, b_ptr, 0, 0,
                       HAS_BIAS, False, False, DOT_UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    z, t = to_logits(a, scalars_ptr, HAS_CAP)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    # Padding rows/columns have finite but meaningless z (exp(bias/τ) may even overflow there):
    # give them log p = 0 here and zero their dz below, before any reduction.
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
                              pid_v.to(tl.int64) * BLOCK_V, M, search_steps, BLOCK_N, BLOCK_V)
    if HAS_CAP:  # ∂z/∂a = (1 − t²)·s/τ
        dz = dz * (1.0 - t * t)
    dz = tl.where(valid, dz * tl.load(scalars_ptr), 0.0)

    accumulate_head_grads(dz, x_ptr, w_ptr, gx_ptr, gw_ptr, gb_ptr,
                          offs_n, offs_v, mask_n, mask_v, H,
                          stride_xn, stride_xh, stride_wv, stride_wh,
                          NEED_X_GRAD, NEED_W_GRAD, NEED_B_GRAD, DOT_UPCAST, PRECISION, BLOCK_H)


def head_backward(
    head: Head,
    lse: torch.Tensor,
    coefs: HeadGradCoefs,
    needs: GradNeeds = ALL_GRADS,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
) -> HeadGrads:
    """Gradients of the loss whose ∂L/∂z is ``coefs`` (see module doc; ``Backend.head_backward``).

    Args:
        head: hidden [N, H] and weight [V, H] of one dtype (float32 / bfloat16 / float16 /
            float64), bias [V] or None, temperature τ > 0.
        lse: [N] logsumexp of z (any float dtype; converted to the accumulator's).
        coefs: the per-row coefficients; target ids in [0, V) (masked rows removed by the caller),
            sparse ids in any order (an id outside [0, V) matches no column; repeated ids add up).
        needs: the gradients to form (a head without bias forms no bias gradient).
        block_n, block_v, block_h: tile overrides (powers of 2, ≥ 16), for tests and tuning.

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
            _launch.check_row_vector(name, vec, n, device)
    if coefs.targets is not None and (coefs.targets.dtype.is_floating_point or coefs.targets.dtype == torch.bool):
        raise TypeError(f"targets must be int64, got {coefs.targets.dtype}")
    for terms in coefs.sparse:
        if terms.ids.device != device or terms.row_index.device != device:
            raise ValueError(f"sparse terms are on {terms.ids.device}, expected {device}")
        if terms.row_index.numel() and (int(terms.row_index.min()) < 0 or int(terms.row_index.max()) >= n):
            raise ValueError(f"sparse row_index must lie in [0, {n})")

    needs = needs.of(head)
    grads = _launch.gradient_buffers(head, needs, acc_dtype)
    if n == 0 or v == 0 or not needs.any:
        return grads

    def vec(t):
        return t.to(acc_dtype).contiguous()

    scalars = torch.tensor(head.transform_scalars(), dtype=acc_dtype, device=device)
    dummy = scalars  # stands in for absent optional pointers (never read: constexpr flags)
    padded = pad_sparse(n, v, coefs.sparse, acc_dtype)
    sparse_ids, sparse_coef = padded if padded is not None else (dummy, dummy)
    m = sparse_ids.shape[1] if padded is not None else 0
    bias = head.bias.contiguous() if head.bias is not None else None
    hidden, weight = head.hidden, head.weight
    bn, bv, bh, warps = _launch.resolve_tiles(hidden.dtype, block_n, block_v, block_h)
    grid = (triton.cdiv(n, bn) * triton.cdiv(v, bv),)
    _head_backward_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, scalars,
        vec(lse), vec(coefs.row_coef),
        vec(coefs.logit_coef) if coefs.logit_coef is not None else dummy,
        vec(coefs.logit_shift) if coefs.logit_shift is not None else torch.zeros(n, dtype=acc_dtype, device=device),
        coefs.targets.to(torch.int64).contiguous() if coefs.targets is not None else dummy,
        vec(coefs.target_coef) if coefs.target_coef is not None else dummy,
        sparse_ids, sparse_coef,
        grads.hidden if grads.hidden is not None else dummy, grads.weight if grads.weight is not None else dummy,
        grads.bias if grads.bias is not None else dummy,
        n, v, h, m, m.bit_length(),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, HAS_CAP=head.softcap is not None, HAS_LOGIT_COEF=coefs.logit_coef is not None,
        HAS_TARGETS=coefs.targets is not None, HAS_SPARSE=padded is not None,
        NEED_X_GRAD=needs.hidden, NEED_W_GRAD=needs.weight, NEED_B_GRAD=needs.bias,
        **_launch.dot_meta(hidden.dtype),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, GROUP_N=_launch.GROUP_N,
        num_warps=warps,
    )
    return grads
