"""The fused functions (docs/api.md): each is one prepared call (``_prepare.prepared``: arguments checked,
backend selected, vocabulary parallelism set up) run by the autograd layer (``autograd.linear``).

None of them allocates a tokens×vocabulary tensor: the logits exist only as bounded tiles or
blocks, recomputed in the backward pass.

Logits: z = cap_c(s · (hidden @ weightᵀ + bias)) / τ per side (``logit_scale`` s, ``softcap`` c;
the teacher's own ``teacher_logit_scale`` and ``teacher_softcap``, never inherited).

Autocast: under ``torch.autocast`` the output-layer operands (hidden, weight, bias, and the
teacher's) are cast to the autocast dtype, as ``nn.Linear``'s are — so bf16 activations with an
fp32 output layer work, and gradients reach the fp32 parameters in fp32 — while the logits and all
divergence math stay in float32 (float64 for float64 inputs) and the outputs are float32.
"""

from __future__ import annotations

from ._prepare import prepared
from ._types import PTDTerms
from .autograd.linear import divergence, full_jsd, logprobs_at, sparse_jsd, sweep, topk, weighted_loss
from .autograd.policy import policy_loss

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
]


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100, with_entropy=False,
                    logit_scale=1.0, softcap=None, process_group=None, backend="auto"):
    """log p(target) per row — and the exact entropy H(p) with ``with_entropy=True`` — of
    p = softmax(cap_c(s·(hidden @ weight.T + bias)) / temperature), without materializing the logits.

    Args:
        hidden: [N, H] float (fp32/bf16/fp16/fp64). weight: [V, H], bias: [V] or None, same dtype.
        targets: [N] integer ids in [0, V), or ``ignore_index`` for rows that yield 0.
        logit_scale, softcap: s and c (``softcap=None``: no tanh).
        process_group: vocabulary-parallel output layer (weight and bias: this rank's slice).
    Returns:
        logp [N] (float32; float64 for float64 inputs), or (logp, entropy).
    Differentiable w.r.t. hidden, weight and bias.
    """
    with prepared("linear_logprobs", locals()) as call:
        results = sweep(call)
    return (results.logp, results.entropy) if call.with_entropy else results.logp



def linear_logprobs_at(hidden, weight, ids, *, bias=None, temperature=1.0, mask=None, with_entropy=False,
                       logit_scale=1.0, softcap=None, process_group=None, backend="auto"):
    """log p at given ids per row, [N, M] — and the exact entropy H(p) [N] with ``with_entropy=True`` — of
    p = softmax(cap_c(s·(hidden @ weight.T + bias)) / temperature), without materializing the logits.

    ``ids`` [N, M]: integer ids in [0, V) (a row may repeat one). Rows with ``mask`` False give 0. One
    forward sweep (the rows' logsumexps) and a gather of the logits at the ids; the backward is one sweep
    with the ids' coefficients as sparse terms: one d weight, however many ids. Differentiable w.r.t.
    hidden, weight and bias. Returns log-probs [N, M] (float32; float64 for float64 inputs), or
    (log-probs, entropy).
    """
    with prepared("linear_logprobs_at", locals()) as call:
        logp, entropy = logprobs_at(call)
    return (logp, entropy) if call.with_entropy else logp


def linear_topk(hidden, weight, k, *, bias=None, temperature=1.0, targets=None, ignore_index=-100, logit_scale=1.0,
                softcap=None, process_group=None, backend="auto"):
    """Top-k of the output layer's logits per row, by streaming over vocabulary tiles. No gradient.

    Returns ``TopK(indices [N,k] int64 by descending logit with ties to the smaller id,
    logprobs [N,k] float32, lse [N], target_logprobs [N] or None)``.
    """
    with prepared("linear_topk", locals()) as call:
        return topk(call)



def linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union", tail=True,
                    bias=None, teacher_bias=None, temperature=1.0, mask=None, logit_scale=1.0, softcap=None,
                    teacher_logit_scale=1.0, teacher_softcap=None, process_group=None, backend="auto"):
    """Top-K JSD_β with tail compensation (docs/method.md §2) between the student output layer and a detached
    teacher output layer, per row [N], never materializing either side's logits.

    support: "union" (TopK(p) ∪ TopK(q)), "teacher" or "student". tail=True adds one tail atom
    per side; tail=False renormalizes over S. K ≥ V gives the full-vocabulary JSD.
    """
    with prepared("linear_topk_jsd", locals()) as call:
        return divergence(call)



def linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union",
                     tail=True, bias=None, teacher_bias=None, temperature=1.0, ignore_index=-100, mask=None,
                     jsd_mask=None, logit_scale=1.0, softcap=None, teacher_logit_scale=1.0, teacher_softcap=None,
                     process_group=None, backend="auto") -> PTDTerms:
    """PTD-PO's per-token terms from one sweep over the vocabulary per side.

    Returns ``PTDTerms(logp, entropy, jsd, overlap)`` (each [N]) with the attribute
    ``teacher_mass`` (Σ_S q). Rows with target == ignore_index or mask False give 0 everywhere;
    rows with ``jsd_mask`` False give jsd = overlap = teacher_mass = 0 and their teacher rows
    are never read. Equal to the separate functions.
    """
    with prepared("linear_ptd_terms", locals()) as call:
        results = sweep(call)
    return PTDTerms.build(results.logp, results.entropy, results.jsd, results.overlap, results.teacher_mass)



