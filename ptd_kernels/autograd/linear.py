"""The autograd Functions of the fused (output-layer) functions: they compose a backend's primitives
(``backends.base.Backend``) and never look inside them. Each entry point takes a prepared ``Call``
(``ptd_kernels._prepare``) and runs it on the rows that go in (``Rows``)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import rowmath
from .._dtypes import compute_dtype
from .._host_reads import free_to_read
from .._types import TopK
from ..backends.base import (
    Backend,
    GradNeeds,
    Head,
    HeadGradCoefs,
    JSDStats,
    RowStats,
    SparseTerms,
    WeightedDivergence,
)
from .common import Call, SweepConfig, cast_grads, detached, grad_needs, once_differentiable

# ----------------------------------------------------------------------------- the sweep


class SweepResults(NamedTuple):
    """Per-row results of ``sweep``, each [N]: the targets' log-probs and the entropy (0 unless the config
    asks for them), the divergence, and the top-K overlap and teacher mass (0 unless asked for)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    jsd: torch.Tensor
    overlap: torch.Tensor
    teacher_mass: torch.Tensor


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


def _at(values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``values[rows]`` (None: every row)."""
    return values if rows is None else values.index_select(0, rows)


def _write(out: torch.Tensor, rows: torch.Tensor | None, values) -> None:
    """``out[rows] = values`` (None: every row)."""
    if rows is None:
        out[:] = values
    else:
        out[rows] = values


def _full_jsd_forward(backend: Backend, student: Head, teacher: Head, beta: float) -> JSDStats:
    """``backend.jsd_forward`` with each row's value bounded (``rowmath.bound_divergence_``): the value is
    complete only here, a vocabulary-parallel backend's inner value being a partial sum over its slice."""
    stats = backend.jsd_forward(student, teacher, beta)
    rowmath.bound_divergence_(stats.value, beta)
    return stats


class _Sweep(torch.autograd.Function):
    """log-prob, entropy and a divergence of the rows that go in, from one student sweep and one teacher sweep.

    ``jsd_rows`` (int64 positions among the rows that go in; None: all of them) selects the rows that get
    a divergence; ``teacher_hidden`` holds exactly those rows (None: no row gets one). Outputs, all [n]:
    logp, entropy, jsd (differentiable), overlap, teacher_mass (not differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows,
                config: SweepConfig, backend: Backend):
        student = Head(hidden, weight, bias, config.student)
        n = student.rows
        div = config.divergence
        want_logp = config.logprobs
        n_jsd = 0 if div is None or teacher_hidden is None else teacher_hidden.shape[0]
        full = div is not None and div.k is None  # S is the whole vocabulary (K ≥ V)
        k = 0 if div is None or full else div.k
        # float64 logsumexps: log-probs z − lse of each side's own logits are then exact whatever the
        # logits' magnitude, so Σ_S p ≤ 1 holds to rounding on near-one-hot rows (a rounded lse shifts
        # a whole row). Outputs and the backward's coefficients stay in the compute dtype.
        wide = torch.float64
        stats = backend.row_stats(student, targets=targets if want_logp else None, k=k if n_jsd else 0,
                                  with_mean_logit=want_logp, lse_dtype=wide)
        dtype = student.dtype
        lse = stats.lse.to(dtype)
        zeros = lse.new_zeros(n)
        logp = (stats.target_logit.to(wide) - stats.lse).to(dtype) if want_logp else zeros
        entropy = (stats.lse - stats.mean_logit.to(wide)).to(dtype) if want_logp else zeros
        jsd, overlap, teacher_mass = zeros.clone(), zeros.clone(), zeros.clone()
        jsd_saved = []
        if n_jsd:
            teacher = Head(teacher_hidden, teacher_weight, teacher_bias, config.teacher)
            student_j = student.take_rows(jsd_rows)
            if full:
                jsd_stats = _full_jsd_forward(backend, student_j, teacher, div.beta)
                _write(jsd, jsd_rows, jsd_stats.value.to(dtype))
                _write(overlap, jsd_rows, 1.0)
                _write(teacher_mass, jsd_rows, 1.0)
                jsd_saved = [jsd_stats.value, jsd_stats.w_sum, jsd_stats.lse, jsd_stats.teacher_lse]
            else:
                teacher_top = backend.row_stats(teacher, k=k, with_mean_logit=False, lse_dtype=wide)
                student_top = stats if jsd_rows is None else stats.take_rows(jsd_rows)
                ids, valid, student_z, teacher_z = _support_logits(backend, student_j, teacher, student_top,
                                                                   teacher_top, div.support, dtype)
                student_logp = (student_z.to(wide) - student_top.lse[:, None]).to(dtype)
                teacher_logq = (teacher_z.to(wide) - teacher_top.lse[:, None]).to(dtype)
                terms = rowmath.topk_jsd_terms(student_logp, teacher_logq, valid, div.beta, div.tail)
                _write(jsd, jsd_rows, terms.value)
                _write(teacher_mass, jsd_rows, terms.teacher_mass)
                if config.overlap and div.support == "union":  # the union's duplicates are the shared ids
                    _write(overlap, jsd_rows, rowmath.overlap_from_union(valid, k, dtype))
                elif config.overlap:
                    _write(overlap, jsd_rows, rowmath.overlap_fraction(student_top.topk_indices,
                                                                        teacher_top.topk_indices, dtype))
                jsd_saved = [ids, terms.row_coef, terms.support_coef]
        ctx.config, ctx.backend, ctx.full, ctx.n_jsd = config, backend, full, n_jsd
        ctx.save_for_backward(hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows,
                              lse, stats.mean_logit.to(dtype) if want_logp else None, *jsd_saved)
        ctx.mark_non_differentiable(overlap, teacher_mass)
        return logp, entropy, jsd, overlap, teacher_mass

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy, grad_jsd, _grad_overlap, _grad_mass):
        (hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, jsd_rows, lse, mean_logit,
         *jsd_saved) = ctx.saved_tensors
        config, backend = ctx.config, ctx.backend
        student = Head(hidden, weight, bias, config.student)
        needs = grad_needs(ctx, bias)
        row_coef = torch.zeros_like(lse)
        logit_coef = logit_shift = target_coef = None
        if config.logprobs:
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
            grad_j = _at(grad_jsd.to(lse.dtype), jsd_rows)
            if jsd_rows is None:
                row_coef += grad_j * jsd_row_coef
                sparse = (SparseTerms.every_row(ids, grad_j[:, None] * support_coef),)
            else:
                row_coef.index_add_(0, jsd_rows, grad_j * jsd_row_coef)
                sparse = (SparseTerms(jsd_rows, ids, grad_j[:, None] * support_coef, distinct_rows=True),)
        coefs = HeadGradCoefs(row_coef, logit_coef, logit_shift, targets if target_coef is not None else None,
                              target_coef, sparse)
        grads = backend.head_backward(student, lse, coefs, needs)
        if with_jsd and ctx.full:
            teacher = Head(teacher_hidden, teacher_weight, teacher_bias, config.teacher)
            part = backend.jsd_backward(student.take_rows(jsd_rows), teacher, config.divergence.beta,
                                        JSDStats(*jsd_saved), _at(grad_jsd.to(lse.dtype), jsd_rows), needs)
            grads.add_(part, hidden_rows=jsd_rows)
        return (*cast_grads(grads, hidden, weight, bias), None, None, None, None, None, None, None)


def _teacher_rows(call: Call) -> torch.Tensor | None:
    """The rows of the call's teacher_hidden that get a divergence (None: every row that goes in)."""
    rows = call.rows
    if rows.index is None:
        return rows.jsd_rows
    return rows.index if rows.jsd_rows is None else rows.index.index_select(0, rows.jsd_rows)


def sweep(call: Call) -> SweepResults:
    """``_Sweep`` on the rows of a prepared call; results scattered back to all N rows."""
    rows, student, teacher, config = call.rows, call.student, call.teacher, call.config
    jsd_live = rows.jsd_live if rows.jsd_live is not None else rows.live
    teacher_hidden = None
    if config.divergence is not None:
        teacher_rows = _teacher_rows(call)
        if teacher_rows is None:  # every row goes in (rows without a divergence zeroed on the sync-free path)
            teacher_hidden = rows.take(teacher.hidden.detach(), live=jsd_live)
        elif teacher_rows.numel():
            teacher_hidden = teacher.hidden.detach().index_select(0, teacher_rows)
    outs = _Sweep.apply(rows.take(student.hidden), student.weight, student.bias, rows.take(call.targets),
                        teacher_hidden, None if teacher is None else detached(teacher.weight),
                        None if teacher is None else detached(teacher.bias), rows.jsd_rows, config, call.backend)
    logp, entropy = (rows.put(o) for o in outs[:2])
    jsd, overlap, teacher_mass = (rows.put(o, live=jsd_live) for o in outs[2:])
    return SweepResults(logp, entropy, jsd, overlap, teacher_mass)


@torch.no_grad()
def topk(call: Call) -> TopK:
    """``linear_topk``: the top-k of every row (and the targets' log-probs, 0 at masked rows)."""
    head, backend, live = call.student, call.backend, call.rows.live
    wide = torch.float64
    stats = backend.row_stats(head, targets=call.targets, k=call.k, with_mean_logit=False, lse_dtype=wide)
    out_dtype = compute_dtype(head.hidden)
    top_logits = stats.topk_logits
    if out_dtype == torch.float64:  # kernels rank on float32 keys; recompute float64 logits at the ids
        top_logits = backend.gather_logits(head, stats.topk_indices, out_dtype)
    target_logprobs = None
    if call.targets is not None:
        target_logprobs = (stats.target_logit.to(wide) - stats.lse).to(out_dtype)
        if live is not None:
            target_logprobs = torch.where(live, target_logprobs, torch.zeros((), dtype=out_dtype,
                                                                                 device=live.device))
    logprobs = (top_logits.to(wide) - stats.lse[:, None]).to(out_dtype)
    return TopK(stats.topk_indices, logprobs, stats.lse.to(out_dtype), target_logprobs)


class _LogprobsAt(torch.autograd.Function):
    """log p at a few ids per row (and the entropy) of the rows that go in: one forward sweep (lse, Σ p·z) and a
    gather; one backward sweep (``head_backward``): ∂/∂z_v = Σ_m g_m·([v = id_m] − p_v) − g_H·p_v·(z_v − Σ p·z),
    the ids' part as sparse terms — one d weight."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, config: SweepConfig, backend: Backend, with_entropy: bool):
        head = Head(hidden, weight, bias, config.student)
        wide = torch.float64
        stats = backend.row_stats(head, with_mean_logit=with_entropy, lse_dtype=wide)
        dtype = head.dtype
        logp = (backend.gather_logits(head, ids, wide) - stats.lse[:, None]).to(dtype)
        entropy = (stats.lse - stats.mean_logit.to(wide)).to(dtype) if with_entropy else logp.new_zeros(head.rows)
        ctx.config, ctx.backend = config, backend
        ctx.save_for_backward(hidden, weight, bias, ids, stats.lse.to(dtype),
                              stats.mean_logit.to(dtype) if with_entropy else None)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, ids, lse, mean_logit = ctx.saved_tensors
        row_coef = torch.zeros_like(lse)
        sparse = ()
        if grad_logp is not None:
            grad_logp = grad_logp.to(lse.dtype)
            row_coef -= grad_logp.sum(-1)
            sparse = (SparseTerms.every_row(ids, grad_logp),)
        logit_coef = None
        if grad_entropy is not None and mean_logit is not None:
            logit_coef = -grad_entropy.to(lse.dtype)
        coefs = HeadGradCoefs(row_coef, logit_coef, mean_logit if logit_coef is not None else None, sparse=sparse)
        grads = ctx.backend.head_backward(Head(hidden, weight, bias, ctx.config.student), lse, coefs,
                                          grad_needs(ctx, bias))
        return (*cast_grads(grads, hidden, weight, bias), None, None, None, None)


def logprobs_at(call: Call):
    """``_LogprobsAt`` on the rows of a prepared call; (log-probs [N, M], entropy [N]), 0 at masked rows."""
    rows, student = call.rows, call.student
    ids = rows.take(call.teacher_indices)
    logp, entropy = _LogprobsAt.apply(rows.take(student.hidden), student.weight, student.bias, ids, call.config,
                                      call.backend, call.with_entropy)
    return rows.put(logp), rows.put(entropy)


# ----------------------------------------------------------------------------- divergences


class _SparseJSD(torch.autograd.Function):
    """Top-K JSD against a teacher given as ids + log-probs (support = those ids), on the rows that go in."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_indices, teacher_logprobs, config: SweepConfig, backend: Backend):
        student = Head(hidden, weight, bias, config.student)
        stats = backend.row_stats(student, with_mean_logit=False, lse_dtype=torch.float64)
        dtype = student.dtype
        lse = stats.lse.to(dtype)
        student_logp = (backend.gather_logits(student, teacher_indices, torch.float64) - stats.lse[:, None]).to(dtype)
        given = teacher_logprobs.to(dtype)
        valid = torch.ones_like(teacher_indices, dtype=torch.bool)
        div = config.divergence
        terms = rowmath.topk_jsd_terms(student_logp, given, valid, div.beta, div.tail,
                                        teacher_log_mass=torch.logsumexp(given, dim=-1))
        ctx.config, ctx.backend = config, backend
        ctx.save_for_backward(hidden, weight, bias, teacher_indices, lse, terms.row_coef, terms.support_coef)
        return terms.value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden, weight, bias, ids, lse, row_coef, support_coef = ctx.saved_tensors
        grad = grad.to(lse.dtype)
        coefs = HeadGradCoefs(grad * row_coef, sparse=(SparseTerms.every_row(ids, grad[:, None] * support_coef),))
        grads = ctx.backend.head_backward(Head(hidden, weight, bias, ctx.config.student), lse, coefs,
                                          grad_needs(ctx, bias))
        return (*cast_grads(grads, hidden, weight, bias), None, None, None, None)


def sparse_jsd(call: Call) -> torch.Tensor:
    """``_SparseJSD`` on the rows of a prepared call. On the sync-free path a masked row's teacher becomes
    K distinct ids at probability e^{-1}/K each (finite terms, zeroed after)."""
    rows = call.rows
    ids, logprobs = call.teacher_indices, call.teacher_logprobs.detach()
    if rows.index is None and rows.live is not None:
        live, k = rows.live[:, None], ids.shape[1]
        ids = torch.where(live, ids, torch.arange(k, device=ids.device))
        logprobs = torch.where(live, logprobs, torch.full((), -1.0 - math.log(k), dtype=logprobs.dtype,
                                                          device=logprobs.device))
    elif rows.index is not None:
        ids, logprobs = ids.index_select(0, rows.index), logprobs.index_select(0, rows.index)
    student = call.student
    value = _SparseJSD.apply(rows.take(student.hidden), student.weight, student.bias, ids, logprobs, call.config,
                             call.backend)
    return rows.put(value)


class _LinearJSD(torch.autograd.Function):
    """Full-vocabulary JSD_β of the rows that go in: two sweeps forward, one recomputing sweep backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, config: SweepConfig,
                backend: Backend):
        beta = config.divergence.beta
        stats = _full_jsd_forward(backend, Head(hidden, weight, bias, config.student),
                                  Head(teacher_hidden, teacher_weight, teacher_bias, config.teacher), beta)
        ctx.config, ctx.backend = config, backend
        ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, stats.value,
                              stats.w_sum, stats.lse, stats.teacher_lse)
        return stats.value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, *stats = ctx.saved_tensors
        config = ctx.config
        stats = JSDStats(*stats)
        grads = ctx.backend.jsd_backward(Head(hidden, weight, bias, config.student),
                                         Head(teacher_hidden, teacher_weight, teacher_bias, config.teacher),
                                         config.divergence.beta, stats, grad.to(stats.lse.dtype),
                                         grad_needs(ctx, bias))
        return (*cast_grads(grads, hidden, weight, bias), None, None, None, None, None)


def full_jsd(call: Call) -> torch.Tensor:
    """``_LinearJSD`` on the rows of a prepared call."""
    rows, student, teacher = call.rows, call.student, call.teacher
    value = _LinearJSD.apply(rows.take(student.hidden), student.weight, student.bias,
                             rows.take(teacher.hidden.detach()), teacher.weight.detach(), detached(teacher.bias),
                             call.config, call.backend)
    return rows.put(value)


def divergence(call: Call) -> torch.Tensor:
    """The per-row divergence of a two-layer call: the full JSD, or the Top-K JSD from the sweep."""
    return full_jsd(call) if call.config.divergence.k is None else sweep(call).jsd


# ----------------------------------------------------------------------------- loss level


class _OneSweepLoss(torch.autograd.Function):
    """Σ_n loss_n with gradients formed during the forward sweep (``Backend.fused_loss``: no recomputation).

    ``row_loss``: the backend's ``RowLoss`` — ``WeightedDivergence`` (Σ_n w_n·D_n, the loss functions;
    ``row_weights`` are its weights, which may require grad: ∂/∂w_n = D_n), or ``policy.RowLossAdapter``
    (``linear_policy_loss``; ``row_weights`` None), which records the rows' losses.

    The one backward hands the stored gradients over (scaled in place when the incoming gradient
    is not 1) instead of copying them: a copy, and autograd's own clone of a gradient still held
    here, would each cost another V×H d weight at the peak. A second backward through the same
    graph (``retain_graph=True``) therefore raises; call the loss again instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, row_weights,
                config: SweepConfig, row_loss, record_grad: bool, backend: Backend):
        # (forward runs under no_grad: whether the caller wants gradients was read before apply)
        needs = GradNeeds(record_grad and hidden.requires_grad, record_grad and weight.requires_grad,
                          record_grad and bias is not None and bias.requires_grad)
        teacher = None if teacher_hidden is None else Head(teacher_hidden, teacher_weight, teacher_bias,
                                                           config.teacher)
        value, grads = backend.fused_loss(Head(hidden, weight, bias, config.student), teacher, config.divergence,
                                          row_loss, needs, targets=targets)
        if config.divergence is not None:  # per row, before the weighted sum (a mean of bounded rows)
            rowmath.bound_divergence_(value, config.divergence.beta)
        # kept in the compute dtype: the incoming gradient scales them before their one cast
        ctx.grads, ctx.dtypes = grads, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        weighted = row_weights is not None
        ctx.save_for_backward(value if weighted and record_grad and row_weights.requires_grad else None)
        return (value * row_weights.to(value.dtype)).sum() if weighted else row_loss.total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "the loss functions (linear_jsd_loss, linear_topk_jsd_loss, linear_policy_loss) formed their "
                "gradients in the forward sweep and handed them over on the first backward; a second backward "
                "through the same graph (retain_graph=True) is not supported: call the loss again")
        # On a CPU, skip the V×H multiply when the incoming gradient is 1; on a device that check would wait
        # for the queue, so the gradients are scaled whatever it is.
        scale = None if free_to_read(grad) and bool(grad == 1) else grad
        grads = [None if g is None else (g if scale is None else g.mul_(scale.to(g.dtype))).to(dtype)
                 for g, dtype in zip(grads, ctx.dtypes)]
        (value,) = ctx.saved_tensors
        grad_row_weights = None if value is None else grad * value
        return (*grads, None, None, None, None, grad_row_weights, None, None, None, None)


