"""The recomputing backward sweep of the cuBLAS backend: gradients from ``HeadGradCoefs``.

Per vocabulary block (``_blocks.vocab_plan``: all rows × as many columns as the budget holds): one GEMM
recomputes a = hidden · weight[cols]ᵀ in float32; ``grad_kernel`` reads it once and writes
da = ∂L/∂a over it in the gradient operand dtype (bf16 for a bf16 model); two GEMMs contract it,
d hidden (+)= da @ weight[cols] (accumulated over the vocabulary blocks, [N, H] float32) and
d weight[cols] = daᵀ @ hidden (formed once per block while all rows are in it, straight in the weight's
dtype: ``SweepGrads``). Work: 3 logits-GEMM equivalents, one 4-byte read and one 2-byte (bf16) write per
logit, one launch per block — plus one more 2-byte read per logit for a bias gradient (column sums by torch).
"""

from __future__ import annotations

import torch

from ..base import GradNeeds, Head, HeadGradCoefs, HeadGrads, SparseTerms
from ..sparse_layout import pad_sparse
from . import _work
from ._blocks import Plan, Side, block_view, operand_view, slice_bytes, tiles, vocab_plan
from .grad_kernel import head_grad


def sparse_layout(n: int, vocab: int, sparse: tuple[SparseTerms, ...], dtype: torch.dtype):
    """``pad_sparse``'s merged layout (ids sorted per row); on meta tensors (counting) its widest shape."""
    if any(terms.ids.is_meta for terms in sparse):
        width = sum(terms.ids.shape[1] for terms in sparse)
        return (torch.empty((n, width), dtype=torch.int64, device="meta"),
                torch.empty((n, width), dtype=dtype, device="meta"))
    return pad_sparse(n, vocab, sparse, dtype)


class SweepGrads:
    """The gradients of a recomputing sweep over vocabulary blocks (``vocab_plan``), each formed in the
    dtype the autograd layer returns it in wherever that needs no buffer beyond the gradient itself:

    - d weight [V, H] in the weight's dtype. The sweep walks columns outer (``Plan.blocks(columns_outer=True)``),
      so a vocabulary slice's d weight is complete after that slice's row blocks. With all rows in one block
      (``vocab_plan`` keeps them so until N·MIN_BLOCK_COLS logits exceed the budget) it is one GEMM whose
      float32 accumulation stays inside cuBLAS, written straight into the slice in bf16/fp16: no float32
      V×H buffer and no cast after. Otherwise (several row blocks, or operands of another dtype than the
      weight) the slice is summed in a compute-dtype [cols, H] work buffer and cast once.
    - d hidden [N, H] in the compute dtype, summed over the vocabulary blocks (the autograd layer casts it).
    - d bias [V]: column sums in the compute dtype, cast once at the end (V elements).

    Create it inside the sweep (``_work.sweep``): a compute-dtype buffer that the autograd layer will cast
    (d hidden of a 16-bit model, a slice buffer) is counted as work memory there.
    """

    def __init__(self, side: Side, needs: GradNeeds, plan: Plan):
        n, v, h = side.head.rows, side.head.vocab, side.hidden.shape[1]
        device, dtype = side.hidden.device, side.dtype
        self.side, self.plan = side, plan
        self.hidden = torch.empty((n, h), dtype=dtype, device=device) if needs.hidden else None
        self.weight = torch.empty((v, h), dtype=side.weight.dtype, device=device) if needs.weight else None
        self.bias = torch.zeros(v, dtype=dtype, device=device) if needs.bias else None
        if self.hidden is not None and self.hidden.dtype != side.hidden.dtype:
            _work.account(self.hidden)
        self.weight_slice = None  # the compute-dtype slice buffer, where d weight cannot be formed in place
        if self.weight is not None and self.weight.dtype != dtype:
            operand = side.head.hidden.dtype  # the gradient operand's dtype (``operand_view``)
            if plan.rows < n or not (operand == side.weight.dtype == side.hidden.dtype):
                self.weight_slice = _work.workspace((plan.cols, h), dtype, device)
        if n == 0 and self.weight is not None:
            self.weight.zero_()

    def add(self, dz: torch.Tensor, rows: slice, cols: slice) -> None:
        """Contract one block's gradient operand ``dz`` [rows, cols] (blocks in ``columns_outer`` order)."""
        side = self.side
        if self.hidden is not None:
            _work.gemm("grad_hidden", self.hidden[rows], dz, side.weight[cols], accumulate=cols.start > 0)
        if self.weight is not None:
            first_row, last_row = rows.start == 0, rows.stop == self.plan.n
            if self.weight_slice is None:
                _work.gemm("grad_weight", self.weight[cols], dz.T, side.hidden[rows], accumulate=not first_row)
            else:
                part = self.weight_slice[: cols.stop - cols.start]
                _work.gemm("grad_weight", part, dz.T, side.hidden[rows], accumulate=not first_row)
                if last_row:
                    self.weight[cols] = part
                    _work.torch_pass("grad_weight_cast", part.numel(), part.numel() * (
                        part.element_size() + self.weight.element_size()))
        if self.bias is not None:
            self.bias[cols] += dz.sum(0, dtype=self.bias.dtype)
            _work.torch_pass("grad_bias", dz.numel(), dz.numel() * dz.element_size())

    def result(self) -> HeadGrads:
        """d hidden (compute dtype), d weight (the weight's dtype), d bias (the bias's dtype)."""
        bias = self.bias if self.bias is None else self.bias.to(self.side.bias.dtype)
        return HeadGrads(self.hidden, self.weight, bias)


