"""The oracle: every public function (docs/api.md) written the obvious way.

Logits are materialized in full ([N, V]), probabilities come from ``log_softmax`` and top-K
from a stable descending sort (ties to the smaller id), and gradients come from autograd.
Slow and memory-hungry on purpose; float64-capable (float64 inputs compute in float64, all
other dtypes in float32). The divergence formulas here are written independently of
``ptd_kernels.rowmath`` so that the tests that tie every backend to this module compare two
separate derivations; only the logit transform comes from there (``rowmath.transform_logits``, its one
out-of-place definition, which the backends' in-place and in-kernel versions are tested against).

Outputs are float32 per-row tensors (float64 for float64 inputs). ``backend`` is accepted for
signature parity and ignored.
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import kl_div

from . import _validate as validate
from ._types import PTDTerms, TopK
from .rowmath import transform_logits

TAIL_FLOOR = 1e-12

__all__ = [
    "linear_logprobs",
    "linear_topk",
    "linear_topk_jsd",
    "linear_sparse_jsd",
    "linear_jsd",
    "linear_ptd_terms",
    "linear_jsd_loss",
    "linear_topk_jsd_loss",
    "linear_policy_loss",
    "linear_logprobs_at",
    "logprobs",
    "jsd",
    "topk_jsd",
    "topk_overlap",
]


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _logits(hidden, weight, bias, temperature, dtype, logit_scale=1.0, softcap=None):
    """z = cap_c(s · (hidden @ weightᵀ + bias)) / τ, cap_c(x) = c · tanh(x / c) (docs/method.md §2), the
    transform by ``rowmath.transform_logits``, its one definition."""
    a = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        a = a + bias.to(dtype)
    return transform_logits(a, logit_scale=logit_scale, softcap=softcap, temperature=temperature)


def _check_transform(logit_scale, softcap, prefix=""):
    return (validate.check_logit_scale(prefix + "logit_scale", logit_scale),
            validate.check_softcap(prefix + "softcap", softcap))


def _scatter_rows(values: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Put per-live-row values back into an [N, ...] tensor of zeros (differentiably)."""
    out = values.new_zeros((live.shape[0],) + tuple(values.shape[1:]))
    return out.index_put((live.nonzero().squeeze(-1),), values)


