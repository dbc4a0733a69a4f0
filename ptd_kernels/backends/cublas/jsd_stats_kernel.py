"""The full-vocabulary JSD_β of one pair of logits blocks, in one read of each: value and Σ w per row.

Student a (and teacher a') are the float32 GEMM outputs of the same rows and vocabulary columns;
z = cap_c(s·(a + bias))/τ, z' likewise with the teacher's transform; with both rows' logsumexps known
(float64 allowed: z − lse is then formed exactly before it is rounded), logp = z − lse, logq = z' − lse'
and per entry ``(d, w) = jsd_pointwise(logp, logq, β)`` (the Triton backend's per-element math):

    value[r] += Σ_j d[r, j],   w_sum[r] += Σ_j w[r, j]        (w = p·∂D/∂p, for the backward)

One program per BLOCK_R rows walks the columns in BLOCK_C tiles, summing per lane and folding once at
the end. Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton.rowmath import beta_case, jsd_pointwise
from . import _work
from .transform import JSD_SCALARS, to_logits, unpack


@triton.jit(do_not_specialize=JSD_SCALARS)
def _jsd_stats_kernel(
    a_ptr, ta_ptr, bias_ptr, t_bias_ptr, lse_ptr, t_lse_ptr, value_ptr, w_sum_ptr,
    rows, cols, col0, stride_a, stride_ta,
    beta_bits, log_beta_bits, log1m_beta_bits, scale_bits, cap_in_bits, cap_out_bits, t_scale_bits, t_cap_in_bits,
    t_cap_out_bits,
    HAS_BIAS: tl.constexpr, T_HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, T_HAS_CAP: tl.constexpr,
    BETA_CASE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rows
    acc_ty = a_ptr.dtype.element_ty
    # β, log β, log(1 − β), the student's (s/τ, s/c, c/τ), the teacher's (s'/τ, s'/c', c'/τ)
    beta, log_beta, log1m_beta = unpack(beta_bits, acc_ty), unpack(log_beta_bits, acc_ty), unpack(log1m_beta_bits,
                                                                                                   acc_ty)
    scale, cap_in, cap_out = unpack(scale_bits, acc_ty), unpack(cap_in_bits, acc_ty), unpack(cap_out_bits, acc_ty)
    t_scale, t_cap_in = unpack(t_scale_bits, acc_ty), unpack(t_cap_in_bits, acc_ty)
    t_cap_out = unpack(t_cap_out_bits, acc_ty)
    lse = tl.load(lse_ptr + offs_r, mask=mask_r, other=0.0)
    t_lse = tl.load(t_lse_ptr + offs_r, mask=mask_r, other=0.0)
    value_l = tl.zeros((BLOCK_R, BLOCK_C), acc_ty)
    w_sum_l = tl.zeros((BLOCK_R, BLOCK_C), acc_ty)
    for c0 in range(0, cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < cols
        valid = mask_r[:, None] & mask_c[None, :]
        a = tl.load(a_ptr + offs_r[:, None] * stride_a + offs_c[None, :], mask=valid, other=0.0)
        ta = tl.load(ta_ptr + offs_r[:, None] * stride_ta + offs_c[None, :], mask=valid, other=0.0).to(acc_ty)
        if HAS_BIAS:
            a += tl.load(bias_ptr + col0 + offs_c, mask=mask_c, other=0.0).to(acc_ty)[None, :]
        if T_HAS_BIAS:
            ta += tl.load(t_bias_ptr + col0 + offs_c, mask=mask_c, other=0.0).to(acc_ty)[None, :]
        z, _ = to_logits(a, scale, cap_in, cap_out, HAS_CAP)
        tz, _ = to_logits(ta, t_scale, t_cap_in, t_cap_out, T_HAS_CAP)
        # padding entries get log p = log q = 0 and are zeroed before the sums
        logp = tl.where(valid, (z - lse[:, None]).to(acc_ty), 0.0)
        logq = tl.where(valid, (tz - t_lse[:, None]).to(acc_ty), 0.0)
        d, w = jsd_pointwise(logp, logq, beta, log_beta, log1m_beta, BETA_CASE)
        value_l += tl.where(valid, d, 0.0)
        w_sum_l += tl.where(valid, w, 0.0)
    value = tl.load(value_ptr + offs_r, mask=mask_r, other=0.0)
    w_sum = tl.load(w_sum_ptr + offs_r, mask=mask_r, other=0.0)
    tl.store(value_ptr + offs_r, value + tl.sum(value_l, axis=1), mask=mask_r)
    tl.store(w_sum_ptr + offs_r, w_sum + tl.sum(w_sum_l, axis=1), mask=mask_r)


def jsd_stats(a: torch.Tensor, teacher_a: torch.Tensor, col0: int, bias, teacher_bias, scalars: tuple[int, ...],
              caps: tuple[bool, bool], beta: float, lse: torch.Tensor, teacher_lse: torch.Tensor,
              value: torch.Tensor, w_sum: torch.Tensor, *, tiles: tuple[int, int, int]) -> None:
    """Add the block's Σ d and Σ w into value, w_sum [R] (a's dtype). ``scalars`` from ``jsd_scalars``."""
    rows, cols = a.shape
    block_r, block_c, warps = tiles
    dummy = lse
    size = a.element_size()
    _work.launch(
        "jsd_stats", _jsd_stats_kernel, (triton.cdiv(rows, block_r),),
        (a, teacher_a, bias if bias is not None else dummy, teacher_bias if teacher_bias is not None else dummy,
         lse, teacher_lse, value, w_sum, rows, cols, col0, a.stride(0), teacher_a.stride(0), *scalars),
        dict(HAS_BIAS=bias is not None, T_HAS_BIAS=teacher_bias is not None, HAS_CAP=caps[0], T_HAS_CAP=caps[1],
             BETA_CASE=beta_case(beta), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps),
        elements=rows * cols,
        bytes_read=rows * cols * (size + teacher_a.element_size()) + rows * (2 * size + lse.element_size()
                                                                           + teacher_lse.element_size()),
        bytes_written=2 * rows * size,
    )
