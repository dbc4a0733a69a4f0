"""``linear_policy_loss``: Σ_n loss_n of the per-row terms (log-prob, entropy, Top-K JSD), from one sweep.

Where the backend offers its one-sweep loss (``Backend.fused_loss``, when ``fused_loss_pays``), the rows
go in with the rows that have a divergence first (the backend's teacher head holds exactly those), and
:class:`RowLossAdapter` is the backend's ``RowLoss``: per block of rows it places the block's terms at
their rows, evaluates the loss of those rows and its derivatives — in closed form for a ``PolicyLoss``,
by autograd over the block's terms for a callable — and records the terms and the losses. The gradients
are formed in the forward and handed over on the first backward (``linear._OneSweepLoss``).

Elsewhere (the Triton and the vocabulary-parallel backends, the full JSD of K ≥ V, a block too thin to
pay), the loss is composed from the per-row path: ``linear.sweep`` (the terms of ``linear_ptd_terms``,
differentiable) and the same loss in PyTorch, differentiated by autograd — equal by construction.

A callable ``row_loss(logp, entropy, jsd) -> loss [N]`` must be row-separable: loss_n depends on row n's
terms only (its own tensors, e.g. advantages [N], it may index freely). It is called with [N] tensors;
in the one-sweep path once per block, with the block's rows holding their terms and the other rows
zeros, and only the block's rows of its result are used. On a CPU (and on a device with
``config.CHECK_ROW_LOSS``) a loss whose block rows have a gradient w.r.t. another row's terms is refused;
``config.CHECK_ROW_LOSS`` also probes the full Jacobian structure of the first rows of every block.
"""

from __future__ import annotations

import torch

from .. import config
from .._dtypes import compute_dtype
from .._host_reads import free_to_read
from .._types import PTDTerms
from ..backends.base import RowGrads, RowLoss, RowTerms
from ..policy_loss import PolicyLoss
from .common import Call, detached

#: Rows of a block whose Jacobian ``config.CHECK_ROW_LOSS`` probes one by one.
PROBE_ROWS = 4


