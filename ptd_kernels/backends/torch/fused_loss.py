"""The one-sweep loss of the chunked PyTorch path: Σ_n loss_n of per-row terms and its gradients, formed
during the forward (no recomputing sweep).

Rows come in blocks of whole vocabulary rows (the rows with a teacher first, two-sided blocks; then the
others, one-sided blocks twice as tall). Per block:

1. the logits: the student's GEMM (and the teacher's; one GEMM over the stacked rows when both sides share
   an output layer);
2. the block's terms, sub-block by sub-block in cache: with y = z − max z, S = Σ e^y and T = Σ e^y·y,
   lse = max z + log S, log p(target) = z_target − lse, H = log S − T/S; the Top-K support (both sides'
   top-k), its log-probs and ``rowmath.topk_jsd_terms`` (value, dense and support coefficients); the full
   JSD by ``rowmath.full_jsd_rows_``. The block keeps e^y (or y, when the entropy's gradient or a soft-cap
   needs it) over the logits;
3. the row loss's derivatives g = ∂loss_n/∂(logp_n, H_n, D_n) (``RowLoss``: once per block, or per
   sub-block when they are constants, as for the weighted divergences of ``linear_jsd_loss``);
4. ∂L/∂z written over the logits:  p·(−g_logp + g_D·c_n − g_H·(y − T/S)) + g_logp·[v = target]
   + g_D·(support terms), times s/τ and the cap's derivative;
5. the two gradient GEMMs: d hidden of the block's rows, d weight accumulated.

GEMMs: the student's forward, the teacher's, d hidden and d weight — 4 logits-GEMM equivalents for the
whole PTD-PO loss, 3 for a loss without a teacher, where the per-row path needs one more (its recompute).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ... import config, rowmath
from ..base import DivergenceSpec, GradNeeds, Head, HeadGrads, RowGrads, RowLoss, RowTerms, as_row_loss
from . import _blocks
from ._blocks import itemsize, logits_into, prepare, shift, sub_blocks, to_logits_


def fused_loss_pays(student: Head, teacher: Head | None = None, *, sides: int | None = None) -> bool:
    """Whether the one-sweep loss (whole rows per block) beats the per-row path (vocabulary blocks).

    Its blocks hold whole rows, so at large V they hold few rows, and each block re-reads the output
    layers and rewrites all of d weight (measured with 26-row blocks at V = 32000: 24.8 s vs 12.2 s per
    row). With ≥ ``config.FUSED_LOSS_MIN_ROWS`` rows per block (V ≲ 90k in float32 at the default budget
    with a teacher, ≲ 180k without) the GEMMs run near full speed and the sweep saves one GEMM in four
    (in three without a teacher). ``sides``: 2 with a teacher, 1 without (default: from ``teacher``).
    """
    sides = (1 if teacher is None else 2) if sides is None else sides
    return config.LOSS_BLOCK_BYTES // (student.vocab * sides * 4) >= config.FUSED_LOSS_MIN_ROWS


def _row_blocks(student: Head, teacher: Head | None, budget: int, dtype, hidden, weight, bias):
    """Yield (r0, r1, a, teacher_a or None): full rows of a = hidden·weight + bias for blocks of rows, each kind
    in one reused buffer of ``budget`` bytes: the teacher's rows (the first ``teacher.rows``) in two-sided
    blocks (``_blocks.two_sided_row_blocks``: one GEMM over the stacked rows for a shared output layer), the
    others in one-sided blocks. Blocks of each kind are of equal size (a thin last block is a slow GEMM)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    n_teacher = 0 if teacher is None else teacher.rows
    if n_teacher:
        yield from _blocks.two_sided_row_blocks(replace(student, hidden=student.hidden[:n_teacher]), teacher, budget)
    rest = n - n_teacher
    if not rest:
        return
    step = max(1, min(rest, budget // (vocab * itemsize(dtype))))
    step = -(-rest // -(-rest // step))
    buffer = torch.empty(step * vocab, dtype=dtype, device=hidden.device)
    for r0 in range(n_teacher, n, step):
        r1 = min(n, r0 + step)
        yield r0, r1, logits_into(buffer[: (r1 - r0) * vocab].view(r1 - r0, vocab), hidden[r0:r1], weight, bias), None


class _Block:
    """The per-row state of one block while its sub-blocks are swept: terms, softmax statistics, and the
    Top-K supports with their gradient coefficients (one entry per sub-block)."""

    def __init__(self, rows: int, dtype, device, row_loss: RowLoss, with_jsd: bool):
        # one allocation for all of the per-row state
        (self.jsd, self.logp, self.entropy, self.overlap, self.teacher_mass, self.row_max, self.exp_sum,
         self.exp_mean) = torch.zeros((8, rows), dtype=dtype, device=device).unbind()
        # self.exp_sum: S = Σ e^{z − max}; self.exp_mean: T / S = Σ p·(z − max)
        if not row_loss.logprobs:
            self.logp = self.entropy = None
        if not (row_loss.overlap and with_jsd):
            self.overlap = self.teacher_mass = None
        self.support = {}  # by sub-block start: (ids, row_coef, support_coef), or None
        self.rows = rows

    def put(self, sub: slice, **values: torch.Tensor) -> None:
        """Per-row values of a sub-block into the named state; a sub-block of all the block's rows hands its
        tensors over (no copy)."""
        whole = sub.start == 0 and sub.stop == self.rows
        for name, value in values.items():
            if whole:
                setattr(self, name, value)
            else:
                getattr(self, name)[sub] = value

    def terms(self, rows: slice) -> RowTerms:
        whole = rows == slice(None)

        def at(t):
            return t if t is None or whole else t[rows]

        return RowTerms(at(self.logp), at(self.entropy), self.jsd if whole else self.jsd[rows], at(self.overlap),
                        at(self.teacher_mass))


def fused_loss(student: Head, teacher: Head | None, divergence: DivergenceSpec | None, row_loss, needs: GradNeeds, *,
               targets: torch.Tensor | None = None) -> tuple[torch.Tensor, HeadGrads]:
    """``Backend.fused_loss`` (see the module doc): the per-row divergence [n] and the gradients of Σ loss_n
    (compute dtype), from one sweep."""
    row_loss = as_row_loss(row_loss)
    needs = needs.of(student)
    dtype, hidden, weight, bias = prepare(student)
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    full = teacher is not None and divergence.k is None
    if full and (row_loss.logprobs or not row_loss.constant):
        raise NotImplementedError("the one-sweep loss takes the full JSD only in a weighted sum of divergences")
    if row_loss.logprobs and targets is None:
        raise ValueError("a row loss that reads log-probs needs the targets")
    capped = student.softcap is not None
    # what the block keeps over its logits between the terms and ∂L/∂z: e^y, or y when the entropy's gradient
    # (it reads z − Σp·z) or the cap's derivative (it reads z) is formed after all of the block's terms
    keep_shifted = not row_loss.constant and (row_loss.entropy_gradient or capped)
    s, tau = student.logit_scale, student.temperature
    chain = s / tau  # the scalar part of ∂z/∂a; the cap's part is elementwise
    value = torch.zeros(n, dtype=dtype, device=device)
    # d weight: written by the first block's GEMM, accumulated by the others (no zero fill of V×H)
    grads = HeadGrads(torch.empty((n, h), dtype=dtype, device=device) if needs.hidden else None,
                      torch.empty((vocab, h), dtype=dtype, device=device) if needs.weight else None,
                      torch.zeros(vocab, dtype=dtype, device=device) if needs.bias else None)
    if n == 0 and needs.weight:
        grads.weight.zero_()
    size = itemsize(dtype)
    first = True
    with torch.no_grad():
        for r0, r1, z, teacher_z in _row_blocks(student, teacher, config.LOSS_BLOCK_BYTES, dtype, hidden, weight,
                                                bias):
            with_jsd = teacher_z is not None
            # Top-K sub-blocks run ~40 small per-row ops: 4× the elementwise budget; the full JSD's stay cache-sized
            subs = sub_blocks(r1 - r0, vocab, size, 4 if with_jsd and not full else 1)
            block = _Block(r1 - r0, dtype, device, row_loss, with_jsd)
            for sub in subs:
                z_sub = z[sub]
                derivative = to_logits_(z_sub, student, want_derivative=capped and needs.any and row_loss.constant)
                teacher_sub = None
                if with_jsd:
                    teacher_sub = teacher_z[sub]
                    to_logits_(teacher_sub, teacher)
                rows = shift(sub, r0)
                if full:
                    jsd_rows = rowmath.full_jsd_rows_(z_sub, teacher_sub, divergence.beta)  # ∂D/∂z over z
                    block.put(sub, jsd=jsd_rows.value)
                else:
                    _terms(block, sub, z_sub, teacher_sub, None if targets is None else targets[rows], divergence,
                           row_loss, keep_shifted)
                if row_loss.constant:
                    g = row_loss(rows, block.terms(sub))
                    if needs.any:
                        if full:
                            z_sub.mul_(g.jsd[:, None] * chain)
                        else:
                            _dz(z_sub, block, sub, g, targets, r0, chain, keep_shifted)
                        if derivative is not None:
                            z_sub.mul_(derivative)
            if not row_loss.constant:
                g = row_loss(slice(r0, r1), block.terms(slice(None)))
                if needs.any:
                    for sub in subs:
                        z_sub = z[sub]
                        derivative = _cap_derivative(z_sub, block.row_max[sub], student) if capped else None
                        _dz(z_sub, block, sub, _rows_of(g, sub, r1 - r0), targets, r0, chain, keep_shifted)
                        if derivative is not None:
                            z_sub.mul_(derivative)
            value[r0:r1] = block.jsd
            if not needs.any:
                continue
            if needs.hidden:
                torch.mm(z, weight, out=grads.hidden[r0:r1])
            if needs.weight:
                if first:
                    torch.mm(z.T, hidden[r0:r1], out=grads.weight)
                else:
                    grads.weight.addmm_(z.T, hidden[r0:r1])
            if needs.bias:
                grads.bias += z.sum(0)
            first = False
    if first and needs.weight:  # no block ran
        grads.weight.zero_()
    return value, grads


def _terms(block: _Block, sub: slice, z: torch.Tensor, teacher_z: torch.Tensor | None, targets, divergence,
           row_loss: RowLoss, keep_shifted: bool) -> None:
    """The terms of a sub-block of logits ``z`` (in place: z becomes e^{z − max}, or z − max with
    ``keep_shifted``), into ``block``."""
    wide = torch.float64
    dtype = z.dtype
    support = None
    if teacher_z is not None:
        k = divergence.k
        student_ids = rowmath.topk_ids(z, k) if divergence.support != "teacher" else None
        teacher_ids = rowmath.topk_ids(teacher_z, k) if divergence.support != "student" else None
        ids, valid = rowmath.support_ids(student_ids, teacher_ids, divergence.support)
        if block.overlap is not None and divergence.support == "union":  # the union's duplicates: shared ids
            block.put(sub, overlap=rowmath.overlap_from_union(valid, k, dtype))
        elif block.overlap is not None:  # one side's support: the other's top-k for the diagnostic
            other = rowmath.topk_ids(teacher_z if teacher_ids is None else z, k)
            block.put(sub, overlap=rowmath.overlap_fraction(ids, other, dtype))
        # float64 logsumexps of each side's own logits: z_S − lse is then exact, and Σ_S p ≤ 1 holds to rounding
        teacher_at = teacher_z.gather(1, ids).to(wide)
        teacher_max = teacher_z.amax(-1, keepdim=True)
        teacher_sum = teacher_z.sub_(teacher_max).exp_().sum(-1, keepdim=True)  # the teacher's logits are done
        teacher_logq = (teacher_at - (teacher_max.to(wide) + teacher_sum.to(wide).log())).to(dtype)
        student_z = z.gather(1, ids)
    target_z = z.gather(1, targets[:, None]).squeeze(1) if row_loss.logprobs else None
    row_max = z.amax(-1, keepdim=True)
    shifted = z.sub_(row_max)
    row_max = row_max.squeeze(-1)
    if row_loss.logprobs:
        e = torch.exp(shifted)
        exp_sum = e.sum(-1)
        exp_mean = torch.linalg.vecdot(e, shifted) / exp_sum
        if not keep_shifted:
            z.copy_(e)
    else:
        e = shifted.exp_()
        exp_sum = e.sum(-1)
        exp_mean = None
    log_sum = exp_sum.to(wide).log()
    lse = row_max.to(wide) + log_sum
    block.put(sub, row_max=row_max, exp_sum=exp_sum)
    if row_loss.logprobs:
        block.put(sub, exp_mean=exp_mean, logp=(target_z.to(wide) - lse).to(dtype),
                  entropy=(log_sum - exp_mean.to(wide)).to(dtype))
    if teacher_z is not None:
        student_logp = (student_z.to(wide) - lse[:, None]).to(dtype)
        terms = rowmath.topk_jsd_terms(student_logp, teacher_logq, valid, divergence.beta, divergence.tail)
        block.put(sub, jsd=terms.value)
        if block.teacher_mass is not None:
            block.put(sub, teacher_mass=terms.teacher_mass)
        support = (ids, terms.row_coef, terms.support_coef)
    block.support[sub.start] = support


def _dz(z: torch.Tensor, block: _Block, sub: slice, g: RowGrads, targets, r0: int, chain: float,
        keep_shifted: bool) -> None:
    """∂L/∂z (times s/τ, before the cap's derivative) of a sub-block, written over what ``_terms`` left in ``z``."""
    support = block.support[sub.start]
    exp_sum = block.exp_sum[sub]
    row_coef = -g.logp if g.logp is not None else torch.zeros_like(exp_sum)
    if g.jsd is not None and support is not None:
        row_coef += g.jsd * support[1]
    row_coef = _times(chain, row_coef)
    if keep_shifted:  # z holds y = z − max: p = e^{y − log S}
        coef = row_coef[:, None]
        if g.entropy is not None:  # ∂H/∂z = −p·(z − Σp·z) = −p·(y − T/S)
            coef = (z - block.exp_mean[sub, None]).mul_((-chain * g.entropy)[:, None]).add_(coef)
        z.sub_(exp_sum.log()[:, None]).exp_().mul_(coef)
    else:  # z holds e^y: p = e^y / S
        z.mul_((row_coef / exp_sum)[:, None])
    if g.logp is not None:
        z.scatter_add_(1, targets[shift(sub, r0), None], _times(chain, g.logp)[:, None])
    if g.jsd is not None and support is not None:
        ids, _, support_coef = support
        z.scatter_add_(1, ids, _times(chain, g.jsd)[:, None] * support_coef.to(z.dtype))


def _times(chain: float, t: torch.Tensor) -> torch.Tensor:
    """chain·t (t itself when chain is 1: no op)."""
    return t if chain == 1.0 else chain * t


def _rows_of(g: RowGrads, rows: slice, count: int) -> RowGrads:
    """The derivatives of a sub-block's rows (``count``: the block's rows)."""
    if rows.start == 0 and rows.stop == count:
        return g
    return RowGrads(*(None if t is None else t[rows] for t in (g.logp, g.entropy, g.jsd)))


def _cap_derivative(z: torch.Tensor, row_max: torch.Tensor, head: Head) -> torch.Tensor:
    """1 − tanh²(s·a/c) of a sub-block from what it holds, y = z − max z: tanh = z·τ/c."""
    t = (z + row_max[:, None]).mul_(head.temperature / head.softcap)
    return torch.addcmul(torch.ones_like(t), t, t, value=-1.0)
