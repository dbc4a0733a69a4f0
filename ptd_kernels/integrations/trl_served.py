"""TRL's served-teacher distillation on ptd's kernels: the student side without a [B, T, V] tensor.

A served teacher (a vLLM server) returns, per completion position, its top-k token ids and
log-probs and the log-prob of the actual token. TRL 1.16 trains against it in
``trl.experimental.server_distillation.ServerDistillationTrainer`` and
``trl.experimental.async_distillation.AsyncDistillationTrainer``; both form the student's full
``log_softmax`` over the vocabulary (``[B, T, V]``, or ``[256, V]`` float32 chunks) only to read it
at a few candidate ids. Here the student's log-probs at the candidate ids come from one fused sweep
(:func:`candidate_logprobs`), and TRL's divergence runs on the ``[rows, candidates + 1]`` atoms.

TRL's semantics, reproduced operation for operation (:func:`served_divergence_terms`):

- support: β = 0 — the teacher's reported candidates (its top-k; the async trainer's worker adds
  the actual token when it falls outside them), a candidate without a teacher log-prob skipped;
  0 < β < 1 — the teacher's top-1 token and the actual token (counted once when they coincide);
  β = 1 — the actual token alone;
- tail bucket on: one more atom per side, log(1 − Σ exp(log-probs)) with the summed log-mass
  clamped at −1e-7 (so a teacher whose top-1 log-prob is 0 gets a tail of about 1e-7, not 0);
  off: each side renormalized over its support;
- the generalized JSD on those atoms with TRL's conventions (β = 0: KL(teacher‖student),
  β = 1: KL(student‖teacher), else the mixture, clamped at the float's ``tiny`` before its log);
- the loss reduction of each trainer (see the hooks below).

ptd's own ``linear_sparse_jsd`` is not used for these trainers: its tail is floored at 1e-12 in
probability rather than clamped in log-mass, and its support is a fixed set of distinct ids per
row, while TRL's supports are masked per candidate and can hold duplicates.
"""

from __future__ import annotations

import types

import torch

import ptd_kernels as ptd
from ptd_kernels import config

from .hf import output_layer, run_as_forward

__all__ = ["candidate_logprobs", "served_divergence_terms", "tail_bucket"]

#: TRL's clamp of the support's summed log-mass before the tail bucket (``_add_tail_bucket``).
TAIL_LOG_MASS_MAX = -1e-7


# ----------------------------------------------------------------------------- the student side