def weighted_loss(call: Call) -> torch.Tensor:
    """Σ_n weights_n·D_n of a prepared loss call: the backend's one-sweep loss where it pays, else the
    per-row function. ``weights`` may require grad (∂/∂weights_n = D_n); masked rows weigh 0."""
    rows, student, teacher = call.rows, call.student, call.teacher
    dtype = compute_dtype(student.hidden)
    device = student.hidden.device
    if call.weights is None:  # the mean over live rows, counted on the device
        if rows.live is None:
            weights = torch.full((rows.count,), 1.0 / max(rows.count, 1), dtype=dtype, device=device)
        else:
            live = rows.live.to(dtype)
            weights = live / live.sum().clamp_min(1.0)
    else:
        weights = call.weights.to(dtype)
        if rows.live is not None:
            weights = torch.where(rows.live, weights, torch.zeros((), dtype=dtype, device=device))
    if not call.backend.fused_loss_pays(student, teacher):
        # per-row function, then the weighted sum (backward recomputes, in efficient vocabulary blocks)
        return (divergence(call) * weights).sum()
    row_weights = rows.take(weights)
    return _OneSweepLoss.apply(rows.take(student.hidden), student.weight, student.bias,
                               rows.take(teacher.hidden.detach()), teacher.weight.detach(), detached(teacher.bias),
                               None, row_weights, call.config, WeightedDivergence(row_weights.detach()),
                               torch.is_grad_enabled(), call.backend)
