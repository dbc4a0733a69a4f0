"""Full-vocabulary generalized JSD fused with both output layers: a forward and a backward sweep.

Math (SPEC §2). Student z = (hidden @ weightᵀ + bias)/τ, teacher z' = (teacher_hidden @
teacher_weightᵀ + teacher_bias)/τ (H' may differ from H; the teacher gets no gradient). With
logp = z − lse and logq = z' − teacher_lse (both lse computed beforehand), each vocabulary entry
gives ``(d, w) = jsd_pointwise(logp, logq, β)`` (``_math.py``, the twin of
``_rowmath.jsd_pointwise``), and

    forward:   value[n] = Σ_v d[n, v],   w_sum[n] = Σ_v w[n, v]
    backward:  dz[n, v] = grad[n] · (w[n, v] − p[n, v] · w_sum[n]),   p = exp(logp)
               grad_hidden = dz @ weight / τ,  grad_weight = dzᵀ @ hidden / τ,  grad_bias = Σ_n dz / τ.

How: both sweeps launch one program per (BLOCK_N rows × BLOCK_V vocabulary) tile, which
recomputes the student and teacher logits tiles (loops over H and H'). The forward atomically
adds its per-row partial sums into value and w_sum; the backward forms dz in registers and hands
it to ``head_backward.accumulate_head_grads`` (atomic adds into float32 gradient accumulators).
Nothing of size N×V is allocated.

Shared weight: when ``teacher_weight is weight`` (self-distillation with a privileged context)
and both hiddens share a dtype, each weight tile is loaded once and multiplied by both hidden
tiles.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _launch
from ._math import beta_case, jsd_pointwise
from .head_backward import (
    GROUP_N,
    accumulate_head_grads,
    check_head,
    check_row_vector,
    dot_precision,
    finish_grads,
    logits_tile,
    resolve_tiles,
    tile_ids,
)

# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _student_teacher_logits(
    x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, inv_tau,
    offs_n, offs_v, mask_n, mask_v, H, TH,
    stride_xn, stride_xh, stride_wv, stride_wh,
    stride_txn, stride_txh, stride_twv, stride_twh,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    T_DOT_UPCAST: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Student and teacher logits tiles [BLOCK_N, BLOCK_V], both in inv_tau's dtype."""
    if SHARED_WEIGHT:
        # One weight tile, two dots (H' = H and the hiddens share the weight's dtype here).
        if x_ptr.dtype.element_ty == tl.float64:
            acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float64)
            t_acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            t_acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            offs_k = k0 + tl.arange(0, BLOCK_H)
            mask_k = offs_k < H
            mask_nk = mask_n[:, None] & mask_k[None, :]
            x = tl.load(x_ptr + offs_n[:, None] * stride_xn + offs_k[None, :] * stride_xh, mask=mask_nk, other=0.0)
            tx = tl.load(tx_ptr + offs_n[:, None] * stride_txn + offs_k[None, :] * stride_txh, mask=mask_nk, other=0.0)
            wt = tl.load(w_ptr + offs_k[:, None] * stride_wh + offs_v[None, :] * stride_wv,
                         mask=mask_k[:, None] & mask_v[None, :], other=0.0)
            if DOT_UPCAST:
                x = x.to(tl.float32)
                tx = tx.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(x, wt, acc, input_precision=PRECISION)
            t_acc = tl.dot(tx, wt, t_acc, input_precision=PRECISION)
        z = acc.to(inv_tau.dtype)
        zt = t_acc.to(inv_tau.dtype)
        if HAS_BIAS:
            z = z + tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(inv_tau.dtype)[None, :]
        if HAS_TEACHER_BIAS:
            zt = zt + tl.load(tb_ptr + offs_v, mask=mask_v, other=0.0).to(inv_tau.dtype)[None, :]
        z = z * inv_tau
        zt = zt * inv_tau
    else:
        z = logits_tile(x_ptr, w_ptr, b_ptr, inv_tau, offs_n, offs_v, mask_n, mask_v, H,
                        stride_xn, stride_xh, stride_wv, stride_wh,
                        HAS_BIAS, DOT_UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        zt = logits_tile(tx_ptr, tw_ptr, tb_ptr, inv_tau, offs_n, offs_v, mask_n, mask_v, TH,
                         stride_txn, stride_txh, stride_twv, stride_twh,
                         HAS_TEACHER_BIAS, T_DOT_UPCAST, T_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    return z, zt


@triton.jit
def _jsd_tile(
    x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
    N, V, H, TH,
    stride_xn, stride_xh, stride_wv, stride_wh,
    stride_txn, stride_txh, stride_twv, stride_twh,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr, BETA_CASE: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, T_DOT_UPCAST: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    """This program's tile: offsets, masks, logp and the per-entry (d, w), zero outside the valid tile."""
    pid_n, pid_v = tile_ids(N, V, BLOCK_N, BLOCK_V, GROUP_N)
    # int64 offsets: N·H and V·H may exceed 2^31.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    # scalars = [1/τ, β, log β, log(1 − β)] in the accumulator dtype (exact for float64 inputs).
    inv_tau = tl.load(scalars_ptr)
    beta = tl.load(scalars_ptr + 1)
    log_beta = tl.load(scalars_ptr + 2)
    log1m_beta = tl.load(scalars_ptr + 3)

    z, zt = _student_teacher_logits(
        x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, inv_tau,
        offs_n, offs_v, mask_n, mask_v, H, TH,
        stride_xn, stride_xh, stride_wv, stride_wh,
        stride_txn, stride_txh, stride_twv, stride_twh,
        HAS_BIAS, HAS_TEACHER_BIAS, SHARED_WEIGHT, DOT_UPCAST, PRECISION, T_DOT_UPCAST, T_PRECISION,
        BLOCK_N, BLOCK_V, BLOCK_H)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    t_lse = tl.load(t_lse_ptr + offs_n, mask=mask_n, other=0.0)
    # Padding rows/columns have finite but meaningless logits (exp(bias/τ) may even overflow
    # there): give them log p = log q = 0 and zero their d and w before any reduction.
    valid = mask_n[:, None] & mask_v[None, :]
    # lse may come in float64: z − lse is then exact before it is rounded back, so that a rounded
    # lse cannot shift every log-prob of the row (Σp ≠ 1 shows as negative divergences).
    logp = tl.where(valid, (z - lse[:, None]).to(z.dtype), 0.0)
    logq = tl.where(valid, (zt - t_lse[:, None]).to(zt.dtype), 0.0)
    d, w = jsd_pointwise(logp, logq, beta, log_beta, log1m_beta, BETA_CASE)
    d = tl.where(valid, d, 0.0)
    w = tl.where(valid, w, 0.0)
    return offs_n, offs_v, mask_n, mask_v, valid, logp, d, w


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _jsd_forward_kernel(
    x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
    value_ptr, w_sum_ptr,
    N, V, H, TH,
    stride_xn, stride_xh, stride_wv, stride_wh,
    stride_txn, stride_txh, stride_twv, stride_twh,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr, BETA_CASE: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, T_DOT_UPCAST: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    offs_n, offs_v, mask_n, mask_v, valid, logp, d, w = _jsd_tile(
        x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
        N, V, H, TH,
        stride_xn, stride_xh, stride_wv, stride_wh,
        stride_txn, stride_txh, stride_twv, stride_twh,
        HAS_BIAS, HAS_TEACHER_BIAS, SHARED_WEIGHT, BETA_CASE,
        DOT_UPCAST, PRECISION, T_DOT_UPCAST, T_PRECISION,
        BLOCK_N, BLOCK_V, BLOCK_H, GROUP_N)
    tl.atomic_add(value_ptr + offs_n, tl.sum(d, axis=1), mask=mask_n, sem="relaxed")
    tl.atomic_add(w_sum_ptr + offs_n, tl.sum(w, axis=1), mask=mask_n, sem="relaxed")


@triton.jit
def _jsd_backward_kernel(
    x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
    w_sum_ptr, grad_ptr, gx_ptr, gw_ptr, gb_ptr,
    N, V, H, TH,
    stride_xn, stride_xh, stride_wv, stride_wh,
    stride_txn, stride_txh, stride_twv, stride_twh,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr, BETA_CASE: tl.constexpr,
    NEED_X_GRAD: tl.constexpr, NEED_W_GRAD: tl.constexpr, NEED_B_GRAD: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, T_DOT_UPCAST: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    offs_n, offs_v, mask_n, mask_v, valid, logp, d, w = _jsd_tile(
        x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
        N, V, H, TH,
        stride_xn, stride_xh, stride_wv, stride_wh,
        stride_txn, stride_txh, stride_twv, stride_twh,
        HAS_BIAS, HAS_TEACHER_BIAS, SHARED_WEIGHT, BETA_CASE,
        DOT_UPCAST, PRECISION, T_DOT_UPCAST, T_PRECISION,
        BLOCK_N, BLOCK_V, BLOCK_H, GROUP_N)
    inv_tau = tl.load(scalars_ptr)
    w_sum = tl.load(w_sum_ptr + offs_n, mask=mask_n, other=0.0)
    grad = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0)
    # ∂D/∂z_v = w_v − p_v·Σw (softmax chain rule); then the 1/τ of z = (·)/τ.
    dz = grad[:, None] * (w - tl.exp(logp) * w_sum[:, None])
    dz = tl.where(valid, dz * inv_tau, 0.0)
    accumulate_head_grads(dz, x_ptr, w_ptr, gx_ptr, gw_ptr, gb_ptr,
                          offs_n, offs_v, mask_n, mask_v, H,
                          stride_xn, stride_xh, stride_wv, stride_wh,
                          NEED_X_GRAD, NEED_W_GRAD, NEED_B_GRAD, DOT_UPCAST, PRECISION, BLOCK_H)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _normalizer(lse, acc_dtype):
    """lse as the kernels read it: float64 stays float64 (the exact normalizer), else acc_dtype."""
    return (lse if lse.dtype == torch.float64 else lse.to(acc_dtype)).contiguous()


def _prepare(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, lse,
             teacher_lse, beta, block_n, block_v, block_h):
    """Validates the inputs; returns the launch arguments shared by both sweeps."""
    n, v, h = check_head(hidden, weight, bias, temperature)
    tn, tv, th = check_head(teacher_hidden, teacher_weight, teacher_bias, temperature, prefix="teacher_")
    if tn != n:
        raise ValueError(f"teacher_hidden has {tn} rows, hidden has {n}")
    if tv != v:
        raise ValueError(f"teacher vocabulary ({tv}) must equal the student vocabulary ({v})")
    if teacher_hidden.device != hidden.device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device}, hidden on {hidden.device}")
    beta, temperature = float(beta), float(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    device = hidden.device
    check_row_vector("lse", lse, n, device)
    check_row_vector("teacher_lse", teacher_lse, n, device)
    acc_dtype = _launch.accumulator_dtype(hidden.dtype)
    shared = teacher_weight is weight and teacher_hidden.dtype == hidden.dtype
    # log β and log(1 − β) in double precision on the host; only the mixture case reads them.
    case = beta_case(beta)
    log_beta = math.log(beta) if beta > 0.0 else 0.0
    log1m_beta = math.log1p(-beta) if beta < 1.0 else 0.0
    scalars = torch.tensor([1.0 / temperature, beta, log_beta, log1m_beta], dtype=acc_dtype, device=device)
    # Tiles fit the larger of the two operand footprints.
    wide = torch.float64 if torch.float64 in (hidden.dtype, teacher_hidden.dtype) else hidden.dtype
    bn, bv, bh, warps = resolve_tiles(wide, block_n, block_v, block_h)
    args = (
        hidden, weight, bias if bias is not None else scalars,
        teacher_hidden, teacher_weight, teacher_bias if teacher_bias is not None else scalars,
        scalars, _normalizer(lse, acc_dtype), _normalizer(teacher_lse, acc_dtype),
    )
    sizes = (
        n, v, h, th,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        teacher_hidden.stride(0), teacher_hidden.stride(1), teacher_weight.stride(0), teacher_weight.stride(1),
    )
    meta = dict(
        HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=teacher_bias is not None, SHARED_WEIGHT=shared,
        BETA_CASE=case,
        DOT_UPCAST=_launch.dot_upcast(hidden.dtype), PRECISION=dot_precision(hidden.dtype),
        T_DOT_UPCAST=_launch.dot_upcast(teacher_hidden.dtype), T_PRECISION=dot_precision(teacher_hidden.dtype),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, GROUP_N=GROUP_N, num_warps=warps,
    )
    grid = (triton.cdiv(n, bn) * triton.cdiv(v, bv),)
    return n, v, h, acc_dtype, args, sizes, meta, grid


def jsd_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    temperature: float,
    lse: torch.Tensor,
    teacher_lse: torch.Tensor,
    beta: float,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
):
    """Per-row full-vocabulary JSD_β and Σ_v w (see module doc).

    Args:
        hidden [N, H], weight [V, H], bias [V] or None: the student output layer.
        teacher_hidden [N, H'], teacher_weight [V, H'], teacher_bias [V] or None: the teacher's
            (any supported dtype, possibly different from the student's).
        temperature: τ > 0, shared by both sides.
        lse, teacher_lse: [N] logsumexp of z and z' (pass float64 for an exact normalizer; see
            ``row_stats(..., lse_dtype=torch.float64)``).
        beta: β in [0, 1] (0 → KL(Q ‖ P), 1 → KL(P ‖ Q)).
        block_n, block_v, block_h: tile overrides (powers of 2, ≥ 16), for tests and tuning.

    Returns:
        (value [N], w_sum [N]) in float32 (float64 when hidden is float64).
    """
    n, v, _, acc_dtype, args, sizes, meta, grid = _prepare(
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, lse,
        teacher_lse, beta, block_n, block_v, block_h)
    value = torch.zeros(n, dtype=acc_dtype, device=hidden.device)
    w_sum = torch.zeros(n, dtype=acc_dtype, device=hidden.device)
    if n and v:
        _jsd_forward_kernel[grid](*args, value, w_sum, *sizes, **meta)
    return value, w_sum


def jsd_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    temperature: float,
    lse: torch.Tensor,
    teacher_lse: torch.Tensor,
    beta: float,
    w_sum: torch.Tensor,
    grad: torch.Tensor,
    *,
    need_hidden_grad: bool = True,
    need_weight_grad: bool = True,
    need_bias_grad: bool = True,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
):
    """Gradients of Σ_n grad[n]·JSD_β(n) w.r.t. the student hidden, weight and bias.

    Args: those of ``jsd_forward``, plus ``w_sum`` [N] from it and ``grad`` [N] (∂L/∂value;
    zero for masked rows), and the flags that skip unwanted gradients.

    Returns:
        (grad_hidden [N, H] in hidden.dtype or None, grad_weight [V, H] in weight.dtype or None,
         grad_bias [V] in bias.dtype, or None when bias is None or not needed).
    """
    n, v, h, acc_dtype, args, sizes, meta, grid = _prepare(
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, lse,
        teacher_lse, beta, block_n, block_v, block_h)
    check_row_vector("w_sum", w_sum, n, hidden.device)
    check_row_vector("grad", grad, n, hidden.device)
    device = hidden.device
    need_bias_grad = need_bias_grad and bias is not None
    gx = torch.zeros((n, h), dtype=acc_dtype, device=device) if need_hidden_grad else None
    gw = torch.zeros((v, h), dtype=acc_dtype, device=device) if need_weight_grad else None
    gb = torch.zeros((v,), dtype=acc_dtype, device=device) if need_bias_grad else None
    if n and v and (need_hidden_grad or need_weight_grad or need_bias_grad):
        dummy = args[6]  # the scalars tensor: stands in for gradients not asked for (never written)
        _jsd_backward_kernel[grid](
            *args, w_sum.to(acc_dtype).contiguous(), grad.to(acc_dtype).contiguous(),
            gx if gx is not None else dummy, gw if gw is not None else dummy, gb if gb is not None else dummy,
            *sizes,
            NEED_X_GRAD=need_hidden_grad, NEED_W_GRAD=need_weight_grad, NEED_B_GRAD=need_bias_grad,
            **meta,
        )
    return finish_grads(gx, gw, gb, hidden, weight, bias)
