"""Public functions (SPEC §4): validation, masked-row stripping, backend dispatch, autograd.

Layering: kernels (``ptd_kernels/triton``, ``_torch_path``) → engines (``_engines``) →
autograd Functions (here) → these functions → ``nn.Module`` wrappers (``modules``).

Masked rows (target == ignore_index, mask False) are removed before any sweep, so they cost
nothing, give exactly 0 and get no gradient, and a NaN in one of them cannot leak into the
weight gradient.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import _engines, _rowmath
from . import _validate as V
from ._sparse import gather_logits
from ._types import PTDTerms, TopK

__all__ = [
    "linear_logprobs",
    "linear_topk",
    "linear_topk_jsd",
    "linear_sparse_jsd",
    "linear_jsd",
    "linear_ptd_terms",
    "linear_jsd_loss",
    "linear_topk_jsd_loss",
]


# ----------------------------------------------------------------------------- helpers


def _out_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _live_index(live: torch.Tensor):
    """None when every row is live (no copy needed), else the int64 indices of the live rows."""
    if bool(live.all()):
        return None
    return live.nonzero().squeeze(-1)


def _take(x, index):
    return x if (x is None or index is None) else x.index_select(0, index)


def _put(values, index, n):
    """Scatter per-live-row values [n_live, ...] back to [n, ...] with zeros elsewhere (differentiable)."""
    if index is None:
        return values
    out = values.new_zeros((n,) + tuple(values.shape[1:]))
    return out.index_copy(0, index, values)


def _cast_grads(grads, hidden, weight, bias):
    grad_hidden, grad_weight, grad_bias = grads
    return (
        grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
        grad_weight.to(weight.dtype) if grad_weight is not None else None,
        grad_bias.to(bias.dtype) if grad_bias is not None else None,
    )






def _support_logits(student, teacher, student_top, teacher_top, support, dtype):
    """Support ids and both sides' logits on them.

    Each side's logits at its own top-k come from its sweep (the same GEMM tiles as its lse, so
    that Σ_S p and the tail stay consistent); only the other side's ids are gathered.
    ``student``/``teacher`` are (hidden, weight, bias, τ) of the rows; ``*_top`` are RowStats.
    """
    def own_or_gather(side, top):
        if top.topk_logits is not None and top.topk_logits.dtype == dtype:
            return top.topk_logits
        return gather_logits(*side, top.topk_indices, dtype)

    def gather(side, ids):
        return gather_logits(*side, ids, dtype)

    if support == "union":
        ids, valid, order = _rowmath.union_support(student_top.topk_indices, teacher_top.topk_indices,
                                                   return_order=True)
        student_cat = torch.cat([own_or_gather(student, student_top), gather(student, teacher_top.topk_indices)], -1)
        teacher_cat = torch.cat([gather(teacher, student_top.topk_indices), own_or_gather(teacher, teacher_top)], -1)
        return ids, valid, student_cat.gather(1, order), teacher_cat.gather(1, order)
    if support == "teacher":
        ids = teacher_top.topk_indices
        return ids, torch.ones_like(ids, dtype=torch.bool), gather(student, ids), own_or_gather(teacher, teacher_top)
    ids = student_top.topk_indices
    return ids, torch.ones_like(ids, dtype=torch.bool), own_or_gather(student, student_top), gather(teacher, ids)


# ----------------------------------------------------------------------------- the PTD head


class _PTDHead(torch.autograd.Function):
    """log-prob, entropy and Top-K JSD of live rows from one student sweep and one teacher sweep.

    Inputs are live rows only. ``jsd_rows`` (int64, into the live rows) selects the rows that
    get a JSD; ``teacher_hidden`` holds exactly those rows. Outputs, all [n]: logp, entropy,
    jsd (differentiable), overlap, teacher_mass (not differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows, cfg,
                engine):
        n, vocab = hidden.shape[0], weight.shape[0]
        want_logp = targets is not None
        full = cfg.k >= vocab  # S is the whole vocabulary: D_K is the full JSD (SPEC §2)
        k = min(cfg.k, vocab)
        n_jsd = 0 if jsd_rows is None else jsd_rows.numel()
        student_topk = n_jsd > 0 and not full and (cfg.support != "teacher" or cfg.want_overlap)
        stats = engine.row_stats(hidden, weight, bias, cfg.temperature, targets, k if student_topk else 0,
                                 with_mean_logit=want_logp)
        dtype = stats.lse.dtype
        zeros = stats.lse.new_zeros(n)
        logp = stats.target_logit - stats.lse if want_logp else zeros
        entropy = stats.lse - stats.mean_logit if want_logp else zeros
        jsd, overlap, teacher_mass = zeros.clone(), zeros.clone(), zeros.clone()
        saved = dict(full=full, n_jsd=n_jsd)
        jsd_saved = []
        if saved["n_jsd"]:
            hidden_j = hidden.index_select(0, jsd_rows)
            if full:
                value, w_sum, lse_j, teacher_lse = engine.jsd_forward(
                    hidden_j, weight, bias, teacher_hidden, teacher_weight, teacher_bias, cfg.temperature, cfg.beta)
                jsd[jsd_rows] = value
                overlap[jsd_rows] = 1.0
                teacher_mass[jsd_rows] = 1.0
                jsd_saved = [lse_j, teacher_lse, w_sum]
            else:
                teacher = engine.row_stats(teacher_hidden, teacher_weight, teacher_bias, cfg.temperature, None, k,
                                           with_mean_logit=False)
                student_top = None
                if student_topk:
                    student_top = SimpleNamespace(topk_indices=stats.topk_indices[jsd_rows],
                                                  topk_logits=stats.topk_logits[jsd_rows])
                ids, valid, student_z, teacher_z = _support_logits(
                    (hidden_j, weight, bias, cfg.temperature), (teacher_hidden, teacher_weight, teacher_bias,
                                                                cfg.temperature),
                    student_top, teacher, cfg.support, dtype)
                lse_j = stats.lse[jsd_rows]
                terms = _rowmath.topk_jsd_terms(student_z.to(dtype) - lse_j[:, None],
                                                teacher_z.to(dtype) - teacher.lse[:, None].to(dtype), valid,
                                                cfg.beta, cfg.tail)
                jsd[jsd_rows] = terms.value
                teacher_mass[jsd_rows] = terms.teacher_mass
                if cfg.want_overlap:
                    overlap[jsd_rows] = _rowmath.overlap_fraction(student_top.topk_indices, teacher.topk_indices,
                                                                  dtype)
                jsd_saved = [ids, terms.row_coef, terms.support_coef]
        ctx.cfg, ctx.engine, ctx.saved_info, ctx.want_logp = cfg, engine, saved, want_logp
        ctx.save_for_backward(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows,
                              stats.lse, stats.mean_logit if want_logp else None, *jsd_saved)
        ctx.mark_non_differentiable(overlap, teacher_mass)
        return logp, entropy, jsd, overlap, teacher_mass

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_jsd, _grad_overlap, _grad_mass):
        (hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows, lse, mean_logit,
         *jsd_saved) = ctx.saved_tensors
        cfg, engine, info = ctx.cfg, ctx.engine, ctx.saved_info
        needs = dict(need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1],
                     need_bias=bias is not None and ctx.needs_input_grad[2])
        row_coef = torch.zeros_like(lse)
        logit_coef = logit_shift = target_coef = None
        if ctx.want_logp:
            if grad_logp is not None:
                grad_logp = grad_logp.to(lse.dtype)
                row_coef -= grad_logp
                target_coef = grad_logp
            if grad_entropy is not None:
                # d H / d z = −p (z − Σ p z); the shift is applied per element (precision at huge logits)
                logit_coef, logit_shift = -grad_entropy.to(lse.dtype), mean_logit
        sparse = []
        full_jsd = info["full"] and info["n_jsd"] and grad_jsd is not None
        if info["n_jsd"] and grad_jsd is not None and not info["full"]:
            ids, jsd_row_coef, support_coef = jsd_saved
            grad_j = grad_jsd.to(lse.dtype)[jsd_rows]
            row_coef.index_add_(0, jsd_rows, grad_j * jsd_row_coef)
            sparse.append((jsd_rows, ids, grad_j[:, None] * support_coef))
        grads = engine.head_backward(hidden, weight, bias, cfg.temperature, lse, row_coef, logit_coef, logit_shift,
                                     targets, target_coef, sparse, **needs)
        if full_jsd:
            lse_j, teacher_lse, w_sum = jsd_saved
            grad_hidden, grad_weight, grad_bias = grads
            part_hidden, part_weight, part_bias = engine.jsd_backward(
                hidden.index_select(0, jsd_rows), weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                cfg.temperature, cfg.beta, lse_j, teacher_lse, w_sum, grad_jsd.to(lse.dtype)[jsd_rows], **needs)
            if grad_hidden is not None:
                grad_hidden.index_add_(0, jsd_rows, part_hidden)
            if grad_weight is not None:
                grad_weight += part_weight
            if grad_bias is not None:
                grad_bias += part_bias
        grad_hidden, grad_weight, grad_bias = _cast_grads(grads, hidden, weight, bias)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _ptd_head(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, live, jsd_live, cfg,
              backend):
    """Strip masked rows, run _PTDHead, scatter back. Returns (logp, entropy, jsd, overlap, teacher_mass)."""
    n = hidden.shape[0]
    engine = _engines.select(backend, hidden, weight, bias, teacher_hidden, teacher_weight)
    index = _live_index(live)
    hidden_l, targets_l = _take(hidden, index), _take(targets, index)
    jsd_in_live = jsd_live if index is None else jsd_live[index]
    jsd_rows = jsd_in_live.nonzero().squeeze(-1)
    teacher_rows = jsd_rows if index is None else index[jsd_rows]
    teacher_hidden_j = teacher_hidden.detach().index_select(0, teacher_rows) if teacher_rows.numel() else None
    outs = _PTDHead.apply(hidden_l, weight, bias, targets_l, teacher_hidden_j,
                          teacher_weight.detach() if teacher_weight is not None else None,
                          teacher_bias.detach() if teacher_bias is not None else None, jsd_rows, cfg, engine)
    return tuple(_put(o, index, n) for o in outs)


