"""TRL's served-teacher distillation on ptd's kernels: the student side without a [B, T, V] tensor.

A served teacher (a vLLM server) returns, per completion position, its top-k token ids and
log-probs and the log-prob of the actual token. TRL 1.16 trains against it in
``trl.experimental.server_distillation.ServerDistillationTrainer`` and
``trl.experimental.async_distillation.AsyncDistillationTrainer``; both form the student's full
``log_softmax`` over the vocabulary (``[B, T, V]``, or ``[256, V]`` float32 chunks) only to read it
at a few candidate ids. Here the student's log-probs at the candidate ids come from one fused sweep
(:func:`candidate_logprobs`: ``ptd_kernels.linear_logprobs_at``, one d weight), and TRL's divergence runs
on the ``[rows, candidates + 1]`` atoms.

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

from .hf import output_layer, run_as_forward

__all__ = ["candidate_logprobs", "served_divergence_terms", "tail_bucket"]

#: TRL's clamp of the support's summed log-mass before the tail bucket (``_add_tail_bucket``).
TAIL_LOG_MASS_MAX = -1e-7


# ----------------------------------------------------------------------------- the student side


def candidate_logprobs(hidden, weight, candidates, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                       with_entropy=False):
    """The student's log-probs at candidate ids, ``[n, C]`` float32, differentiable in ``hidden``,
    ``weight`` and ``bias``, without a tokens×vocabulary tensor: ``ptd_kernels.linear_logprobs_at`` — one
    fused sweep for the rows' logsumexps (and the entropy) and a gather of the logits at the candidates
    forward, one sweep backward with the candidates as sparse terms (one d weight, however many candidates).
    ``candidates`` [n, C]: ids, negative ones read as 0 (the caller masks them). Under ``torch.autocast`` the
    operands are read in the autocast dtype, as ptd's fused functions read them. Returns ``(logp, entropy)``
    with ``entropy`` None unless ``with_entropy``.
    """
    vocab = weight.shape[0]
    if candidates.numel() and int(candidates.max()) >= vocab:
        raise ValueError(f"candidate id {int(candidates.max())} is outside the student's vocabulary [0, {vocab}): the "
                         "teacher must share the student's vocabulary")
    out = ptd.linear_logprobs_at(hidden, weight, candidates.clamp_min(0), bias=bias, temperature=temperature,
                                 logit_scale=logit_scale, softcap=softcap, with_entropy=with_entropy)
    return out if with_entropy else (out, None)


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
                              teacher_logprobs.to(device), valid.to(device), self.beta, self.loss_add_tail,
                              self.temperature)

    per_row = self._forward_redirection(model, unwrapped, student_loss, None)
    loss = per_row.sum() / max(int(rows.sum()), 1)
    if self.model.training:
        loss = loss / self.current_gradient_accumulation_steps
    return (loss, None) if return_outputs else loss


def _served_rows_divergence(model, hidden_rows, ids, teacher_logprobs, valid, beta, tail, temperature):
    """Per-row divergence of the student's rows against the served teacher (runs as the output layer's
    forward, so FSDP2 un-shards it and reduces its gradient)."""
    layer = output_layer(model)
    if not torch.is_autocast_enabled(hidden_rows.device.type):
        hidden_rows = hidden_rows.to(layer.weight.dtype)
    student, _ = candidate_logprobs(hidden_rows, layer.weight, ids, bias=layer.bias, temperature=temperature,
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
        student, entropy = candidate_logprobs(rows, weight, target_ids, bias=bias, temperature=temperature,
                                              logit_scale=logit_scale, softcap=final_logit_softcapping,
                                              with_entropy=True)
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
