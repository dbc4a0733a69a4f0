"""Small per-row math shared by every backend (one source of truth per formula).

Everything here works on small tensors: per-row scalars [n] and per-row atom sets [n, M]
(a top-K support, or a bounded chunk of full vocabulary rows). Nothing here ever sees all N
rows by all V columns at once.

Notation (SPEC §2): P is the student, Q the teacher, atoms a carry log-probabilities
``logp_a`` and ``logq_a``. For β ∈ [0, 1]

    M = β·Q + (1 − β)·P
    JSD_β(P, Q) = β·KL(Q ‖ M) + (1 − β)·KL(P ‖ M)          (0 < β < 1)
    β = 0 → KL(Q ‖ P),   β = 1 → KL(P ‖ Q).

Gradients are expressed through ``w_a = p_a · ∂D/∂p_a`` (the "weighted score" of an atom):

    0 < β < 1 :  w_a = (1 − β) · p_a · (log p_a − log m_a)
    β = 0     :  w_a = −q_a
    β = 1     :  w_a = p_a · (log p_a − log q_a + 1)

When the atoms are a softmax of logits z (p = softmax(z)), ∂D/∂z_v = w_v − p_v · Σ_a w_a.
The Triton kernels implement the same formulas in ``ptd_kernels/triton/_math.py``; tests tie
both to ``ptd_kernels.reference``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

TAIL_FLOOR = 1e-12  # floor of a tail atom, in probability (SPEC §2)


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


def tail_logprob(log_support_mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the tail atom 1 − Σ_S p, from log Σ_S p, floored at TAIL_FLOOR in probability.

    Returns (log_tail, floored) where ``floored`` marks rows whose tail sits on the floor (the
    tail is then a constant: it carries no gradient).
    """
    tail = -torch.expm1(log_support_mass)
    floored = tail < TAIL_FLOOR
    tail = torch.where(floored, torch.full_like(tail, TAIL_FLOOR), tail)
    return tail.log(), floored