# ----------------------------------------------------------------------------- log-probs and top-k


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100, with_entropy=False,
                    backend="auto"):
    """log p(target) per row — and the exact entropy H(p) with ``with_entropy=True`` — of
    p = softmax((hidden @ weight.T + bias) / temperature), without materializing the logits.

    Args:
        hidden: [N, H] float (fp32/bf16/fp16/fp64). weight: [V, H], bias: [V] or None, same dtype.
        targets: [N] integer ids in [0, V), or ``ignore_index`` for rows that yield 0.
    Returns:
        logp [N] (float32; float64 for float64 inputs), or (logp, entropy).
    Differentiable w.r.t. hidden, weight and bias.
    """
    V.check_backend(backend)
    n, vocab, temperature = V.check_student(hidden, weight, bias, temperature)
    V.check_targets(targets, n, vocab, ignore_index, hidden.device)
    live = V.row_mask(n, hidden.device, targets, ignore_index)
    cfg = SimpleNamespace(k=1, beta=0.5, support="union", tail=True, temperature=temperature, want_overlap=False)
    logp, entropy, *_ = _ptd_head(hidden, weight, bias, targets.long(), None, None, None, live,
                                  torch.zeros_like(live), cfg, backend)
    return (logp, entropy) if with_entropy else logp


