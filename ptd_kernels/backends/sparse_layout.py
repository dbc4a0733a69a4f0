"""The layout of sparse ∂L/∂z terms for the backward sweeps: one sorted, padded array per row.

Both backends add a row's few sparse terms (target one-hots, Top-K support corrections) into their
dz tiles or blocks; the terms of all ``SparseTerms`` triples are merged first, so that a tile (or a
block of rows) finds its terms by row, and a Triton tile binary-searches its column range in the
row's sorted ids (``triton/tiles.add_sparse_terms``).
"""

from __future__ import annotations

import torch

from .base import SparseTerms


def pad_sparse(n: int, vocab: int, sparse: tuple[SparseTerms, ...], dtype: torch.dtype):
    """Merge sparse terms into one padded array per row.

    ``sparse``: triples with row_index in [0, n) (several triples may name one row, and one row
    may repeat within a triple). Returns (ids [n, M] int64 sorted ascending per row, coef [n, M]
    in ``dtype``), M the largest number of terms of any row, the unused slots at the end of a row
    holding id ``vocab`` (it matches no column) and coefficient 0; or None when no term is left.
    Terms with coefficient 0 are dropped (they add nothing); a NaN coefficient is kept. A repeated
    (row, id) keeps both terms.

    When every triple names each of its rows once (``distinct_rows``, as the library's own terms do),
    the layout is built without reading the device: M is the sum of the triples' widths, and terms
    with coefficient 0 keep their slots (they add 0). Otherwise the merge reads row counts (host syncs).
    """
    if all(terms.distinct_rows for terms in sparse):
        return _pad_distinct_rows(n, vocab, sparse, dtype)
    rows, ids, coefs = [], [], []
    for terms in sparse:
        if terms.ids.numel() == 0:
            continue
        rows.append(terms.row_index.to(torch.int64)[:, None].expand_as(terms.ids).reshape(-1))
        ids.append(terms.ids.to(torch.int64).reshape(-1))
        coefs.append(terms.coef.to(dtype).reshape(-1))
    if not rows:
        return None
    rows, ids, coefs = torch.cat(rows), torch.cat(ids), torch.cat(coefs)
    keep = coefs != 0
    rows, ids, coefs = rows[keep], ids[keep], coefs[keep]
    if rows.numel() == 0:
        return None
    # One sort on (row, id): rows become contiguous runs, ids ascending within each.
    span = int(ids.max()) - int(ids.min()) + 1
    order = (rows * span + (ids - ids.min())).argsort()
    rows, ids, coefs = rows[order], ids[order], coefs[order]
    counts = torch.bincount(rows, minlength=n)
    width = int(counts.max())
    run_start = counts.cumsum(0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - run_start[rows]
    out_ids = torch.full((n, width), vocab, dtype=torch.int64, device=rows.device)
    out_coef = torch.zeros((n, width), dtype=dtype, device=rows.device)
    out_ids[rows, slot] = ids
    out_coef[rows, slot] = coefs
    return out_ids, out_coef


def _pad_distinct_rows(n: int, vocab: int, sparse: tuple[SparseTerms, ...], dtype: torch.dtype):
    """``pad_sparse`` for triples that name each row at most once: each triple gets its own columns,
    then one sort per row orders the ids (padding id ``vocab`` sorts after every id of the vocabulary)."""
    sparse = [terms for terms in sparse if terms.ids.numel()]
    if not sparse:
        return None
    width = sum(terms.ids.shape[1] for terms in sparse)
    device = sparse[0].ids.device
    out_ids = torch.full((n, width), vocab, dtype=torch.int64, device=device)
    out_coef = torch.zeros((n, width), dtype=dtype, device=device)
    start = 0
    for terms in sparse:
        columns = slice(start, start + terms.ids.shape[1])
        out_ids[:, columns].index_copy_(0, terms.row_index.to(torch.int64), terms.ids.to(torch.int64))
        out_coef[:, columns].index_copy_(0, terms.row_index.to(torch.int64), terms.coef.to(dtype))
        start = columns.stop
    if width > 1:
        out_ids, order = out_ids.sort(dim=-1)
        out_coef = out_coef.gather(1, order)
    return out_ids, out_coef
