"""∂(Σ_r g_r·JSD_β,r)/∂a of one pair of logits blocks, written over the student block as the operand of
the two gradient GEMMs.

With logp, logq and w = p·∂D/∂p as in ``jsd_stats_kernel`` and the forward's Σ w per row:

    dz = g·(w − p·Σw)        (the softmax chain rule),   da = dz·(1 − tanh²(s·(a + bias)/c))·s/τ

stored in the gradient operand dtype over the student block (a 16-bit da in the first half of each
row's float32 storage, as ``grad_kernel`` explains). Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton.rowmath import beta_case, jsd_pointwise
from . import _work
from .transform import JSD_SCALARS, to_logits, unpack


@triton.jit(do_not_specialize=JSD_SCALARS)
def _jsd_grad_kernel(
    a_ptr, ta_ptr, dz_ptr, bias_ptr, t_bias_ptr, lse_ptr, t_lse_ptr, w_sum_ptr, grad_ptr,
    rows, cols, col0, stride_a, stride_ta, stride_dz,
    beta_bits, log_beta_bits, log1m_beta_bits, scale_bits, cap_in_bits, cap_out_bits, t_scale_bits, t_cap_in_bits,
    t_cap_out_bits,
    HAS_BIAS: tl.constexpr, T_HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, T_HAS_CAP: tl.constexpr,
    BETA_CASE: tl.constexpr, NARROW_IN_PLACE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rows
    acc_ty = a_ptr.dtype.element_ty
    # β, log β, log(1 − β), the student's (s/τ, s/c, c/τ), the teacher's (s'/τ, s'/c', c'/τ)
    beta, log_beta, log1m_beta = unpack(beta_bits, acc_ty), unpack(log_beta_bits, acc_ty), unpack(log1m_beta_bits,
                                                                                                   acc_ty)
    chain, cap_in, cap_out = unpack(scale_bits, acc_ty), unpack(cap_in_bits, acc_ty), unpack(cap_out_bits, acc_ty)
    t_scale, t_cap_in = unpack(t_scale_bits, acc_ty), unpack(t_cap_in_bits, acc_ty)
    t_cap_out = unpack(t_cap_out_bits, acc_ty)
    lse = tl.load(lse_ptr + offs_r, mask=mask_r, other=0.0)
    t_lse = tl.load(t_lse_ptr + offs_r, mask=mask_r, other=0.0)
    w_sum = tl.load(w_sum_ptr + offs_r, mask=mask_r, other=0.0)
    grad = tl.load(grad_ptr + offs_r, mask=mask_r, other=0.0)
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
        z, t = to_logits(a, chain, cap_in, cap_out, HAS_CAP)
        tz, _ = to_logits(ta, t_scale, t_cap_in, t_cap_out, T_HAS_CAP)
        logp = tl.where(valid, (z - lse[:, None]).to(acc_ty), 0.0)
        logq = tl.where(valid, (tz - t_lse[:, None]).to(acc_ty), 0.0)
        _, w = jsd_pointwise(logp, logq, beta, log_beta, log1m_beta, BETA_CASE)
        dz = grad[:, None] * (w - tl.exp(logp) * w_sum[:, None])
        if HAS_CAP:
            dz = dz * (1.0 - t * t)
        dz = tl.where(valid, dz * chain, 0.0)
        if NARROW_IN_PLACE:
            tl.debug_barrier()  # this tile's float32 loads, by every thread, before its 16-bit stores
        tl.store(dz_ptr + offs_r[:, None] * stride_dz + offs_c[None, :], dz.to(dz_ptr.dtype.element_ty), mask=valid)


def jsd_grad(a: torch.Tensor, teacher_a: torch.Tensor, dz: torch.Tensor, col0: int, bias, teacher_bias,
             scalars: tuple[int, ...], caps: tuple[bool, bool], beta: float, lse: torch.Tensor,
             teacher_lse: torch.Tensor, w_sum: torch.Tensor, grad: torch.Tensor, *,
             tiles: tuple[int, int, int]) -> None:
    """Write da of the student block ``a`` [R, C] into ``dz`` (a view over a's storage); row vectors [R]."""
    rows, cols = a.shape
    block_r, block_c, warps = tiles
    dummy = lse
    size = a.element_size()
    _work.launch(
        "jsd_grad", _jsd_grad_kernel, (triton.cdiv(rows, block_r),),
        (a, teacher_a, dz, bias if bias is not None else dummy, teacher_bias if teacher_bias is not None else dummy,
         lse, teacher_lse, w_sum, grad, rows, cols, col0, a.stride(0), teacher_a.stride(0), dz.stride(0), *scalars),
        dict(HAS_BIAS=bias is not None, T_HAS_BIAS=teacher_bias is not None, HAS_CAP=caps[0], T_HAS_CAP=caps[1],
             BETA_CASE=beta_case(beta), NARROW_IN_PLACE=dz.dtype != a.dtype, BLOCK_R=block_r, BLOCK_C=block_c,
             num_warps=warps),
        elements=rows * cols,
        bytes_read=rows * cols * (size + teacher_a.element_size()) + rows * (2 * size + lse.element_size()
                                                                           + teacher_lse.element_size()),
        bytes_written=rows * cols * dz.element_size(),
    )
