"""The autograd Functions of the fused (output-layer) functions: they compose a backend's primitives
(``backends.base.Backend``) and never look inside them."""

from __future__ import annotations

import torch

from .. import rowmath
from .._dtypes import compute_dtype
from .._types import TopK
from ..backends.base import Backend, DivergenceSpec, GradNeeds, Head, HeadGradCoefs, JSDStats, RowStats, SparseTerms
from .common import (
    JSDConfig,
    LossConfig,
    PTDHeadConfig,
    SparseJSDConfig,
    cast_grads,
    detached,
    grad_needs,
    live_index,
    put,
    take,
)

# ----------------------------------------------------------------------------- the PTD head


def _support_logits(backend: Backend, student: Head, teacher: Head, student_top: RowStats | None,
                    teacher_top: RowStats, support: str, dtype):
    """Support ids and both sides' logits on them.

    Each side's logits at its own top-k come from its sweep (the same tiles as its lse, so that
    Σ_S p and the tail stay consistent); only the other side's ids are gathered.
    """
    def own_or_gather(head, top):
        if top.topk_logits is not None and top.topk_logits.dtype == dtype:
            return top.topk_logits
        return backend.gather_logits(head, top.topk_indices, dtype)

    if support == "union":
        ids, valid, order = rowmath.union_support(student_top.topk_indices, teacher_top.topk_indices,
                                                   return_order=True)
        student_cat = torch.cat([own_or_gather(student, student_top),
                                 backend.gather_logits(student, teacher_top.topk_indices, dtype)], -1)
        teacher_cat = torch.cat([backend.gather_logits(teacher, student_top.topk_indices, dtype),
                                 own_or_gather(teacher, teacher_top)], -1)
        return ids, valid, student_cat.gather(1, order), teacher_cat.gather(1, order)
    if support == "teacher":
        ids = teacher_top.topk_indices
        return (ids, torch.ones_like(ids, dtype=torch.bool), backend.gather_logits(student, ids, dtype),
                own_or_gather(teacher, teacher_top))
    ids = student_top.topk_indices
    return (ids, torch.ones_like(ids, dtype=torch.bool), own_or_gather(student, student_top),
            backend.gather_logits(teacher, ids, dtype))