class _CandidateLogits(torch.autograd.Function):
    """raw[n, c] = hidden[n] · weight[ids[n, c]] (+ bias[ids[n, c]]) in float32, in blocks of rows.

    The operands are read in ``dtype`` (the dtype ptd's GEMMs use for this call) and multiplied in
    float32 (float64 for float64 operands), so the values are those of the fused sweep's logits at
    the same ids. A block holds at most ``ptd_kernels.config.GATHER_BYTES`` of gathered weight rows.
    The weight's gradient is accumulated over the distinct ids only, then written into a zero
    gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, dtype):
        n, width = ids.shape
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        block = max(1, config.GATHER_BYTES // max(1, width * weight.shape[1] * 4))
        raw = torch.empty((n, width), dtype=compute, device=hidden.device)
        for start in range(0, n, block):
            rows = hidden[start:start + block].to(dtype).to(compute)
            gathered = weight[ids[start:start + block]].to(dtype).to(compute)  # [b, C, H]
            raw[start:start + block] = torch.einsum("bh,bch->bc", rows, gathered)
        if bias is not None:
            raw += bias.to(dtype).to(compute)[ids]
        ctx.save_for_backward(hidden, weight, ids)
        ctx.dtype, ctx.compute, ctx.block, ctx.has_bias = dtype, compute, block, bias is not None
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return raw

    @staticmethod
    def backward(ctx, grad_raw):
        hidden, weight, ids = ctx.saved_tensors
        dtype, compute, block = ctx.dtype, ctx.compute, ctx.block
        grad_hidden = grad_weight = grad_bias = None
        grad_raw = grad_raw.to(compute)
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.empty(hidden.shape, dtype=compute, device=hidden.device)
            for start in range(0, ids.shape[0], block):
                gathered = weight[ids[start:start + block]].to(dtype).to(compute)
                grad_hidden[start:start + block] = torch.einsum("bc,bch->bh", grad_raw[start:start + block], gathered)
            grad_hidden = grad_hidden.to(hidden.dtype)
        distinct, position = torch.unique(ids.reshape(-1), return_inverse=True)
        if ctx.needs_input_grad[1]:
            rows = torch.zeros((distinct.shape[0], weight.shape[1]), dtype=compute, device=weight.device)
            width = ids.shape[1]
            for start in range(0, ids.shape[0], block):
                stop = min(start + block, ids.shape[0])
                contribution = grad_raw[start:stop, :, None] * hidden[start:stop, None, :].to(dtype).to(compute)
                rows.index_add_(0, position[start * width:stop * width], contribution.reshape(-1, weight.shape[1]))
            grad_weight = torch.zeros_like(weight)
            grad_weight[distinct] = rows.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            shape, bias_dtype = ctx.bias_meta
            summed = torch.zeros(distinct.shape[0], dtype=compute, device=grad_raw.device)
            summed.index_add_(0, position, grad_raw.reshape(-1))
            grad_bias = torch.zeros(shape, dtype=bias_dtype, device=grad_raw.device)
            grad_bias[distinct] = summed.to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _transform(raw, temperature, logit_scale, softcap):
    """z = cap_c(s · raw) / τ on gathered logits, as ptd's kernels transform the full row."""
    z = raw * logit_scale if logit_scale != 1.0 else raw
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def candidate_logprobs(hidden, weight, candidates, anchor, *, bias=None, temperature=1.0, logit_scale=1.0,
                       softcap=None, with_entropy=False):
    """The student's log-probs at candidate ids, ``[n, C]`` float32, differentiable in ``hidden``,
    ``weight`` and ``bias``, without a tokens×vocabulary tensor.

    One fused ``ptd_kernels.linear_logprobs`` sweep gives log p(anchor) (and the entropy); the
    logits at the candidates and at the anchor are gathered (O(n·C·H)); then
    log p(c) = log p(anchor) + z_c − z_anchor. ``anchor`` [n]: any id in [0, V) per row (e.g. the
    actual token). ``candidates`` [n, C]: ids, negative ones read as 0 (the caller masks them).
    Under ``torch.autocast`` the operands are read in the autocast dtype, as ptd's fused functions
    read them. Returns ``(logp, entropy)`` with ``entropy`` None unless ``with_entropy``.
    """
    vocab = weight.shape[0]
    if candidates.numel() and int(candidates.max()) >= vocab:
        raise ValueError(f"candidate id {int(candidates.max())} is outside the student's vocabulary [0, {vocab}): the "
                         "teacher must share the student's vocabulary")
    device_type = hidden.device.type
    dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type) and hidden.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
    transform = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    with torch.autocast(device_type, enabled=False):
        hidden_in, weight_in = hidden.to(dtype), weight.to(dtype)
        bias_in = None if bias is None else bias.to(dtype)
        anchor_logp = ptd.linear_logprobs(hidden_in, weight_in, anchor, bias=bias_in, with_entropy=with_entropy,
                                          **transform)
        entropy = None
        if with_entropy:
            anchor_logp, entropy = anchor_logp
        ids = torch.cat([anchor[:, None], candidates.clamp_min(0)], dim=1)
        raw = _CandidateLogits.apply(hidden, weight, bias, ids, dtype)
        z = _transform(raw, **transform)
    return anchor_logp[:, None] + (z[:, 1:] - z[:, :1]), entropy


# ----------------------------------------------------------------------------- TRL's sparse divergence


def tail_bucket(log_probs, support):
    """Append TRL's tail atom log(1 − Σ exp(log_probs)), the log-mass clamped at −1e-7; the support
    mask gains an always-on column."""
    log_mass = torch.clamp(torch.logsumexp(log_probs, dim=-1, keepdim=True), max=TAIL_LOG_MASS_MAX)
    tail = torch.log(-torch.expm1(log_mass))
    return torch.cat([log_probs, tail], dim=-1), torch.cat([support, torch.ones_like(support[..., :1])], dim=-1)


def _jsd_terms(student, teacher, support, beta):
    """Per-atom terms of TRL's generalized JSD on log-prob atoms; atoms off ``support`` give 0."""
    zero = torch.zeros_like(student)
    log_s, log_t = torch.where(support, student, zero), torch.where(support, teacher, zero)
    p_s, p_t = torch.where(support, student.exp(), zero), torch.where(support, teacher.exp(), zero)
    if beta == 0:
        return torch.nan_to_num(p_t * (log_t - log_s), nan=0.0)
    if beta == 1:
        return torch.nan_to_num(p_s * (log_s - log_t), nan=0.0)
    weight = torch.tensor(beta, dtype=student.dtype, device=student.device)
    mixture = (1 - weight) * p_s + weight * p_t
    log_m = torch.where(support, torch.log(mixture.clamp_min(torch.finfo(mixture.dtype).tiny)), zero)
    teacher_part = torch.nan_to_num(p_t * (log_t - log_m), nan=0.0)
    student_part = torch.nan_to_num(p_s * (log_s - log_m), nan=0.0)
    return weight * teacher_part + (1 - weight) * student_part