class RowLossAdapter(RowLoss):
    """A ``PolicyLoss`` or a callable as the backend's ``RowLoss`` of a call's rows (see the module doc).

    ``positions`` (int64 [n], None: 0…N−1): the call's row of each row that goes in, in the order they go in.
    ``live`` / ``jsd_live`` (bool [N], None: all): on the sync-free path, the rows that count and the rows
    whose divergence counts (the others went in with zeroed hidden states). Records, [N] each: the terms
    (``terms()``) and the rows' losses (their sum is ``total``).
    """

    def __init__(self, loss, n: int, positions, live, jsd_live, dtype, device, *, with_teacher: bool):
        self.named = isinstance(loss, PolicyLoss)
        # a PolicyLoss's rows in the order they go in, in the compute dtype, once: a block reads slices of them
        self.loss = loss.for_rows(positions, dtype) if self.named else loss
        self.positions, self.live, self.jsd_live = positions, live, jsd_live
        self.logprobs = True
        self.entropy_gradient = loss.uses_entropy_gradient if self.named else True
        self.overlap = with_teacher
        self.n, self.dtype, self.device = n, dtype, device
        # the records in one [k, N] tensor: a block writes all of its rows' records with one index_copy_
        self.records = torch.zeros((6 if with_teacher else 4, n), dtype=dtype, device=device)
        self.logp, self.entropy, self.jsd, self.losses, *rest = self.records.unbind()
        self.overlap_values, self.teacher_mass = rest if with_teacher else (None, None)

    def _place(self, rows: slice) -> torch.Tensor:
        if self.positions is None:
            return torch.arange(rows.start, rows.stop, device=self.device)
        return self.positions[rows]

    def __call__(self, rows: slice, terms: RowTerms) -> RowGrads:
        at = self._place(rows)
        zero = (None if self.live is None and self.jsd_live is None else
                torch.zeros((), dtype=self.dtype, device=self.device))
        live = None if self.live is None else self.live[at]
        jsd_live = None if self.jsd_live is None else self.jsd_live[at]
        jsd = terms.jsd if jsd_live is None else torch.where(jsd_live, terms.jsd, zero)
        if self.named:
            loss, d_logp, d_entropy, d_jsd = self.loss.row_gradients(terms.logp, terms.entropy, jsd, rows=rows)
        else:
            loss, d_logp, d_entropy, d_jsd = self._by_autograd(at, terms.logp, terms.entropy, jsd)
        if jsd_live is not None and d_jsd is not None:
            d_jsd = torch.where(jsd_live, d_jsd, zero)
        if live is not None:
            loss = torch.where(live, loss, zero)
            d_logp, d_entropy, d_jsd = (None if g is None else torch.where(live, g, zero)
                                        for g in (d_logp, d_entropy, d_jsd))
        records = [terms.logp, terms.entropy, jsd, loss]  # the first rows of self.records
        if self.overlap_values is not None and terms.overlap is not None:
            records += [terms.overlap, terms.teacher_mass]
        for i, values in enumerate(records):
            if values is None:
                values = torch.zeros_like(loss)
            elif live is not None:
                values = torch.where(live, values, zero)
            if i >= 4 and jsd_live is not None:
                values = torch.where(jsd_live, values, zero)
            records[i] = values if values.dtype == self.dtype else values.to(self.dtype)
        self.records[:len(records)].index_copy_(1, at, torch.stack(records))
        return RowGrads(d_logp, d_entropy, d_jsd)

    def _by_autograd(self, at: torch.Tensor, logp, entropy, jsd):
        """The callable's losses of the rows ``at`` and their derivatives w.r.t. the rows' own terms."""
        inputs = []
        for values in (logp, entropy, jsd):
            full = torch.zeros(self.n, dtype=self.dtype, device=self.device)
            inputs.append(full.index_copy_(0, at, values.detach()).requires_grad_())
        with torch.enable_grad():
            out = _called(self.loss, *inputs, self.n)
            mine = out.index_select(0, at)
            grads = torch.autograd.grad(mine.sum(), inputs, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
        if free_to_read(mine) or config.CHECK_ROW_LOSS:
            _check_separable(grads, at, self.n)
            if config.CHECK_ROW_LOSS:
                _probe_jacobian(self.loss, inputs, at[:PROBE_ROWS], self.n)
        return (mine.detach(), *(g.index_select(0, at) for g in grads))

    @property
    def total(self) -> torch.Tensor:
        return self.losses.sum()

    def terms(self) -> PTDTerms:
        zeros = torch.zeros_like(self.logp)
        return PTDTerms.build(self.logp, self.entropy, self.jsd,
                              zeros if self.overlap_values is None else self.overlap_values,
                              zeros if self.teacher_mass is None else self.teacher_mass)


def _called(row_loss, logp, entropy, jsd, n: int) -> torch.Tensor:
    out = row_loss(logp, entropy, jsd)
    if not isinstance(out, torch.Tensor) or out.shape != (n,) or not out.dtype.is_floating_point:
        shown = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"row_loss(logp, entropy, jsd) must return a float tensor [N] = ({n},), one loss per row, "
                         f"got {shown}")
    return out


def _not_separable(row: int, other: int) -> ValueError:
    return ValueError(f"row_loss is not row-separable: the loss of row {row} depends on the terms of row {other} (a "
                      "mean, sum or sort over rows, say); give it per-row weights instead, e.g. weights[n] / count")


def _check_separable(grads, at: torch.Tensor, n: int) -> None:
    """The block's losses have no gradient w.r.t. another row's terms (a finite nonzero one refuses)."""
    outside = torch.ones(n, dtype=torch.bool, device=at.device)
    outside[at] = False
    for g in grads:
        leak = outside & torch.isfinite(g) & (g != 0)
        if bool(leak.any()):
            raise _not_separable(int(at[0]), int(leak.nonzero()[0, 0]))


def _probe_jacobian(row_loss, inputs, rows: torch.Tensor, n: int) -> None:
    """``config.CHECK_ROW_LOSS``: the full Jacobian rows of a few of the block's losses — each loss has a
    gradient at its own row only."""
    with torch.enable_grad():
        out = _called(row_loss, *inputs, n)
        for row in rows.tolist():
            grads = torch.autograd.grad(out[row], inputs, retain_graph=True, allow_unused=True)
            for g in grads:
                if g is None:
                    continue
                others = torch.isfinite(g) & (g != 0)
                others[row] = False
                if bool(others.any()):
                    raise _not_separable(row, int(others.nonzero()[0, 0]))


# ----------------------------------------------------------------------------- the call