def _topk_mask(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids (descending, ties to the smaller id) and the same set as a dense bool mask."""
    ids = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
    return ids, mask


def _generalized_jsd(logp, logq, beta, valid=None):
    """Σ over the last dim of the generalized JSD terms; entries where ``valid`` is False are skipped.

    β = 0: KL(Q‖P); β = 1: KL(P‖Q); else β·KL(Q‖M) + (1−β)·KL(P‖M), M = βQ + (1−β)P.
    """
    if valid is not None:  # keep the skipped entries finite so no NaN leaks through where()
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        logq = torch.where(valid, logq, torch.zeros_like(logq))
    if beta == 0.0:
        terms = kl_div(logp, logq, reduction="none", log_target=True)
    elif beta == 1.0:
        terms = kl_div(logq, logp, reduction="none", log_target=True)
    else:
        log_mix = torch.logsumexp(torch.stack([logq + math.log(beta), logp + math.log(1.0 - beta)]), dim=0)
        terms = beta * kl_div(log_mix, logq, reduction="none", log_target=True) + (1.0 - beta) * kl_div(
            log_mix, logp, reduction="none", log_target=True
        )
    if valid is not None:
        terms = torch.where(valid, terms, torch.zeros_like(terms))
    value = terms.sum(-1)
    # A divergence lies in [0, h(β)] (h the binary entropy; no upper bound for a KL), the library's
    # contract too: the value is clamped there, its gradient stays the formula's.
    upper = math.inf if beta in (0.0, 1.0) else -beta * math.log(beta) - (1.0 - beta) * math.log(1.0 - beta)
    exact = value.detach()
    return torch.where(exact.isfinite(), value + (exact.clamp(0.0, upper) - exact), value)


def _log_tail(log_support_mass):
    """log(1 − Σ_S p) from log Σ_S p, floored at 1e-12 in probability."""
    return torch.log(torch.clamp(-torch.expm1(log_support_mass), min=TAIL_FLOOR))


def _support_jsd(logp, logq, in_support, beta, tail, log_q_mass=None):
    """Top-K JSD of two full log-prob rows [n, V] coarse-grained onto ``in_support`` [n, V]."""
    neg_inf = torch.full_like(logp, -math.inf)
    log_p_mass = torch.logsumexp(torch.where(in_support, logp, neg_inf), dim=-1)
    if log_q_mass is None:
        log_q_mass = torch.logsumexp(torch.where(in_support, logq, neg_inf), dim=-1)
    if tail:
        atoms_p = torch.cat([logp, _log_tail(log_p_mass)[:, None]], dim=-1)
        atoms_q = torch.cat([logq, _log_tail(log_q_mass)[:, None]], dim=-1)
        valid = torch.cat([in_support, torch.ones_like(in_support[:, :1])], dim=-1)
        return _generalized_jsd(atoms_p, atoms_q, beta, valid)
    return _generalized_jsd(logp - log_p_mass[:, None], logq - log_q_mass[:, None], beta, in_support)






# ----------------------------------------------------------------------------- logits level


def logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, with_entropy=False, backend="auto"):
    """log p(target) [N] (and the entropy H(p) [N]) of softmax(logits / τ); 0 at ignored rows."""
    validate.check_backend(backend)
    n, vocab = validate.check_logits("logits", logits)
    temperature = validate.check_temperature(temperature)
    targets = validate.check_targets(targets, n, vocab, ignore_index, logits.device)
    live = validate.row_mask(n, logits.device, targets, ignore_index)
    dtype = _compute_dtype(logits)
    z = logits[live].to(dtype) / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    logp = log_probs.gather(1, targets[live].long()[:, None]).squeeze(1)
    logp = _scatter_rows(logp, live)
    if not with_entropy:
        return logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, _scatter_rows(entropy, live)


def jsd(logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, backend="auto"):
    """Full-vocabulary JSD_β(softmax(logits/τ), softmax(teacher_logits/τ)) per row [N]."""
    validate.check_backend(backend)
    n, vocab = validate.check_logits_pair(logits, teacher_logits)
    beta, temperature = validate.check_beta(beta), validate.check_temperature(temperature)
    validate.check_mask("mask", mask, n, logits.device)
    live = validate.row_mask(n, logits.device, mask=mask)
    dtype = _compute_dtype(logits, teacher_logits)
    logp = torch.log_softmax(logits[live].to(dtype) / temperature, dim=-1)
    logq = torch.log_softmax(teacher_logits[live].detach().to(dtype) / temperature, dim=-1)
    return _scatter_rows(_generalized_jsd(logp, logq, beta), live)


def _support_mask(z, teacher_z, k, support):
    k = min(k, z.shape[-1])
    student_ids, student_mask = _topk_mask(z, k)
    teacher_ids, teacher_mask = _topk_mask(teacher_z, k)
    in_support = {"union": student_mask | teacher_mask, "teacher": teacher_mask, "student": student_mask}[support]
    overlap = (student_mask & teacher_mask).sum(-1).to(z.dtype) / k
    return in_support, overlap


def _topk_jsd_rows(z, teacher_z, k, beta, support, tail):
    in_support, overlap = _support_mask(z, teacher_z, k, support)
    logp = torch.log_softmax(z, dim=-1)
    logq = torch.log_softmax(teacher_z, dim=-1)
    value = _support_jsd(logp, logq, in_support, beta, tail)
    teacher_mass = torch.where(in_support, logq.exp(), torch.zeros_like(logq)).sum(-1)
    return value, overlap, teacher_mass


def topk_jsd(logits, teacher_logits, k, *, beta=0.5, support="union", tail=True, temperature=1.0, mask=None,
             backend="auto"):
    """Top-K JSD with tail compensation (docs/method.md §2) per row [N], on given logits."""
    validate.check_backend(backend)
    n, vocab = validate.check_logits_pair(logits, teacher_logits)
    k, beta, support = validate.check_k(k), validate.check_beta(beta), validate.check_support(support)
    temperature = validate.check_temperature(temperature)
    validate.check_mask("mask", mask, n, logits.device)
    live = validate.row_mask(n, logits.device, mask=mask)
    dtype = _compute_dtype(logits, teacher_logits)
    z = logits[live].to(dtype) / temperature
    teacher_z = teacher_logits[live].detach().to(dtype) / temperature
    value, _, _ = _topk_jsd_rows(z, teacher_z, k, beta, support, tail)
    return _scatter_rows(value, live)


def topk_overlap(indices_a, indices_b, *, backend="auto"):
    """|A ∩ B| / k per row for two [N, k] id sets (float32 [N])."""
    validate.check_backend(backend)
    if not isinstance(indices_a, torch.Tensor) or not isinstance(indices_b, torch.Tensor):
        raise TypeError("indices_a and indices_b must be tensors")
    if indices_a.dim() != 2 or indices_a.shape != indices_b.shape:
        raise ValueError(
            f"indices_a {tuple(indices_a.shape)} and indices_b {tuple(indices_b.shape)} must be equal [N, k] shapes"
        )
    for name, t in (("indices_a", indices_a), ("indices_b", indices_b)):
        if bool((t[:, :, None] == t[:, None, :]).sum((-1, -2)).gt(t.shape[1]).any()):
            raise ValueError(f"{name} repeats an id within a row: the overlap is defined for sets of distinct ids")
    hits = (indices_a[:, :, None] == indices_b[:, None, :]).any(-1).sum(-1)
    return hits.to(torch.float32) / max(indices_a.shape[1], 1)


# ----------------------------------------------------------------------------- output-layer level


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100, with_entropy=False,
                    logit_scale=1.0, softcap=None, backend="auto"):
    """log p(target) (and entropy) of softmax((hidden @ weight.T + bias) / τ), materializing logits."""
    validate.check_backend(backend)
    n, vocab, temperature = validate.check_student(hidden, weight, bias, temperature)
    targets = validate.check_targets(targets, n, vocab, ignore_index, hidden.device)
    live = validate.row_mask(n, hidden.device, targets, ignore_index)
    dtype = _compute_dtype(hidden)
    z = _logits(hidden[live], weight, bias, temperature, dtype, *_check_transform(logit_scale, softcap))
    log_probs = torch.log_softmax(z, dim=-1)
    logp = _scatter_rows(log_probs.gather(1, targets[live].long()[:, None]).squeeze(1), live)
    if not with_entropy:
        return logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, _scatter_rows(entropy, live)


@torch.no_grad()
def linear_topk(hidden, weight, k, *, bias=None, temperature=1.0, targets=None, ignore_index=-100, logit_scale=1.0,
                softcap=None, backend="auto"):
    """Top-k ids, their log-probs, the row logsumexp and the targets' log-probs. No gradient."""
    validate.check_backend(backend)
    n, vocab, temperature = validate.check_student(hidden, weight, bias, temperature)
    k = validate.check_k(k)
    if k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
    if targets is not None:
        targets = validate.check_targets(targets, n, vocab, ignore_index, hidden.device)
    dtype = _compute_dtype(hidden)
    z = _logits(hidden, weight, bias, temperature, dtype, *_check_transform(logit_scale, softcap))
    lse = torch.logsumexp(z, dim=-1)
    ids = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k]
    logprobs_k = z.gather(1, ids) - lse[:, None]
    target_logprobs = None
    if targets is not None:
        live = targets != ignore_index
        safe = torch.where(live, targets.long(), torch.zeros_like(targets.long()))
        target_logprobs = torch.where(live, z.gather(1, safe[:, None]).squeeze(1) - lse, torch.zeros_like(lse))
    return TopK(ids, logprobs_k, lse, target_logprobs)


