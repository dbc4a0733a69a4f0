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


def _row_blocks(index, n: int, vocab: int, buffers: int):  # buffers: live [rows, V] temporaries
    """Bounded blocks of the live rows: yields (slice into the per-live-row outputs, the rows of logits).

    ``index`` holds the live rows (None: all ``n``); masked rows are never copied, so nothing
    N×V is allocated beyond the gradient.
    """
    live = n if index is None else index.numel()
    step = max(1, min(live, CHUNK_BYTES // max(1, vocab * 4 * buffers)))
    for r0 in range(0, live, step):
        out = slice(r0, min(live, r0 + step))
        yield out, (out if index is None else index[out])


def _scaled(logits, rows, temperature):
    block = logits[rows] if isinstance(rows, slice) else logits.index_select(0, rows)
    return block.to(compute_dtype(logits.dtype)) / temperature


def _grad_buffer(logits, index):
    return torch.empty_like(logits) if index is None else torch.zeros_like(logits)


def _write(grad_logits, rows, values):
    if isinstance(rows, slice):
        grad_logits[rows] = values
    else:
        grad_logits.index_copy_(0, rows, values.to(grad_logits.dtype))


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, index):
        """targets: [n_live]; index: the live rows of logits (None: all). Outputs per live row."""
        n, vocab = logits.shape
        dtype = compute_dtype(logits.dtype)
        live = targets.shape[0]
        logp, lse, mean_logit = (torch.empty(live, dtype=dtype, device=logits.device) for _ in range(3))
        for out, rows in _row_blocks(index, n, vocab, 6):
            z = _scaled(logits, rows, temperature)
            lse[out] = torch.logsumexp(z, dim=-1)
            mean_logit[out] = (torch.exp(z - lse[out, None]) * z).sum(-1)
            logp[out] = z.gather(1, targets[out, None]).squeeze(1) - lse[out]
        entropy = lse - mean_logit
        ctx.temperature = temperature
        ctx.save_for_backward(logits, targets, lse, mean_logit, index)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, mean_logit, index = ctx.saved_tensors
        grad_logits = _grad_buffer(logits, index)
        zero = torch.zeros_like(lse)
        grad_logp = zero if grad_logp is None else grad_logp.to(lse.dtype)
        grad_entropy = zero if grad_entropy is None else grad_entropy.to(lse.dtype)
        for out, rows in _row_blocks(index, *logits.shape, 6):
            z = _scaled(logits, rows, ctx.temperature)
            p = torch.exp(z - lse[out, None])
            # d logp / dz = onehot − p ;  d H / dz = −p (z − Σ p z)
            dz = p * (grad_entropy[out, None] * (mean_logit[out, None] - z) - grad_logp[out, None])
            dz.scatter_add_(1, targets[out, None], grad_logp[out, None])
            _write(grad_logits, rows, dz / ctx.temperature)
        return grad_logits, None, None, None


def logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, with_entropy=False, backend="auto"):
    """log p(target) [N] (and entropy [N]) of softmax(logits / τ); rows with ignore_index give 0."""
    V.check_backend(backend)
    n, vocab = V.check_logits("logits", logits)
    temperature = V.check_temperature(temperature)
    V.check_targets(targets, n, vocab, ignore_index, logits.device)
    index = _live_index(targets != ignore_index)
    logp, entropy = _LogProbs.apply(logits, _take(targets.long(), index), temperature, index)
    logp, entropy = _put(logp, index, n), _put(entropy, index, n)
    return (logp, entropy) if with_entropy else logp


class _JSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, teacher_logits, beta, temperature, index):
        n, vocab = logits.shape
        dtype = compute_dtype(logits.dtype if logits.dtype == torch.float64 else teacher_logits.dtype)
        live = n if index is None else index.numel()
        value, w_sum, lse, teacher_lse = (torch.empty(live, dtype=dtype, device=logits.device) for _ in range(4))
        for out, rows in _row_blocks(index, n, vocab, 10):
            z, teacher_z = _scaled(logits, rows, temperature).to(dtype), _scaled(teacher_logits, rows, temperature)
            lse[out], teacher_lse[out] = torch.logsumexp(z, -1), torch.logsumexp(teacher_z, -1).to(dtype)
            d, w = _rowmath.jsd_pointwise(torch.log_softmax(z, -1), torch.log_softmax(teacher_z.to(dtype), -1), beta)
            value[out], w_sum[out] = d.sum(-1), w.sum(-1)
        ctx.beta, ctx.temperature = beta, temperature
        ctx.save_for_backward(logits, teacher_logits, lse, teacher_lse, w_sum, index)
        return value

    @staticmethod
    def backward(ctx, grad):
        logits, teacher_logits, lse, teacher_lse, w_sum, index = ctx.saved_tensors
        grad_logits = _grad_buffer(logits, index)
        grad = grad.to(lse.dtype)
        for out, rows in _row_blocks(index, *logits.shape, 10):
            logp = _scaled(logits, rows, ctx.temperature).to(lse.dtype) - lse[out, None]
            logq = _scaled(teacher_logits, rows, ctx.temperature).to(lse.dtype) - teacher_lse[out, None]
            _, w = _rowmath.jsd_pointwise(logp, logq, ctx.beta)
            _write(grad_logits, rows, (w - logp.exp() * w_sum[out, None]) * (grad[out, None] / ctx.temperature))
        return grad_logits, None, None, None, None


