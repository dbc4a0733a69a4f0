"""Functions on logits the caller already has (SPEC §4): ``logprobs``, ``jsd``, ``topk_jsd``, ``topk_overlap``.

The logits exist already, so there is no GEMM to fuse: these run row block by row block in
float32 (float64 for float64 inputs) and allocate nothing N×V beyond the gradient itself,
which the backward pass writes block by block. Both backends share this path (a Triton
kernel would only save the float32 upcast of each block).
"""

from __future__ import annotations

import torch

from . import _rowmath
from . import _validate as V
from ._torch_path import CHUNK_BYTES, compute_dtype
from .functional import _live_index, _put, _take

__all__ = ["logprobs", "jsd", "topk_jsd", "topk_overlap"]


def _row_blocks(n: int, vocab: int, buffers: int):
    step = max(1, min(n, CHUNK_BYTES // max(1, vocab * 4 * buffers)))
    for r0 in range(0, n, step):
        yield slice(r0, min(n, r0 + step))


def _scaled(logits, rows, temperature):
    return logits[rows].to(compute_dtype(logits.dtype)) / temperature


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature):
        n, vocab = logits.shape
        dtype = compute_dtype(logits.dtype)
        logp, entropy, lse, mean_logit = (torch.empty(n, dtype=dtype, device=logits.device) for _ in range(4))
        for rows in _row_blocks(n, vocab, 3):
            z = _scaled(logits, rows, temperature)
            lse[rows] = torch.logsumexp(z, dim=-1)
            mean_logit[rows] = (torch.exp(z - lse[rows, None]) * z).sum(-1)
            logp[rows] = z.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
        entropy = lse - mean_logit
        ctx.temperature = temperature
        ctx.save_for_backward(logits, targets, lse, mean_logit)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, mean_logit = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        zero = torch.zeros_like(lse)
        grad_logp = zero if grad_logp is None else grad_logp.to(lse.dtype)
        grad_entropy = zero if grad_entropy is None else grad_entropy.to(lse.dtype)
        for rows in _row_blocks(*logits.shape, 3):
            z = _scaled(logits, rows, ctx.temperature)
            p = torch.exp(z - lse[rows, None])
            # d logp / dz = onehot − p ;  d H / dz = −p (z − Σ p z)
            dz = p * (grad_entropy[rows, None] * (mean_logit[rows, None] - z) - grad_logp[rows, None])
            dz.scatter_add_(1, targets[rows, None], grad_logp[rows, None])
            grad_logits[rows] = dz / ctx.temperature
        return grad_logits, None, None


def logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, with_entropy=False, backend="auto"):
    """log p(target) [N] (and entropy [N]) of softmax(logits / τ); rows with ignore_index give 0."""
    V.check_backend(backend)
    n, vocab = V.check_logits("logits", logits)
    temperature = V.check_temperature(temperature)
    V.check_targets(targets, n, vocab, ignore_index, logits.device)
    index = _live_index(targets != ignore_index)
    logp, entropy = _LogProbs.apply(_take(logits, index), _take(targets.long(), index), temperature)
    logp, entropy = _put(logp, index, n), _put(entropy, index, n)
    return (logp, entropy) if with_entropy else logp


class _JSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, teacher_logits, beta, temperature):
        n, vocab = logits.shape
        dtype = compute_dtype(logits.dtype if logits.dtype == torch.float64 else teacher_logits.dtype)
        value, w_sum, lse, teacher_lse = (torch.empty(n, dtype=dtype, device=logits.device) for _ in range(4))
        for rows in _row_blocks(n, vocab, 4):
            z, teacher_z = _scaled(logits, rows, temperature).to(dtype), _scaled(teacher_logits, rows, temperature)
            lse[rows], teacher_lse[rows] = torch.logsumexp(z, -1), torch.logsumexp(teacher_z, -1).to(dtype)
            d, w = _rowmath.jsd_pointwise(z - lse[rows, None], teacher_z.to(dtype) - teacher_lse[rows, None], beta)
            value[rows], w_sum[rows] = d.sum(-1), w.sum(-1)
        ctx.beta, ctx.temperature = beta, temperature
        ctx.save_for_backward(logits, teacher_logits, lse, teacher_lse, w_sum)
        return value

    @staticmethod
    def backward(ctx, grad):
        logits, teacher_logits, lse, teacher_lse, w_sum = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        grad = grad.to(lse.dtype)
        for rows in _row_blocks(*logits.shape, 4):
            logp = _scaled(logits, rows, ctx.temperature).to(lse.dtype) - lse[rows, None]
            logq = _scaled(teacher_logits, rows, ctx.temperature).to(lse.dtype) - teacher_lse[rows, None]
            _, w = _rowmath.jsd_pointwise(logp, logq, ctx.beta)
            grad_logits[rows] = (w - logp.exp() * w_sum[rows, None]) * (grad[rows, None] / ctx.temperature)
        return grad_logits, None, None, None


