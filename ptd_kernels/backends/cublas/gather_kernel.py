"""Logits at a few ids per row, from the output layer: z[n, m] = cap_c(s·(hidden[n] · weight[ids[n, m]] + bias))/τ.

O(n·M·H) work and n·M weight rows read (H elements each) instead of a vocabulary sweep: the support
logits of the Top-K JSD (each side at the other side's top-k ids). One program per (row, BLOCK_M ids)
loads the row's hidden state once per BLOCK_H slice and the gathered weight rows, and accumulates the
dot products in float32 (float64 when asked for float64). Offsets are int64 (ids · H may exceed 2^31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _work
from .transform import pack, to_logits, unpack


@triton.jit(do_not_specialize=["scale_bits", "cap_in_bits", "cap_out_bits"])
def _gather_logits_kernel(
    x_ptr, w_ptr, bias_ptr, ids_ptr, out_ptr,
    M, H, stride_xn, stride_xh, stride_wv, stride_wh, scale_bits, cap_in_bits, cap_out_bits,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc_ty = out_ptr.dtype.element_ty
    ids = tl.load(ids_ptr + row * M + offs_m, mask=mask_m, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M,), acc_ty)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        x = tl.load(x_ptr + row * stride_xn + offs_h * stride_xh, mask=mask_h, other=0.0).to(acc_ty)
        w = tl.load(w_ptr + ids[:, None] * stride_wv + offs_h[None, :] * stride_wh,
                    mask=mask_m[:, None] & mask_h[None, :], other=0.0).to(acc_ty)
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ids, mask=mask_m, other=0.0).to(acc_ty)
    scale, cap_in, cap_out = unpack(scale_bits, acc_ty), unpack(cap_in_bits, acc_ty), unpack(cap_out_bits, acc_ty)
    z, _ = to_logits(acc, scale, cap_in, cap_out, HAS_CAP)
    tl.store(out_ptr + row * M + offs_m, z, mask=mask_m)


def gather_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scalars: tuple[int, ...],
                  has_cap: bool, ids: torch.Tensor, out: torch.Tensor, *, tiles: tuple[int, int, int]) -> None:
    """out [n, M] (float32 or float64, the accumulation dtype) = the logits at ``ids`` (int64 [n, M],
    contiguous, in [0, V)). ``scalars``: the transform's, ``transform.pack``ed."""
    n, m = ids.shape
    block_m, block_h, warps = tiles
    h = hidden.shape[1]
    dummy = ids
    _work.launch(
        "gather_logits", _gather_logits_kernel, (n, triton.cdiv(m, block_m)),
        (hidden, weight, bias if bias is not None else dummy, ids, out, m, h,
         hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), *scalars),
        dict(HAS_BIAS=bias is not None, HAS_CAP=has_cap, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps),
        elements=n * m,
        bytes_read=n * m * (h * weight.element_size() + 8) + n * h * hidden.element_size(),
        bytes_written=n * m * out.element_size(),
    )


def gather_head_logits(head, ids: torch.Tensor, dtype: torch.dtype, *, tiles: tuple[int, int, int]) -> torch.Tensor:
    """``Backend.gather_logits``: z at ``ids`` [n, M] (in [0, V)) of a ``Head``, computed in float64 when
    ``dtype`` or the head is float64, else float32, returned in ``dtype``."""
    wide = torch.float64 if torch.float64 in (dtype, head.dtype) else torch.float32
    device = head.hidden.device
    out = torch.empty(ids.shape, dtype=wide, device=device)
    if out.numel():
        gather_logits(head.hidden, head.weight, head.bias, pack(*head.transform_scalars()), head.softcap is not None,
                      ids.to(torch.int64).contiguous(), out, tiles=tiles)
    return out.to(dtype)
