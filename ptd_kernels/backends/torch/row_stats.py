"""Row statistics by the chunked PyTorch path: lse, Σ p·z, target logit and top-k in one sweep.

Blocks of up to ``config.ROW_BLOCK`` rows × as many vocabulary columns as ``config.CHUNK_BYTES``
allows, with an online logsumexp and a running top-k merged block by block, so each weight
block is read once per row block.

Online logsumexp, one exp per logit: with m the running max, S = Σ e^{z−m} and
T = Σ e^{z−m}·(z − m), a new max m' rescales S ← S·e^{m−m'} and T ← (T + (m − m')·S)·e^{m−m'};
at the end lse = m + log S and Σ p·z = m + T/S.
"""

from __future__ import annotations

import math

import torch

from ... import config, rowmath
from ..._host_reads import free_to_read
from ..base import Head, RowStats
from ._blocks import block_length, itemsize, logits_into, prepare, sub_blocks, to_logits_, view


@torch.no_grad()
def row_stats(head: Head, *, targets: torch.Tensor | None = None, k: int = 0, with_mean_logit: bool = True,
              lse_dtype: torch.dtype | None = None) -> RowStats:
    """Per-row logsumexp, Σ p·z, target logit and top-k (ids, logits) in one sweep (see module doc).

    ``lse_dtype`` (default: the compute dtype) is the dtype of lse and Σ p·z: float64 keeps m + log S
    unrounded, so that z − lse of this sweep's own logits is exact (a rounded lse shifts every
    log-prob of a row with large logits alike).
    """
    dtype, hidden, weight, bias = prepare(head)
    n, vocab = hidden.shape[0], weight.shape[0]
    lse_dtype = lse_dtype or dtype
    device = hidden.device
    size = itemsize(dtype)
    lse = torch.empty(n, dtype=lse_dtype, device=device)
    mean_logit = torch.empty_like(lse) if with_mean_logit else None
    target_logit = torch.empty(n, dtype=dtype, device=device) if targets is not None else None
    top_ids = torch.empty((n, k), dtype=torch.int64, device=device) if k else None
    top_logits = torch.empty((n, k), dtype=dtype, device=device) if k else None
    rows_step = min(n, config.ROW_BLOCK) if n else 1
    cols_step = max(min(vocab, max(k, 128)), block_length(vocab, rows_step, size))
    flat = torch.empty(rows_step * cols_step, dtype=dtype, device=device)
    for r0 in range(0, n, rows_step):
        rows = slice(r0, min(n, r0 + rows_step))
        h = hidden[rows]
        m = torch.full((h.shape[0], 1), -math.inf, dtype=dtype, device=device)
        e_sum = torch.zeros_like(m)
        ez_sum = torch.zeros_like(m)
        run_values = run_ids = None
        for c0 in range(0, vocab, cols_step):
            c1 = min(vocab, c0 + cols_step)
            block_bias = bias[c0:c1] if bias is not None else None
            z = logits_into(view(flat, h.shape[0], c1 - c0), h, weight[c0:c1], block_bias)
            for sub in sub_blocks(z.shape[0], c1 - c0, size):  # before the top-k: its ties are the logits'
                to_logits_(z[sub], head)
            if targets is not None and c1 - c0 == vocab:  # one block holds every id
                target_logit[rows] = z.gather(1, targets[rows, None]).squeeze(1)
            elif targets is not None:
                local = targets[rows] - c0
                inside = (local >= 0) & (local < c1 - c0)
                picked = z.gather(1, local.clamp(0, c1 - c0 - 1)[:, None]).squeeze(1)
                target_logit[rows] = torch.where(inside, picked, target_logit[rows])
            if k:
                block_ids = rowmath.topk_ids(z, min(k, c1 - c0))
                block_values = z.gather(1, block_ids)
                block_ids += c0
                if run_ids is not None:
                    block_values = torch.cat([run_values, block_values], dim=-1)
                    block_ids = torch.cat([run_ids, block_ids], dim=-1)
                    run_values, run_ids = rowmath.merge_topk(block_values, block_ids, k)
                elif c1 < vocab or (free_to_read(block_values) and not bool(block_values.isnan().any())):
                    # the first block's top-k is in the rule's order already (the next merge re-sorts anyway);
                    # only NaNs, tied among themselves, take merge_topk's id order (on a device that check
                    # would wait for the queue: the merge runs)
                    run_values, run_ids = block_values, block_ids
                else:
                    run_values, run_ids = rowmath.merge_topk(block_values, block_ids, k)
            for sub in sub_blocks(z.shape[0], c1 - c0, size):
                if c0 == 0:  # the first block: nothing to rescale (S = 0, m = −inf)
                    z_sub = z[sub]
                    m_new = z_sub.amax(-1, keepdim=True)
                    e = z_sub.sub_(m_new).exp()
                    e_sum[sub] = e.sum(-1, keepdim=True)
                    if with_mean_logit:
                        ez_sum[sub] = torch.linalg.vecdot(e, z_sub)[:, None]
                    m[sub] = m_new
                    continue
                z_sub, m_sub, e_sub = z[sub], m[sub], e_sum[sub]
                m_new = torch.maximum(m_sub, z_sub.amax(-1, keepdim=True))
                seen = e_sub > 0  # the first block: S = 0 and m = −inf, nothing to rescale
                scale = torch.where(seen, torch.exp(m_sub - m_new), torch.zeros_like(m_sub))
                if with_mean_logit:
                    shift = torch.where(seen, m_sub - m_new, torch.zeros_like(m_sub))
                    ez_sum[sub] = (ez_sum[sub] + shift * e_sub) * scale
                z_sub -= m_new
                e = z_sub.exp()
                e_sum[sub] = e_sub * scale + e.sum(-1, keepdim=True)
                if with_mean_logit:
                    ez_sum[sub] += torch.linalg.vecdot(e, z_sub)[:, None]
                m[sub] = m_new
        lse[rows] = (m.to(lse_dtype) + e_sum.log().to(lse_dtype)).squeeze(-1)
        if with_mean_logit:
            mean_logit[rows] = (m.to(lse_dtype) + (ez_sum / e_sum).to(lse_dtype)).squeeze(-1)
        if k:
            top_logits[rows], top_ids[rows] = run_values, run_ids
    return RowStats(lse, mean_logit, target_logit, top_ids, top_logits)
