"""Full-vocabulary generalized JSD fused with both output layers: a forward and a backward sweep.

Math (SPEC §2). Student z = cap_c(s·(hidden @ weightᵀ + bias))/τ, teacher z' = cap_c'(s'·(teacher_hidden @
teacher_weightᵀ + teacher_bias))/τ (H' may differ from H; the teacher gets no gradient). With
logp = z − lse and logq = z' − teacher_lse (both lse from ``row_stats`` first, in float64 so that
z − lse is exact before it is rounded), each vocabulary entry gives
``(d, w) = jsd_pointwise(logp, logq, β)`` (``_math.py``, the twin of ``rowmath.jsd_pointwise``), and

    forward:   value[n] = Σ_v d[n, v],   w_sum[n] = Σ_v w[n, v]
    backward:  dz[n, v] = grad[n] · (w[n, v] − p[n, v] · w_sum[n]),   p = exp(logp)
               da = dz · ∂z/∂a (see head_backward),  grad_hidden = da @ weight,  grad_weight = daᵀ @ hidden,
               grad_bias = Σ_n da.

How: both sweeps launch one program per (BLOCK_N rows × BLOCK_V vocabulary) tile, which
recomputes the student and teacher logits tiles (``tiles.logits_tile``). The forward atomically
adds its per-row partial sums into value and w_sum; the backward forms dz in registers and hands
it to ``tiles.accumulate_head_grads``. Nothing of size N×V is allocated.

Shared output layer (self-distillation with a privileged context: ``Head.shares_layer_with``, both
hiddens of one dtype): each weight tile is loaded once and multiplied by both hidden tiles.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..base import ALL_GRADS, GradNeeds, Head, HeadGrads, JSDStats
from . import _launch
from ._math import beta_case, jsd_pointwise
from .row_stats import row_stats
from .tiles import accumulate_head_grads, logits_tile, tile_ids, to_logits


@triton.jit
def _jsd_tile(
    x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
    N, V, H, TH,
    stride_xn, stride_xh, stride_wv, stride_wh,
    stride_txn, stride_txh, stride_twv, stride_twh,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr, BETA_CASE: tl.constexpr,
    HAS_CAP: tl.constexpr, T_HAS_CAP: tl.constexpr,
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
    # scalars = [β, log β, log(1 − β), then each side's logit transform (s/τ, s/c, c/τ)] in the
    # accumulator dtype (exact for float64 inputs).
    beta = tl.load(scalars_ptr)
    log_beta = tl.load(scalars_ptr + 1)
    log1m_beta = tl.load(scalars_ptr + 2)

    if SHARED_WEIGHT:
        a, ta = logits_tile(x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H,
                            stride_xn, stride_xh, stride_wv, stride_wh, tx_ptr, tb_ptr, stride_txn, stride_txh,
                            HAS_BIAS, HAS_TEACHER_BIAS, True, DOT_UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    else:
        a, _ = logits_tile(x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H,
                           stride_xn, stride_xh, stride_wv, stride_wh, x_ptr, b_ptr, 0, 0,
                           HAS_BIAS, False, False, DOT_UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        ta, _ = logits_tile(tx_ptr, tw_ptr, tb_ptr, offs_n, offs_v, mask_n, mask_v, TH,
                            stride_txn, stride_txh, stride_twv, stride_twh, tx_ptr, tb_ptr, 0, 0,
                            HAS_TEACHER_BIAS, False, False, T_DOT_UPCAST, T_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    z, t = to_logits(a, scalars_ptr + 3, HAS_CAP)
    zt, _ = to_logits(ta.to(a.dtype), scalars_ptr + 6, T_HAS_CAP)
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
    return offs_n, offs_v, mask_n, mask_v, valid, logp, t, d, w


@triton.jit
def _jsd_forward_kernel(
    x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
    value_ptr, w_sum_ptr,
    N, V, H, TH,
    stride_xn, stride_xh, stride_wv, stride_wh,
    stride_txn, stride_txh, stride_twv, stride_twh,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr, BETA_CASE: tl.constexpr,
    HAS_CAP: tl.constexpr, T_HAS_CAP: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, T_DOT_UPCAST: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    offs_n, offs_v, mask_n, mask_v, valid, logp, t, d, w = _jsd_tile(
        x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
        N, V, H, TH,
        stride_xn, stride_xh, stride_wv, stride_wh,
        stride_txn, stride_txh, stride_twv, stride_twh,
        HAS_BIAS, HAS_TEACHER_BIAS, SHARED_WEIGHT, BETA_CASE, HAS_CAP, T_HAS_CAP,
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
    HAS_CAP: tl.constexpr, T_HAS_CAP: tl.constexpr,
    NEED_X_GRAD: tl.constexpr, NEED_W_GRAD: tl.constexpr, NEED_B_GRAD: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, T_DOT_UPCAST: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    offs_n, offs_v, mask_n, mask_v, valid, logp, t, d, w = _jsd_tile(
        x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
        N, V, H, TH,
        stride_xn, stride_xh, stride_wv, stride_wh,
        stride_txn, stride_txh, stride_twv, stride_twh,
        HAS_BIAS, HAS_TEACHER_BIAS, SHARED_WEIGHT, BETA_CASE, HAS_CAP, T_HAS_CAP,
        DOT_UPCAST, PRECISION, T_DOT_UPCAST, T_PRECISION,
        BLOCK_N, BLOCK_V, BLOCK_H, GROUP_N)
    w_sum = tl.load(w_sum_ptr + offs_n, mask=mask_n, other=0.0)
    grad = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0)
    # ∂D/∂z_v = w_v − p_v·Σw (softmax chain rule); then ∂z/∂a = (1 − t²)·s/τ (s/τ without a cap).
    dz = grad[:, None] * (w - tl.exp(logp) * w_sum[:, None])
    if HAS_CAP:
        dz = dz * (1.0 - t * t)
    dz = tl.where(valid, dz * tl.load(scalars_ptr + 3), 0.0)
    accumulate_head_grads(dz, x_ptr, w_ptr, gx_ptr, gw_ptr, gb_ptr,
                          offs_n, offs_v, mask_n, mask_v, H,
                          stride_xn, stride_xh, stride_wv, stride_wh,
                          NEED_X_GRAD, NEED_W_GRAD, NEED_B_GRAD, DOT_UPCAST, PRECISION, BLOCK_H)


def _normalizer(lse, acc_dtype):
    """lse as the kernels read it: float64 stays float64 (the exact normalizer), else acc_dtype."""
    return (lse if lse.dtype == torch.float64 else lse.to(acc_dtype)).contiguous()


def _prepare(student: Head, teacher: Head, beta, lse, teacher_lse, block_n, block_v, block_h):
    """Validates the inputs; returns the launch arguments shared by both sweeps."""
    n, v, _ = _launch.check_head(student)
    tn, tv, th = _launch.check_head(teacher, prefix="teacher_")
    if tn != n:
        raise ValueError(f"teacher_hidden has {tn} rows, hidden has {n}")
    if tv != v:
        raise ValueError(f"teacher vocabulary ({tv}) must equal the student vocabulary ({v})")
    if teacher.hidden.device != student.hidden.device:
        raise ValueError(f"teacher_hidden is on {teacher.hidden.device}, hidden on {student.hidden.device}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    device = student.hidden.device
    _launch.check_row_vector("lse", lse, n, device)
    _launch.check_row_vector("teacher_lse", teacher_lse, n, device)
    hidden, weight, teacher_hidden, teacher_weight = student.hidden, student.weight, teacher.hidden, teacher.weight
    acc_dtype = _launch.accumulator_dtype(hidden.dtype)
    shared = student.shares_layer_with(teacher) and teacher_hidden.dtype == hidden.dtype
    # log β and log(1 − β) in double precision on the host; only the mixture case reads them.
    log_beta = math.log(beta) if beta > 0.0 else 0.0
    log1m_beta = math.log1p(-beta) if beta < 1.0 else 0.0
    scalars = torch.tensor([beta, log_beta, log1m_beta, *student.transform_scalars(), *teacher.transform_scalars()],
                           dtype=acc_dtype, device=device)
    # Tiles fit the larger of the two operand footprints.
    wide = torch.float64 if torch.float64 in (hidden.dtype, teacher_hidden.dtype) else hidden.dtype
    bn, bv, bh, warps = _launch.resolve_tiles(wide, block_n, block_v, block_h)
    bias = student.bias.contiguous() if student.bias is not None else scalars
    teacher_bias = teacher.bias.contiguous() if teacher.bias is not None else scalars
    args = (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
            scalars, _normalizer(lse, acc_dtype), _normalizer(teacher_lse, acc_dtype))
    sizes = (
        n, v, hidden.shape[1], th,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        teacher_hidden.stride(0), teacher_hidden.stride(1), teacher_weight.stride(0), teacher_weight.stride(1),
    )
    meta = dict(
        HAS_BIAS=student.bias is not None, HAS_TEACHER_BIAS=teacher.bias is not None, SHARED_WEIGHT=shared,
        BETA_CASE=beta_case(beta), HAS_CAP=student.softcap is not None, T_HAS_CAP=teacher.softcap is not None,
        **_launch.dot_meta(hidden.dtype), **_launch.dot_meta(teacher_hidden.dtype, "T_"),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, GROUP_N=_launch.GROUP_N, num_warps=warps,
    )
    grid = (triton.cdiv(n, bn) * triton.cdiv(v, bv),)
    return n, v, acc_dtype, args, sizes, meta, grid


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
) -> JSDStats:
    """Per-row full-vocabulary JSD_β, Σ_v w and both lse (``Backend.jsd_forward``).

    Args:
        student, teacher: the two output layers (any supported dtypes, possibly different; H' may
            differ from H; one temperature).
        beta: β in [0, 1] (0 → KL(Q ‖ P), 1 → KL(P ‖ Q)).
        lse, teacher_lse: [N] logsumexps of z and z' if known (pass float64 for an exact
            normalizer); else computed here by ``row_stats`` in float64.
        block_n, block_v, block_h: tile overrides (powers of 2, ≥ 16), for tests and tuning.

    Returns JSDStats with value and w_sum in float32 (float64 when hidden is float64).
    """
    # The logsumexps come from the JSD kernels' own tiles: at large logits (|z| ~ 1e5 at τ = 1e-4) a
    # tile of another shape rounds z differently by more than the divergence's own precision.
    wide = torch.float64 if torch.float64 in (student.hidden.dtype, teacher.hidden.dtype) else student.hidden.dtype
    bn, bv, bh, warps = _launch.resolve_tiles(wide, block_n, block_v, block_h)
    tiles = dict(block_n=bn, block_v=bv, block_h=bh, num_warps=warps)
    if lse is None:
        lse = row_stats(student, with_mean_logit=False, lse_dtype=torch.float64, **tiles).lse
    if teacher_lse is None:
        teacher_lse = row_stats(teacher, with_mean_logit=False, lse_dtype=torch.float64, **tiles).lse
    n, v, acc_dtype, args, sizes, meta, grid = _prepare(student, teacher, beta, lse, teacher_lse,
                                                        block_n, block_v, block_h)
    value = torch.zeros(n, dtype=acc_dtype, device=student.hidden.device)
    w_sum = torch.zeros(n, dtype=acc_dtype, device=student.hidden.device)
    if n and v:
        _jsd_forward_kernel[grid](*args, value, w_sum, *sizes, **meta)
    return JSDStats(value, w_sum, lse, teacher_lse)


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
) -> HeadGrads:
    """Gradients of Σ_n grad[n]·JSD_β(n) w.r.t. the student hidden, weight and bias (``Backend.jsd_backward``).

    Args: those of ``jsd_forward``, with ``stats`` from it and ``grad`` [N] (∂L/∂value), and the
    gradients to form. Returns HeadGrads in the accumulator dtype (float32; float64 for float64 inputs).
    """
    n, v, acc_dtype, args, sizes, meta, grid = _prepare(student, teacher, beta, stats.lse, stats.teacher_lse,
                                                        block_n, block_v, block_h)
    device = student.hidden.device
    _launch.check_row_vector("w_sum", stats.w_sum, n, device)
    _launch.check_row_vector("grad", grad, n, device)
    needs = needs.of(student)
    grads = _launch.gradient_buffers(student, needs, acc_dtype)
    if n and v and needs.any:
        dummy = args[6]  # the scalars tensor: stands in for gradients not asked for (never written)
        _jsd_backward_kernel[grid](
            *args, stats.w_sum.to(acc_dtype).contiguous(), grad.to(acc_dtype).contiguous(),
            grads.hidden if grads.hidden is not None else dummy, grads.weight if grads.weight is not None else dummy,
            grads.bias if grads.bias is not None else dummy,
            *sizes,
            NEED_X_GRAD=needs.hidden, NEED_W_GRAD=needs.weight, NEED_B_GRAD=needs.bias,
            **meta,
        )
    return grads