@torch.no_grad()
def linear_topk(hidden, weight, k, *, bias=None, temperature=1.0, targets=None, ignore_index=-100, backend="auto"):
    """Top-k of the output layer's logits per row, by streaming over vocabulary tiles. No gradient.

    Returns ``TopK(indices [N,k] int64 by descending logit with ties to the smaller id,
    logprobs [N,k] float32, lse [N], target_logprobs [N] or None)``.
    """
    V.check_backend(backend)
    n, vocab, temperature = V.check_student(hidden, weight, bias, temperature)
    k = V.check_k(k)
    if k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
    live = None
    if targets is not None:
        V.check_targets(targets, n, vocab, ignore_index, hidden.device)
        live = targets != ignore_index
        targets = torch.where(live, targets.long(), torch.zeros_like(targets.long()))
    engine = _engines.select(backend, hidden, weight, bias)
    stats = engine.row_stats(hidden, weight, bias, temperature, targets, k, with_mean_logit=False)
    out_dtype = _out_dtype(hidden)
    lse = stats.lse.to(out_dtype)
    top_logits = stats.topk_logits
    if out_dtype == torch.float64:  # kernels rank on float32 keys; recompute float64 logits at the ids
        top_logits = gather_logits(hidden, weight, bias, temperature, stats.topk_indices, out_dtype)
    logprobs = top_logits.to(out_dtype) - lse[:, None]
    target_logprobs = None
    if targets is not None:
        target_logprobs = torch.where(live, stats.target_logit.to(out_dtype) - lse, torch.zeros_like(lse))
    return TopK(stats.topk_indices, logprobs, lse, target_logprobs)