def _check_pair(logits, teacher_logits, mask, temperature, beta, backend):
    V.check_backend(backend)
    n, vocab = V.check_logits_pair(logits, teacher_logits)
    V.check_mask("mask", mask, n, logits.device)
    return n, vocab, V.check_temperature(temperature), V.check_beta(beta), _live_index(
        V.row_mask(n, logits.device, mask=mask))


def jsd(logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, backend="auto"):
    """Full-vocabulary JSD_β(softmax(logits/τ), softmax(teacher_logits/τ)) per row [N]; the teacher is detached."""
    n, _, temperature, beta, index = _check_pair(logits, teacher_logits, mask, temperature, beta, backend)
    value = _JSD.apply(logits, teacher_logits.detach(), beta, temperature, index)
    return _put(value, index, n)


class _TopKJSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, teacher_logits, k, beta, support, tail, temperature, index):
        n, vocab = logits.shape
        dtype = compute_dtype(logits.dtype if logits.dtype == torch.float64 else teacher_logits.dtype)
        width = 2 * k if support == "union" else k
        live = n if index is None else index.numel()
        value, lse, row_coef = (torch.empty(live, dtype=dtype, device=logits.device) for _ in range(3))
        ids = torch.empty((live, width), dtype=torch.int64, device=logits.device)
        support_coef = torch.empty((live, width), dtype=dtype, device=logits.device)
        for out, rows in _row_blocks(index, n, vocab, 10):
            z = _scaled(logits, rows, temperature).to(dtype)
            teacher_z = _scaled(teacher_logits, rows, temperature).to(dtype)
            lse[out] = torch.logsumexp(z, -1)
            block_ids, valid = _rowmath.support_ids(_rowmath.topk_ids(z, k), _rowmath.topk_ids(teacher_z, k), support)
            logq = teacher_z.gather(1, block_ids) - torch.logsumexp(teacher_z, -1, keepdim=True)
            terms = _rowmath.topk_jsd_terms(z.gather(1, block_ids) - lse[out, None], logq, valid, beta, tail)
            value[out], row_coef[out] = terms.value, terms.row_coef
            ids[out], support_coef[out] = block_ids, terms.support_coef
        ctx.temperature = temperature
        ctx.save_for_backward(logits, lse, row_coef, ids, support_coef, index)
        return value

    @staticmethod
    def backward(ctx, grad):
        logits, lse, row_coef, ids, support_coef, index = ctx.saved_tensors
        grad_logits = _grad_buffer(logits, index)
        grad = grad.to(lse.dtype) / ctx.temperature
        for out, rows in _row_blocks(index, *logits.shape, 6):
            p = torch.exp(_scaled(logits, rows, ctx.temperature).to(lse.dtype) - lse[out, None])
            dz = p.mul_(row_coef[out, None]).scatter_add_(1, ids[out], support_coef[out])
            _write(grad_logits, rows, dz * grad[out, None])
        return grad_logits, None, None, None, None, None, None, None


def topk_jsd(logits, teacher_logits, k, *, beta=0.5, support="union", tail=True, temperature=1.0, mask=None,
             backend="auto"):
    """Top-K JSD_β with tail compensation (SPEC §2) per row [N] on given logits; K ≥ V gives the full JSD."""
    n, vocab, temperature, beta, index = _check_pair(logits, teacher_logits, mask, temperature, beta, backend)
    k, support = V.check_k(k), V.check_support(support)
    if k >= vocab:
        return jsd(logits, teacher_logits, beta=beta, temperature=temperature, mask=mask, backend=backend)
    value = _TopKJSD.apply(logits, teacher_logits.detach(), k, beta, support, bool(tail), temperature, index)
    return _put(value, index, n)


def topk_overlap(indices_a, indices_b, *, backend="auto"):
    """|A ∩ B| / k per row for two [N, k] sets of distinct ids (float32 [N]). ``backend`` is accepted
    for API uniformity: this is a small sort-based op with one implementation."""
    V.check_backend(backend)
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
