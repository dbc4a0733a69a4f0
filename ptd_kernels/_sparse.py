"""Output-layer work on a few ids per row (a top-K support, the targets): shared by both backends.

Costs O(N·M·H) for M ids per row instead of the O(N·V·H) of a vocabulary sweep, so it needs no
tiling over the vocabulary: rows are processed in chunks whose gathered weight rows
([rows, M, H]) stay within ``CHUNK_BYTES``.
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


def sparse_backward(hidden, weight, temperature: float, ids: torch.Tensor, coef: torch.Tensor, grad_hidden,
                    grad_weight, grad_bias, rows: torch.Tensor | None = None) -> None:
    """Add the gradients of Σ_{n,m} coef[n, m] · z[n, ids[n, m]] into the given accumulators (in place).

    ``grad_hidden`` [N, H], ``grad_weight`` [V, H], ``grad_bias`` [V] are compute-dtype buffers or
    None when not wanted. The 1/τ of the logits is applied here. With ``rows`` (int64 [n]), the
    i-th row of ids/coef belongs to row ``rows[i]`` of hidden / grad_hidden.
    """
    if rows is not None:
        hidden = hidden[rows]
        if grad_hidden is not None:
            partial = torch.zeros((rows.shape[0], hidden.shape[1]), dtype=grad_hidden.dtype, device=hidden.device)
            sparse_backward(hidden, weight, temperature, ids, coef, partial, grad_weight, grad_bias)
            grad_hidden.index_add_(0, rows, partial)
            return
        sparse_backward(hidden, weight, temperature, ids, coef, None, grad_weight, grad_bias)
        return
    n, m = ids.shape
    if n == 0 or m == 0:
        return
    dtype = coef.dtype
    scaled = coef / temperature
    if grad_bias is not None:
        grad_bias.index_add_(0, ids.reshape(-1), scaled.reshape(-1).to(grad_bias.dtype))
    if grad_hidden is None and grad_weight is None:
        return
    h = hidden.shape[1]
    step = _rows_per_chunk(n, m, h, torch.finfo(dtype).bits // 8)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows, c = ids[r0:r1], scaled[r0:r1]
        if grad_hidden is not None:
            w_rows = weight[rows].to(dtype)  # [c, m, H]
            grad_hidden[r0:r1] += torch.bmm(c[:, None, :], w_rows).squeeze(1).to(grad_hidden.dtype)
        if grad_weight is not None:
            contrib = c[:, :, None] * hidden[r0:r1].to(dtype)[:, None, :]  # [c, m, H]
            grad_weight.index_add_(0, rows.reshape(-1), contrib.reshape(-1, h).to(grad_weight.dtype))