# ----------------------------------------------------------------------------- divergences


def _jsd_common(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, beta, temperature, mask,
                backend):
    V.check_backend(backend)
    n, vocab, temperature = V.check_student(hidden, weight, bias, temperature)
    V.check_teacher(hidden, vocab, teacher_hidden, teacher_weight, teacher_bias)
    beta = V.check_beta(beta)
    V.check_mask("mask", mask, n, hidden.device)
    return n, vocab, temperature, beta, V.row_mask(n, hidden.device, mask=mask)


def linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union", tail=True,
                    bias=None, teacher_bias=None, temperature=1.0, mask=None, backend="auto"):
    """Top-K JSD_β with tail compensation (SPEC §2) between the student output layer and a detached
    teacher output layer, per row [N], never materializing either side's logits.

    support: "union" (TopK(p) ∪ TopK(q)), "teacher" or "student". tail=True adds one tail atom
    per side; tail=False renormalizes over S. K ≥ V gives the full-vocabulary JSD.
    """
    n, vocab, temperature, beta, live = _jsd_common(hidden, weight, bias, teacher_hidden, teacher_weight,
                                                    teacher_bias, beta, temperature, mask, backend)
    cfg = SimpleNamespace(k=V.check_k(k), beta=beta, support=V.check_support(support), tail=bool(tail),
                          temperature=temperature, want_overlap=False)
    return _ptd_head(hidden, weight, bias, None, teacher_hidden, teacher_weight, teacher_bias, live, live, cfg,
                     backend)[2]


def linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union",
                     tail=True, bias=None, teacher_bias=None, temperature=1.0, ignore_index=-100, mask=None,
                     jsd_mask=None, backend="auto") -> PTDTerms:
    """PTD-PO's per-token terms from one sweep over the vocabulary per side.

    Returns ``PTDTerms(logp, entropy, jsd, overlap)`` (each [N]) with the attribute
    ``teacher_mass`` (Σ_S q). Rows with target == ignore_index or mask False give 0 everywhere;
    rows with ``jsd_mask`` False give jsd = overlap = teacher_mass = 0 and their teacher rows
    are never read. Equal to the separate functions.
    """
    V.check_backend(backend)
    n, vocab, temperature = V.check_student(hidden, weight, bias, temperature)
    V.check_teacher(hidden, vocab, teacher_hidden, teacher_weight, teacher_bias)
    cfg = SimpleNamespace(k=V.check_k(k), beta=V.check_beta(beta), support=V.check_support(support),
                          tail=bool(tail), temperature=temperature, want_overlap=True)
    V.check_targets(targets, n, vocab, ignore_index, hidden.device)
    V.check_mask("mask", mask, n, hidden.device)
    V.check_mask("jsd_mask", jsd_mask, n, hidden.device)
    live = V.row_mask(n, hidden.device, targets, ignore_index, mask)
    jsd_live = live if jsd_mask is None else live & jsd_mask
    logp, entropy, jsd, overlap, teacher_mass = _ptd_head(
        hidden, weight, bias, torch.where(live, targets.long(), 0), teacher_hidden, teacher_weight, teacher_bias, live,
        jsd_live, cfg, backend)
    return PTDTerms.build(logp, entropy, jsd, overlap, teacher_mass)


