"""Per-row math shared by every backend and by the logits-level functions: one spelling per form.

Everything here works on rows: per-row scalars [n], atom sets [n, M] (a top-K support) or
bounded blocks of full vocabulary rows [n, V] (never all N rows by V columns at once).

Notation (docs/method.md §2): P is the student, Q the teacher, atoms a carry log-probabilities
``logp_a`` and ``logq_a``. For β ∈ [0, 1]

    M = β·Q + (1 − β)·P
    JSD_β(P, Q) = β·KL(Q ‖ M) + (1 − β)·KL(P ‖ M)          (0 < β < 1)
    β = 0 → KL(Q ‖ P),   β = 1 → KL(P ‖ Q).

Gradients are expressed through ``w_a = p_a · ∂D/∂p_a`` (the "weighted score" of an atom):

    0 < β < 1 :  w_a = (1 − β) · p_a · (log p_a − log m_a)
    β = 0     :  w_a = −q_a
    β = 1     :  w_a = p_a · (log p_a − log q_a + 1)

When the atoms are a softmax of logits z (p = softmax(z)), ∂D/∂z_v = w_v − p_v · Σ_a w_a.

The forms, each written once:

- the logit transform z = cap_c(s·a)/τ, out of place and differentiable: ``transform_logits`` (the
  reference and the trainer's sampling use it; the PyTorch backend's in-place, cache-blocked
  ``backends/torch/_blocks.py::to_logits_`` and the kernels' ``to_logits`` compute the same z).
- value and weighted score per atom, log-add-exp form: ``jsd_pointwise`` (top-K atoms; full rows
  near β = 0 or 1). Its Triton twin is ``backends/triton/rowmath.py``.
- the same for full rows from the probabilities (0.001 ≤ β ≤ 0.999): ``jsd_scores_`` (log m =
  log(lerp(p, q, β)) beside log p and log q of the same rounded probabilities, so that p = q gives exactly
  0), chosen by ``mixture_from_probs``.
- the softmax chain rule: ``jsd_grad_logits_``; the Top-K one: ``topk_grad_logits_``.
- the Top-K value and gradient coefficients on a support: ``topk_jsd_terms``.
- the range of a row's value: ``bound_divergence_`` (see its docstring for where it is applied).

Tests tie every backend to ``ptd_kernels.reference``, which is derived independently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._host_reads import free_to_read

TAIL_FLOOR = 1e-12  # floor of a tail atom, in probability (docs/method.md, Top-K JSD)


# ----------------------------------------------------------------------------- the logit transform


def transform_logits(a: torch.Tensor, *, logit_scale: float = 1.0, softcap: float | None = None,
                     temperature: float = 1.0) -> torch.Tensor:
    """The logits z of the pre-activations a = W h + b, out of place (``a`` is never changed) and differentiable:

        z = cap_c(s·a) / τ,   cap_c(x) = c·tanh(x / c)   (``softcap=None``: no cap, z = s·a / τ)

    with s = ``logit_scale``, c = ``softcap``, τ = ``temperature``; computed in ``a``'s dtype, in that order
    (scale, cap, divide); a factor of 1 is skipped (exact either way), so the identity transform returns ``a``
    itself. The callers validate s, c and τ (``ptd_kernels._validate``).
    """
    z = a * logit_scale if logit_scale != 1.0 else a
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature if temperature != 1.0 else z


# ----------------------------------------------------------------------------- the range of a divergence


def divergence_upper_bound(beta: float) -> float:
    """The largest JSD_β of two distributions: the binary entropy h(β) = −β ln β − (1 − β) ln(1 − β) for
    0 < β < 1 (ln 2 at β = ½, reached by disjoint supports); no bound for β = 0 or 1 (a KL divergence)."""
    if beta <= 0.0 or beta >= 1.0:
        return math.inf
    return -beta * math.log(beta) - (1.0 - beta) * math.log1p(-beta)


def bound_divergence_(value: torch.Tensor, beta: float) -> torch.Tensor:
    """A row's complete JSD_β (or Top-K JSD) clamped, in place, into [0, ``divergence_upper_bound(β)``].

    The exact value lies there; the computed one can leave it by rounding (identical sides give ±1e-7 in
    float32). Only the value is clamped: the gradient coefficients stay those of the exact formula. NaN
    stays NaN. Applied where a row's value is complete: ``topk_jsd_terms`` (every Top-K and sparse-teacher
    value) and, for the full JSD, the autograd layer that reads ``Backend.jsd_forward`` / ``fused_loss``
    (a backend's own value may be a partial sum over a vocabulary slice, which a KL may make negative).
    """
    return value.clamp_(0.0, divergence_upper_bound(beta))


# ----------------------------------------------------------------------------- JSD per atom


def jsd_pointwise(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-atom JSD_β contributions ``d`` (summing to D) and weighted scores ``w = p·∂D/∂p``.

    ``logp``/``logq`` must be finite where the result is used (mask invalid atoms before).
    """
    if beta == 0.0:
        q = logq.exp()
        return q * (logq - logp), -q
    if beta == 1.0:
        p = logp.exp()
        log_ratio = logp - logq
        return p * log_ratio, p * (log_ratio + 1.0)
    p = logp.exp()
    q = logq.exp()
    logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
    student_part = p * (logp - logm)
    d = beta * q * (logq - logm) + (1.0 - beta) * student_part
    return d, (1.0 - beta) * student_part


def mixture_from_probs(beta: float) -> bool:
    """Whether full rows may form log m from the probabilities (``log_mixture_``).

    Near β = 0 or 1 the weight of one side is tiny: a float32 lerp rounds it (1 − β at β = 1 − 1e-6
    comes out 1.3 % off) and log p − log m cancels to nothing, so there the log-add-exp form of
    ``jsd_pointwise`` (with log β and log1p(−β) in double) is used, in forward and backward alike.
    """
    return 1e-3 <= beta <= 1.0 - 1e-3


def log_mixture_(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """log m = log(β·q + (1 − β)·p) for 0 < β < 1, floored at the smallest normal float where both p
    and q underflow (their atoms are then 0·finite = 0, as with a log-add-exp)."""
    return torch.lerp(p, q, beta).clamp_min_(torch.finfo(p.dtype).tiny).log_()


def log_of_probs_(out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``out`` ← log(probs), floored like ``log_mixture_``: the log-probs rounded as log m is. Where p = q,
    m = p exactly, so log p − log m is then exactly 0 (identical rows give a divergence of exactly 0, where
    the exact z − lse beside the log of a rounded probability would leave ±1e-7)."""
    return torch.log(probs, out=out).clamp_min_(math.log(torch.finfo(probs.dtype).tiny))


def jsd_scores_(logp: torch.Tensor, logq: torch.Tensor, beta: float, p: torch.Tensor, q: torch.Tensor | None = None,
                *, with_value: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, float]:
    """JSD_β of full rows [n, V] given both sides' log-probs and the student probabilities ``p``.

    Returns (value [n] or None, w_part, scale): the weighted scores are w = scale·w_part, and
    ``w_part`` is written over ``logp`` (``logq`` is overwritten too). ``q`` = exp(logq) when the
    caller has it. The forward, the recomputing backward and the one-sweep loss all call this, so
    that Σ_v (w_v − p_v·Σw) cancels to rounding (one-hot rows). In the mixture form the log-probs
    beside log m are the logs of the same rounded probabilities (``log_of_probs_``).
    """
    if not mixture_from_probs(beta):
        d, w = jsd_pointwise(logp, logq, beta)
        return (d.sum(-1) if with_value else None), logp.copy_(w), 1.0
    if q is None:
        q = logq.exp() if with_value else logq.exp_()
    logm = log_mixture_(p, q, beta)
    teacher_kl = torch.linalg.vecdot(q, log_of_probs_(logq, q).sub_(logm)) if with_value else None
    w_part = log_of_probs_(logp, p).sub_(logm).mul_(p)  # p·(log p − log m): the atoms of KL(P ‖ M)
    value = beta * teacher_kl + (1.0 - beta) * w_part.sum(-1) if with_value else None
    return value, w_part, 1.0 - beta


def jsd_grad_logits_(w_part: torch.Tensor, p: torch.Tensor, w_part_sum: torch.Tensor, scale: float) -> torch.Tensor:
    """∂D/∂z = w − p·Σw = scale·(w_part − p·Σ w_part) (softmax chain rule), written over ``w_part``."""
    w_part.addcmul_(p, w_part_sum[:, None], value=-1.0)
    return w_part if scale == 1.0 else w_part.mul_(scale)


def softmax_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: z ← log softmax(z); returns (p = softmax(z), lse [n]) from one exp per element."""
    row_max = z.amax(-1, keepdim=True)
    z.sub_(row_max)
    p = z.exp()
    p_sum = p.sum(-1, keepdim=True)
    log_sum = p_sum.log()
    z.sub_(log_sum)
    return p.div_(p_sum), (row_max + log_sum).squeeze(-1)


def normalize_(z: torch.Tensor, lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """z ← log p in place, from the given row logsumexps (None: computed here); returns (p, lse)."""
    if lse is None:
        return softmax_(z)
    z.sub_(lse[:, None])
    return z.exp(), lse


@dataclass(frozen=True)
class FullJSDRows:
    value: torch.Tensor  # [n]
    w_sum: torch.Tensor  # Σ_v w_v [n]
    lse: torch.Tensor  # student logsumexp [n]
    teacher_lse: torch.Tensor  # teacher logsumexp [n]
    grad_logits: torch.Tensor | None  # ∂D/∂z [n, V], written over the student logits


def full_jsd_rows_(z: torch.Tensor, teacher_z: torch.Tensor, beta: float, *, grad: bool = True,
                   lse: torch.Tensor | None = None, teacher_lse: torch.Tensor | None = None) -> FullJSDRows:
    """Full-vocabulary JSD_β of rows of logits (1/τ applied), in place: ∂D/∂z (``grad``) is written
    over ``z``; ``teacher_z`` is overwritten too. ``lse``/``teacher_lse``: the rows' logsumexps when
    known (else computed here, from the same exp)."""
    p, lse = normalize_(z, lse)  # z now holds log p
    q, teacher_lse = normalize_(teacher_z, teacher_lse)  # teacher_z now holds log q
    value, w_part, scale = jsd_scores_(z, teacher_z, beta, p, q)
    w_part_sum = w_part.sum(-1)
    grad_logits = jsd_grad_logits_(w_part, p, w_part_sum, scale) if grad else None
    return FullJSDRows(value, scale * w_part_sum, lse, teacher_lse, grad_logits)


def jsd_backward_rows_(z: torch.Tensor, teacher_z: torch.Tensor, beta: float, lse: torch.Tensor,
                       teacher_lse: torch.Tensor, w_sum: torch.Tensor) -> torch.Tensor:
    """∂D/∂z of a block of logits (any columns of the rows; 1/τ applied) from the forward's lse and
    Σw, written over ``z`` (``teacher_z`` is overwritten too)."""
    logp = z.sub_(lse[:, None])
    p = logp.exp()
    _, w_part, scale = jsd_scores_(logp, teacher_z.sub_(teacher_lse[:, None]), beta, p, with_value=False)
    return jsd_grad_logits_(w_part, p, w_sum / scale, scale)


# ----------------------------------------------------------------------------- Top-K JSD


def tail_logprob(log_support_mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the tail atom 1 − Σ_S p, from log Σ_S p, floored at TAIL_FLOOR in probability.

    Returns (log_tail, floored) where ``floored`` marks rows whose tail sits on the floor (the
    tail is then a constant: it carries no gradient).
    """
    tail = -torch.expm1(log_support_mass)
    floored = tail < TAIL_FLOOR
    return tail.clamp_min_(TAIL_FLOOR).log_(), floored  # (a NaN stays NaN)


def masked_logsumexp(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, counting only ``valid`` entries."""
    return torch.logsumexp(values.masked_fill(~valid, -math.inf), dim=-1)


@dataclass(frozen=True)
class TopKJSDTerms:
    """Per-row Top-K JSD value and the coefficients of its gradient w.r.t. the student logits.

    With p = softmax(z) over the full vocabulary:

        ∂D/∂z_v = p_v · row_coef  +  Σ_m [S_m = v] · support_coef_m

    so a backward pass needs one scalar per row for the dense part and a sparse correction on
    the support. For ``tail=False`` the dense part vanishes (``row_coef`` is 0).
    """

    value: torch.Tensor
    row_coef: torch.Tensor
    support_coef: torch.Tensor
    teacher_mass: torch.Tensor


def topk_jsd_terms(
    student_logp: torch.Tensor,
    teacher_logq: torch.Tensor,
    valid: torch.Tensor,
    beta: float,
    tail: bool,
    teacher_log_mass: torch.Tensor | None = None,
) -> TopKJSDTerms:
    """Top-K JSD on a support S given the exact full-vocabulary log-probs at S.

    Args:
        student_logp: [n, M] log p at the support ids (z_S − lse).
        teacher_logq: [n, M] log q at the support ids.
        valid: [n, M] bool, False for padding / duplicate support slots.
        beta: JSD β in [0, 1].
        tail: add the tail atoms (True) or renormalize over S (False).
        teacher_log_mass: optional [n] log Σ_S q when it is known more exactly than from the
            gathered values (a sparse teacher's own log-probs).
    """
    zero = torch.zeros((), dtype=student_logp.dtype, device=student_logp.device)
    # both sides stacked [2, n, M] (and [2, n] per row): each step below is one op for both
    sides = torch.where(valid, torch.stack([student_logp, teacher_logq]), zero)
    logp, logq = sides.unbind()
    if teacher_log_mass is None:
        masses = masked_logsumexp(sides, valid)
    else:
        masses = torch.stack([masked_logsumexp(logp, valid), teacher_log_mass.to(logp.dtype)])
    log_p_mass, log_q_mass = masses.unbind()
    if tail:
        log_tails, floored = tail_logprob(masses)
        # the support's atoms and the tail atom in one row [n, M + 1] of each side
        atoms = torch.cat([sides, log_tails[:, :, None]], dim=-1)
        d_all, w_all = jsd_pointwise(atoms[0], atoms[1], beta)
        size = sides.shape[-1]
        d = torch.where(valid, d_all[:, :size], zero)
        w = torch.where(valid, w_all[:, :size], zero)
        log_p_tail, d_tail = log_tails[0], d_all[:, size]
        # A floored student tail is a constant: it contributes to D but not to the gradient.
        w_tail = torch.where(floored[0], zero, w_all[:, size])
        g_tail = w_tail * torch.exp(-log_p_tail)  # ∂D/∂p_tail
        value = d.sum(-1) + d_tail
        w_sum = w.sum(-1) + w_tail
        # v ∉ S: ∂D/∂z_v = p_v (g_tail − Σw);  v ∈ S: w_v − p_v Σw.
        row_coef = g_tail - w_sum
        support_coef = torch.where(valid, w - logp.exp() * g_tail[:, None], zero)
    else:
        logp_renorm = torch.where(valid, logp - log_p_mass[:, None], zero)
        logq_renorm = torch.where(valid, logq - log_q_mass[:, None], zero)
        d, w = jsd_pointwise(logp_renorm, logq_renorm, beta)
        d = torch.where(valid, d, zero)
        w = torch.where(valid, w, zero)
        value = d.sum(-1)
        w_sum = w.sum(-1)
        row_coef = torch.zeros_like(value)
        support_coef = torch.where(valid, w - logp_renorm.exp() * w_sum[:, None], zero)
    return TopKJSDTerms(bound_divergence_(value, beta), row_coef, support_coef, log_q_mass.exp())


def topk_grad_logits_(p: torch.Tensor, row_coef: torch.Tensor, ids: torch.Tensor,
                      support_coef: torch.Tensor) -> torch.Tensor:
    """∂D/∂z = p·row_coef + the support terms (``TopKJSDTerms``) of full rows, written over ``p``."""
    return p.mul_(row_coef[:, None]).scatter_add_(1, ids, support_coef.to(p.dtype))


@dataclass(frozen=True)
class TopKJSDRows:
    terms: TopKJSDTerms
    ids: torch.Tensor  # [n, M] the support
    lse: torch.Tensor  # [n] student logsumexp
    shifted_exp: torch.Tensor  # [n, V] exp(z − max z), written over z
    shifted_sum: torch.Tensor  # [n] its row sums: p = shifted_exp / shifted_sum


def topk_jsd_rows_(z: torch.Tensor, teacher_z: torch.Tensor, k: int, beta: float, support: str,
                   tail: bool) -> TopKJSDRows:
    """Top-K JSD of full rows of logits (1/τ applied, k < V), with one exp per student logit, which
    is kept (over ``z``) as the dense part of the gradient. The support log-probs are z_S − lse with
    float64 logsumexps of the rows' own logits (so that Σ_S p ≤ 1 holds to rounding however large
    the logits: a rounded lse would shift a whole row)."""
    ids, valid = support_ids(topk_ids(z, k), topk_ids(teacher_z, k), support)
    wide = torch.float64
    teacher_max = teacher_z.amax(-1, keepdim=True)
    teacher_sum = torch.exp(teacher_z - teacher_max).sum(-1, keepdim=True)
    teacher_lse = teacher_max.to(wide) + teacher_sum.to(wide).log()
    teacher_logq = (teacher_z.gather(1, ids).to(wide) - teacher_lse).to(z.dtype)
    row_max = z.amax(-1, keepdim=True)
    student_z = z.gather(1, ids)
    shifted_exp = z.sub_(row_max).exp_()
    shifted_sum = shifted_exp.sum(-1, keepdim=True)
    lse = row_max.to(wide) + shifted_sum.to(wide).log()
    student_logp = (student_z.to(wide) - lse).to(z.dtype)
    terms = topk_jsd_terms(student_logp, teacher_logq, valid, beta, tail)
    return TopKJSDRows(terms, ids, lse.squeeze(-1).to(z.dtype), shifted_exp, shifted_sum.squeeze(-1))


# ----------------------------------------------------------------------------- supports and top-K


def union_support(student_ids: torch.Tensor, teacher_ids: torch.Tensor, *, return_order: bool = False):
    """Deduplicated union of two id sets per row.

    Returns (ids [n, Ks + Kt] sorted ascending, valid [n, Ks + Kt]) where duplicates are
    marked invalid (their slot still holds a real id, so gathers stay in range); with
    ``return_order``, also the permutation of ``cat([student_ids, teacher_ids])`` that sorts it
    (to carry values known for the inputs over to the union). The sort is stable: of an id in both
    sets (each set distinct), the student's copy comes first and is the valid one.
    """
    ids, order = torch.cat([student_ids, teacher_ids], dim=-1).sort(dim=-1, stable=True)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return (ids, valid, order) if return_order else (ids, valid)


def support_ids(student_ids, teacher_ids, support: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The support S (docs/method.md, Top-K JSD) from both sides' top-k ids: (ids [n, M], valid [n, M])."""
    if support == "union":
        return union_support(student_ids, teacher_ids)
    ids = teacher_ids if support == "teacher" else student_ids
    return ids, torch.ones_like(ids, dtype=torch.bool)


def overlap_fraction(ids_a: torch.Tensor, ids_b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """|A ∩ B| / k per row for two [n, k] sets of distinct ids ([n] in ``dtype``)."""
    k = ids_a.shape[-1]
    if k == 0:
        return torch.zeros(ids_a.shape[0], dtype=dtype, device=ids_a.device)
    _, valid = union_support(ids_a, ids_b)
    return overlap_from_union(valid, k, dtype)


def overlap_from_union(valid: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``overlap_fraction`` from the ``valid`` of the two sets' ``union_support``: each duplicate is a
    shared id (k > 0)."""
    return (~valid).sum(-1).to(dtype) / k


def merge_topk(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of [n, m] candidate (values, ids) under the tie rule (larger value, then smaller id):
    exact in any dtype, by two stable sorts (by id, then by value). Returns (values, ids) [n, k]."""
    by_id = ids.argsort(dim=-1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = values.argsort(dim=-1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), ids.gather(1, by_value)


def pack_topk_keys(values: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """int64 keys whose order is (value descending, id ascending): top-K with ties to the smaller id.

    key = (order-preserving int32 bits of the float32 value) << 32 | (2^32 − 1 − id), where the
    ids default to the column index. NaN values sort above +inf (they are propagated, not hidden).
    """
    # "+ 0.0" turns −0.0 into +0.0 so that the two zeros tie (and fall back to the id order).
    bits = (values.to(torch.float32) + 0.0).contiguous().view(torch.int32).to(torch.int64)
    # Negative floats: flip the magnitude bits so that larger floats have larger keys.
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    if ids is None:
        ids = torch.arange(values.shape[-1], device=values.device, dtype=torch.int64)
    return (ordered << 32) | (0xFFFFFFFF - ids)


def _ids_from_keys(keys: torch.Tensor) -> torch.Tensor:
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest logits per row (a bounded block), descending, ties to the smaller id.

    ``torch.topk`` finds the k largest values fast but orders ties arbitrarily; the exact rule
    only matters where ties straddle the k-th place (those rows redo the selection on packed
    keys) and among equal selected values (fixed by sorting the k selected on packed keys). A block
    whose k + 1 largest values are distinct in every row (no NaN) takes torch's order as it is.
    float64 blocks use a stable sort instead (packed keys hold float32 bits, which would merge
    float64 values closer than a float32 ulp). On a device, where that check would wait for the queue,
    one top-k of the packed keys gives the exact ids in order directly. k ≥ V gives all V ids, in that order.
    """
    k = min(k, logits.shape[-1])
    if logits.dtype == torch.float64:
        return torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    if not free_to_read(logits):  # on a device a tie check would wait for the queue: select on packed keys once
        return _ids_from_keys(torch.topk(pack_topk_keys(logits), k, dim=-1).values)  # key order = the tie rule
    # one extra value tells whether a tie straddles the k-th place
    values, ids = torch.topk(logits, min(k + 1, logits.shape[-1]), dim=-1)
    if bool((values[:, :-1] > values[:, 1:]).all()):  # strictly descending: distinct, no NaN — torch's order
        return ids[:, :k]
    if k < logits.shape[-1]:
        ambiguous = values[:, k - 1] == values[:, k]
        values, ids = values[:, :k], ids[:, :k]
    else:
        ambiguous = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    ambiguous |= torch.isnan(values).any(-1)
    if bool(ambiguous.any()):  # a CPU block: redo only the rows that need it
        rows = ambiguous.nonzero().squeeze(-1)
        top = torch.topk(pack_topk_keys(logits[rows]), k, dim=-1).values
        ids[rows] = _ids_from_keys(top)
        values[rows] = logits[rows].gather(1, ids[rows])
    order = torch.sort(pack_topk_keys(values, ids), dim=-1, descending=True).values
    return _ids_from_keys(order)
