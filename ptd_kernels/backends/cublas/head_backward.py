"""The recomputing backward sweep of the cuBLAS backend: gradients from ``HeadGradCoefs``.

Per vocabulary block (``_blocks.vocab_plan``: all rows × as many columns as the budget holds): one GEMM
recomputes a = hidden · weight[cols]ᵀ in float32; ``grad_kernel`` reads it once and writes
da = ∂L/∂a over it in the gradient operand dtype (bf16 for a bf16 model); two GEMMs contract it,
d hidden (+)= da @ weight[cols] (accumulated over the vocabulary blocks, [N, H] float32) and
d weight[cols] = daᵀ @ hidden (written once per block while all rows are in it). Work: 3 logits-GEMM
equivalents, one 4-byte read and one 2-byte (bf16) write per logit, one launch per block — plus one more
2-byte read per logit for a bias gradient (column sums by torch).
"""

from __future__ import annotations

import torch

from ..base import GradNeeds, Head, HeadGradCoefs, HeadGrads, SparseTerms
from ..sparse_layout import pad_sparse
from . import _work
from ._blocks import Side, block_view, operand_view, tiles, vocab_plan
from .grad_kernel import head_grad


def sparse_layout(n: int, vocab: int, sparse: tuple[SparseTerms, ...], dtype: torch.dtype):
    """``pad_sparse``'s merged layout (ids sorted per row); on meta tensors (counting) its widest shape."""
    if any(terms.ids.is_meta for terms in sparse):
        width = sum(terms.ids.shape[1] for terms in sparse)
        return (torch.empty((n, width), dtype=torch.int64, device="meta"),
                torch.empty((n, width), dtype=dtype, device="meta"))
    return pad_sparse(n, vocab, sparse, dtype)


def new_grads(side: Side, needs: GradNeeds) -> HeadGrads:
    """Gradient buffers in the compute dtype: d hidden and d weight written by the sweep's first GEMMs
    (no zero fill), d bias accumulated."""
    n, v, h = side.head.rows, side.head.vocab, side.hidden.shape[1]
    device = side.hidden.device
    grads = HeadGrads(torch.empty((n, h), dtype=side.dtype, device=device) if needs.hidden else None,
                      torch.empty((v, h), dtype=side.dtype, device=device) if needs.weight else None,
                      torch.zeros(v, dtype=side.dtype, device=device) if needs.bias else None)
    if n == 0 and grads.weight is not None:
        grads.weight.zero_()
    return grads


def head_backward(head: Head, lse: torch.Tensor, coefs: HeadGradCoefs, needs: GradNeeds) -> HeadGrads:
    """``Backend.head_backward``: gradients of a loss with ∂L/∂z = ``coefs`` (p = e^{z − lse})."""
    side = Side.of(head)
    needs = needs.of(head)
    grads = new_grads(side, needs)
    n, v = head.rows, head.vocab
    if n == 0 or not needs.any:
        return grads
    dtype = side.dtype

    def vec(t):
        return None if t is None else t.to(dtype).contiguous()

    lse, row_coef, logit_coef, target_coef = vec(lse), vec(coefs.row_coef), vec(coefs.logit_coef), vec(
        coefs.target_coef)
    logit_shift = vec(coefs.logit_shift) if coefs.logit_shift is not None else (
        torch.zeros_like(lse) if logit_coef is not None else None)
    targets = coefs.targets.to(torch.int64).contiguous() if coefs.targets is not None else None
    sparse = sparse_layout(n, v, coefs.sparse, dtype) if coefs.sparse else None
    with _work.sweep("head_backward"):
        _work.account(*(sparse or ()))
        plan = vocab_plan(n, v, side.itemsize)
        buffer = _work.workspace(plan.elements, dtype, head.hidden.device)
        for rows, cols in plan.blocks():
            block = side.logits(block_view(buffer, rows.stop - rows.start, cols.stop - cols.start), rows, cols)
            dz = operand_view(block, head.hidden.dtype)
            head_grad(block, dz, cols.start, side.bias, side.scalars, side.has_cap, lse[rows], row_coef[rows],
                      logit_coef=logit_coef[rows] if logit_coef is not None else None,
                      logit_shift=logit_shift[rows] if logit_shift is not None else None,
                      targets=targets[rows] if targets is not None else None,
                      target_coef=target_coef[rows] if target_coef is not None else None,
                      sparse=(sparse[0][rows], sparse[1][rows]) if sparse is not None else None,
                      tiles=tiles("grad"))
            side.grads_into(grads, dz, rows, cols, first_col=cols.start == 0, first_row=rows.start == 0)
    return grads