class _SparseJSD(torch.autograd.Function):
    """Top-K JSD against a teacher given as ids + log-probs (support = those ids), live rows only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_indices, teacher_logprobs, cfg, engine):
        stats = engine.row_stats(hidden, weight, bias, cfg.temperature, None, 0, with_mean_logit=False)
        dtype = stats.lse.dtype
        student_logp = gather_logits(hidden, weight, bias, cfg.temperature, teacher_indices, dtype) - stats.lse[:, None]
        given = teacher_logprobs.to(dtype)
        valid = torch.ones_like(teacher_indices, dtype=torch.bool)
        terms = _rowmath.topk_jsd_terms(student_logp, given, valid, cfg.beta, cfg.tail,
                                        teacher_log_mass=torch.logsumexp(given, dim=-1))
        ctx.cfg, ctx.engine = cfg, engine
        ctx.save_for_backward(hidden, weight, bias, teacher_indices, stats.lse, terms.row_coef, terms.support_coef)
        return terms.value

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, ids, lse, row_coef, support_coef = ctx.saved_tensors
        cfg = ctx.cfg
        grad = grad.to(lse.dtype)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        grads = ctx.engine.head_backward(
            hidden, weight, bias, cfg.temperature, lse, grad * row_coef, None, None, None, None,
            [(rows, ids, grad[:, None] * support_coef)], need_hidden=ctx.needs_input_grad[0],
            need_weight=ctx.needs_input_grad[1], need_bias=bias is not None and ctx.needs_input_grad[2])
        return (*_cast_grads(grads, hidden, weight, bias), None, None, None, None)


def linear_sparse_jsd(hidden, weight, teacher_indices, teacher_logprobs, *, beta=0.5, tail=True, bias=None,
                      temperature=1.0, mask=None, backend="auto"):
    """Top-K JSD_β against a sparse teacher (its top-K ids and their log-probs, e.g. an offline cache).

    The support is the teacher's ids; q_tail = 1 − Σ exp(teacher_logprobs) (floored at 1e-12).
    """
    V.check_backend(backend)
    n, vocab, temperature = V.check_student(hidden, weight, bias, temperature)
    V.check_sparse_teacher(teacher_indices, teacher_logprobs, n, vocab, hidden.device)
    cfg = SimpleNamespace(beta=V.check_beta(beta), tail=bool(tail), temperature=temperature)
    V.check_mask("mask", mask, n, hidden.device)
    live = V.row_mask(n, hidden.device, mask=mask)
    index = _live_index(live)
    engine = _engines.select(backend, hidden, weight, bias)
    value = _SparseJSD.apply(_take(hidden, index), weight, bias, _take(teacher_indices.long(), index),
                             _take(teacher_logprobs.detach(), index), cfg, engine)
    return _put(value, index, n)


class _LinearJSD(torch.autograd.Function):
    """Full-vocabulary JSD_β per live row: two sweeps forward, one recomputing sweep backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, cfg, engine):
        value, w_sum, lse, teacher_lse = engine.jsd_forward(hidden, weight, bias, teacher_hidden, teacher_weight,
                                                            teacher_bias, cfg.temperature, cfg.beta)
        ctx.cfg, ctx.engine = cfg, engine
        ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, lse, teacher_lse,
                              w_sum)
        return value

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, lse, teacher_lse, w_sum = ctx.saved_tensors
        cfg = ctx.cfg
        grads = ctx.engine.jsd_backward(
            hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, cfg.temperature, cfg.beta, lse,
            teacher_lse, w_sum, grad.to(lse.dtype), need_hidden=ctx.needs_input_grad[0],
            need_weight=ctx.needs_input_grad[1], need_bias=bias is not None and ctx.needs_input_grad[2])
        return (*_cast_grads(grads, hidden, weight, bias), None, None, None, None, None)


def linear_jsd(hidden, weight, teacher_hidden, teacher_weight, *, beta=0.5, bias=None, teacher_bias=None,
               temperature=1.0, mask=None, backend="auto"):
    """Full-vocabulary generalized JSD_β (β=0: KL(Q‖P), β=1: KL(P‖Q)) per row [N], fused with the
    output layers: logsumexps first, then the divergence tile by tile, recomputed in backward."""
    n, vocab, temperature, beta, live = _jsd_common(hidden, weight, bias, teacher_hidden, teacher_weight,
                                                    teacher_bias, beta, temperature, mask, backend)
    index = _live_index(live)
    engine = _engines.select(backend, hidden, weight, bias, teacher_hidden, teacher_weight)
    cfg = SimpleNamespace(beta=beta, temperature=temperature)
    value = _LinearJSD.apply(_take(hidden, index), weight, bias, _take(teacher_hidden.detach(), index),
                             teacher_weight.detach(), teacher_bias.detach() if teacher_bias is not None else None,
                             cfg, engine)
    return _put(value, index, n)


# ----------------------------------------------------------------------------- loss level