class _PTDHead(torch.autograd.Function):
    """log-prob, entropy and a divergence of live rows from one student sweep and one teacher sweep.

    Inputs are live rows only. ``jsd_rows`` (int64, into the live rows) selects the rows that
    get a divergence; ``teacher_hidden`` holds exactly those rows. Outputs, all [n]: logp, entropy,
    jsd (differentiable), overlap, teacher_mass (not differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows,
                cfg: PTDHeadConfig, backend: Backend):
        student = Head(hidden, weight, bias, cfg.temperature)
        n, vocab = student.rows, student.vocab
        want_logp = targets is not None
        div = cfg.divergence
        n_jsd = 0 if div is None else jsd_rows.numel()
        full = div is not None and (div.k is None or div.k >= vocab)  # S is the whole vocabulary (SPEC §2)
        k = 0 if div is None or full else div.k
        student_topk = n_jsd > 0 and not full and (div.support != "teacher" or cfg.want_overlap)
        stats = backend.row_stats(student, targets=targets, k=k if student_topk else 0, with_mean_logit=want_logp)
        dtype = stats.lse.dtype
        zeros = stats.lse.new_zeros(n)
        logp = stats.target_logit - stats.lse if want_logp else zeros
        entropy = stats.lse - stats.mean_logit if want_logp else zeros
        jsd, overlap, teacher_mass = zeros.clone(), zeros.clone(), zeros.clone()
        jsd_saved = []
        if n_jsd:
            teacher = Head(teacher_hidden, teacher_weight, teacher_bias, cfg.temperature)
            student_j = student.take_rows(jsd_rows)
            if full:
                jsd_stats = backend.jsd_forward(student_j, teacher, div.beta)
                jsd[jsd_rows] = jsd_stats.value
                overlap[jsd_rows] = 1.0
                teacher_mass[jsd_rows] = 1.0
                jsd_saved = [jsd_stats.value, jsd_stats.w_sum, jsd_stats.lse, jsd_stats.teacher_lse]
            else:
                teacher_top = backend.row_stats(teacher, k=k, with_mean_logit=False)
                student_top = stats.take_rows(jsd_rows) if student_topk else None
                ids, valid, student_z, teacher_z = _support_logits(backend, student_j, teacher, student_top,
                                                                   teacher_top, div.support, dtype)
                lse_j = stats.lse[jsd_rows]
                terms = rowmath.topk_jsd_terms(student_z.to(dtype) - lse_j[:, None],
                                                teacher_z.to(dtype) - teacher_top.lse[:, None].to(dtype), valid,
                                                div.beta, div.tail)
                jsd[jsd_rows] = terms.value
                teacher_mass[jsd_rows] = terms.teacher_mass
                if cfg.want_overlap:
                    overlap[jsd_rows] = rowmath.overlap_fraction(student_top.topk_indices, teacher_top.topk_indices,
                                                                  dtype)
                jsd_saved = [ids, terms.row_coef, terms.support_coef]
        ctx.cfg, ctx.backend, ctx.full, ctx.n_jsd, ctx.want_logp = cfg, backend, full, n_jsd, want_logp
        ctx.save_for_backward(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows,
                              stats.lse, stats.mean_logit if want_logp else None, *jsd_saved)
        ctx.mark_non_differentiable(overlap, teacher_mass)
        return logp, entropy, jsd, overlap, teacher_mass

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_jsd, _grad_overlap, _grad_mass):
        (hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows, lse, mean_logit,
         *jsd_saved) = ctx.saved_tensors
        cfg, backend = ctx.cfg, ctx.backend
        student = Head(hidden, weight, bias, cfg.temperature)
        needs = grad_needs(ctx, bias)
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
        sparse = ()
        with_jsd = ctx.n_jsd and grad_jsd is not None
        if with_jsd and not ctx.full:
            ids, jsd_row_coef, support_coef = jsd_saved
            grad_j = grad_jsd.to(lse.dtype)[jsd_rows]
            row_coef.index_add_(0, jsd_rows, grad_j * jsd_row_coef)
            sparse = (SparseTerms(jsd_rows, ids, grad_j[:, None] * support_coef),)
        coefs = HeadGradCoefs(row_coef, logit_coef, logit_shift, targets if target_coef is not None else None,
                              target_coef, sparse)
        grads = backend.head_backward(student, lse, coefs, needs)
        if with_jsd and ctx.full:
            teacher = Head(teacher_hidden, teacher_weight, teacher_bias, cfg.temperature)
            part = backend.jsd_backward(student.take_rows(jsd_rows), teacher, cfg.divergence.beta,
                                        JSDStats(*jsd_saved), grad_jsd.to(lse.dtype)[jsd_rows], needs)
            grads.add_(part, hidden_rows=jsd_rows)
        return (*cast_grads(grads, hidden, weight, bias), None, None, None, None, None, None, None)


def ptd_head(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, live, jsd_live,
             cfg: PTDHeadConfig, backend: Backend):
    """Strip masked rows, run ``_PTDHead``, scatter back. Returns (logp, entropy, jsd, overlap, teacher_mass)."""
    n = hidden.shape[0]
    index = live_index(live)
    jsd_in_live = jsd_live if index is None else jsd_live[index]
    jsd_rows = jsd_in_live.nonzero().squeeze(-1)
    teacher_rows = jsd_rows if index is None else index[jsd_rows]
    teacher_hidden_j = teacher_hidden.detach().index_select(0, teacher_rows) if teacher_rows.numel() else None
    outs = _PTDHead.apply(take(hidden, index), weight, bias, take(targets, index), teacher_hidden_j,
                          detached(teacher_weight), detached(teacher_bias), jsd_rows, cfg, backend)
    return tuple(put(o, index, n) for o in outs)


@torch.no_grad()
def topk(hidden, weight, bias, k: int, temperature: float, targets, live, backend: Backend) -> TopK:
    """``linear_topk`` once validated: targets with ignored rows already replaced by a valid id."""
    head = Head(hidden, weight, bias, temperature)
    stats = backend.row_stats(head, targets=targets, k=k, with_mean_logit=False)
    out_dtype = compute_dtype(hidden)
    lse = stats.lse.to(out_dtype)
    top_logits = stats.topk_logits
    if out_dtype == torch.float64:  # kernels rank on float32 keys; recompute float64 logits at the ids
        top_logits = backend.gather_logits(head, stats.topk_indices, out_dtype)
    target_logprobs = None
    if targets is not None:
        target_logprobs = torch.where(live, stats.target_logit.to(out_dtype) - lse, torch.zeros_like(lse))
    return TopK(stats.topk_indices, top_logits.to(out_dtype) - lse[:, None], lse, target_logprobs)


# ----------------------------------------------------------------------------- divergences


class _SparseJSD(torch.autograd.Function):
    """Top-K JSD against a teacher given as ids + log-probs (support = those ids), live rows only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_indices, teacher_logprobs, cfg: SparseJSDConfig, backend: Backend):
        student = Head(hidden, weight, bias, cfg.temperature)
        stats = backend.row_stats(student, with_mean_logit=False)
        dtype = stats.lse.dtype
        student_logp = backend.gather_logits(student, teacher_indices, dtype) - stats.lse[:, None]
        given = teacher_logprobs.to(dtype)
        valid = torch.ones_like(teacher_indices, dtype=torch.bool)
        terms = rowmath.topk_jsd_terms(student_logp, given, valid, cfg.beta, cfg.tail,
                                        teacher_log_mass=torch.logsumexp(given, dim=-1))
        ctx.cfg, ctx.backend = cfg, backend
        ctx.save_for_backward(hidden, weight, bias, teacher_indices, stats.lse, terms.row_coef, terms.support_coef)
        return terms.value

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, ids, lse, row_coef, support_coef = ctx.saved_tensors
        grad = grad.to(lse.dtype)
        coefs = HeadGradCoefs(grad * row_coef, sparse=(SparseTerms.every_row(ids, grad[:, None] * support_coef),))
        grads = ctx.backend.head_backward(Head(hidden, weight, bias, ctx.cfg.temperature), lse, coefs,
                                          grad_needs(ctx, bias))
        return (*cast_grads(grads, hidden, weight, bias), None, None, None, None)


