"""Hugging Face causal LMs and VLMs through ptd.

What a model's logits are made of, read from the model itself:

- :func:`backbone` — the module that returns ``last_hidden_state`` (for a VLM, the multimodal
  model that merges the image features; not ``get_decoder()``, which is only the text stack);
- :func:`output_layer` — the output layer as an :class:`OutputLayer`: weight, bias, and the
  logit scale / soft-cap of the text config (``final_logit_softcapping`` → soft-cap,
  ``logit_scale`` → scale, ``logits_scaling`` → scale 1/value, and the other spellings listed
  in :func:`logit_transform`), so that logits = cap(scale · (W h + b));
- :func:`add_fused_head` — an instance-scoped forward: ``model(..., labels=labels, fused_head=True)``
  returns a :class:`FusedCausalLMOutput` with per-token log-probs and entropy (and, given a
  :class:`PTDTeacher`, PTD-PO's Top-K JSD, overlap and teacher mass) computed by ptd from the
  last hidden states; ``fused_policy_loss=PolicyLoss(...)`` makes its ``loss`` that policy loss, from
  one sweep; no tokens × vocabulary tensor is formed. The computation runs inside the
  model's ``forward``, and the output-layer part inside the output layer's own call
  (:func:`run_as_forward`), so DDP's and FSDP2's hooks see both: FSDP2 un-shards the parameters
  and reduces their gradients, also when the output layer is an FSDP unit of its own.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from transformers.utils import ModelOutput

import ptd_kernels as ptd
from ptd_kernels.backends.vocab_parallel_setup import is_dtensor

__all__ = [
    "OutputLayer",
    "FusedCausalLMOutput",
    "SparseTeacher",
    "PTDTeacher",
    "add_fused_head",
    "backbone",
    "check_against_logits",
    "last_hidden_states",
    "logit_transform",
    "output_layer",
    "fused_lm_forward",
    "remove_fused_head",
    "run_as_forward",
    "sparse_teacher_terms",
]

_TRANSFORMERS_5 = Version(transformers.__version__) >= Version("5.0.0")


# ----------------------------------------------------------------------------- the output layer


@dataclass(frozen=True)
class OutputLayer:
    """An output layer as ptd sees it: logits = cap_softcap(logit_scale · (hidden @ weight.T + bias)).

    ``source`` names the config settings the scale and soft-cap came from (for error messages).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None
    source: str = ""

    @property
    def plain(self) -> bool:
        """True when the logits are the bare affine map (scale 1, no soft-cap)."""
        return self.logit_scale == 1.0 and self.softcap is None

    def kernel_kwargs(self, prefix: str = "") -> dict:
        """Keyword arguments that give ptd's fused functions this layer's logit transform.

        ``prefix="teacher_"`` for the teacher side (a teacher's transform is its own, never inherited).
        """
        return {prefix + "logit_scale": self.logit_scale, prefix + "softcap": self.softcap}


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(config) -> tuple[float, float | None, str]:
    """``(logit_scale, softcap, source)`` of a model config (its text config for a VLM).

    Settings read, as transformers' modeling code applies them (checked against transformers 5.x):
    ``final_logit_softcapping`` (Gemma 2/3/4 and kin) → soft-cap; ``logit_scale`` (Cohere) → scale,
    except MPT, whose transformers model ignores it; ``logits_scaling`` → scale 1/value (Granite),
    or ×value for HyperCLOVA X; ``output_multiplier`` (Muse) and ``lm_head_multiplier`` (Falcon-H1)
    → ×value; ``logits_mup_width_multiplier`` (Inkling, divides the hidden states) → 1/value.
    The scale applies before the soft-cap.
    """
    text = _text_config(config)
    model_type = getattr(text, "model_type", "")
    scale, parts = 1.0, []

    def number(name):
        value = getattr(text, name, None)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config.{name} = {value!r}: expected a number or None")
        return float(value)

    softcap = number("final_logit_softcapping")
    if softcap is not None:
        if softcap <= 0:
            raise ValueError(f"config.final_logit_softcapping = {softcap}: expected a positive number or None")
        parts.append(f"final_logit_softcapping={softcap:g}")
    if model_type != "mpt" and (value := number("logit_scale")) is not None:
        scale *= value
        parts.append(f"logit_scale={value:g}")
    if (value := number("logits_scaling")) is not None:
        scale *= value if model_type.startswith("hyperclovax") else 1.0 / value
        parts.append(f"logits_scaling={value:g}")
    for name in ("output_multiplier", "lm_head_multiplier"):
        if (value := number(name)) is not None:
            scale *= value
            parts.append(f"{name}={value:g}")
    if (value := number("logits_mup_width_multiplier")) is not None:
        scale /= value
        parts.append(f"logits_mup_width_multiplier={value:g}")
    source = f"{model_type or type(text).__name__}: " + ", ".join(parts) if parts else ""
    return scale, softcap, source