def _row_order(call: Call):
    """(positions of the rows that go in, in the order they go in — the rows with a divergence first —, or
    None for 0…N−1; the number of rows with a teacher, or None for all of them)."""
    rows = call.rows
    if call.teacher is None:
        return rows.index, 0
    if rows.jsd_rows is None:  # every row that goes in has a divergence (or the sync-free path: all go in)
        return rows.index, None
    n_in = rows.count if rows.index is None else rows.index.shape[0]
    n_jsd = rows.jsd_rows.shape[0]
    has_jsd = torch.zeros(n_in, dtype=torch.bool, device=rows.jsd_rows.device)
    has_jsd[rows.jsd_rows] = True
    rest = torch.argsort(has_jsd.to(torch.uint8), stable=True)[: n_in - n_jsd]  # no host read
    order = torch.cat([rows.jsd_rows, rest])
    return (order if rows.index is None else rows.index.index_select(0, order)), n_jsd


def _resolved(call: Call, dtype, device) -> PolicyLoss | object:
    """A PolicyLoss's defaults on this call: the weights (1 / live rows) and ptd_tokens (live rows with a
    divergence), counted on the device."""
    loss = call.row_loss
    if not isinstance(loss, PolicyLoss) or (loss.weights is not None and loss.ptd_tokens is not None):
        return loss
    rows = call.rows
    if rows.live is None:
        weights = torch.full((rows.count,), 1.0 / max(rows.count, 1), dtype=dtype, device=device)
    else:
        live = rows.live.to(dtype)
        weights = live / live.sum().clamp_min(1.0)
    if call.teacher is None:
        tokens = torch.zeros((), dtype=dtype, device=device)
    elif rows.jsd_rows is not None:
        tokens = torch.full((), float(rows.jsd_rows.shape[0]), dtype=dtype, device=device)
    elif rows.jsd_live is not None:  # the sync-free path
        tokens = rows.jsd_live.sum().to(dtype)
    elif rows.index is not None:
        tokens = torch.full((), float(rows.index.shape[0]), dtype=dtype, device=device)
    elif rows.live is not None:  # the sync-free path
        tokens = rows.live.sum().to(dtype)
    else:
        tokens = torch.full((), float(rows.count), dtype=dtype, device=device)
    return loss.resolved(weights, tokens)


def policy_loss(call: Call) -> tuple[torch.Tensor, PTDTerms]:
    """``linear_policy_loss`` of a prepared call: (the scalar Σ loss_n, the per-row terms, detached)."""
    from .linear import _OneSweepLoss, sweep

    student, teacher, rows = call.student, call.teacher, call.rows
    dtype, device = compute_dtype(student.hidden), student.hidden.device
    loss_fn = _resolved(call, dtype, device)
    divergence = call.config.divergence
    one_sweep = (divergence is None or divergence.k is not None) and call.backend.fused_loss_pays(student, teacher)
    if not one_sweep:
        terms = sweep(call)
        losses = (loss_fn.row_losses if isinstance(loss_fn, PolicyLoss) else
                  lambda *t: _called(loss_fn, *t, rows.count))(terms.logp, terms.entropy, terms.jsd)
        if rows.live is not None:
            losses = torch.where(rows.live, losses, torch.zeros((), dtype=losses.dtype, device=device))
        detached_terms = PTDTerms.build(*(t.detach() for t in (terms.logp, terms.entropy, terms.jsd, terms.overlap,
                                                                 terms.teacher_mass)))
        return losses.sum(), detached_terms
    positions, n_teacher = _row_order(call)
    sync_free = rows.index is None  # masked rows (if any) go in with zeroed hidden states, then count 0
    hidden = rows.take(student.hidden) if positions is None else student.hidden.index_select(0, positions)
    targets = call.targets if positions is None else call.targets.index_select(0, positions)
    teacher_hidden = None
    if teacher is not None:
        if n_teacher is None and positions is None:
            jsd_live = rows.jsd_live if rows.jsd_live is not None else rows.live
            teacher_hidden = rows.take(teacher.hidden.detach(), live=jsd_live)
        else:
            teacher_positions = positions if n_teacher is None else positions[:n_teacher]
            teacher_hidden = teacher.hidden.detach().index_select(0, teacher_positions)
    adapter = RowLossAdapter(loss_fn, rows.count, positions, rows.live if sync_free else None, rows.jsd_live,
                             dtype, device, with_teacher=teacher is not None)
    total = _OneSweepLoss.apply(hidden, student.weight, student.bias, teacher_hidden,
                                None if teacher is None else detached(teacher.weight),
                                None if teacher is None else detached(teacher.bias), targets, None, call.config,
                                adapter, torch.is_grad_enabled(), call.backend)
    return total, adapter.terms()