def _student_teacher_logits(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, live,
                            transforms):
    """Both sides' logits of the live rows; ``transforms`` = (s, c, s', c'), each side its own."""
    logit_scale, softcap, teacher_logit_scale, teacher_softcap = transforms
    dtype = _compute_dtype(hidden, teacher_hidden)
    z = _logits(hidden[live], weight, bias, temperature, dtype, logit_scale, softcap)
    with torch.no_grad():
        teacher_z = _logits(teacher_hidden[live], teacher_weight, teacher_bias, temperature, dtype,
                            teacher_logit_scale, teacher_softcap)
    return z, teacher_z


def _check_transforms(logit_scale, softcap, teacher_logit_scale, teacher_softcap):
    return (*_check_transform(logit_scale, softcap), *_check_transform(teacher_logit_scale, teacher_softcap,
                                                                        "teacher_"))


def linear_jsd(hidden, weight, teacher_hidden, teacher_weight, *, beta=0.5, bias=None, teacher_bias=None,
               temperature=1.0, mask=None, logit_scale=1.0, softcap=None, teacher_logit_scale=1.0,
               teacher_softcap=None, backend="auto"):
    """Full-vocabulary JSD_β between the student and the (detached) teacher output layers, per row."""
    validate.check_backend(backend)
    n, vocab, temperature = validate.check_student(hidden, weight, bias, temperature)
    validate.check_teacher(hidden, vocab, teacher_hidden, teacher_weight, teacher_bias)
    beta = validate.check_beta(beta)
    validate.check_mask("mask", mask, n, hidden.device)
    live = validate.row_mask(n, hidden.device, mask=mask)
    z, teacher_z = _student_teacher_logits(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                           temperature, live, _check_transforms(logit_scale, softcap,
                                                                                teacher_logit_scale, teacher_softcap))
    value = _generalized_jsd(torch.log_softmax(z, -1), torch.log_softmax(teacher_z, -1), beta)
    return _scatter_rows(value, live)


def linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union", tail=True,
                    bias=None, teacher_bias=None, temperature=1.0, mask=None, logit_scale=1.0, softcap=None,
                    teacher_logit_scale=1.0, teacher_softcap=None, backend="auto"):
    """Top-K JSD with tail compensation between the student and the (detached) teacher, per row."""
    validate.check_backend(backend)
    n, vocab, temperature = validate.check_student(hidden, weight, bias, temperature)
    validate.check_teacher(hidden, vocab, teacher_hidden, teacher_weight, teacher_bias)
    k, beta, support = validate.check_k(k), validate.check_beta(beta), validate.check_support(support)
    validate.check_mask("mask", mask, n, hidden.device)
    live = validate.row_mask(n, hidden.device, mask=mask)
    z, teacher_z = _student_teacher_logits(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                           temperature, live, _check_transforms(logit_scale, softcap,
                                                                                teacher_logit_scale, teacher_softcap))
    value, _, _ = _topk_jsd_rows(z, teacher_z, k, beta, support, tail)
    return _scatter_rows(value, live)


def linear_sparse_jsd(hidden, weight, teacher_indices, teacher_logprobs, *, beta=0.5, tail=True, bias=None,
                      temperature=1.0, mask=None, logit_scale=1.0, softcap=None, backend="auto"):
    """Top-K JSD against a sparse teacher given as its top-K ids and log-probs (support = those ids)."""
    validate.check_backend(backend)
    n, vocab, temperature = validate.check_student(hidden, weight, bias, temperature)
    validate.check_sparse_teacher(teacher_indices, teacher_logprobs, n, vocab, hidden.device)
    beta = validate.check_beta(beta)
    validate.check_mask("mask", mask, n, hidden.device)
    live = validate.row_mask(n, hidden.device, mask=mask)
    dtype = _compute_dtype(hidden)
    z = _logits(hidden[live], weight, bias, temperature, dtype, *_check_transform(logit_scale, softcap))
    ids = teacher_indices[live].long()
    given = teacher_logprobs[live].detach().to(dtype)
    in_support = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
    logq = torch.zeros_like(z).scatter_(1, ids, given)
    log_q_mass = torch.logsumexp(given, dim=-1)
    value = _support_jsd(torch.log_softmax(z, -1), logq, in_support, beta, tail, log_q_mass=log_q_mass)
    return _scatter_rows(value, live)


def linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union",
                     tail=True, bias=None, teacher_bias=None, temperature=1.0, ignore_index=-100, mask=None,
                     jsd_mask=None, logit_scale=1.0, softcap=None, teacher_logit_scale=1.0, teacher_softcap=None,
                     backend="auto"):
    """(logp, entropy, jsd, overlap) per row, plus ``teacher_mass`` (Σ_S q) as an attribute.

    Rows with target == ignore_index or mask False: every output 0. Rows with jsd_mask False:
    jsd, overlap and teacher_mass are 0 and the teacher rows are not read.
    """
    validate.check_backend(backend)
    n, vocab, temperature = validate.check_student(hidden, weight, bias, temperature)
    validate.check_teacher(hidden, vocab, teacher_hidden, teacher_weight, teacher_bias)
    k, beta, support = validate.check_k(k), validate.check_beta(beta), validate.check_support(support)
    targets = validate.check_targets(targets, n, vocab, ignore_index, hidden.device)
    validate.check_mask("mask", mask, n, hidden.device)
    validate.check_mask("jsd_mask", jsd_mask, n, hidden.device)
    live = validate.row_mask(n, hidden.device, targets, ignore_index, mask)
    logp, entropy = linear_logprobs(hidden, weight, torch.where(live, targets, ignore_index), bias=bias,
                                    temperature=temperature, ignore_index=ignore_index, with_entropy=True,
                                    logit_scale=logit_scale, softcap=softcap)
    jsd_live = live if jsd_mask is None else live & jsd_mask
    z, teacher_z = _student_teacher_logits(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                           temperature, jsd_live, _check_transforms(logit_scale, softcap,
                                                                                    teacher_logit_scale,
                                                                                    teacher_softcap))
    value, overlap, teacher_mass = _topk_jsd_rows(z, teacher_z, k, beta, support, tail)
    return PTDTerms.build(logp, entropy, _scatter_rows(value, jsd_live), _scatter_rows(overlap.detach(), jsd_live),
                          _scatter_rows(teacher_mass.detach(), jsd_live))


def _weighted_sum(per_row, live, weights):
    if weights is None:
        count = int(live.sum())
        return per_row.sum() / max(count, 1)
    return (per_row * torch.where(live, weights.to(per_row.dtype), torch.zeros_like(per_row))).sum()


def linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, *, beta=0.5, bias=None, teacher_bias=None,
                    temperature=1.0, mask=None, weights=None, logit_scale=1.0, softcap=None, teacher_logit_scale=1.0,
                    teacher_softcap=None, backend="auto"):
    """Σ_n weights_n · JSD_n (default weights: 1 / number of unmasked rows)."""
    per_row = linear_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=beta, bias=bias,
                         teacher_bias=teacher_bias, temperature=temperature, mask=mask, logit_scale=logit_scale,
                         softcap=softcap, teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)
    validate.check_weights(weights, hidden.shape[0], hidden.device)
    return _weighted_sum(per_row, validate.row_mask(hidden.shape[0], hidden.device, mask=mask), weights)


def linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union", tail=True,
                         bias=None, teacher_bias=None, temperature=1.0, mask=None, weights=None, logit_scale=1.0,
                         softcap=None, teacher_logit_scale=1.0, teacher_softcap=None, backend="auto"):
    """Σ_n weights_n · D_K,n (default weights: 1 / number of unmasked rows)."""
    per_row = linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, beta=beta, support=support,
                              tail=tail, bias=bias, teacher_bias=teacher_bias, temperature=temperature, mask=mask,
                              logit_scale=logit_scale, softcap=softcap, teacher_logit_scale=teacher_logit_scale,
                              teacher_softcap=teacher_softcap)
    validate.check_weights(weights, hidden.shape[0], hidden.device)
    return _weighted_sum(per_row, validate.row_mask(hidden.shape[0], hidden.device, mask=mask), weights)


