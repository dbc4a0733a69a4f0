"""The recomputing backward sweep of the chunked PyTorch path.

Every backward pass of the library is one sweep over bounded logits blocks: recompute a block,
write ∂L/∂z over it (sub-block by sub-block, in cache), add the few sparse terms that fall in it,
and contract it into the gradients with two GEMMs. The sweep tiles along whichever axis makes
the accumulated gradient the smaller one: vocabulary blocks (accumulating d hidden, [n, H]) when
n ≤ V, row blocks (accumulating d weight, [V, H]) otherwise.
"""

from __future__ import annotations

import torch

from ..base import GradNeeds, Head, HeadGradCoefs, HeadGrads, SparseTerms
from ._blocks import block_length, itemsize, logits_into, prepare, shift, sub_blocks, view


def _add_sparse(dz, r0, r1, c0, c1, sparse: tuple[SparseTerms, ...]):
    """Add the sparse terms that fall in the block rows [r0, r1) × columns [c0, c1) into dz, before
    the block's GEMMs (so that dense and sparse parts cancel before they multiply hidden)."""
    for terms in sparse:
        row_index, ids, coef = terms.row_index, terms.ids, terms.coef
        inside = (ids >= c0) & (ids < c1) & ((row_index >= r0) & (row_index < r1))[:, None]
        if bool(inside.any()):
            block_rows = row_index[:, None].expand_as(ids)[inside] - r0
            dz.index_put_((block_rows, ids[inside] - c0), coef[inside].to(dz.dtype), accumulate=True)


def dense_backward(head: Head, dz_rows, needs: GradNeeds, sparse: tuple[SparseTerms, ...] = (),
                   teacher: Head | None = None) -> HeadGrads:
    """Sweep bounded logits blocks, write ∂L/∂z over each (``dz_rows`` per cache sub-block), add the
    sparse terms, and contract into gradients.

    ``dz_rows(z, teacher_z, rows, cols)`` gets a sub-block of logits (1/τ applied; ``teacher_z`` the
    teacher's same sub-block when ``teacher`` is given, else None) and must write ∂L/∂z over ``z``.
    Returns compute-dtype gradients, the 1/τ applied.
    """
    needs = needs.of(head)
    dtype, hidden, weight, bias = prepare(head)
    temperature = head.temperature
    if teacher is not None:
        teacher_hidden = teacher.hidden.to(dtype)
        teacher_weight = teacher.weight.to(dtype)
        teacher_bias = teacher.bias.to(dtype) if teacher.bias is not None else None
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    grads = HeadGrads(
        torch.zeros((n, h), dtype=dtype, device=device) if needs.hidden else None,
        torch.zeros((vocab, h), dtype=dtype, device=device) if needs.weight else None,
        torch.zeros(vocab, dtype=dtype, device=device) if needs.bias else None)
    size = itemsize(dtype)
    sides = 1 if teacher is None else 2
    by_vocab = n <= vocab  # vocabulary blocks over all rows: d weight written once, d hidden accumulates
    if by_vocab:
        step = block_length(vocab, n, size * sides)
        blocks = [(slice(0, n), slice(c0, min(vocab, c0 + step))) for c0 in range(0, vocab, step)]
    else:  # row blocks over the whole vocabulary: d hidden written once, d weight accumulates
        step = block_length(n, vocab, size * sides)
        blocks = [(slice(r0, min(n, r0 + step)), slice(0, vocab)) for r0 in range(0, n, step)]
    block_elems = (blocks[0][0].stop - blocks[0][0].start) * (blocks[0][1].stop - blocks[0][1].start) if blocks else 0
    flats = [torch.empty(block_elems, dtype=dtype, device=device) for _ in range(sides)]
    for rows, cols in blocks:
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        z = logits_into(view(flats[0], *shape), hidden[rows], weight[cols], bias[cols] if bias is not None else None)
        teacher_z = None if teacher is None else logits_into(
            view(flats[1], *shape), teacher_hidden[rows], teacher_weight[cols],
            teacher_bias[cols] if teacher_bias is not None else None)
        for sub in sub_blocks(z.shape[0], z.shape[1], size):
            z_sub = z[sub]
            teacher_sub = None if teacher_z is None else teacher_z[sub]
            if temperature != 1.0:
                z_sub /= temperature
                if teacher_sub is not None:
                    teacher_sub /= temperature
            dz_rows(z_sub, teacher_sub, shift(sub, rows.start), cols)
        _add_sparse(z, rows.start, rows.stop, cols.start, cols.stop, sparse)
        if needs.hidden:
            if by_vocab:
                grads.hidden.addmm_(z, weight[cols])
            else:
                torch.mm(z, weight, out=grads.hidden[rows])
        if needs.weight:
            if by_vocab:
                torch.mm(z.T, hidden, out=grads.weight[cols])
            else:
                grads.weight.addmm_(z.T, hidden[rows])
        if needs.bias:
            grads.bias[cols] += z.sum(0)
    if temperature != 1.0:
        for g in (grads.hidden, grads.weight, grads.bias):
            if g is not None:
                g /= temperature
    return grads


def head_backward(head: Head, lse: torch.Tensor, coefs: HeadGradCoefs, needs: GradNeeds) -> HeadGrads:
    """Gradients of a loss with ∂L/∂z = p·(row_coef + logit_coef·(z − logit_shift)) + one-hots + sparse
    terms (``HeadGradCoefs``), p = exp(z − lse)."""
    row_coef, logit_coef, logit_shift = coefs.row_coef, coefs.logit_coef, coefs.logit_shift

    def dz_rows(z, _teacher_z, rows, _cols):
        coef = row_coef[rows, None]
        if logit_coef is not None:  # one temporary: (z − shift)·logit_coef + row_coef
            shifted = z.clone() if logit_shift is None else z - logit_shift[rows, None]
            coef = shifted.mul_(logit_coef[rows, None]).add_(coef)
        z.sub_(lse[rows, None]).exp_().mul_(coef)  # z: p, then ∂L/∂z

    return dense_backward(head, dz_rows, needs, coefs.all_sparse())