class _FusedLoss(torch.autograd.Function):
    """Σ_n w_n·D_n with gradients formed during the forward sweep (no recomputation).

    The one backward hands the stored gradients over (scaled in place when the incoming gradient
    is not 1) instead of copying them: a copy, and autograd's own clone of a gradient still held
    here, would each cost another V×H d weight at the peak. A second backward through the same
    graph (``retain_graph=True``) therefore raises; call the loss again instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, row_weights, cfg, engine):
        # (forward runs under no_grad: whether the caller wants gradients was read before apply)
        needs = dict(need_hidden=cfg.grad and hidden.requires_grad, need_weight=cfg.grad and weight.requires_grad,
                     need_bias=cfg.grad and bias is not None and bias.requires_grad)
        value, *grads = engine.fused_loss(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                          cfg.temperature, cfg.beta, row_weights, k=cfg.k, support=cfg.support,
                                          tail=cfg.tail, **needs)
        ctx.grads = _cast_grads(grads, hidden, weight, bias)
        return (value * row_weights.to(value.dtype)).sum()

    @staticmethod
    def backward(ctx, grad):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "linear_jsd_loss / linear_topk_jsd_loss formed their gradients in the forward sweep and handed "
                "them over on the first backward; a second backward through the same graph (retain_graph=True) "
                "is not supported: call the loss again")
        if not bool(grad == 1):
            grads = [None if g is None else g.mul_(grad.to(g.dtype)) for g in grads]
        return (*grads, None, None, None, None, None, None)


def _loss(per_row_fn, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, k, support, tail, beta,
          temperature, mask, weights, backend):
    n, vocab, temperature, beta, live = _jsd_common(hidden, weight, bias, teacher_hidden, teacher_weight,
                                                    teacher_bias, beta, temperature, mask, backend)
    V.check_weights(weights, n, hidden.device)
    if k is not None:
        k, support = V.check_k(k), V.check_support(support)
    dtype = _out_dtype(hidden)
    if weights is None:
        weights = live.to(dtype) / max(int(live.sum()), 1)
    else:
        weights = torch.where(live, weights.detach().to(dtype), torch.zeros((), dtype=dtype, device=hidden.device))
    engine = _engines.select(backend, hidden, weight, bias, teacher_hidden, teacher_weight)
    if engine.fused_loss is None or not engine.fused_loss_pays(vocab):
        # per-row function, then the weighted sum (backward recomputes, in efficient vocabulary blocks)
        return (per_row_fn() * weights).sum()
    index = _live_index(live)
    cfg = SimpleNamespace(k=k if (k is None or k < vocab) else None, support=support, tail=bool(tail), beta=beta,
                          temperature=temperature, grad=torch.is_grad_enabled())
    return _FusedLoss.apply(_take(hidden, index), weight, bias, _take(teacher_hidden.detach(), index),
                            teacher_weight.detach(), teacher_bias.detach() if teacher_bias is not None else None,
                            _take(weights, index), cfg, engine)


def linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, *, beta=0.5, bias=None, teacher_bias=None,
                    temperature=1.0, mask=None, weights=None, backend="auto"):
    """Σ_n weights_n · JSD_β,n (default weights: 1 / number of unmasked rows), a scalar.

    Gradients equal those of ``linear_jsd``; the chunked path forms them during the forward sweep
    and hands them over on the first backward (a second backward through the same graph raises).
    """
    return _loss(lambda: linear_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=beta, bias=bias,
                                    teacher_bias=teacher_bias, temperature=temperature, mask=mask, backend=backend),
                 hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, None, "union", True, beta,
                 temperature, mask, weights, backend)


def linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union", tail=True,
                         bias=None, teacher_bias=None, temperature=1.0, mask=None, weights=None, backend="auto"):
    """Σ_n weights_n · D_K,n (default weights: 1 / number of unmasked rows), a scalar.

    Gradients equal those of ``linear_topk_jsd``; the chunked path forms them during the forward
    sweep and hands them over on the first backward (a second backward through the same graph raises).
    """
    return _loss(lambda: linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, beta=beta,
                                         support=support, tail=tail, bias=bias, teacher_bias=teacher_bias,
                                         temperature=temperature, mask=mask, backend=backend),
                 hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, k, support, tail, beta,
                 temperature, mask, weights, backend)