def output_layer(model) -> OutputLayer:
    """The output layer of a transformers model (``get_output_embeddings()``) and its logit transform.

    Tied embeddings give the embedding matrix, as the model's own head uses. A weight read while
    it is a sharded DTensor (FSDP2, outside the head's forward) is gathered to a full tensor: right
    for a frozen teacher, but a gradient through that copy is not reduced across ranks — to train
    through the layer, read it inside :func:`run_as_forward` (as :func:`fused_lm_forward` does).
    """
    head = _head_module(model)
    weight, bias = head.weight, getattr(head, "bias", None)
    if is_dtensor(weight):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    scale, softcap, source = logit_transform(model.config)
    return OutputLayer(weight, bias, scale, softcap, source)


def _head_module(model):
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output layer with a weight (get_output_embeddings())")
    return head


def run_as_forward(module, fn, *args, **kwargs):
    """Call ``fn(*args, **kwargs)`` as ``module``'s forward, through ``module(...)``.

    Whatever a data-parallel wrapper hooked onto the module runs around ``fn``: FSDP2 un-shards
    the module's parameters for the call (and again for its backward) and reduces their
    gradients after it — which reading a sharded parameter from outside would skip. The module's
    own forward is back in place before ``fn`` runs. Pass the tensors that need gradients as
    ``args`` (FSDP2 hooks its gradient reduction onto them).
    """
    own = module.__dict__.get("forward")

    def restore():
        if own is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own

    def redirected(*a, **k):
        restore()
        return fn(*a, **k)

    module.forward = redirected
    try:
        return module(*args, **kwargs)
    finally:
        restore()


def backbone(model):
    """The module whose output holds ``last_hidden_state`` for the model's output layer.

    ``model.base_model`` (transformers ≥ 5, text and vision-language models alike); before
    transformers 5 a VLM keeps it as ``model.model``.
    """
    if not _TRANSFORMERS_5 and _text_config(model.config) is not model.config and hasattr(model, "model"):
        return model.model
    base = model.base_model
    if base is model:
        raise ValueError(f"{type(model).__name__} exposes no backbone separate from its output layer (base_model)")
    return base


def last_hidden_states(model, *args, **kwargs) -> torch.Tensor:
    """``backbone(model)(*args, **kwargs).last_hidden_state`` [B, L, H] (no cache).

    Under DDP / FSDP call it from inside the wrapped model's ``forward`` (as :func:`add_fused_head`
    does), never on the bare backbone from outside.
    """
    kwargs.setdefault("use_cache", False)
    kwargs.pop("logits_to_keep", None)
    return backbone(model)(*args, **kwargs).last_hidden_state


# ----------------------------------------------------------------------------- the forward


@dataclass
class PTDTeacher:
    """The teacher side of PTD-PO's terms for :func:`fused_lm_forward`.

    ``hidden`` [B, T, H']: the teacher's last hidden states, detached, aligned with the *last* T
    next-token positions of the student (the positions that predict the T completion tokens,
    teacher-forced on the student's tokens). ``layer``: the teacher's :class:`OutputLayer`.
    ``rows`` bool [B]: the sequences that get a JSD (default: all). ``k``, ``beta``, ``support``,
    ``tail``: as in ``ptd_kernels.linear_ptd_terms``.
    """

    hidden: torch.Tensor
    layer: OutputLayer
    rows: torch.Tensor | None = None
    k: int = 100
    beta: float = 0.5
    support: str = "union"
    tail: bool = True