def masked_logsumexp(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, counting only ``valid`` entries."""
    return torch.logsumexp(values.masked_fill(~valid, -math.inf), dim=-1)


class TopKJSDTerms:
    """Per-row Top-K JSD value and the coefficients of its gradient w.r.t. the student logits.

    With p = softmax(z) over the full vocabulary:

        ∂D/∂z_v = p_v · row_coef  +  Σ_m [S_m = v] · support_coef_m

    so a backward pass needs one scalar per row for the dense part and a sparse correction on
    the support. For ``tail=False`` the dense part vanishes (``row_coef`` is 0).
    """

    __slots__ = ("value", "row_coef", "support_coef", "teacher_mass")

    def __init__(self, value, row_coef, support_coef, teacher_mass):
        self.value = value
        self.row_coef = row_coef
        self.support_coef = support_coef
        self.teacher_mass = teacher_mass


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
            gathered values (unused by the dense paths; kept for sparse teachers).
    """
    zero = torch.zeros((), dtype=student_logp.dtype, device=student_logp.device)
    logp = torch.where(valid, student_logp, zero)
    logq = torch.where(valid, teacher_logq, zero)
    log_p_mass = masked_logsumexp(logp, valid)
    log_q_mass = masked_logsumexp(logq, valid) if teacher_log_mass is None else teacher_log_mass
    if tail:
        d, w = jsd_pointwise(logp, logq, beta)
        d = torch.where(valid, d, zero)
        w = torch.where(valid, w, zero)
        log_p_tail, p_floored = tail_logprob(log_p_mass)
        log_q_tail, _ = tail_logprob(log_q_mass)
        d_tail, w_tail = jsd_pointwise(log_p_tail, log_q_tail, beta)
        # A floored student tail is a constant: it contributes to D but not to the gradient.
        w_tail = torch.where(p_floored, zero, w_tail)
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
    return TopKJSDTerms(value, row_coef, support_coef, log_q_mass.exp())


def full_jsd_terms(
    logp: torch.Tensor, logq: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-vocabulary JSD over rows of log-probs [n, V].

    Returns (value [n], grad_logits [n, V]) where grad_logits = ∂D/∂z = w − p·Σw, and the
    per-row Σw [n] (the Triton path streams it instead of keeping [n, V]).

    The same formulas as ``jsd_pointwise``, arranged for whole rows: the row sums are taken
    from the two KL parts directly and p is computed once, so a block costs ~12 elementwise
    passes instead of ~18 (this is the inner loop of the CPU loss, see ``_torch_path``).
    """
    if beta == 0.0 or beta == 1.0:
        d, w = jsd_pointwise(logp, logq, beta)
        value = d.sum(-1)
        p = logp.exp()
    else:
        p = logp.exp()
        q = logq.exp()
        logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
        teacher_kl = torch.linalg.vecdot(q, logq - logm)
        w = (logp - logm).mul_(p)  # p·(log p − log m): the atoms of KL(P ‖ M)
        value = beta * teacher_kl + (1.0 - beta) * w.sum(-1)
        w.mul_(1.0 - beta)
    w_sum = w.sum(-1)
    grad_logits = w.addcmul_(p, w_sum[:, None], value=-1.0)
    return value, grad_logits, w_sum


def _softmax_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: z ← log softmax(z) (log_softmax's arithmetic); returns (p = softmax(z), lse [n]), one exp."""
    row_max = z.amax(-1, keepdim=True)
    z.sub_(row_max)
    p = z.exp()
    p_sum = p.sum(-1, keepdim=True)
    log_sum = p_sum.log()
    z.sub_(log_sum)
    return p.div_(p_sum), (row_max + log_sum).squeeze(-1)


def mixture_from_probs(beta: float) -> bool:
    """Whether the CPU JSD may form log m from the probabilities (``log_mixture_``).

    Near β = 0 or 1 the weight of one side is tiny: a float32 lerp rounds it (1 − β at β = 1 − 1e-6
    comes out 1.3 % off) and log p − log m cancels to nothing, so there the log-add-exp form of
    ``jsd_pointwise`` (with log β and log1p(−β) in double) is used, in forward and backward alike.
    """
    return 1e-3 <= beta <= 1.0 - 1e-3


def log_mixture_(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """log m = log(β·q + (1 − β)·p) for 0 < β < 1, floored at the smallest normal float where both
    p and q underflow (their atoms are then 0·finite = 0, as with a log-add-exp). Overwrites nothing;
    the forward and the recomputing backward of the CPU JSD must use this same expression, so that
    Σ_v (w_v − p_v·Σw) cancels to rounding (one-hot rows)."""
    return torch.lerp(p, q, beta).clamp_min_(torch.finfo(p.dtype).tiny).log_()


class FullJSDRows(NamedTuple):
    value: torch.Tensor  # [n]
    grad_logits: torch.Tensor | None  # ∂D/∂z [n, V], written over the student logits
    w_sum: torch.Tensor  # Σ_v w_v [n]
    lse: torch.Tensor  # student logsumexp [n]
    teacher_lse: torch.Tensor  # teacher logsumexp [n]


def full_jsd_from_logits_(z: torch.Tensor, teacher_z: torch.Tensor, beta: float, *, grad: bool = True) -> FullJSDRows:
    """``full_jsd_terms`` of rows of logits, in place: ∂D/∂z is written over z (``teacher_z`` is
    overwritten too), with both logsumexps.

    For 0 < β < 1 one exp per logit and side and one log per atom (``log_mixture_``) instead of
    log_softmax + exp + logaddexp (about 3× the transcendental work; this is the inner loop of the
    CPU JSD, see ``_torch_path``).
    """
    if not mixture_from_probs(beta):
        lse, teacher_lse = torch.logsumexp(z, -1), torch.logsumexp(teacher_z, -1)
        value, grad_logits, w_sum = full_jsd_terms(torch.log_softmax(z, -1), torch.log_softmax(teacher_z, -1), beta)
        return FullJSDRows(value, z.copy_(grad_logits) if grad else None, w_sum, lse, teacher_lse)
    p, lse = _softmax_(z)  # z now holds log p
    q, teacher_lse = _softmax_(teacher_z)  # teacher_z now holds log q
    logm = log_mixture_(p, q, beta)
    teacher_kl = torch.linalg.vecdot(q, teacher_z.sub_(logm))
    w = z.sub_(logm).mul_(p)  # p·(log p − log m): the atoms of KL(P ‖ M)
    student_kl = w.sum(-1)
    value = beta * teacher_kl + (1.0 - beta) * student_kl
    w_sum = (1.0 - beta) * student_kl
    # ∂D/∂z = w − p·Σw with w = (1 − β)·p·(log p − log m)
    grad_logits = w.addcmul_(p, student_kl[:, None], value=-1.0).mul_(1.0 - beta) if grad else None
    return FullJSDRows(value, grad_logits, w_sum, lse, teacher_lse)


def union_support(student_ids: torch.Tensor, teacher_ids: torch.Tensor, *, return_order: bool = False):
    """Deduplicated union of two id sets per row.

    Returns (ids [n, Ks + Kt] sorted ascending, valid [n, Ks + Kt]) where duplicates are
    marked invalid (their slot still holds a real id, so gathers stay in range); with
    ``return_order``, also the permutation of ``cat([student_ids, teacher_ids])`` that sorts it
    (to carry values known for the inputs over to the union).
    """
    ids, order = torch.cat([student_ids, teacher_ids], dim=-1).sort(dim=-1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return (ids, valid, order) if return_order else (ids, valid)


def support_ids(student_ids, teacher_ids, support: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The support S of SPEC §2 from both sides' top-k ids: (ids [n, M], valid [n, M])."""
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
    duplicates = (~valid).sum(-1)
    return duplicates.to(dtype) / k


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
    keys) and among equal selected values (fixed by sorting the k selected on packed keys).
    float64 blocks use a stable sort instead (packed keys hold float32 bits, which would merge
    float64 values closer than a float32 ulp).
    """
    if logits.dtype == torch.float64:
        return torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    if k < logits.shape[-1]:  # one extra value tells whether a tie straddles the k-th place
        values, ids = torch.topk(logits, k + 1, dim=-1)
        ambiguous = values[:, k - 1] == values[:, k]
        values, ids = values[:, :k], ids[:, :k]
    else:
        values, ids = torch.topk(logits, k, dim=-1)
        ambiguous = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    ambiguous |= torch.isnan(values).any(-1)
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(-1)
        top = torch.topk(pack_topk_keys(logits[rows]), k, dim=-1).values
        ids[rows] = _ids_from_keys(top)
        values[rows] = logits[rows].gather(1, ids[rows])
    order = torch.sort(pack_topk_keys(values, ids), dim=-1, descending=True).values
    return _ids_from_keys(order)
