"""The autograd Functions of the fused (output-layer) functions: they compose a backend's primitives
(``backends.base.Backend``) and never look inside them."""

from __future__ import annotations

import torch

from .. import rowmath
from .._dtypes import compute_dtype
from .._types import TopK
from ..backends.base import (
    Backend,
    DivergenceSpec,
    GradNeeds,
    Head,
    HeadGradCoefs,
    JSDStats,
    LogitSpec,
    RowStats,
    SparseTerms,
)
from .common import (
    JSDConfig,
    LossConfig,
    PTDHeadConfig,
    SparseJSDConfig,
    cast_grads,
    detached,
    grad_needs,
    live_index,
    once_differentiable,
    put,
    take,
)

# ----------------------------------------------------------------------------- the PTD head


def _own_where_known(values, ids, top: RowStats | None, dtype):
    """``values`` (a side's gathered logits at ``ids``) with the side's own sweep value wherever an id is
    in its top-k: the same rounding as its lse, so that Σ_S p ≤ 1 holds to rounding at large logits."""
    if top is None or top.topk_logits is None or top.topk_logits.dtype != dtype or not top.topk_indices.shape[1]:
        return values
    own_ids, order = top.topk_indices.sort(dim=-1)
    pos = torch.searchsorted(own_ids, ids).clamp_max_(own_ids.shape[1] - 1)
    hit = own_ids.gather(1, pos) == ids
    return torch.where(hit, top.topk_logits.gather(1, order.gather(1, pos)), values)


def _support_logits(backend: Backend, student: Head, teacher: Head, student_top: RowStats, teacher_top: RowStats,
                    support: str, dtype):
    """Support ids, their validity and both sides' logits on them.

    Each side's logits at its own top-k come from its sweep; only ids outside it are gathered.
    """
    if support == "union":
        ids, valid, order = rowmath.union_support(student_top.topk_indices, teacher_top.topk_indices,
                                                  return_order=True)
        student_cat = torch.cat([student_top.topk_logits.to(dtype),
                                 backend.gather_logits(student, teacher_top.topk_indices, dtype)], -1)
        teacher_cat = torch.cat([backend.gather_logits(teacher, student_top.topk_indices, dtype),
                                 teacher_top.topk_logits.to(dtype)], -1)
        student_z, teacher_z = student_cat.gather(1, order), teacher_cat.gather(1, order)
        # An id in both top-k sits twice, student copy first (a stable sort), and the first copy is
        # the valid one: give it the teacher's own value from the second copy.
        both = ids[:, :-1] == ids[:, 1:]
        teacher_z[:, :-1] = torch.where(both, teacher_z[:, 1:], teacher_z[:, :-1])
        if student_top.topk_logits.dtype != dtype:  # own values of another dtype: gather all of them
            student_z = backend.gather_logits(student, ids, dtype)
            teacher_z = backend.gather_logits(teacher, ids, dtype)
        return ids, valid, student_z, teacher_z
    ids = teacher_top.topk_indices if support == "teacher" else student_top.topk_indices
    student_z = _own_where_known(backend.gather_logits(student, ids, dtype), ids, student_top, dtype)
    teacher_z = _own_where_known(backend.gather_logits(teacher, ids, dtype), ids, teacher_top, dtype)
    return ids, torch.ones_like(ids, dtype=torch.bool), student_z, teacher_z