def head_backward(head: Head, lse: torch.Tensor, coefs: HeadGradCoefs, needs: GradNeeds) -> HeadGrads:
    """``Backend.head_backward``: gradients of a loss with ∂L/∂z = ``coefs`` (p = e^{z − lse}); d weight and
    d bias in their inputs' dtypes, d hidden in the compute dtype (``SweepGrads``)."""
    side = Side.of(head)
    needs = needs.of(head)
    n, v = head.rows, head.vocab
    dtype = side.dtype
    with _work.sweep("head_backward"):
        plan = vocab_plan(n, v, side.itemsize, slice_bytes(head))
        grads = SweepGrads(side, needs, plan)
        if n == 0 or not needs.any:
            return grads.result()

        def vec(t):
            return None if t is None else t.to(dtype).contiguous()

        lse, row_coef, logit_coef, target_coef = vec(lse), vec(coefs.row_coef), vec(coefs.logit_coef), vec(
            coefs.target_coef)
        logit_shift = vec(coefs.logit_shift) if coefs.logit_shift is not None else (
            torch.zeros_like(lse) if logit_coef is not None else None)
        targets = coefs.targets.to(torch.int64).contiguous() if coefs.targets is not None else None
        sparse = sparse_layout(n, v, coefs.sparse, dtype) if coefs.sparse else None
        _work.account(*(sparse or ()))
        buffer = _work.workspace(plan.elements, dtype, head.hidden.device)
        for rows, cols in plan.blocks(columns_outer=True):
            block = side.logits(block_view(buffer, rows.stop - rows.start, cols.stop - cols.start), rows, cols)
            dz = operand_view(block, head.hidden.dtype)
            head_grad(block, dz, cols.start, side.bias, side.scalars, side.has_cap, lse[rows], row_coef[rows],
                      logit_coef=logit_coef[rows] if logit_coef is not None else None,
                      logit_shift=logit_shift[rows] if logit_shift is not None else None,
                      targets=targets[rows] if targets is not None else None,
                      target_coef=target_coef[rows] if target_coef is not None else None,
                      sparse=(sparse[0][rows], sparse[1][rows]) if sparse is not None else None,
                      tiles=tiles("grad"))
            grads.add(dz, rows, cols)
    return grads.result()
