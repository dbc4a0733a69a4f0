"""The vocabulary-parallel backend: every primitive of ``Backend`` on a tensor-parallel output layer.

Each rank of the process group holds a contiguous slice of the vocabulary rows of the output layer
(rank order, sizes may differ), and the same rows (hidden states, targets, masks) as every other
rank. This backend runs another backend (``inner``: torch or Triton) on the local slice and
combines per-row statistics with collectives, so that every output equals the single-process one
and every rank holds it:

- row statistics: local lse_r, Σ_r-normalized mean logits and the owned target logit; then
  lse = M + log Σ_r e^{lse_r − M} (M = max_r lse_r, one MAX and one SUM all-reduce of a few
  floats per row); the top-k as the merge of every rank's local top-k candidates (an all-gather of
  k ids and logits per rank and row) under the global tie rule (larger logit, then smaller id);
- logits at a few ids per row: each id's owner computes it, one SUM all-reduce;
- backward sweeps: local ∂L/∂z with the global lse and coefficients, local d weight and d bias,
  and one SUM all-reduce of d hidden;
- the full JSD: local sums of its atoms with the global logsumexps, one SUM all-reduce.

Communication per row: O(1) floats for everything but the top-K parts, O(K·world) for those;
never O(V). There is no one-sweep loss here (its blocks are full vocabulary rows): the loss functions
take the per-row path. The set-up — DTensor layers, the process group, and the one exchange in which
the ranks check that they agree — is ``vocab_parallel_setup``'s.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import rowmath
from .base import Backend, GradNeeds, HeadGradCoefs, HeadGrads, JSDStats, RowStats, SparseTerms


class VocabParallelBackend(Backend):
    """``inner`` on this rank's vocabulary slice [offset, offset + sizes[rank]) of ``sizes`` over ``group``."""

    def __init__(self, inner: Backend, group, sizes: tuple[int, ...]):
        self.inner, self.group = inner, group
        self.rank = dist.get_rank(group)
        self.sizes = tuple(int(s) for s in sizes)
        self.offset = sum(self.sizes[: self.rank])
        self.local = self.sizes[self.rank]
        self.vocab = sum(self.sizes)
        self.name = f"vocab-parallel {inner.name}"

    # ------------------------------------------------------------------------- helpers

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def _local_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ids as local ids, and whether this rank owns them."""
        local = ids - self.offset
        return local, (local >= 0) & (local < self.local)

    def _merge_topk(self, values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global top-k from every rank's candidates: larger logit first, ties to the smaller id."""
        world = len(self.sizes)
        gathered_values = [torch.empty_like(values) for _ in range(world)]
        gathered_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(gathered_values, values.contiguous(), group=self.group)
        dist.all_gather(gathered_ids, ids.contiguous(), group=self.group)
        return rowmath.merge_topk(torch.cat(gathered_values, dim=1), torch.cat(gathered_ids, dim=1), k)

    # ------------------------------------------------------------------------- primitives

    def row_stats(self, head, *, targets=None, k=0, with_mean_logit=True, lse_dtype=None):
        wide = torch.float64
        local_targets = owned = None
        if targets is not None:
            local_targets, owned = self._local_ids(targets)
            local_targets = torch.where(owned, local_targets, torch.zeros_like(local_targets))
        local_k = min(k, self.local)
        stats = self.inner.row_stats(head, targets=local_targets, k=local_k, with_mean_logit=with_mean_logit,
                                     lse_dtype=wide)
        local_lse = stats.lse.to(wide)
        row_max = self._all_reduce(local_lse.clone(), dist.ReduceOp.MAX)
        share = torch.exp(local_lse - row_max)  # e^{lse_r − M}: this rank's part of Σ_v e^{z_v − M}
        parts = [share]
        if with_mean_logit:
            parts.append(share * stats.mean_logit.to(wide))
        if targets is not None:
            parts.append(torch.where(owned, stats.target_logit.to(wide), torch.zeros((), dtype=wide,
                                                                                     device=local_lse.device)))
        sums = self._all_reduce(torch.stack(parts))
        total = sums[0]
        out_dtype = lse_dtype or head.dtype
        lse = (row_max + total.log()).to(out_dtype)
        mean_logit = (sums[1] / total).to(out_dtype) if with_mean_logit else None
        target_logit = sums[-1].to(head.dtype) if targets is not None else None
        top_ids = top_logits = None
        if k:
            n = head.rows
            values = torch.full((n, k), -torch.inf, dtype=stats.topk_logits.dtype, device=local_lse.device)
            ids = torch.full((n, k), self.vocab, dtype=torch.int64, device=local_lse.device)
            values[:, :local_k], ids[:, :local_k] = stats.topk_logits, stats.topk_indices + self.offset
            top_logits, top_ids = self._merge_topk(values, ids, k)
        return RowStats(lse, mean_logit, target_logit, top_ids, top_logits)

    def gather_logits(self, head, ids, dtype):
        local, owned = self._local_ids(ids)
        values = self.inner.gather_logits(head, torch.where(owned, local, torch.zeros_like(local)), dtype)
        return self._all_reduce(torch.where(owned, values, torch.zeros((), dtype=dtype, device=values.device)))

    def head_backward(self, head, lse, coefs: HeadGradCoefs, needs: GradNeeds) -> HeadGrads:
        # Global ids become local ones; ids another rank owns fall outside [0, V_r) and match no column.
        targets = None if coefs.targets is None else coefs.targets - self.offset
        sparse = tuple(SparseTerms(t.row_index, t.ids - self.offset, t.coef, t.distinct_rows) for t in coefs.sparse)
        local = HeadGradCoefs(coefs.row_coef, coefs.logit_coef, coefs.logit_shift, targets, coefs.target_coef, sparse)
        grads = self.inner.head_backward(head, lse, local, needs)
        if grads.hidden is not None:
            self._all_reduce(grads.hidden)
        return grads

    def jsd_forward(self, student, teacher, beta, *, lse=None, teacher_lse=None) -> JSDStats:
        if lse is None:
            lse = self.row_stats(student, with_mean_logit=False, lse_dtype=torch.float64).lse
        if teacher_lse is None:
            teacher_lse = self.row_stats(teacher, with_mean_logit=False, lse_dtype=torch.float64).lse
        local = self.inner.jsd_forward(student, teacher, beta, lse=lse, teacher_lse=teacher_lse)
        sums = self._all_reduce(torch.stack([local.value, local.w_sum]))
        return JSDStats(sums[0], sums[1], lse, teacher_lse)

    def jsd_backward(self, student, teacher, beta, stats, grad, needs) -> HeadGrads:
        grads = self.inner.jsd_backward(student, teacher, beta, stats, grad, needs)
        if grads.hidden is not None:
            self._all_reduce(grads.hidden)
        return grads