def served_divergence_terms(student_logprobs, teacher_logprobs, valid, *, beta, tail):
    """TRL's served-teacher divergence on a masked candidate support.

    ``student_logprobs``, ``teacher_logprobs`` [n, C] (each model's own full-vocabulary log-probs at
    the candidates) and ``valid`` [n, C] bool. Returns ``(terms, teacher_atoms, support)``: the
    per-atom terms [n, A] (a row's divergence is their sum; A = C + 1 with the tail bucket), the
    teacher's atoms and the atom mask (for the teacher-entropy metric).
    """
    neg_inf = torch.full((), float("-inf"), dtype=student_logprobs.dtype, device=student_logprobs.device)
    student = torch.where(valid, student_logprobs, neg_inf)
    teacher = torch.where(valid, teacher_logprobs.to(student_logprobs.dtype), neg_inf)
    if tail:
        student, support = tail_bucket(student, valid)
        teacher, _ = tail_bucket(teacher, valid)
    else:
        student = student - torch.logsumexp(student, dim=-1, keepdim=True)
        teacher = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
        support = valid
    return _jsd_terms(student, teacher, support, beta), teacher, support


def top1_actual_support(top1_ids, top1_logprobs, actual_ids, actual_logprobs, beta):
    """TRL's β > 0 support: (ids, teacher log-probs, valid), each [n, 2] (the teacher's top-1, the
    actual token — masked when it is the top-1), or [n, 1] (the actual token) for β = 1."""
    if beta == 1:
        return actual_ids[:, None], actual_logprobs[:, None], torch.ones_like(actual_ids[:, None], dtype=torch.bool)
    ids = torch.stack([top1_ids, actual_ids], dim=-1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, 1] = actual_ids != top1_ids
    return torch.where(valid, ids, torch.zeros_like(ids)), torch.stack([top1_logprobs, actual_logprobs], -1), valid


# ----------------------------------------------------------------------------- ServerDistillationTrainer


def use_on_server_distillation(trainer) -> None:
    """Replace this instance's ``compute_loss`` (see :func:`_server_compute_loss`)."""
    trainer.compute_loss = types.MethodType(_server_compute_loss, trainer)


