"""Row statistics by the cuBLAS backend: lse, Σ p·z, the target logit and the top-k, in one forward sweep.

Per vocabulary block (``_blocks.vocab_plan``: all rows × as many columns as the budget holds): one
GEMM writes a = hidden · weight[cols]ᵀ in float32, and one read of it by ``stats_kernel`` folds the
block into every row's running state (logsumexp, T, target logit, top-k keys). The block is then free
for the next. Work: 1 logits-GEMM equivalent; one 4-byte read per logit; one launch per block.

k ≤ ``MAX_K``: the kernel keeps the top set (K_PAD = next power of two ≥ k keys per row, with a scratch
list per row). Larger k (the wide path): the kernel also writes the logits over the block, and torch
ranks the block's keys (``rowmath.pack_topk_keys``: the same keys) and merges them with the running
top-k; no cliff, more passes. float64 logits with k > 0 take the chunked PyTorch path, as on the Triton
backend: keys hold float32 bits and would tie float64 logits closer than a float32 ulp.
"""

from __future__ import annotations

import math

import torch
import triton

from ... import rowmath
from ..base import Head, RowStats
from ..triton._launch import interpreting
from . import _work
from ._blocks import MAX_K, Side, block_view, slice_bytes, tiles, vocab_plan
from .keys import SENTINEL, unpack_keys
from .stats_kernel import block_stats, scratch_width


def row_stats(head: Head, *, targets: torch.Tensor | None = None, k: int = 0, with_mean_logit: bool = True,
              lse_dtype: torch.dtype | None = None) -> RowStats:
    """``Backend.row_stats``: lse (in ``lse_dtype``, default the compute dtype), Σ p·z (in lse's dtype: entropy =
    lse − Σ p·z without cancellation at large logits), the target logit, the top-k ids and float32 logits."""
    side = Side.of(head)
    if k and side.dtype == torch.float64:
        from ..torch.row_stats import row_stats as torch_row_stats

        return torch_row_stats(head, targets=targets, k=k, with_mean_logit=with_mean_logit, lse_dtype=lse_dtype)
    n, v = head.rows, head.vocab
    device, dtype = head.hidden.device, side.dtype
    lse_dtype = lse_dtype or dtype
    wide = k > MAX_K
    kind = "stats_topk" if 0 < k <= MAX_K else "stats"
    block_r, block_c, warps = tiles(kind)
    k_pad = max(2, triton.next_power_of_2(k)) if 0 < k <= MAX_K else 0
    cap = scratch_width(k_pad, block_c) if k_pad else 0
    with _work.sweep("row_stats"):
        m = _work.workspace((n,), dtype, device, fill=-math.inf)
        s = _work.workspace((n,), dtype, device, fill=0.0)
        t = _work.workspace((n,), dtype, device, fill=0.0) if with_mean_logit else None
        target = torch.full((n,), math.nan, dtype=dtype, device=device) if targets is not None else None
        top = _work.workspace((n, k_pad), torch.int64, device, fill=SENTINEL) if k_pad else None
        running = _work.workspace((n, k), torch.int64, device, fill=SENTINEL) if wide else None
        # the block (its plan is the backward's: the same GEMMs), the top-K scratch list per row beside it
        plan = vocab_plan(n, v, side.itemsize, slice_bytes(head))
        buffer = _work.workspace(plan.elements, dtype, device) if n else None
        scratch = _work.workspace((plan.rows, cap), torch.int64, device) if k_pad and n else None
        for rows, cols in plan.blocks():
            block = side.logits(block_view(buffer, rows.stop - rows.start, cols.stop - cols.start), rows, cols)
            block_stats(block, cols.start, side.bias, side.scalars, side.has_cap, m=m[rows], s=s[rows],
                        t=t[rows] if t is not None else None,
                        targets=targets[rows] if targets is not None else None,
                        target=target[rows] if target is not None else None,
                        top=top[rows] if top is not None else None, k=k,
                        scratch=scratch[: rows.stop - rows.start] if scratch is not None else None,
                        write_z=wide, tiles=(block_r, block_c, warps), rank_select=interpreting())
            if wide:
                _merge_wide(running, rows, block, cols.start, k)
    lse = m.to(lse_dtype) + s.log().to(lse_dtype)
    mean = m.to(lse_dtype) + (t / s).to(lse_dtype) if with_mean_logit else None
    top_ids = top_logits = None
    if k:
        keys = running if wide else top[:, :k]
        top_ids, top_logits = unpack_keys(keys)
    return RowStats(lse, mean, target, top_ids, top_logits)


def _merge_wide(running: torch.Tensor, rows: slice, z: torch.Tensor, col0: int, k: int) -> None:
    """The wide path: running[rows] ← the k largest of its keys and the keys of the logits block ``z``, a
    chunk of rows at a time (the int64 keys of a chunk: at most half the block's bytes)."""
    ids = torch.arange(col0, col0 + z.shape[1], device=z.device)
    step = max(1, z.shape[0] // 4)
    for r0 in range(0, z.shape[0], step):
        chunk = slice(rows.start + r0, min(rows.stop, rows.start + r0 + step))
        keys = rowmath.pack_topk_keys(z[r0:r0 + step], ids)
        block_top = torch.topk(keys, min(k, z.shape[1]), dim=1, sorted=False).values
        running[chunk] = torch.topk(torch.cat([running[chunk], block_top], dim=1), k, dim=1, sorted=True).values
    _work.torch_pass("wide_topk", z.numel(), z.numel() * (z.element_size() + 8 * 3))