def _check_pair(logits, teacher_logits, mask, temperature, beta, backend):
    V.check_backend(backend)
    n, vocab = V.check_logits_pair(logits, teacher_logits)
    V.check_mask("mask", mask, n, logits.device)
    return n, vocab, V.check_temperature(temperature), V.check_beta(beta), _live_index(
        V.row_mask(n, logits.device, mask=mask))


def jsd(logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, backend="auto"):
    """Full-vocabulary JSD_β(softmax(logits/τ), softmax(teacher_logits/τ)) per row [N]; the teacher is detached."""
    n, _, temperature, beta, index = _check_pair(logits, teacher_logits, mask, temperature, beta, backend)
    value = _JSD.apply(_take(logits, index), _take(teacher_logits.detach(), index), beta, temperature)
    return _put(value, index, n)


class _TopKJSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, teacher_logits, k, beta, support, tail, temperature):
        n, vocab = logits.shape
        dtype = compute_dtype(logits.dtype if logits.dtype == torch.float64 else teacher_logits.dtype)
        width = 2 * k if support == "union" else k
        value, lse = torch.empty(n, dtype=dtype, device=logits.device), torch.empty(n, dtype=dtype,
                                                                                      device=logits.device)
        row_coef = torch.empty_like(value)
        ids = torch.empty((n, width), dtype=torch.int64, device=logits.device)
        support_coef = torch.empty((n, width), dtype=dtype, device=logits.device)
        for rows in _row_blocks(n, vocab, 6):
            z = _scaled(logits, rows, temperature).to(dtype)
            teacher_z = _scaled(teacher_logits, rows, temperature).to(dtype)
            lse[rows] = torch.logsumexp(z, -1)
            block_ids, valid = _rowmath.support_ids(_rowmath.topk_ids(z, k), _rowmath.topk_ids(teacher_z, k), support)
            logq = teacher_z.gather(1, block_ids) - torch.logsumexp(teacher_z, -1, keepdim=True)
            terms = _rowmath.topk_jsd_terms(z.gather(1, block_ids) - lse[rows, None], logq, valid, beta, tail)
            value[rows], row_coef[rows] = terms.value, terms.row_coef
            ids[rows], support_coef[rows] = block_ids, terms.support_coef
        ctx.temperature = temperature
        ctx.save_for_backward(logits, lse, row_coef, ids, support_coef)
        return value

    @staticmethod
    def backward(ctx, grad):
        logits, lse, row_coef, ids, support_coef = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        grad = grad.to(lse.dtype) / ctx.temperature
        for rows in _row_blocks(*logits.shape, 2):
            p = torch.exp(_scaled(logits, rows, ctx.temperature).to(lse.dtype) - lse[rows, None])
            dz = p.mul_(row_coef[rows, None]).scatter_add_(1, ids[rows], support_coef[rows])
            grad_logits[rows] = dz * grad[rows, None]
        return grad_logits, None, None, None, None, None, None


def topk_jsd(logits, teacher_logits, k, *, beta=0.5, support="union", tail=True, temperature=1.0, mask=None,
             backend="auto"):
    """Top-K JSD_β with tail compensation (SPEC §2) per row [N] on given logits; K ≥ V gives the full JSD."""
    n, vocab, temperature, beta, index = _check_pair(logits, teacher_logits, mask, temperature, beta, backend)
    k, support = V.check_k(k), V.check_support(support)
    if k >= vocab:
        return jsd(logits, teacher_logits, beta=beta, temperature=temperature, mask=mask, backend=backend)
    value = _TopKJSD.apply(_take(logits, index), _take(teacher_logits.detach(), index), k, beta, support, bool(tail),
                           temperature)
    return _put(value, index, n)


def topk_overlap(indices_a, indices_b):
    """|A ∩ B| / k per row for two [N, k] sets of distinct ids (float32 [N])."""
    for name, t in (("indices_a", indices_a), ("indices_b", indices_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if indices_a.dim() != 2 or indices_a.shape != indices_b.shape:
        raise ValueError(f"indices_a {tuple(indices_a.shape)} and indices_b {tuple(indices_b.shape)} must be "
                         "[N, k] tensors of the same shape")
    if indices_a.device != indices_b.device:
        raise ValueError(f"indices_b is on {indices_b.device} but indices_a is on {indices_a.device}")
    return _rowmath.overlap_fraction(indices_a.long(), indices_b.long())
