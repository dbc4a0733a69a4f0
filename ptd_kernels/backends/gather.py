"""Logits at a few ids per row (a top-K support), without a vocabulary sweep.

O(n·M·H) work for M ids per row instead of the O(n·V·H) of a sweep, so no tiling over the
vocabulary: rows go in chunks whose gathered weight rows ([rows, M, H]) stay within
``ptd_kernels.config.GATHER_BYTES``. It is PyTorch on any device, the default
``Backend.gather_logits`` of every backend.
"""

from __future__ import annotations

import torch

from .. import config
from .base import Head
from .torch._blocks import to_logits_

_LIVE_BUFFERS = 4  # gathered weight rows, their compute-dtype copy, the product, its reshape/cast


def gather_logits(head: Head, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """z[n, m] = the logit of row n at id ids[n, m] (``Head``'s transform included), computed in ``dtype``."""
    hidden, weight, bias = head.hidden, head.weight, head.bias
    n, m = ids.shape
    out = torch.empty((n, m), dtype=dtype, device=hidden.device)
    if n == 0 or m == 0:
        return out
    per_row = _LIVE_BUFFERS * m * hidden.shape[1] * (torch.finfo(dtype).bits // 8)
    step = max(1, min(n, config.GATHER_BYTES // max(1, per_row)))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows = ids[r0:r1]
        w_rows = weight[rows].to(dtype)  # [c, m, H]
        z = torch.bmm(w_rows, hidden[r0:r1].to(dtype)[:, :, None]).squeeze(-1)
        if bias is not None:
            z += bias[rows].to(dtype)
        to_logits_(z, head)
        out[r0:r1] = z
    return out
