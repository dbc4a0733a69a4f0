"""The fused functions of SPEC §4: each validates its arguments, builds its typed config and
dispatches to the autograd layer (``ptd_kernels.autograd``) with the selected backend.

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

import functools
import inspect

import torch

from . import _distributed as D
from . import _validate as V
from ._types import PTDTerms
from .autograd import linear as A
from .autograd.common import JSDConfig, PTDHeadConfig, SparseJSDConfig
from .backends import select_backend
from .backends.base import DivergenceSpec, LogitSpec, same_data
from .backends.vocab_parallel import VocabParallelBackend

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

_OUTPUT_LAYER_ARGS = ("hidden", "weight", "bias", "teacher_hidden", "teacher_weight", "teacher_bias")


def _autocast_policy(fn):
    """Under an enabled ``torch.autocast`` for the student's device: cast the output-layer operands to
    the autocast dtype (float64 ones stay), then run ``fn`` with autocast off, so that every GEMM of
    the call sees one dtype and the divergence math stays in float32."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden")
        device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else None
        if device_type is None or not torch.is_autocast_enabled(device_type):
            return fn(*args, **kwargs)
        dtype = torch.get_autocast_dtype(device_type)
        bound = signature.bind(*args, **kwargs)
        cast = {}
        for name in _OUTPUT_LAYER_ARGS:
            t = bound.arguments.get(name)
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
                cast[name] = t.to(dtype)
        for side in ("weight", "bias"):  # a shared output layer stays one tensor (one weight read)
            student, teacher = bound.arguments.get(side), bound.arguments.get("teacher_" + side)
            if side in cast and student is not None and same_data(student, teacher):
                cast["teacher_" + side] = cast[side].detach()
        bound.arguments.update(cast)
        with torch.autocast(device_type, enabled=False):
            return fn(*bound.args, **bound.kwargs)

    return wrapper


def _engine(backend, process_group, hidden, weight, bias=None, teacher_hidden=None, teacher_weight=None,
            teacher_bias=None, **replicated):
    """The backend of a call and its vocabulary size V (None: the local weight's). With a process group,
    the selected backend runs on this rank's vocabulary slice (``VocabParallelBackend``); the slices and
    the replicated arguments are checked on every rank alike first."""
    V.check_backend(backend)
    inner = select_backend(backend, hidden, weight, bias, teacher_hidden, teacher_weight)
    if process_group is None:
        return inner, None
    sizes = D.slice_sizes(process_group, weight, bias, teacher_weight, teacher_bias, hidden=hidden,
                          teacher_hidden=teacher_hidden, **replicated)
    return VocabParallelBackend(inner, process_group, sizes), sum(sizes)


def _spec(temperature, logit_scale, softcap, prefix="") -> LogitSpec:
    return LogitSpec(V.check_temperature(temperature), V.check_logit_scale(prefix + "logit_scale", logit_scale),
                     V.check_softcap(prefix + "softcap", softcap))


@_autocast_policy
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
    process_group, hidden, weight, bias, *_ = D.resolve(process_group, hidden, weight, bias)
    engine, vocab = _engine(backend, process_group, hidden, weight, bias, targets=targets)
    n, local_vocab, _ = V.check_student(hidden, weight, bias, temperature)
    spec = _spec(temperature, logit_scale, softcap)
    targets = V.check_targets(targets, n, vocab or local_vocab, ignore_index, hidden.device)
    live = V.row_mask(n, hidden.device, targets, ignore_index)
    with_entropy = V.check_bool("with_entropy", with_entropy)
    logp, entropy, *_ = A.ptd_head(hidden, weight, bias, targets, None, None, None, live, torch.zeros_like(live),
                                   PTDHeadConfig(spec), engine)
    return (logp, entropy) if with_entropy else logp