class _PTDHead(torch.autograd.Function):
    """log-prob, entropy and a divergence of live rows from one student sweep and one teacher sweep.

    Inputs are live rows only. ``jsd_rows`` (int64, into the live rows) selects the rows that
    get a divergence; ``teacher_hidden`` holds exactly those rows. Outputs, all [n]: logp, entropy,
    jsd (differentiable), overlap, teacher_mass (not differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows,
                cfg: PTDHeadConfig, backend: Backend):
        student = Head.of(hidden, weight, bias, cfg.student)
        n, vocab = student.rows, backend.vocab_size(student)
        want_logp = targets is not None
        div = cfg.divergence
        n_jsd = 0 if div is None else jsd_rows.numel()
        full = div is not None and (div.k is None or div.k >= vocab)  # S is the whole vocabulary (SPEC §2)
        k = 0 if div is None or full else div.k
        # float64 logsumexps: log-probs z − lse of each side's own logits are then exact whatever the
        # logits' magnitude, so Σ_S p ≤ 1 holds to rounding on near-one-hot rows (a rounded lse shifts
        # a whole row). Outputs and the backward's coefficients stay in the compute dtype.
        wide = torch.float64
        stats = backend.row_stats(student, targets=targets, k=k if n_jsd and not full else 0,
                                  with_mean_logit=want_logp, lse_dtype=wide)
        dtype = student.dtype
        lse = stats.lse.to(dtype)
        zeros = lse.new_zeros(n)
        logp = (stats.target_logit.to(wide) - stats.lse).to(dtype) if want_logp else zeros
        entropy = (stats.lse - stats.mean_logit.to(wide)).to(dtype) if want_logp else zeros
        jsd, overlap, teacher_mass = zeros.clone(), zeros.clone(), zeros.clone()
        jsd_saved = []
        if n_jsd:
            teacher = Head.of(teacher_hidden, teacher_weight, teacher_bias, cfg.teacher)
            student_j = student.take_rows(jsd_rows)
            if full:
                jsd_stats = backend.jsd_forward(student_j, teacher, div.beta)
                jsd[jsd_rows] = jsd_stats.value.to(dtype)
                overlap[jsd_rows] = 1.0
                teacher_mass[jsd_rows] = 1.0
                jsd_saved = [jsd_stats.value, jsd_stats.w_sum, jsd_stats.lse, jsd_stats.teacher_lse]
            else:
                teacher_top = backend.row_stats(teacher, k=k, with_mean_logit=False, lse_dtype=wide)
                student_top = stats.take_rows(jsd_rows)
                ids, valid, student_z, teacher_z = _support_logits(backend, student_j, teacher, student_top,
                                                                   teacher_top, div.support, dtype)
                student_logp = (student_z.to(wide) - student_top.lse[:, None]).to(dtype)
                teacher_logq = (teacher_z.to(wide) - teacher_top.lse[:, None]).to(dtype)
                terms = rowmath.topk_jsd_terms(student_logp, teacher_logq, valid, div.beta, div.tail)
                jsd[jsd_rows] = terms.value
                teacher_mass[jsd_rows] = terms.teacher_mass
                if cfg.want_overlap:
                    overlap[jsd_rows] = rowmath.overlap_fraction(student_top.topk_indices, teacher_top.topk_indices,
                                                                 dtype)
                jsd_saved = [ids, terms.row_coef, terms.support_coef]
        ctx.cfg, ctx.backend, ctx.full, ctx.n_jsd, ctx.want_logp = cfg, backend, full, n_jsd, want_logp
        ctx.save_for_backward(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows,
                              lse, stats.mean_logit.to(dtype) if want_logp else None, *jsd_saved)
        ctx.mark_non_differentiable(overlap, teacher_mass)
        return logp, entropy, jsd, overlap, teacher_mass

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy, grad_jsd, _grad_overlap, _grad_mass):
        (hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows, lse, mean_logit,
         *jsd_saved) = ctx.saved_tensors
        cfg, backend = ctx.cfg, ctx.backend
        student = Head.of(hidden, weight, bias, cfg.student)
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
            teacher = Head.of(teacher_hidden, teacher_weight, teacher_bias, cfg.teacher)
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
def topk(hidden, weight, bias, k: int, spec: LogitSpec, targets, live, backend: Backend) -> TopK:
    """``linear_topk`` once validated: targets with ignored rows already replaced by a valid id."""
    head = Head.of(hidden, weight, bias, spec)
    wide = torch.float64
    stats = backend.row_stats(head, targets=targets, k=k, with_mean_logit=False, lse_dtype=wide)
    out_dtype = compute_dtype(hidden)
    top_logits = stats.topk_logits
    if out_dtype == torch.float64:  # kernels rank on float32 keys; recompute float64 logits at the ids
        top_logits = backend.gather_logits(head, stats.topk_indices, out_dtype)
    target_logprobs = None
    if targets is not None:
        target_logprobs = torch.where(live, (stats.target_logit.to(wide) - stats.lse).to(out_dtype),
                                      torch.zeros((), dtype=out_dtype, device=hidden.device))
    logprobs = (top_logits.to(wide) - stats.lse[:, None]).to(out_dtype)
    return TopK(stats.topk_indices, logprobs, stats.lse.to(out_dtype), target_logprobs)


# ----------------------------------------------------------------------------- divergences


class _SparseJSD(torch.autograd.Function):
    """Top-K JSD against a teacher given as ids + log-probs (support = those ids), live rows only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_indices, teacher_logprobs, cfg: SparseJSDConfig, backend: Backend):
        student = Head.of(hidden, weight, bias, cfg.student)
        stats = backend.row_stats(student, with_mean_logit=False, lse_dtype=torch.float64)
        dtype = student.dtype
        lse = stats.lse.to(dtype)
        student_logp = (backend.gather_logits(student, teacher_indices, torch.float64) - stats.lse[:, None]).to(dtype)
        given = teacher_logprobs.to(dtype)
        valid = torch.ones_like(teacher_indices, dtype=torch.bool)
        terms = rowmath.topk_jsd_terms(student_logp, given, valid, cfg.beta, cfg.tail,
                                        teacher_log_mass=torch.logsumexp(given, dim=-1))
        ctx.cfg, ctx.backend = cfg, backend
        ctx.save_for_backward(hidden, weight, bias, teacher_indices, lse, terms.row_coef, terms.support_coef)
        return terms.value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden, weight, bias, ids, lse, row_coef, support_coef = ctx.saved_tensors
        grad = grad.to(lse.dtype)
        coefs = HeadGradCoefs(grad * row_coef, sparse=(SparseTerms.every_row(ids, grad[:, None] * support_coef),))
        grads = ctx.backend.head_backward(Head.of(hidden, weight, bias, ctx.cfg.student), lse, coefs,
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
        stats = backend.jsd_forward(Head.of(hidden, weight, bias, cfg.student),
                                    Head.of(teacher_hidden, teacher_weight, teacher_bias, cfg.teacher), cfg.beta)
        ctx.cfg, ctx.backend = cfg, backend
        ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, stats.value,
                              stats.w_sum, stats.lse, stats.teacher_lse)
        return stats.value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, *stats = ctx.saved_tensors
        cfg = ctx.cfg
        stats = JSDStats(*stats)
        grads = ctx.backend.jsd_backward(Head.of(hidden, weight, bias, cfg.student),
                                         Head.of(teacher_hidden, teacher_weight, teacher_bias, cfg.teacher),
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
    graph (``retain_graph=True``) therefore raises; call the loss again instead. Row weights that
    require grad get ∂/∂w_n = D_n.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, row_weights,
                cfg: LossConfig, backend: Backend):
        # (forward runs under no_grad: whether the caller wants gradients was read before apply)
        needs = GradNeeds(cfg.grad and hidden.requires_grad, cfg.grad and weight.requires_grad,
                          cfg.grad and bias is not None and bias.requires_grad)
        value, grads = backend.fused_loss(Head.of(hidden, weight, bias, cfg.student),
                                          Head.of(teacher_hidden, teacher_weight, teacher_bias, cfg.teacher),
                                          cfg.divergence, row_weights.detach(), needs)
        # kept in the compute dtype: the incoming gradient scales them before their one cast
        ctx.grads, ctx.dtypes = grads, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(value if cfg.grad and row_weights.requires_grad else None)
        return (value * row_weights.to(value.dtype)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "linear_jsd_loss / linear_topk_jsd_loss formed their gradients in the forward sweep and handed "
                "them over on the first backward; a second backward through the same graph (retain_graph=True) "
                "is not supported: call the loss again")
        scale = None if bool(grad == 1) else grad
        grads = [None if g is None else (g if scale is None else g.mul_(scale.to(g.dtype))).to(dtype)
                 for g, dtype in zip(grads, ctx.dtypes)]
        (value,) = ctx.saved_tensors
        grad_row_weights = None if value is None else grad * value
        return (*grads, None, None, None, grad_row_weights, None, None)