@dataclass
class SparseTeacher:
    """A sparse teacher for :func:`fused_lm_forward` (a served teacher's answer): its top-K ids and their
    log-probs per completion position, ``indices`` (int) and ``logprobs`` [B, T, K], aligned as
    :class:`PTDTeacher`'s ``hidden``. The support is those ids (the sparse teacher of docs/method.md §2,
    ``ptd_kernels.linear_sparse_jsd``); ``rows``, ``beta``, ``tail`` as in :class:`PTDTeacher`.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    rows: torch.Tensor | None = None
    beta: float = 0.5
    tail: bool = True


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """Output of :func:`fused_lm_forward`. Per-token fields are [B, L-1] (next-token positions;
    [B, L] with ``shift_labels``), 0 where the label is -100, float32.

    loss: −Σ log p(label) / (number of labels, or ``num_items_in_batch``); with ``policy_loss``, that loss.
    log_probs, entropy: of the next-token distribution (entropy None when not asked for).
    jsd, overlap, teacher_mass: the teacher's JSD (PTD-PO's Top-K JSD with a :class:`PTDTeacher`, the
    sparse-teacher JSD with a :class:`SparseTeacher`), top-K overlap and Σ_S q (None without a teacher;
    0 off the teacher's rows).
    label_mask: bool, where the label is not -100.
    last_hidden_state: [B, L, H], only when called without labels.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    jsd: torch.Tensor | None = None
    overlap: torch.Tensor | None = None
    teacher_mass: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def _teacher_rows(teacher, label_mask: torch.Tensor, device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The teacher's per-position tensors (hidden [n, H'], or top-K ids and log-probs [n, K]) aligned with
    the student's labelled positions, and the jsd mask [n]."""
    per_position = (teacher.indices, teacher.logprobs) if isinstance(teacher, SparseTeacher) else (teacher.hidden,)
    name = "teacher.indices" if isinstance(teacher, SparseTeacher) else "teacher.hidden"
    first = per_position[0]
    n_seq, n_pos = label_mask.shape
    if first.dim() != 3 or first.shape[0] != n_seq or first.shape[1] > n_pos:
        raise ValueError(f"{name} must be [B={n_seq}, T<={n_pos}, ...], got {tuple(first.shape)}")
    if any(t.shape != first.shape for t in per_position):
        raise ValueError(f"teacher.logprobs {tuple(per_position[-1].shape)} must match {name} {tuple(first.shape)}")
    offset = n_pos - first.shape[1]
    seq, pos = label_mask.nonzero(as_tuple=True)
    col = pos - offset
    in_window = col >= 0
    aligned = tuple(t.detach().to(device)[seq, col.clamp(min=0)] for t in per_position)
    jsd_mask = in_window
    if teacher.rows is not None:
        if teacher.rows.shape != (n_seq,):
            raise ValueError(f"teacher.rows must be a bool tensor [B={n_seq}], got shape {tuple(teacher.rows.shape)}")
        jsd_mask = jsd_mask & teacher.rows.to(device=device, dtype=torch.bool)[seq]
    if not isinstance(teacher, SparseTeacher):
        aligned = (aligned[0].to(teacher.layer.weight.dtype),)
    return aligned, jsd_mask