@_autocast_policy
def linear_topk(hidden, weight, k, *, bias=None, temperature=1.0, targets=None, ignore_index=-100, logit_scale=1.0,
                softcap=None, process_group=None, backend="auto"):
    """Top-k of the output layer's logits per row, by streaming over vocabulary tiles. No gradient.

    Returns ``TopK(indices [N,k] int64 by descending logit with ties to the smaller id,
    logprobs [N,k] float32, lse [N], target_logprobs [N] or None)``.
    """
    process_group, hidden, weight, bias, *_ = D.resolve(process_group, hidden, weight, bias)
    engine, vocab = _engine(backend, process_group, hidden, weight, bias, targets=targets)
    n, local_vocab, _ = V.check_student(hidden, weight, bias, temperature)
    vocab = vocab or local_vocab
    spec = _spec(temperature, logit_scale, softcap)
    k = V.check_k(k)
    if k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
    live = None
    if targets is not None:
        targets = V.check_targets(targets, n, vocab, ignore_index, hidden.device)
        live = targets != ignore_index
        targets = torch.where(live, targets, torch.zeros_like(targets))
    return A.topk(hidden, weight, bias, k, spec, targets, live, engine)


def _check_pair(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, beta, temperature, mask,
                logit_scale, softcap, teacher_logit_scale, teacher_softcap, process_group, backend, **replicated):
    """The checks every student/teacher function shares, and its backend. Returns (N, V, student spec,
    teacher spec, β, live rows, backend, the output layers' local tensors)."""
    layers = D.resolve(process_group, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
    process_group, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias = layers
    engine, vocab = _engine(backend, process_group, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                            mask=mask, **replicated)
    n, local_vocab, _ = V.check_student(hidden, weight, bias, temperature)
    V.check_teacher(hidden, local_vocab, teacher_hidden, teacher_weight, teacher_bias)
    student = _spec(temperature, logit_scale, softcap)
    teacher = _spec(temperature, teacher_logit_scale, teacher_softcap, "teacher_")
    beta = V.check_beta(beta)
    V.check_mask("mask", mask, n, hidden.device)
    return (n, vocab or local_vocab, student, teacher, beta, V.row_mask(n, hidden.device, mask=mask), engine,
            (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias))


def _divergence(beta, k, support, tail) -> DivergenceSpec:
    return DivergenceSpec(beta, V.check_k(k), V.check_support(support), V.check_bool("tail", tail))


@_autocast_policy
def linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union", tail=True,
                    bias=None, teacher_bias=None, temperature=1.0, mask=None, logit_scale=1.0, softcap=None,
                    teacher_logit_scale=1.0, teacher_softcap=None, process_group=None, backend="auto"):
    """Top-K JSD_β with tail compensation (SPEC §2) between the student output layer and a detached
    teacher output layer, per row [N], never materializing either side's logits.

    support: "union" (TopK(p) ∪ TopK(q)), "teacher" or "student". tail=True adds one tail atom
    per side; tail=False renormalizes over S. K ≥ V gives the full-vocabulary JSD.
    """
    _, _, student, teacher, beta, live, engine, layers = _check_pair(
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, beta, temperature, mask, logit_scale,
        softcap, teacher_logit_scale, teacher_softcap, process_group, backend)
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias = layers
    return A.ptd_head(hidden, weight, bias, None, teacher_hidden, teacher_weight, teacher_bias, live, live,
                      PTDHeadConfig(student, teacher, _divergence(beta, k, support, tail)), engine)[2]


@_autocast_policy
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
    n, vocab, student, teacher, beta, _, engine, layers = _check_pair(
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, beta, temperature, mask, logit_scale,
        softcap, teacher_logit_scale, teacher_softcap, process_group, backend, targets=targets, jsd_mask=jsd_mask)
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias = layers
    divergence = _divergence(beta, k, support, tail)
    targets = V.check_targets(targets, n, vocab, ignore_index, hidden.device)
    V.check_mask("jsd_mask", jsd_mask, n, hidden.device)
    live = V.row_mask(n, hidden.device, targets, ignore_index, mask)
    jsd_live = live if jsd_mask is None else live & jsd_mask
    logp, entropy, jsd, overlap, teacher_mass = A.ptd_head(
        hidden, weight, bias, torch.where(live, targets, 0), teacher_hidden, teacher_weight, teacher_bias, live,
        jsd_live, PTDHeadConfig(student, teacher, divergence, want_overlap=True), engine)
    return PTDTerms.build(logp, entropy, jsd, overlap, teacher_mass)


