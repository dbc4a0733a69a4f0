"""The autograd Functions of the logits-level functions (``logprobs``, ``jsd``, ``topk_jsd``).

The logits exist already, so there is no GEMM to fuse: these run row block by row block in the
compute dtype and allocate nothing N×V beyond the gradient itself, which the backward writes
block by block. The per-row math is ``rowmath``'s, the same spelling as the fused functions',
so ``jsd(hidden @ weightᵀ, …)`` equals ``linear_jsd(hidden, weight, …)`` to float rounding.
"""

from __future__ import annotations

import torch

from .. import config, rowmath
from .._dtypes import compute_dtype
from .common import SweepConfig, once_differentiable


def _row_blocks(index, n: int, vocab: int, buffers: int):  # buffers: live [rows, V] temporaries
    """Bounded blocks of the rows that go in: yields (slice into their per-row outputs, the rows of logits).

    ``index`` holds the live rows (None: all ``n``); masked rows are never copied.
    """
    live = n if index is None else index.numel()
    step = max(1, min(live, config.CHUNK_BYTES // max(1, vocab * 4 * buffers)))
    for r0 in range(0, live, step):
        out = slice(r0, min(live, r0 + step))
        yield out, (out if index is None else index[out])


def _scaled(logits, rows, temperature, dtype, live=None):
    """A fresh compute-dtype copy of the rows' logits, divided by τ; rows that ``live`` (bool [N], the
    sync-free path's mask) marks masked become zeros, so that their terms are finite and vanish."""
    block = logits[rows] if isinstance(rows, slice) else logits.index_select(0, rows)
    block = block.to(dtype) / temperature
    if live is not None:
        block.masked_fill_(~live[rows, None], 0.0)
    return block


def _grad_buffer(logits, index):
    return torch.empty_like(logits) if index is None else torch.zeros_like(logits)


def _write(grad_logits, rows, values):
    if isinstance(rows, slice):
        grad_logits[rows] = values
    else:
        grad_logits.index_copy_(0, rows, values.to(grad_logits.dtype))


class LogProbs(torch.autograd.Function):
    """log p(target) and entropy of live rows of given logits."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, index, live):
        """targets: per row that goes in; index: the live rows of logits (None: all); live: the mask whose
        masked rows are zeroed (sync-free path; None: none). Outputs per row that goes in."""
        n, vocab = logits.shape
        dtype = compute_dtype(logits)
        count = targets.shape[0]
        logp, lse, mean_logit = (torch.empty(count, dtype=dtype, device=logits.device) for _ in range(3))
        for out, rows in _row_blocks(index, n, vocab, 6):
            z = _scaled(logits, rows, temperature, dtype, live)
            lse[out] = torch.logsumexp(z, dim=-1)
            mean_logit[out] = (torch.exp(z - lse[out, None]) * z).sum(-1)
            logp[out] = z.gather(1, targets[out, None]).squeeze(1) - lse[out]
        entropy = lse - mean_logit
        ctx.temperature = temperature
        ctx.save_for_backward(logits, targets, lse, mean_logit, index, live)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, mean_logit, index, live = ctx.saved_tensors
        grad_logits = _grad_buffer(logits, index)
        zero = torch.zeros_like(lse)
        grad_logp = zero if grad_logp is None else grad_logp.to(lse.dtype)
        grad_entropy = zero if grad_entropy is None else grad_entropy.to(lse.dtype)
        for out, rows in _row_blocks(index, *logits.shape, 6):
            z = _scaled(logits, rows, ctx.temperature, lse.dtype, live)
            p = torch.exp(z - lse[out, None])
            # d logp / dz = onehot − p ;  d H / dz = −p (z − Σ p z)
            dz = p * (grad_entropy[out, None] * (mean_logit[out, None] - z) - grad_logp[out, None])
            dz.scatter_add_(1, targets[out, None], grad_logp[out, None])
            _write(grad_logits, rows, dz / ctx.temperature)
        return grad_logits, None, None, None, None


class JSD(torch.autograd.Function):
    """Full-vocabulary JSD_β of live rows of given logits (``rowmath.full_jsd_rows_``)."""

    @staticmethod
    def forward(ctx, logits, teacher_logits, cfg: SweepConfig, index, live):
        n, vocab = logits.shape
        dtype = compute_dtype(logits, teacher_logits)
        count = n if index is None else index.numel()
        temperature = cfg.student.temperature
        value, w_sum, lse, teacher_lse = (torch.empty(count, dtype=dtype, device=logits.device) for _ in range(4))
        for out, rows in _row_blocks(index, n, vocab, 10):
            z = _scaled(logits, rows, temperature, dtype, live)
            teacher_z = _scaled(teacher_logits, rows, temperature, dtype, live)
            terms = rowmath.full_jsd_rows_(z, teacher_z, cfg.divergence.beta, grad=False)
            value[out], w_sum[out], lse[out], teacher_lse[out] = terms.value, terms.w_sum, terms.lse, terms.teacher_lse
        rowmath.bound_divergence_(value, cfg.divergence.beta)
        ctx.cfg = cfg
        ctx.save_for_backward(logits, teacher_logits, lse, teacher_lse, w_sum, index, live)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, teacher_logits, lse, teacher_lse, w_sum, index, live = ctx.saved_tensors
        cfg = ctx.cfg
        temperature = cfg.student.temperature
        grad_logits = _grad_buffer(logits, index)
        grad = grad.to(lse.dtype)
        for out, rows in _row_blocks(index, *logits.shape, 10):
            z = _scaled(logits, rows, temperature, lse.dtype, live)
            teacher_z = _scaled(teacher_logits, rows, temperature, lse.dtype, live)
            dz = rowmath.jsd_backward_rows_(z, teacher_z, cfg.divergence.beta, lse[out], teacher_lse[out],
                                             w_sum[out])
            _write(grad_logits, rows, dz.mul_(grad[out, None] / temperature))
        return grad_logits, None, None, None, None


class TopKJSD(torch.autograd.Function):
    """Top-K JSD of live rows of given logits (``rowmath.topk_jsd_rows_``); k < V."""

    @staticmethod
    def forward(ctx, logits, teacher_logits, cfg: SweepConfig, index, live):
        n, vocab = logits.shape
        div = cfg.divergence
        dtype = compute_dtype(logits, teacher_logits)
        width = 2 * div.k if div.support == "union" else div.k
        count = n if index is None else index.numel()
        temperature = cfg.student.temperature
        value, lse, row_coef = (torch.empty(count, dtype=dtype, device=logits.device) for _ in range(3))
        ids = torch.empty((count, width), dtype=torch.int64, device=logits.device)
        support_coef = torch.empty((count, width), dtype=dtype, device=logits.device)
        for out, rows in _row_blocks(index, n, vocab, 10):
            z = _scaled(logits, rows, temperature, dtype, live)
            teacher_z = _scaled(teacher_logits, rows, temperature, dtype, live)
            block = rowmath.topk_jsd_rows_(z, teacher_z, div.k, div.beta, div.support, div.tail)
            value[out], row_coef[out], lse[out] = block.terms.value, block.terms.row_coef, block.lse
            ids[out], support_coef[out] = block.ids, block.terms.support_coef
        ctx.cfg = cfg
        ctx.save_for_backward(logits, lse, row_coef, ids, support_coef, index, live)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, lse, row_coef, ids, support_coef, index, live = ctx.saved_tensors
        temperature = ctx.cfg.student.temperature
        grad_logits = _grad_buffer(logits, index)
        grad = grad.to(lse.dtype) / temperature
        for out, rows in _row_blocks(index, *logits.shape, 6):
            p = torch.exp(_scaled(logits, rows, temperature, lse.dtype, live) - lse[out, None])
            dz = rowmath.topk_grad_logits_(p, row_coef[out], ids[out], support_coef[out])
            _write(grad_logits, rows, dz.mul_(grad[out, None]))
        return grad_logits, None, None, None, None