def sparse_teacher_terms(rows, weight, targets, teacher_indices, teacher_logprobs, jsd_mask, *, beta=0.5, tail=True,
                         bias=None, **kwargs):
    """(logp, entropy, jsd, overlap, teacher mass) per row [n] against a served teacher's top-K
    (``teacher_indices``, ``teacher_logprobs`` [n, K]): log-probs and entropy from one
    ``linear_logprobs`` sweep; on the rows of ``jsd_mask`` whose target is not ``ignore_index`` only,
    ``linear_sparse_jsd`` (support: the teacher's ids), the overlap with the student's top-K (no
    gradient) and Σ_S q; 0 on the other rows.
    ``kwargs``: ``temperature``, ``ignore_index``, ``logit_scale``, ``softcap``, ``backend``.
    """
    logp, entropy = ptd.linear_logprobs(rows, weight, targets, bias=bias, with_entropy=True, **kwargs)
    ignore_index = kwargs.pop("ignore_index", -100)
    chosen = (jsd_mask & (targets != ignore_index)).nonzero().squeeze(-1)
    ids, logprobs = teacher_indices[chosen], teacher_logprobs[chosen].float()
    jsd = overlap = mass = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
    if chosen.numel():
        part = ptd.linear_sparse_jsd(rows[chosen], weight, ids, logprobs, beta=beta, tail=tail, bias=bias, **kwargs)
        jsd = jsd.index_put((chosen,), part)
        with torch.no_grad():
            student_top = ptd.linear_topk(rows[chosen].detach(), weight.detach(), ids.shape[1],
                                          bias=None if bias is None else bias.detach(), **kwargs)
            overlap = overlap.index_put((chosen,), ptd.topk_overlap(student_top.indices, ids))
            mass = mass.index_put((chosen,), logprobs.exp().sum(-1))
    return logp, entropy, jsd, overlap, mass


def _policy_rows(policy_loss, label_mask: torch.Tensor, device):
    """A ``PolicyLoss`` given per completion position ([B, T], aligned as :class:`PTDTeacher`'s ``hidden``) as
    one of the labelled rows; a labelled position outside the window weighs 0."""
    n_seq, n_pos = label_mask.shape
    width = policy_loss.advantages.shape[-1]
    if policy_loss.advantages.dim() != 2 or policy_loss.advantages.shape[0] != n_seq or width > n_pos:
        raise ValueError(f"policy_loss's per-token tensors must be [B={n_seq}, T<={n_pos}], got "
                         f"{tuple(policy_loss.advantages.shape)}")
    seq, pos = label_mask.nonzero(as_tuple=True)
    col = pos - (n_pos - width)
    in_window = col >= 0
    col = col.clamp(min=0)

    def take(t):
        t = t.detach().to(device)[seq, col]
        return t & in_window if t.dtype == torch.bool else torch.where(in_window, t, torch.zeros_like(t))

    return policy_loss.map_rows(take)


