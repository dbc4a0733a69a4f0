"""The recomputing backward sweep of the chunked PyTorch path.

Every backward pass of the library is one sweep over bounded logits blocks: recompute a block,
write ∂L/∂z over it (sub-block by sub-block, in cache), add the few sparse terms that fall in it,
and contract it into the gradients with two GEMMs. The sweep tiles along whichever axis makes
the accumulated gradient the smaller one: vocabulary blocks (accumulating d hidden, [n, H]) when
n ≤ V, row blocks (accumulating d weight, [V, H]) otherwise.
"""

from __future__ import annotations

import torch

from ... import config
from ..base import GradNeeds, Head, HeadGradCoefs, HeadGrads, SparseTerms
from ..sparse_layout import pad_sparse
from ._blocks import block_length, itemsize, logits_into, prepare, scale_grads_, shift, sub_blocks, to_logits_, view


def _add_sparse(dz, rows: slice, cols: slice, merged):
    """Add the sparse terms (``pad_sparse``'s layout) of rows × cols into dz, the ∂L/∂z of those rows
    and columns, before the cap's derivative and the GEMMs (so that dense and sparse parts of a logit
    cancel before they multiply hidden). A term outside the columns adds 0 at column 0: no host read.
    Rows go in cache-sized runs, so that the temporaries stay small beside the logits block."""
    ids, coef = merged
    width = cols.stop - cols.start
    step = max(1, config.SUB_BLOCK_BYTES // max(1, ids.shape[1] * ids.element_size()))
    zero = torch.zeros((), dtype=dz.dtype, device=dz.device)
    for r0 in range(rows.start, rows.stop, step):
        run = slice(r0, min(rows.stop, r0 + step))
        local = ids[run] - cols.start
        inside = (local >= 0) & (local < width)
        dz[run.start - rows.start: run.stop - rows.start].scatter_add_(
            1, local.masked_fill_(~inside, 0), torch.where(inside, coef[run].to(dz.dtype), zero))


def dense_backward(head: Head, dz_rows, needs: GradNeeds, sparse: tuple[SparseTerms, ...] = (),
                   teacher: Head | None = None) -> HeadGrads:
    """Sweep bounded logits blocks, write ∂L/∂z over each (``dz_rows`` per cache sub-block), add the
    sparse terms, apply the chain rule of the logit transform, and contract into gradients.

    ``dz_rows(z, teacher_z, rows, cols)`` gets a sub-block of logits (``teacher_z`` the teacher's same
    sub-block when ``teacher`` is given, else None) and must write ∂L/∂z over ``z``. Returns
    compute-dtype gradients.
    """
    needs = needs.of(head)
    dtype, hidden, weight, bias = prepare(head)
    if teacher is not None:
        teacher_hidden = teacher.hidden.to(dtype)
        teacher_weight = teacher.weight.to(dtype)
        teacher_bias = teacher.bias.to(dtype) if teacher.bias is not None else None
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    merged = pad_sparse(n, vocab, sparse, dtype)
    capped = head.softcap is not None
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
            derivative = to_logits_(z_sub, head, want_derivative=True)
            if teacher_sub is not None:
                to_logits_(teacher_sub, teacher)
            sub_rows = shift(sub, rows.start)
            dz_rows(z_sub, teacher_sub, sub_rows, cols)
            if capped:  # the sparse terms go in before the cap's derivative: per sub-block
                if merged is not None:
                    _add_sparse(z_sub, sub_rows, cols, merged)
                z_sub.mul_(derivative)
        if merged is not None and not capped:  # one pass per block
            _add_sparse(z, rows, cols, merged)
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
    scale_grads_(head, *grads)
    return grads


def head_backward(head: Head, lse: torch.Tensor, coefs: HeadGradCoefs, needs: GradNeeds) -> HeadGrads:
    """Gradients of a loss with ∂L/∂z = p·(row_coef + logit_coef·(z − logit_shift)) + one-hots + sparse
    terms (``HeadGradCoefs``), p = exp(z − lse)."""
    row_coef, logit_coef, logit_shift = coefs.row_coef, coefs.logit_coef, coefs.logit_shift
    lse = lse.to(head.dtype)

    def dz_rows(z, _teacher_z, rows, _cols):
        coef = row_coef[rows, None]
        if logit_coef is not None:  # one temporary: (z − shift)·logit_coef + row_coef
            shifted = z.clone() if logit_shift is None else z - logit_shift[rows, None]
            coef = shifted.mul_(logit_coef[rows, None]).add_(coef)
        z.sub_(lse[rows, None]).exp_().mul_(coef)  # z: p, then ∂L/∂z

    return dense_backward(head, dz_rows, needs, coefs.all_sparse())