def sparse_jsd(hidden, weight, bias, teacher_indices, teacher_logprobs, live, cfg: SparseJSDConfig, backend: Backend):
    index = live_index(live)
    value = _SparseJSD.apply(take(hidden, index), weight, bias, take(teacher_indices.long(), index),
                             take(teacher_logprobs.detach(), index), cfg, backend)
    return put(value, index, hidden.shape[0])


class _LinearJSD(torch.autograd.Function):
    """Full-vocabulary JSD_β per live row: two sweeps forward, one recomputing sweep backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, cfg: JSDConfig,
                backend: Backend):
        stats = backend.jsd_forward(Head(hidden, weight, bias, cfg.temperature),
                                    Head(teacher_hidden, teacher_weight, teacher_bias, cfg.temperature), cfg.beta)
        ctx.cfg, ctx.backend = cfg, backend
        ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, stats.value,
                              stats.w_sum, stats.lse, stats.teacher_lse)
        return stats.value

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, *stats = ctx.saved_tensors
        cfg = ctx.cfg
        stats = JSDStats(*stats)
        grads = ctx.backend.jsd_backward(Head(hidden, weight, bias, cfg.temperature),
                                         Head(teacher_hidden, teacher_weight, teacher_bias, cfg.temperature),
                                         cfg.beta, stats, grad.to(stats.lse.dtype), grad_needs(ctx, bias))
        return (*cast_grads(grads, hidden, weight, bias), None, None, None, None, None)


def full_jsd(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, live, cfg: JSDConfig,
             backend: Backend):
    index = live_index(live)
    value = _LinearJSD.apply(take(hidden, index), weight, bias, take(teacher_hidden.detach(), index),
                             teacher_weight.detach(), detached(teacher_bias), cfg, backend)
    return put(value, index, hidden.shape[0])


# ----------------------------------------------------------------------------- loss level


class _FusedLoss(torch.autograd.Function):
    """Σ_n w_n·D_n with gradients formed during the forward sweep (no recomputation).

    The one backward hands the stored gradients over (scaled in place when the incoming gradient
    is not 1) instead of copying them: a copy, and autograd's own clone of a gradient still held
    here, would each cost another V×H d weight at the peak. A second backward through the same
    graph (``retain_graph=True``) therefore raises; call the loss again instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, row_weights,
                cfg: LossConfig, backend: Backend):
        # (forward runs under no_grad: whether the caller wants gradients was read before apply)
        needs = GradNeeds(cfg.grad and hidden.requires_grad, cfg.grad and weight.requires_grad,
                          cfg.grad and bias is not None and bias.requires_grad)
        value, grads = backend.fused_loss(Head(hidden, weight, bias, cfg.temperature),
                                          Head(teacher_hidden, teacher_weight, teacher_bias, cfg.temperature),
                                          cfg.divergence, row_weights, needs)
        ctx.grads = cast_grads(grads, hidden, weight, bias)
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


def weighted_loss(per_row_fn, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, weights, live,
                  divergence: DivergenceSpec, temperature: float, backend: Backend):
    """Σ_n weights_n·D_n: the backend's one-sweep loss where it pays, else the per-row function."""
    dtype = compute_dtype(hidden)
    if weights is None:
        weights = live.to(dtype) / max(int(live.sum()), 1)
    else:
        weights = torch.where(live, weights.detach().to(dtype), torch.zeros((), dtype=dtype, device=hidden.device))
    if not backend.fused_loss_pays(Head(hidden, weight, bias, temperature)):
        # per-row function, then the weighted sum (backward recomputes, in efficient vocabulary blocks)
        return (per_row_fn() * weights).sum()
    index = live_index(live)
    if divergence.k is not None and divergence.k >= weight.shape[0]:
        divergence = DivergenceSpec(divergence.beta)  # K ≥ V: the full JSD (SPEC §2)
    cfg = LossConfig(temperature, divergence, torch.is_grad_enabled())
    return _FusedLoss.apply(take(hidden, index), weight, bias, take(teacher_hidden.detach(), index),
                            teacher_weight.detach(), detached(teacher_bias), take(weights, index), cfg, backend)
