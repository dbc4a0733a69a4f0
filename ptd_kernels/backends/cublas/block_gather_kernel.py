"""Logits at a few ids per row, read from a logits block of whole rows: z = cap_c(s·(a[r, id] + bias[id]))/τ.

The one-sweep Top-K loss has the student's float32 row block in hand when it learns the support ids:
their logits are read from it (R·M elements) rather than recomputed from the weights, with the same
transform (``tiles.to_logits``) as the statistics kernel, so they are bit for bit the logits whose
logsumexp that kernel formed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _work
from .transform import to_logits, unpack


@triton.jit(do_not_specialize=["scale_bits", "cap_in_bits", "cap_out_bits"])
def _block_gather_kernel(
    a_ptr, bias_ptr, ids_ptr, out_ptr, rows, M, stride_a, scale_bits, cap_in_bits, cap_out_bits,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rows
    acc_ty = a_ptr.dtype.element_ty
    scale, cap_in, cap_out = unpack(scale_bits, acc_ty), unpack(cap_in_bits, acc_ty), unpack(cap_out_bits, acc_ty)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = mask_r[:, None] & (offs_m < M)[None, :]
        ids = tl.load(ids_ptr + offs_r[:, None] * M + offs_m[None, :], mask=mask, other=0).to(tl.int64)
        a = tl.load(a_ptr + offs_r[:, None] * stride_a + ids, mask=mask, other=0.0)
        if HAS_BIAS:
            a += tl.load(bias_ptr + ids, mask=mask, other=0.0).to(a.dtype)
        z, _ = to_logits(a, scale, cap_in, cap_out, HAS_CAP)
        tl.store(out_ptr + offs_r[:, None] * M + offs_m[None, :], z, mask=mask)


def block_gather(a: torch.Tensor, bias: torch.Tensor | None, scalars: tuple[int, ...], has_cap: bool, ids: torch.Tensor,
                 out: torch.Tensor, *, tiles: tuple[int, int, int]) -> None:
    """out [R, M] (a's dtype) = the logits of the whole-row block ``a`` [R, V] at ``ids`` (int64 [R, M], contiguous)."""
    rows, m = ids.shape
    block_r, block_m, warps = tiles
    _work.launch(
        "block_gather", _block_gather_kernel, (triton.cdiv(rows, block_r),),
        (a, bias if bias is not None else a, ids, out, rows, m, a.stride(0), *scalars),
        dict(HAS_BIAS=bias is not None, HAS_CAP=has_cap, BLOCK_R=block_r, BLOCK_M=block_m, num_warps=warps),
        elements=rows * m,
        bytes_read=rows * m * (8 + a.element_size()),
        bytes_written=rows * m * out.element_size(),
    )