def fused_lm_forward(model, *args, labels=None, shift_labels=None, temperature: float = 1.0, teacher=None,
                     with_entropy: bool = True, num_items_in_batch=None, fp32_head: bool = False, policy_loss=None,
                     **kwargs) -> FusedCausalLMOutput:
    """Run the model's backbone and its output layer through ptd.

    Meant to run *inside* ``model.forward`` (:func:`add_fused_head` arranges it): under DDP / FSDP2
    the wrapped model's forward is what prepares the parameters and the backward.

    ``labels`` [B, L] are shifted by one as a causal LM's loss does (position t scores label
    t+1); ``shift_labels`` [B, L] are taken as already aligned. Positions labelled -100 are
    skipped (they cost nothing). Without labels the output carries only ``last_hidden_state``.
    ``teacher`` (a :class:`PTDTeacher`) adds PTD-PO's Top-K JSD from the same sweep; a
    :class:`SparseTeacher` (a served teacher's top-K) adds the sparse-teacher JSD.
    ``fp32_head``: the output layer in float32, autocast off (TRL's ``cast_lm_head_to_fp32``).
    ``policy_loss`` (a ``ptd_kernels.PolicyLoss`` whose per-token tensors are [B, T], aligned as
    :class:`PTDTeacher`'s ``hidden``): the output's ``loss`` is that loss over the labelled positions, formed
    with its gradients in one sweep (``ptd_kernels.linear_policy_loss``; a :class:`PTDTeacher` or none), and
    the per-token fields are its terms, detached.
    The remaining arguments go to the backbone (``input_ids``, ``attention_mask``,
    ``pixel_values``, ``image_grid_thw``, ...).
    """
    if kwargs.get("output_router_logits"):
        raise NotImplementedError(
            "output_router_logits: the MoE load-balancing loss is not computed by the fused head; "
            "call the model without it (or without the fused head)")
    hidden = last_hidden_states(model, *args, **kwargs)
    if labels is None and shift_labels is None:
        if teacher is not None:
            raise ValueError("a teacher needs labels (the tokens it is teacher-forced on)")
        return FusedCausalLMOutput(last_hidden_state=hidden)
    if shift_labels is not None:
        targets = shift_labels
    else:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    head = _head_module(model)
    device = head.weight.device
    hidden, targets = hidden.to(device), targets.to(device)
    label_mask = targets != -100
    rows, row_targets = hidden[label_mask], targets[label_mask]
    teacher_rows, jsd_mask = (), None
    if teacher is not None:
        teacher_rows, jsd_mask = _teacher_rows(teacher, label_mask, device)
    if policy_loss is not None:
        if isinstance(teacher, SparseTeacher):
            raise ValueError("policy_loss takes a PTDTeacher (a local teacher's hidden states) or none, not a "
                             "SparseTeacher")
        policy_loss = _policy_rows(policy_loss, label_mask, device)

    def head_terms(rows, row_targets, jsd_mask, *teacher_rows):
        # runs as the output layer's forward: its parameters are whole tensors here, even under FSDP2
        if fp32_head:
            with torch.autocast(device.type, enabled=False):
                return layer_terms(output_layer(model), rows.float(), row_targets, jsd_mask, teacher_rows, True)
        return layer_terms(output_layer(model), rows, row_targets, jsd_mask, teacher_rows, False)

    def layer_terms(layer, rows, row_targets, jsd_mask, teacher_rows, fp32):
        # under autocast ptd casts rows and layer to its dtype, as the model's nn.Linear would (and keeps
        # the divergence math in float32); outside it the rows take the layer's dtype
        weight, bias = layer.weight, layer.bias
        if fp32:
            weight, bias = weight.float(), None if bias is None else bias.float()
        if not torch.is_autocast_enabled(device.type):
            rows = rows.to(weight.dtype)
        common = dict(bias=bias, temperature=temperature, **layer.kernel_kwargs())
        if isinstance(teacher, SparseTeacher):
            return (None, *sparse_teacher_terms(rows, weight, row_targets, *teacher_rows, jsd_mask, beta=teacher.beta,
                                                tail=teacher.tail, **common))
        pair, with_teacher = (), {}
        if teacher is not None:
            teacher_weight, teacher_bias = teacher.layer.weight, teacher.layer.bias
            (teacher_hidden,) = teacher_rows
            if fp32:
                teacher_hidden, teacher_weight = teacher_hidden.float(), teacher_weight.float()
                teacher_bias = None if teacher_bias is None else teacher_bias.float()
            pair = (teacher_hidden, teacher_weight, teacher.k)
            with_teacher = dict(beta=teacher.beta, support=teacher.support, tail=teacher.tail,
                                teacher_bias=teacher_bias, jsd_mask=jsd_mask, **teacher.layer.kernel_kwargs("teacher_"))
        if policy_loss is not None:
            loss, terms = ptd.linear_policy_loss(rows, weight, row_targets, *pair, row_loss=policy_loss,
                                                 return_terms=True, **common, **with_teacher)
            return (loss, *terms, terms.teacher_mass if teacher is not None else None)
        if teacher is None:
            if with_entropy:
                return (None, *ptd.linear_logprobs(rows, weight, row_targets, with_entropy=True, **common),
                        None, None, None)
            return None, ptd.linear_logprobs(rows, weight, row_targets, **common), None, None, None, None
        terms = ptd.linear_ptd_terms(rows, weight, row_targets, *pair, **common, **with_teacher)
        return (None, *terms, terms.teacher_mass)

    loss, logp, entropy, jsd, overlap, mass = run_as_forward(head, head_terms, rows, row_targets, jsd_mask,
                                                             *teacher_rows)
    if policy_loss is not None and teacher is None:
        jsd = overlap = None

    def spread(values):
        # masked_scatter keeps the result attached to the graph even when no label is valid
        return None if values is None else values.new_zeros(label_mask.shape).masked_scatter(label_mask, values)

    if loss is None:
        count = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -logp.sum() / count
    return FusedCausalLMOutput(
        loss=loss,
        log_probs=spread(logp),
        entropy=spread(entropy),
        jsd=spread(jsd),
        overlap=spread(overlap),
        teacher_mass=spread(mass),
        label_mask=label_mask,
    )


