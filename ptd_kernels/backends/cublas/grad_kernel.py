"""∂L/∂a of one logits block, written over the block as the operand of the two gradient GEMMs.

With a = hidden · weightᵀ of the block's rows and columns, z = cap_c(s·(a + bias))/τ, p = e^{z − lse}
and the per-row coefficients of ``HeadGradCoefs``:

    dz = p·(row_coef + logit_coef·(z − logit_shift)) + target_coef·[v = target] + Σ sparse coef·[v = id]
    da = dz · (1 − tanh²(s·(a + bias)/c)) · s/τ        (dz · s/τ without a cap)

da is stored in the gradient operand dtype (the inputs' dtype: bf16 on a bf16 model, as cuBLAS's own
backward of a bf16 linear layer sees it) over the block itself. A 16-bit da goes into the first half of
each row's own float32 storage (row stride 2C in 16-bit elements): a program owns whole rows and walks
their columns left to right, so it only ever overwrites bytes of columns it has already read; a
barrier per tile orders its threads' loads before its stores. Every other dtype is written in place.

The sparse terms (``sparse_layout``: ids sorted per row) are added before the cap's derivative, so a
dense and a sparse part of one logit cancel at |dz| magnitude (``tiles.add_sparse_terms``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton.tiles import add_sparse_terms
from . import _work
from .transform import to_logits, unpack


@triton.jit(do_not_specialize=["scale_bits", "cap_in_bits", "cap_out_bits"])
def _head_grad_kernel(
    a_ptr, dz_ptr, bias_ptr,
    lse_ptr, row_coef_ptr, logit_coef_ptr, logit_shift_ptr, targets_ptr, target_coef_ptr,
    sparse_ids_ptr, sparse_coef_ptr,
    rows, cols, col0, stride_a, stride_dz, M, search_steps, scale_bits, cap_in_bits, cap_out_bits,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_LOGIT_COEF: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_SPARSE: tl.constexpr, NARROW_IN_PLACE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rows
    acc_ty = a_ptr.dtype.element_ty
    lse = tl.load(lse_ptr + offs_r, mask=mask_r, other=0.0)
    row_coef = tl.load(row_coef_ptr + offs_r, mask=mask_r, other=0.0)
    if HAS_LOGIT_COEF:
        logit_coef = tl.load(logit_coef_ptr + offs_r, mask=mask_r, other=0.0)
        logit_shift = tl.load(logit_shift_ptr + offs_r, mask=mask_r, other=0.0)
    if HAS_TARGETS:
        target = tl.load(targets_ptr + offs_r, mask=mask_r, other=-1)
        target_coef = tl.load(target_coef_ptr + offs_r, mask=mask_r, other=0.0)
    # chain = s/τ: ∂z/∂a without a cap, its factor with one
    chain, cap_in, cap_out = unpack(scale_bits, acc_ty), unpack(cap_in_bits, acc_ty), unpack(cap_out_bits, acc_ty)

    for c0 in range(0, cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < cols
        valid = mask_r[:, None] & mask_c[None, :]
        a = tl.load(a_ptr + offs_r[:, None] * stride_a + offs_c[None, :], mask=valid, other=0.0)
        if HAS_BIAS:
            a += tl.load(bias_ptr + col0 + offs_c, mask=mask_c, other=0.0).to(acc_ty)[None, :]
        z, t = to_logits(a, chain, cap_in, cap_out, HAS_CAP)
        # padding entries get log p = 0 (finite) and are zeroed below
        p = tl.exp(tl.where(valid, z - lse[:, None], 0.0))
        coef = row_coef[:, None]
        if HAS_LOGIT_COEF:
            coef = coef + logit_coef[:, None] * (z - logit_shift[:, None])
        dz = p * coef
        if HAS_TARGETS:
            dz += tl.where((col0 + offs_c)[None, :] == target[:, None], target_coef[:, None], 0.0)
        if HAS_SPARSE:
            dz = add_sparse_terms(dz, sparse_ids_ptr, sparse_coef_ptr, offs_r, col0 + offs_c, mask_r, col0 + c0, M,
                                  search_steps, BLOCK_R, BLOCK_C)
        if HAS_CAP:
            dz = dz * (1.0 - t * t)
        dz = tl.where(valid, dz * chain, 0.0)
        if NARROW_IN_PLACE:
            tl.debug_barrier()  # this tile's float32 loads, by every thread, before its 16-bit stores
        tl.store(dz_ptr + offs_r[:, None] * stride_dz + offs_c[None, :], dz.to(dz_ptr.dtype.element_ty), mask=valid)


def head_grad(a: torch.Tensor, dz: torch.Tensor, col0: int, bias: torch.Tensor | None, scalars: tuple[int, ...],
              has_cap: bool, lse: torch.Tensor, row_coef: torch.Tensor, *, logit_coef: torch.Tensor | None = None,
              logit_shift: torch.Tensor | None = None, targets: torch.Tensor | None = None,
              target_coef: torch.Tensor | None = None, sparse: tuple[torch.Tensor, torch.Tensor] | None = None,
              tiles: tuple[int, int, int]) -> None:
    """Write ∂L/∂a of the block ``a`` [R, C] (vocabulary columns col0 …) into ``dz`` [R, C] (a view over the
    block's own storage, see the module doc). Row vectors [R] in a's dtype; targets int64 [R]; sparse:
    (ids int64 [R, M] sorted per row, coef [R, M]). ``scalars``: ``Side.scalars``."""
    rows, cols = a.shape
    block_r, block_c, warps = tiles
    narrow = dz.dtype != a.dtype
    if logit_coef is not None and logit_shift is None:
        raise ValueError("logit_coef needs logit_shift (zeros for none)")
    dummy = lse
    sparse_ids, sparse_coef = sparse if sparse is not None else (dummy, dummy)
    m = sparse_ids.shape[1] if sparse is not None else 0
    size = a.element_size()
    row_bytes = rows * size * (2 + 2 * (logit_coef is not None) + 2 * (targets is not None)) + rows * m * (8 + size)
    _work.launch(
        "head_grad", _head_grad_kernel, (triton.cdiv(rows, block_r),),
        (a, dz, bias if bias is not None else dummy, lse, row_coef,
         logit_coef if logit_coef is not None else dummy, logit_shift if logit_shift is not None else dummy,
         targets if targets is not None else dummy, target_coef if target_coef is not None else dummy,
         sparse_ids, sparse_coef,
         rows, cols, col0, a.stride(0), dz.stride(0), m, m.bit_length(), *scalars),
        dict(HAS_BIAS=bias is not None, HAS_CAP=has_cap, HAS_LOGIT_COEF=logit_coef is not None,
             HAS_TARGETS=targets is not None, HAS_SPARSE=sparse is not None, NARROW_IN_PLACE=narrow,
             BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps),
        elements=rows * cols,
        bytes_read=rows * cols * size + (cols * bias.element_size() if bias is not None else 0) + row_bytes,
        bytes_written=rows * cols * dz.element_size(),
    )