def _server_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``ServerDistillationTrainer.compute_loss`` with the student's side through ptd.

    As stock: the teacher server scores prompt + completion; the rows are the completion tokens
    inside the teacher's window; the loss is Σ_rows D / (number of rows) (``batchmean``, local),
    divided by the gradient-accumulation steps in training; ``num_items_in_batch`` is not used.
    """
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    completion_labels = torch.where(completion_mask.bool(), completion_ids, torch.full_like(completion_ids, -100))
    labels = torch.cat([torch.full_like(prompt_ids, -100), completion_labels], dim=1)
    request = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "prompt_attention_mask": prompt_mask}
    start = self._compute_prompt_length(request)
    teacher = self._get_teacher_token_logprobs_from_server(request, start)
    width = teacher["actual_logprobs"].shape[1]
    window_labels = labels[:, start:start + width]
    rows = window_labels != -100
    actual = input_ids[:, start:start + width][rows]
    actual_teacher = teacher["actual_logprobs"][rows]
    if self.beta > 0:
        if not bool(torch.isfinite(actual_teacher).all()):
            missing = int((~torch.isfinite(actual_teacher)).sum())
            raise ValueError(f"the teacher server returned no log-prob of the actual token at {missing} of "
                             f"{actual.numel()} completion positions (needed for β > 0)")
        top1_ids = teacher["topk_token_ids"][rows][:, 0]
        top1_logprobs = teacher["topk_logprobs"][rows][:, 0]
        if self.beta < 1 and not bool(torch.isfinite(top1_logprobs).all()):
            missing = int((~torch.isfinite(top1_logprobs)).sum())
            raise ValueError(f"the teacher server returned no top-1 log-prob at {missing} of {actual.numel()} "
                             "completion positions (needed for 0 < β < 1)")
        ids, teacher_logprobs, valid = top1_actual_support(top1_ids, top1_logprobs, actual, actual_teacher,
                                                           self.beta)
    else:
        ids, teacher_logprobs = teacher["topk_token_ids"][rows], teacher["topk_logprobs"][rows]
        valid = teacher_logprobs > float("-inf")

    unwrapped = self.accelerator.unwrap_model(model)

    def student_loss(_):
        with self.accelerator.autocast():
            hidden = self._get_last_hidden_state(unwrapped, input_ids, attention_mask, input_ids.shape[1] - start)
        head = unwrapped.get_output_embeddings()
        device = head.weight.device
        hidden_rows = hidden[:, :width].to(device)[rows.to(device)]
        return run_as_forward(head, _served_rows_divergence, unwrapped, hidden_rows, ids.to(device),
                              actual.to(device), teacher_logprobs.to(device), valid.to(device), self.beta,
                              self.loss_add_tail, self.temperature)

    per_row = self._forward_redirection(model, unwrapped, student_loss, None)
    loss = per_row.sum() / max(int(rows.sum()), 1)
    if self.model.training:
        loss = loss / self.current_gradient_accumulation_steps
    return (loss, None) if return_outputs else loss


def _served_rows_divergence(model, hidden_rows, ids, anchor, teacher_logprobs, valid, beta, tail, temperature):
    """Per-row divergence of the student's rows against the served teacher (runs as the output layer's
    forward, so FSDP2 un-shards it and reduces its gradient)."""
    layer = output_layer(model)
    if not torch.is_autocast_enabled(hidden_rows.device.type):
        hidden_rows = hidden_rows.to(layer.weight.dtype)
    student, _ = candidate_logprobs(hidden_rows, layer.weight, ids, anchor, bias=layer.bias, temperature=temperature,
                                    **layer.kernel_kwargs())
    terms, _, _ = served_divergence_terms(student, teacher_logprobs, valid, beta=beta, tail=tail)
    return terms.sum(-1)


# ----------------------------------------------------------------------------- AsyncDistillationTrainer


def use_on_async_distillation(trainer) -> None:
    """Give this instance a ``_compute_loss`` whose chunked divergence (``_chunked_jsd_loss``) is ptd's.

    TRL's ``_compute_loss`` is kept as it is — its packing, support narrowing, rows with teacher
    signal, normalization by the global token count and every metric — and only the name
    ``_chunked_jsd_loss`` in it resolves to :func:`_async_candidate_loss` for this instance.
    """
    method = type(trainer)._compute_loss
    function = method.__func__ if hasattr(method, "__func__") else method
    namespace = dict(function.__globals__)
    namespace["_chunked_jsd_loss"] = _async_candidate_loss
    rebound = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                                 function.__closure__)
    rebound.__kwdefaults__ = function.__kwdefaults__
    trainer._compute_loss = types.MethodType(rebound, trainer)


def _async_candidate_loss(hidden_valid, lm_head_weight, lm_head_bias, logit_scale, final_logit_softcapping,
                          target_ids, teacher_target_logps, valid_candidate_mask, beta, temperature, add_tail_bucket,
                          teacher_id_idx, num_teachers, chunk_size):
    """``_chunked_jsd_loss`` of TRL's async trainer, student side through ptd: same arguments, same
    ``(loss, jsd_sum, entropy_sum, teacher_entropy_sum, per_teacher_stats)``.

    As stock, the student's logits are float32 (hidden states and head read in float32, autocast
    off) with TRL's logit scale and soft-cap; ``chunk_size`` is unused (ptd tiles on its own).
    """
    device_type = hidden_valid.device.type
    with torch.autocast(device_type, enabled=False):
        rows = hidden_valid.float()
        weight = lm_head_weight.float()
        bias = None if lm_head_bias is None else lm_head_bias.float()
        student, entropy = candidate_logprobs(rows, weight, target_ids, target_ids[:, 0].clamp_min(0), bias=bias,
                                              temperature=temperature, logit_scale=logit_scale,
                                              softcap=final_logit_softcapping, with_entropy=True)
        terms, teacher_atoms, support = served_divergence_terms(student, teacher_target_logps, valid_candidate_mask,
                                                                beta=beta, tail=add_tail_bucket)
    loss = terms.sum()
    with torch.no_grad():
        per_row = terms.sum(-1)
        teacher_log = torch.where(support, teacher_atoms, torch.zeros_like(teacher_atoms))
        teacher_p = torch.where(support, teacher_atoms.exp(), torch.zeros_like(teacher_atoms))
        teacher_entropy = torch.nan_to_num(-(teacher_p * teacher_log).sum(-1), nan=0.0)
        stats = per_row.new_zeros(3 * num_teachers)
        if teacher_id_idx is not None:
            parts = []
            for index in range(num_teachers):
                chosen = teacher_id_idx == index
                parts += [chosen.sum().float(), per_row[chosen].sum(), teacher_entropy[chosen].sum()]
            stats = torch.stack(parts)
        return loss, per_row.sum(), entropy.detach().sum(), teacher_entropy.sum(), stats