def add_fused_head(model, *, temperature: float = 1.0, flag: str = "fused_head", with_entropy: bool = True,
                   fp32_head: bool = False):
    """Give this model instance a fused output head: ``model(..., labels=labels, fused_head=True)`` returns a
    :class:`FusedCausalLMOutput` (see :func:`fused_lm_forward`): per-token log-probs and entropy from the last
    hidden states, with no logits tensor. ``fused_teacher=PTDTeacher(...)`` adds PTD-PO's terms,
    ``fused_teacher=SparseTeacher(...)`` the sparse-teacher JSD, ``fused_policy_loss=PolicyLoss(...)`` makes the
    output's ``loss`` that policy loss (see :func:`fused_lm_forward`'s ``teacher`` and ``policy_loss``). Without
    the flag the forward is the previous one, so ``generate`` is unchanged.

    Only this instance changes (its ``forward`` attribute); other instances and the class do not.
    ``flag`` renames the switch (TRL's trainers call ``fused_lm_head=True``); ``fp32_head`` runs the
    output layer in float32 with autocast off (TRL's ``cast_lm_head_to_fp32``). Apply it to the
    transformers model before wrapping it in DDP / FSDP, or to the module inside the wrapper.
    Returns the model.
    """
    if not isinstance(flag, str) or not flag.isidentifier():
        raise ValueError(f"flag must be a keyword name, got {flag!r}")
    previous = model.forward

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, **kwargs):
        if not kwargs.pop(flag, False):
            return previous(*args, **kwargs)
        teacher = kwargs.pop("fused_teacher", None)
        policy_loss = kwargs.pop("fused_policy_loss", None)
        # the model's own forward takes no such keyword and would drop it silently
        stray = [name for name in kwargs if name.startswith(("fused_", "ptd_"))]
        if stray:
            raise TypeError(f"model(..., {flag}=True): unknown keyword {stray[0]!r}; the fused head takes "
                            "fused_teacher= and fused_policy_loss=")
        return fused_lm_forward(self, *args, temperature=temperature, teacher=teacher, with_entropy=with_entropy,
                                fp32_head=fp32_head, policy_loss=policy_loss, **kwargs)

    forward._fused_head_previous_forward = previous
    model.forward = types.MethodType(forward, model)
    return model


def remove_fused_head(model):
    """Undo the last :func:`add_fused_head` on this instance. Returns the model."""
    previous = getattr(model.forward, "_fused_head_previous_forward", None)
    if previous is None:
        raise ValueError(f"{type(model).__name__} instance has no fused head (add_fused_head)")
    if getattr(previous, "__self__", None) is model and previous.__func__ is type(model).forward:
        del model.forward  # back to the class's forward
    else:
        model.forward = previous
    return model


def check_against_logits(model, *, atol: float = 1e-4, temperature: float = 1.0, **inputs) -> float:
    """Compare ptd's log-probs and entropy with those of the model's own logits on ``inputs``.

    Runs the model's ordinary forward once (materializing [B, L, V] logits: use a short input)
    and the ptd path on the same input; raises ``ValueError`` when they differ by more than
    ``atol``, which would mean the model transforms its logits in a way :func:`logit_transform`
    does not know. Returns the largest difference. For a model outside transformers' own
    families, run it once before training.
    """
    input_ids = inputs["input_ids"]
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, :-1].float() / temperature
        targets = input_ids[:, 1:]
        logp = logits.log_softmax(-1)
        want_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        want_entropy = -(logp.exp() * logp).sum(-1)
        got = fused_lm_forward(model, labels=input_ids, temperature=temperature, **inputs)
    gap = max((got.log_probs - want_logp).abs().max().item(), (got.entropy - want_entropy).abs().max().item())
    if not gap <= atol:
        raise ValueError(
            f"ptd's log-probs / entropy differ from {type(model).__name__}'s own logits by {gap:.3g} (> {atol:g}): "
            "its output layer transforms the logits in a way ptd_kernels.integrations.hf.logit_transform does not read")
    return gap