def weighted_loss(per_row_fn, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, weights, live,
                  divergence: DivergenceSpec, student: LogitSpec, teacher: LogitSpec, backend: Backend):
    """Σ_n weights_n·D_n: the backend's one-sweep loss where it pays, else the per-row function.
    ``weights`` may require grad (∂/∂weights_n = D_n); masked rows weigh 0."""
    dtype = compute_dtype(hidden)
    if weights is None:
        weights = live.to(dtype) / max(int(live.sum()), 1)
    else:
        weights = torch.where(live, weights.to(dtype), torch.zeros((), dtype=dtype, device=hidden.device))
    if not backend.fused_loss_pays(Head.of(hidden, weight, bias, student)):
        # per-row function, then the weighted sum (backward recomputes, in efficient vocabulary blocks)
        return (per_row_fn() * weights).sum()
    index = live_index(live)
    if divergence.k is not None and divergence.k >= backend.vocab_size(Head.of(hidden, weight, bias, student)):
        divergence = DivergenceSpec(divergence.beta)  # K ≥ V: the full JSD (SPEC §2)
    cfg = LossConfig(student, teacher, divergence, torch.is_grad_enabled())
    return _FusedLoss.apply(take(hidden, index), weight, bias, take(teacher_hidden.detach(), index),
                            teacher_weight.detach(), detached(teacher_bias), take(weights, index), cfg, backend)
