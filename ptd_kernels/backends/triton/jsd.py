"""What the two full-vocabulary JSD sweeps share (``jsd_forward``, ``jsd_backward``): the per-tile
math and the launch arguments.

Math (docs/method.md §2). Student z = cap_c(s·(hidden @ weightᵀ + bias))/τ, teacher z' = cap_c'(s'·(teacher_hidden @
teacher_weightᵀ + teacher_bias))/τ (H' may differ from H; the teacher gets no gradient). With
logp = z − lse and logq = z' − teacher_lse (both lse from ``row_stats`` first, in float64 so that
z − lse is exact before it is rounded), each vocabulary entry gives
``(d, w) = jsd_pointwise(logp, logq, β)`` (``rowmath.py``, the Triton twin of ``ptd_kernels.rowmath``):
d is its share of JSD_β and w = p·∂D/∂p its weighted score.

Shared output layer (self-distillation with a privileged context: ``Head.shares_layer_with``, both
hiddens of one dtype): each weight tile is loaded once and multiplied by both hidden tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..base import Head
from . import _launch
from .rowmath import beta_case, jsd_pointwise
from .tiles import logits_tile, to_logits


@triton.jit
def jsd_tile(
    x_ptr, w_ptr, b_ptr, tx_ptr, tw_ptr, tb_ptr, scalars_ptr, lse_ptr, t_lse_ptr,
    offs_n, offs_v, mask_n, mask_v, H, TH,
    stride_xn, stride_xh, stride_wv, stride_wh,
    stride_txn, stride_txh, stride_twv, stride_twh,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr, BETA_CASE: tl.constexpr,
    HAS_CAP: tl.constexpr, T_HAS_CAP: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, T_DOT_UPCAST: tl.constexpr, T_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The tile (rows offs_n, columns offs_v): (valid, logp, t, d, w), d and w zero outside ``valid``.

    t = tanh(s·a/c) of the student's cap (the chain rule's 1 − t²), or z without a cap.
    """
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
    return valid, logp, t, d, w


def normalizer(lse, acc_dtype):
    """lse as the kernels read it: float64 stays float64 (the exact normalizer), else acc_dtype."""
    return (lse if lse.dtype == torch.float64 else lse.to(acc_dtype)).contiguous()


def operand_dtype(student: Head, teacher: Head) -> torch.dtype:
    """The dtype whose tiles the sweeps use: float64 if either side is float64 (its footprint is larger)."""
    return torch.float64 if torch.float64 in (student.hidden.dtype, teacher.hidden.dtype) else student.hidden.dtype


@dataclass
class JSDLaunch:
    """The arguments both sweeps pass their kernel: inputs, sizes and strides, constexprs."""

    n: int
    v: int
    acc_dtype: torch.dtype
    inputs: tuple  # hidden, weight, bias, teacher hidden/weight/bias, scalars, lse, teacher lse
    sizes: tuple  # N, V, H, TH and the eight strides
    meta: dict


def prepare(student: Head, teacher: Head, beta, lse, teacher_lse) -> JSDLaunch:
    """Checks what the kernels read (shapes, dtypes, β's range); the launch arguments of both sweeps."""
    n, v, _ = _launch.check_head(student)
    tn, tv, th = _launch.check_head(teacher, prefix="teacher_")
    if tn != n:
        raise ValueError(f"teacher_hidden has {tn} rows, hidden has {n}")
    if tv != v:
        raise ValueError(f"teacher vocabulary ({tv}) must equal the student vocabulary ({v})")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    _launch.check_row_vector("lse", lse, n)
    _launch.check_row_vector("teacher_lse", teacher_lse, n)
    hidden, weight, teacher_hidden, teacher_weight = student.hidden, student.weight, teacher.hidden, teacher.weight
    acc_dtype = _launch.accumulator_dtype(hidden.dtype)
    device = hidden.device
    shared = student.shares_layer_with(teacher) and teacher_hidden.dtype == hidden.dtype
    # log β and log(1 − β) in double precision on the host; only the mixture case reads them.
    log_beta = math.log(beta) if beta > 0.0 else 0.0
    log1m_beta = math.log1p(-beta) if beta < 1.0 else 0.0
    scalars = _launch.device_scalars([beta, log_beta, log1m_beta, *student.transform_scalars(),
                                      *teacher.transform_scalars()], acc_dtype, device)
    bias = student.bias.contiguous() if student.bias is not None else scalars
    teacher_bias = teacher.bias.contiguous() if teacher.bias is not None else scalars
    inputs = (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
              scalars, normalizer(lse, acc_dtype), normalizer(teacher_lse, acc_dtype))
    sizes = (
        n, v, hidden.shape[1], th,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        teacher_hidden.stride(0), teacher_hidden.stride(1), teacher_weight.stride(0), teacher_weight.stride(1),
    )
    meta = dict(
        HAS_BIAS=student.bias is not None, HAS_TEACHER_BIAS=teacher.bias is not None, SHARED_WEIGHT=shared,
        BETA_CASE=beta_case(beta), HAS_CAP=student.softcap is not None, T_HAS_CAP=teacher.softcap is not None,
        ACC_DTYPE=_launch.tl_dtype(acc_dtype),
        **_launch.dot_meta(hidden.dtype), **_launch.dot_meta(teacher_hidden.dtype, "T_"),
    )
    return JSDLaunch(n, v, acc_dtype, inputs, sizes, meta)