def linear_sparse_jsd(hidden, weight, teacher_indices, teacher_logprobs, *, beta=0.5, tail=True, bias=None,
                      temperature=1.0, mask=None, logit_scale=1.0, softcap=None, process_group=None, backend="auto"):
    """Top-K JSD_β against a sparse teacher (its top-K ids and their log-probs, e.g. an offline cache).

    The support is the teacher's ids; q_tail = 1 − Σ exp(teacher_logprobs) (floored at 1e-12).
    """
    with prepared("linear_sparse_jsd", locals()) as call:
        return sparse_jsd(call)



def linear_jsd(hidden, weight, teacher_hidden, teacher_weight, *, beta=0.5, bias=None, teacher_bias=None,
               temperature=1.0, mask=None, logit_scale=1.0, softcap=None, teacher_logit_scale=1.0,
               teacher_softcap=None, process_group=None, backend="auto"):
    """Full-vocabulary generalized JSD_β (β=0: KL(Q‖P), β=1: KL(P‖Q)) per row [N], fused with the
    output layers: logsumexps first, then the divergence tile by tile, recomputed in backward."""
    with prepared("linear_jsd", locals()) as call:
        return full_jsd(call)



def linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, *, beta=0.5, bias=None, teacher_bias=None,
                    temperature=1.0, mask=None, weights=None, logit_scale=1.0, softcap=None, teacher_logit_scale=1.0,
                    teacher_softcap=None, process_group=None, backend="auto"):
    """Σ_n weights_n · JSD_β,n (default weights: 1 / number of unmasked rows), a scalar.

    Gradients equal those of ``linear_jsd`` (and ∂/∂weights_n = JSD_n when ``weights`` requires grad);
    the chunked path forms them during the forward sweep and hands them over on the first backward
    (a second backward through the same graph raises).
    """
    with prepared("linear_jsd_loss", locals()) as call:
        return weighted_loss(call)



def linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union", tail=True,
                         bias=None, teacher_bias=None, temperature=1.0, mask=None, weights=None, logit_scale=1.0,
                         softcap=None, teacher_logit_scale=1.0, teacher_softcap=None, process_group=None,
                         backend="auto"):
    """Σ_n weights_n · D_K,n (default weights: 1 / number of unmasked rows), a scalar.

    Gradients equal those of ``linear_topk_jsd`` (and ∂/∂weights_n = D_K,n when ``weights`` requires
    grad); the chunked path forms them during the forward sweep and hands them over on the first
    backward (a second backward through the same graph raises).
    """
    with prepared("linear_topk_jsd_loss", locals()) as call:
        return weighted_loss(call)



def linear_policy_loss(hidden, weight, targets, teacher_hidden=None, teacher_weight=None, k=None, *, row_loss,
                       beta=0.5, support="union", tail=True, bias=None, teacher_bias=None, temperature=1.0,
                       ignore_index=-100, mask=None, jsd_mask=None, logit_scale=1.0, softcap=None,
                       teacher_logit_scale=1.0, teacher_softcap=None, process_group=None, backend="auto",
                       return_terms=False):
    """Σ_n loss_n of the per-row terms of ``linear_ptd_terms`` — log-prob, entropy and Top-K JSD — a scalar.

    ``row_loss``: the loss of one row, either named token losses (``ptd_kernels.PolicyLoss``: the clipped
    ratio objective with advantages and old log-probs, GRPO / DAPO / Dr. GRPO normalization as row weights,
    a k3 KL against reference log-probs, λ·D_K on the rows of ``jsd_mask``, an entropy bonus) or a callable
    ``row_loss(logp, entropy, jsd) -> loss [N]`` that is row-separable (loss_n depends on row n's terms only).
    Rows with target == ignore_index or mask False are left out of the sum. Without a teacher
    (``teacher_hidden`` None) the terms are the log-prob and the entropy (jsd = 0): the policy loss alone.

    Gradients w.r.t. hidden, weight and bias equal autograd through ``linear_ptd_terms`` (or
    ``linear_logprobs``) and the same loss in PyTorch; no gradient flows into the loss's own tensors. Where
    the backend offers it (the chunked PyTorch path, cuBLAS) they are formed during the forward sweep: the
    whole PTD-PO loss costs 4 logits-GEMM equivalents (student, teacher, d hidden, d weight), the policy loss
    alone 3; the first backward hands them over (a second backward through the same graph raises).

    ``return_terms=True``: returns (loss, ``PTDTerms``(logp, entropy, jsd, overlap) with ``teacher_mass``),
    the terms detached (for logging).
    """
    with prepared("linear_policy_loss", locals()) as call:
        loss, terms = policy_loss(call)
    return (loss, terms) if return_terms else loss