@_autocast_policy
def linear_sparse_jsd(hidden, weight, teacher_indices, teacher_logprobs, *, beta=0.5, tail=True, bias=None,
                      temperature=1.0, mask=None, logit_scale=1.0, softcap=None, process_group=None, backend="auto"):
    """Top-K JSD_β against a sparse teacher (its top-K ids and their log-probs, e.g. an offline cache).

    The support is the teacher's ids; q_tail = 1 − Σ exp(teacher_logprobs) (floored at 1e-12).
    """
    process_group, hidden, weight, bias, *_ = D.resolve(process_group, hidden, weight, bias)
    engine, vocab = _engine(backend, process_group, hidden, weight, bias, teacher_indices=teacher_indices,
                            teacher_logprobs=teacher_logprobs, mask=mask)
    n, local_vocab, _ = V.check_student(hidden, weight, bias, temperature)
    V.check_sparse_teacher(teacher_indices, teacher_logprobs, n, vocab or local_vocab, hidden.device)
    cfg = SparseJSDConfig(_spec(temperature, logit_scale, softcap), V.check_beta(beta), V.check_bool("tail", tail))
    V.check_mask("mask", mask, n, hidden.device)
    live = V.row_mask(n, hidden.device, mask=mask)
    return A.sparse_jsd(hidden, weight, bias, teacher_indices, teacher_logprobs, live, cfg, engine)


@_autocast_policy
def linear_jsd(hidden, weight, teacher_hidden, teacher_weight, *, beta=0.5, bias=None, teacher_bias=None,
               temperature=1.0, mask=None, logit_scale=1.0, softcap=None, teacher_logit_scale=1.0,
               teacher_softcap=None, process_group=None, backend="auto"):
    """Full-vocabulary generalized JSD_β (β=0: KL(Q‖P), β=1: KL(P‖Q)) per row [N], fused with the
    output layers: logsumexps first, then the divergence tile by tile, recomputed in backward."""
    _, _, student, teacher, beta, live, engine, layers = _check_pair(
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, beta, temperature, mask, logit_scale,
        softcap, teacher_logit_scale, teacher_softcap, process_group, backend)
    return A.full_jsd(*layers, live, JSDConfig(student, teacher, beta), engine)


@_autocast_policy
def linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, *, beta=0.5, bias=None, teacher_bias=None,
                    temperature=1.0, mask=None, weights=None, logit_scale=1.0, softcap=None, teacher_logit_scale=1.0,
                    teacher_softcap=None, process_group=None, backend="auto"):
    """Σ_n weights_n · JSD_β,n (default weights: 1 / number of unmasked rows), a scalar.

    Gradients equal those of ``linear_jsd`` (and ∂/∂weights_n = JSD_n when ``weights`` requires grad);
    the chunked path forms them during the forward sweep and hands them over on the first backward
    (a second backward through the same graph raises).
    """
    n, _, student, teacher, beta, live, engine, layers = _check_pair(
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, beta, temperature, mask, logit_scale,
        softcap, teacher_logit_scale, teacher_softcap, process_group, backend, weights=weights)
    V.check_weights(weights, n, hidden.device)
    config = JSDConfig(student, teacher, beta)
    return A.weighted_loss(lambda: A.full_jsd(*layers, live, config, engine), *layers, weights, live,
                           DivergenceSpec(beta), student, teacher, engine)


@_autocast_policy
def linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, k, *, beta=0.5, support="union", tail=True,
                         bias=None, teacher_bias=None, temperature=1.0, mask=None, weights=None, logit_scale=1.0,
                         softcap=None, teacher_logit_scale=1.0, teacher_softcap=None, process_group=None,
                         backend="auto"):
    """Σ_n weights_n · D_K,n (default weights: 1 / number of unmasked rows), a scalar.

    Gradients equal those of ``linear_topk_jsd`` (and ∂/∂weights_n = D_K,n when ``weights`` requires
    grad); the chunked path forms them during the forward sweep and hands them over on the first
    backward (a second backward through the same graph raises).
    """
    n, _, student, teacher, beta, live, engine, layers = _check_pair(
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, beta, temperature, mask, logit_scale,
        softcap, teacher_logit_scale, teacher_softcap, process_group, backend, weights=weights)
    V.check_weights(weights, n, hidden.device)
    config = PTDHeadConfig(student, teacher, _divergence(beta, k, support, tail))
    return A.weighted_loss(lambda: A.ptd_head(*layers[:3], None, *layers[3:], live, live, config, engine)[2],
                           *layers, weights, live, config.divergence, student, teacher, engine)