def linear_policy_loss(hidden, weight, targets, teacher_hidden=None, teacher_weight=None, k=None, *, row_loss,
                       beta=0.5, support="union", tail=True, bias=None, teacher_bias=None, temperature=1.0,
                       ignore_index=-100, mask=None, jsd_mask=None, logit_scale=1.0, softcap=None,
                       teacher_logit_scale=1.0, teacher_softcap=None, backend="auto", return_terms=False):
    """Σ_n loss_n over the live rows of a per-row loss of (logp, entropy, D_K): ``linear_ptd_terms`` (or, without
    a teacher, ``linear_logprobs``) and the loss (a ``PolicyLoss`` or a callable) differentiated by autograd."""
    from .policy_loss import PolicyLoss

    validate.check_backend(backend)
    n, vocab, temperature = validate.check_student(hidden, weight, bias, temperature)
    targets = validate.check_targets(targets, n, vocab, ignore_index, hidden.device)
    validate.check_mask("mask", mask, n, hidden.device)
    live = validate.row_mask(n, hidden.device, targets, ignore_index, mask)
    if teacher_hidden is None:
        logp, entropy = linear_logprobs(hidden, weight, torch.where(live, targets, ignore_index), bias=bias,
                                        temperature=temperature, ignore_index=ignore_index, with_entropy=True,
                                        logit_scale=logit_scale, softcap=softcap)
        zeros = torch.zeros_like(logp)
        terms = PTDTerms.build(logp, entropy, zeros, zeros, zeros)
        tokens = 0.0
    else:
        terms = linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, k, beta=beta, support=support,
                                 tail=tail, bias=bias, teacher_bias=teacher_bias, temperature=temperature,
                                 ignore_index=ignore_index, mask=mask, jsd_mask=jsd_mask, logit_scale=logit_scale,
                                 softcap=softcap, teacher_logit_scale=teacher_logit_scale,
                                 teacher_softcap=teacher_softcap)
        tokens = float((live if jsd_mask is None else live & jsd_mask).sum())
    if isinstance(row_loss, PolicyLoss):
        row_loss = row_loss.checked(n, hidden.device)
        count = max(float(live.sum()), 1.0)
        row_loss = row_loss.resolved(live.to(terms.logp.dtype) / count, torch.tensor(tokens, dtype=terms.logp.dtype))
    losses = row_loss(terms.logp, terms.entropy, terms.jsd)
    total = torch.where(live, losses, torch.zeros_like(losses)).sum()
    if not return_terms:
        return total
    return total, PTDTerms.build(*(t.detach() for t in (*terms, terms.teacher_mass)))


def linear_logprobs_at(hidden, weight, ids, *, bias=None, temperature=1.0, mask=None, logit_scale=1.0, softcap=None,
                       with_entropy=False, backend="auto"):
    """log p at ``ids`` [N, M] (and the entropy [N]) of softmax((hidden @ weight.T + bias) / τ); 0 at masked rows."""
    validate.check_backend(backend)
    n, vocab, temperature = validate.check_student(hidden, weight, bias, temperature)
    validate.check_mask("mask", mask, n, hidden.device)
    live = validate.row_mask(n, hidden.device, mask=mask)
    dtype = _compute_dtype(hidden)
    z = _logits(hidden[live], weight, bias, temperature, dtype, *_check_transform(logit_scale, softcap))
    log_probs = torch.log_softmax(z, dim=-1)
    out = _scatter_rows(log_probs.gather(1, ids[live].long()), live)
    if not with_entropy:
        return out
    return out, _scatter_rows(-(log_probs.exp() * log_probs).sum(-1), live)
