"""Output-layer work on a few ids per row (a top-K support, the targets).

``gather_logits`` costs O(N·M·H) for M ids per row instead of the O(N·V·H) of a vocabulary
sweep, so it needs no tiling over the vocabulary: rows are processed in chunks whose gathered
weight rows ([rows, M, H]) stay within ``CHUNK_BYTES``. Gradients of such terms are never formed
here: both backends add them into the dz blocks of their vocabulary sweep (so that they cancel
against the dense part before the GEMMs); ``pad_sparse`` lays them out for the Triton kernel.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 16 << 20  # all live [rows, M, H] temporaries of one chunk
_LIVE_BUFFERS = 4  # gathered weight rows, their compute-dtype copy, the product, its reshape/cast


def _rows_per_chunk(n: int, m: int, h: int, itemsize: int) -> int:
    return max(1, min(n, CHUNK_BYTES // max(1, _LIVE_BUFFERS * m * h * itemsize)))


def gather_logits(hidden, weight, bias, temperature: float, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """z[n, m] = (hidden[n] · weight[ids[n, m]] + bias[ids[n, m]]) / τ, computed in ``dtype``."""
    n, m = ids.shape
    out = torch.empty((n, m), dtype=dtype, device=hidden.device)
    if n == 0 or m == 0:
        return out
    step = _rows_per_chunk(n, m, hidden.shape[1], torch.finfo(dtype).bits // 8)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows = ids[r0:r1]
        w_rows = weight[rows].to(dtype)  # [c, m, H]
        z = torch.bmm(w_rows, hidden[r0:r1].to(dtype)[:, :, None]).squeeze(-1)
        if bias is not None:
            z += bias[rows].to(dtype)
        out[r0:r1] = z / temperature
    return out


def pad_sparse(n: int, vocab: int, sparse, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Merge sparse terms into one padded array per row, for kernels that add them into dz tiles.

    ``sparse``: (row_index [m], ids [m, M_i], coef [m, M_i]) triples with row_index in [0, n)
    (several triples may name one row, and one row may repeat within a triple). Returns
    (ids [n, M] int64 sorted ascending per row, coef [n, M] in ``dtype``), M the largest number
    of terms of any row, the unused slots at the end of a row holding id ``vocab`` (it matches no
    column) and coefficient 0; or None when no term is left. Terms with coefficient 0 are dropped
    (they add nothing); a NaN coefficient is kept. A repeated (row, id) keeps both terms.
    """
    rows, ids, coefs = [], [], []
    for row_index, row_ids, coef in sparse:
        if row_ids.numel() == 0:
            continue
        rows.append(row_index.to(torch.int64)[:, None].expand_as(row_ids).reshape(-1))
        ids.append(row_ids.to(torch.int64).reshape(-1))
        coefs.append(coef.to(dtype).reshape(-1))
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
