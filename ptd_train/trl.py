"""PTD-PO on TRL: ``PTDGRPOTrainer`` is TRL's ``GRPOTrainer`` plus the Top-K JSD of docs/method.md §3.

Same constructor as ``GRPOTrainer`` (with a :class:`PTDGRPOConfig`), same datasets, reward
functions and processors, plus one dataset column: the privileged hint (``hint_column``, None
for rows without one). Per rollout batch:

1. rewards as TRL computes them; the PTD set F = rollouts with reward < 1 in groups whose mean
   reward < ``ptd_threshold`` and whose prompt has a hint (docs/method.md §3);
2. the teacher — the frozen initial policy (TRL's reference model when ``beta > 0``, else a
   frozen copy of the policy taken at construction) — reads the prompt with the hint appended
   through the processor's chat template (same images), teacher-forced on the student's
   completion; only F's sequences are needed (for a VLM batch, the whole micro-batch runs).
   With ``ptd_teacher_server_url`` the teacher is served instead (no local copy): a vLLM server
   holding the initial checkpoint returns the top-K of F's hinted sequences once per generation
   batch (``ptd_train.teacher_server``; TRL's ``VLLMClient``, or any object with its
   ``get_sequence_logprobs`` set as ``trainer.ptd_teacher_client``), and the JSD is the sparse
   teacher's (support "teacher", ``ptd_kernels.linear_sparse_jsd``);
3. loss = TRL's GRPO loss (its ``loss_type``, clipping, KL, a static entropy bonus) + ``ptd_coef`` ·
   Σ_F D_K / Σ_F |y|, the PTD denominator counted over the whole generation batch (all processes), so
   that gradient accumulation and data parallelism give the same gradient as one big batch; members of
   PTD groups lose their reference-KL term (``ptd_drop_ref_kl``). For the settings it expresses (loss
   types grpo, bnpo, dr_grpo, dapo at the token level; see ``one_sweep_unsupported``) the whole loss is
   TRL's per-token loss written as ``ptd_kernels.PolicyLoss`` and formed with its gradients in one sweep
   per side (``ptd_kernels.linear_policy_loss``: 4 logits-GEMM equivalents with the teacher, 3 without);
   TRL's metrics are logged from its terms. Any other setting takes the per-row path: one ptd sweep per
   side (``ptd_kernels.linear_ptd_terms``) gives the policy's log-probs and entropy — which TRL's own
   loss then uses — and the Top-K JSD, overlap and teacher mass, and the PTD term is added to TRL's loss.

Hints pass ``ptd_train.hints.check_hint`` (zero-spoiler) against ``ptd_answer_column`` before a
teacher sees them. Logged: ``ptd/jsd``, ``ptd/overlap``, ``ptd/teacher_mass`` (means over F's
tokens) and ``ptd/rollouts`` (|F| per generation batch). ``ptd_coef = 0`` switches PTD-PO off
(no teacher, no dropped KL): the trainer is then ``GRPOTrainer`` on ptd's kernels.

Every log-prob (old, reference, current) goes through ptd (``ptd_kernels.integrations.trl``).
TRL 1.16.x. Not supported (clear error): PEFT models, environment factories, MoE aux loss,
DeepSpeed with ``beta = 0``.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational, prepare_multimodal_messages

from ptd_kernels import SUPPORTS, PolicyLoss
from ptd_kernels.integrations.hf import PTDTeacher, SparseTeacher, add_fused_head, output_layer
from ptd_kernels.integrations.trl import check_trl_version, use_ptd_kernels
from ptd_kernels.policy_loss import normalization_weights

from .grpo import k3, ptd_groups, ptd_set, ptd_term
from .hints import check_hint
from .prompts import left_pad
from .teacher_server import accepts_images, served_topk

__all__ = ["PTDGRPOConfig", "PTDGRPOTrainer"]

# multimodal inputs that depend on the images only, so the teacher reuses the student's
_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
               "image_position_ids")
# per-token multimodal inputs: the teacher's prompt has its own
_TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")


@dataclass
class PTDGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus PTD-PO's settings (docs/method.md §3)."""

    ptd_coef: float = field(default=0.05, metadata={"help": "λ: weight of the Top-K JSD term (0 = plain GRPO)."})
    ptd_k: int = field(default=100, metadata={"help": "K of the Top-K support (capped at the vocabulary)."})
    ptd_beta: float = field(default=0.5, metadata={"help": "β of the generalized JSD (0 = KL(q‖p), 1 = KL(p‖q))."})
    ptd_support: str = field(default="union", metadata={"help": "Top-K support: union | teacher | student."})
    ptd_tail: bool = field(default=True, metadata={"help": "Add the tail atom (else renormalize over the support)."})
    ptd_threshold: float = field(
        default=1.0, metadata={"help": "Groups whose mean reward is below this get PTD (failed rollouts only)."})
    ptd_drop_ref_kl: bool = field(default=True, metadata={"help": "No reference-KL term for members of PTD groups."})
    hint_column: str = field(default="hint", metadata={"help": "Dataset column of the privileged hint (None = none)."})
    ptd_teacher_server_url: str | None = field(
        default=None, metadata={"help": "Base URL of a vLLM server holding the initial policy: the hinted teacher's "
                                        "top-K comes from it (no local teacher copy; ptd_support must be 'teacher')."})
    ptd_answer_column: str | None = field(
        default="answer", metadata={"help": "Dataset column the zero-spoiler check compares each hint with."})
    ptd_allow_answer_leak: bool = field(
        default=False, metadata={"help": "Skip the zero-spoiler check (an answer-conditioned teacher, on purpose)."})

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.ptd_coef, (int, float)) and self.ptd_coef >= 0):
            raise ValueError(f"ptd_coef must be a number ≥ 0, got {self.ptd_coef!r}")
        if isinstance(self.ptd_k, bool) or not isinstance(self.ptd_k, int) or self.ptd_k < 1:
            raise ValueError(f"ptd_k must be an int ≥ 1, got {self.ptd_k!r}")
        if not (0.0 <= self.ptd_beta <= 1.0):
            raise ValueError(f"ptd_beta must lie in [0, 1], got {self.ptd_beta!r}")
        if self.ptd_support not in SUPPORTS:
            raise ValueError(f"ptd_support must be one of {SUPPORTS}, got {self.ptd_support!r}")
        if not self.hint_column:
            raise ValueError("hint_column must name a dataset column")
        if self.ptd_teacher_server_url and self.ptd_support != "teacher":
            raise ValueError(
                f"ptd_support={self.ptd_support!r} with a teacher server: 'union' and 'student' need the teacher's "
                "log-probs at the student's top-K ids, which a vLLM server does not return (its prompt_logprobs give "
                "its own top-k and the actual token); set ptd_support='teacher'")


@dataclass
class _PendingStep:
    """What one ``_compute_loss`` call hands to the log-prob call inside TRL's loss."""

    batch: dict
    teacher: PTDTeacher | SparseTeacher | None
    ptd_group: torch.Tensor
    consumed: bool = False
    jsd: torch.Tensor | None = None
    overlap: torch.Tensor | None = None
    teacher_mass: torch.Tensor | None = None


class PTDGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with PTD-PO's Top-K JSD on failed rollouts (see the module doc).

    Takes exactly ``GRPOTrainer``'s arguments; ``args`` must be a :class:`PTDGRPOConfig`
    (default: one with PTD-PO's defaults). Override :meth:`hinted_prompt` to place the hint
    elsewhere in the prompt.
    """

    _tag_names = ["trl", "grpo", "ptd-po"]
    hint_separator = "\n\n"

    def __init__(self, *args, **kwargs):
        check_trl_version()
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        config = arguments.get("args")
        if config is None:
            model = arguments["model"]
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            arguments["args"] = PTDGRPOConfig(f"{name.rstrip('/').split('/')[-1]}-PTD-PO")
        elif not isinstance(config, PTDGRPOConfig):
            raise TypeError(f"args must be a PTDGRPOConfig, got {type(config).__name__}")
        super().__init__(**arguments)
        use_ptd_kernels(self)
        self.ptd_coef = float(self.args.ptd_coef)
        self._ptd_pending: _PendingStep | None = None
        self._ptd_rewards_per_func = None
        self._ptd_checked_hints: set = set()
        self._ptd_enabled = self.ptd_coef > 0
        #: the served teacher (ptd_train.teacher_server.TeacherServer), or None: a local frozen copy
        self.ptd_teacher_client = None
        if self._ptd_enabled:
            self._check_supported()
        if self._ptd_enabled and self.args.ptd_teacher_server_url:
            from trl.generation.vllm_client import VLLMClient

            self.ptd_teacher_client = VLLMClient(base_url=self.args.ptd_teacher_server_url,
                                                 connection_timeout=self.args.vllm_server_timeout)
            if self._is_vlm and not accepts_images(self.ptd_teacher_client):
                raise NotImplementedError(
                    f"{type(self.ptd_teacher_client).__name__}.get_sequence_logprobs sends token ids only, and this "
                    "model reads images: a vision-language teacher needs a client that takes images= (set "
                    "trainer.ptd_teacher_client), or the local teacher (ptd_teacher_server_url=None)")
        served = self.ptd_teacher_client is not None
        self.ptd_teacher_model = self._build_teacher() if self._ptd_enabled and not served else None

    # ------------------------------------------------------------------ set-up

    def _check_supported(self) -> None:
        """What PTD-PO does not run with here, local or served teacher alike."""
        if is_peft_model(self.model):
            raise NotImplementedError("PTDGRPOTrainer does not support PEFT models yet (the teacher would be the "
                                      "adapter-free base model)")
        if self.environment_factories is not None:
            raise NotImplementedError("PTDGRPOTrainer does not support environment_factory (the teacher prompt "
                                      "would need each environment's observation)")

    def _build_teacher(self):
        """The frozen initial policy: TRL's reference model if it built one, else a frozen copy."""
        if self.ref_model is not None:
            return self.ref_model  # given a fused head by use_ptd_kernels
        if self.is_deepspeed_enabled:
            raise NotImplementedError("under DeepSpeed set beta > 0: TRL then builds the reference model, which is "
                                      "PTD-PO's teacher")
        teacher = copy.deepcopy(self.accelerator.unwrap_model(self.model))
        for module in teacher.modules():
            # instance-level forwards (TRL's fused head, its fp32 head cast) close over the original modules
            module.__dict__.pop("forward", None)
        teacher.requires_grad_(False).eval()
        add_fused_head(teacher, temperature=self.temperature, flag="fused_lm_head", with_entropy=False,
                       fp32_head=self.args.cast_lm_head_to_fp32)
        if self.is_fsdp_enabled:
            from trl.models.utils import prepare_fsdp

            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [self.args.hint_column] + ([self.args.ptd_answer_column] if self.args.ptd_answer_column else [])
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    # ------------------------------------------------------------------ hints and teacher prompts

    def hinted_prompt(self, prompt, hint: str):
        """The teacher's prompt x^h: the hint appended to the last user turn (to a plain-text
        prompt, after ``hint_separator``). Returns a new object; ``prompt`` is not changed."""
        if isinstance(prompt, str):
            return prompt + self.hint_separator + hint
        messages = list(prompt)
        for i in range(len(messages) - 1, -1, -1):
            if messages[i]["role"] == "user":
                content = messages[i]["content"]
                if isinstance(content, str):
                    content = content + self.hint_separator + hint
                else:
                    content = [*content, {"type": "text", "text": self.hint_separator + hint}]
                messages[i] = {**messages[i], "content": content}
                return messages
        raise ValueError("a conversational prompt needs a user turn to carry the hint")

    def _checked_hints(self, inputs) -> list[str | None]:
        column, answer_column = self.args.hint_column, self.args.ptd_answer_column
        if any(column not in x for x in inputs):
            raise ValueError(f"PTD-PO reads each prompt's hint from the dataset column {column!r} (hint_column), "
                             "which this batch lacks; add it (None where there is no hint)")
        hints = []
        for x in inputs:
            hint = x[column]
            if hint is None or (isinstance(hint, str) and not hint.strip()):
                hints.append(None)
                continue
            if not isinstance(hint, str):
                raise TypeError(f"column {column!r} must hold strings or None, got {type(hint).__name__}")
            if not self.args.ptd_allow_answer_leak:
                if not answer_column or x.get(answer_column) is None:
                    raise ValueError(
                        f"the zero-spoiler check compares each hint with the answer in column {answer_column!r} "
                        "(ptd_answer_column), which this row lacks; add it, or set ptd_allow_answer_leak=True to "
                        "use unchecked hints on purpose")
                key = (hint, str(x[answer_column]))
                if key not in self._ptd_checked_hints:
                    check_hint(*key)
                    self._ptd_checked_hints.add(key)
            hints.append(hint)
        return hints

    def _teacher_prompts(self, inputs, hints, student_prompt_ids, student_prompt_mask) -> dict:
        """Left-padded teacher prompt ids / mask (and token types) for the local rows."""
        prompts = [x["prompt"] for x in inputs]
        if "images" in inputs[0]:
            images = [x.get("images") for x in inputs]
        elif "image" in inputs[0]:
            images = [[x["image"]] if x.get("image") is not None else None for x in inputs]
        else:
            images = None
        if images is not None and all(not i for i in images):
            images = None
        conversational = is_conversational(inputs[0])
        if images is not None:
            prompts = [prepare_multimodal_messages(p, images=i) for p, i in zip(prompts, images)]
        prompts = [self.hinted_prompt(p, h) if h is not None else p for p, h in zip(prompts, hints)]
        if conversational:
            if self._is_vlm:
                prompts = [prepare_multimodal_messages(p) for p in prompts]
            encoded = self.processing_class.apply_chat_template(
                conversation=prompts, tools=self.tools or None, chat_template=self.chat_template,
                add_generation_prompt=True, tokenize=True, return_dict=True, **self.chat_template_kwargs)
        else:
            encoded = self.processing_class(text=prompts)
        ids = [list(map(int, row)) for row in encoded["input_ids"]]
        if "attention_mask" in encoded:  # drop any padding the processor added
            keep = [[bool(m) for m in row] for row in encoded["attention_mask"]]
        else:
            keep = [[True] * len(row) for row in ids]
        device = student_prompt_ids.device
        out = {}
        out["ptd_teacher_prompt_ids"], out["ptd_teacher_prompt_mask"] = left_pad(
            [[t for t, k in zip(r, m) if k] for r, m in zip(ids, keep)], self._tokenizer.pad_token_id, device)
        for key in _TOKEN_TYPE_KEYS:
            if key in encoded:
                rows = [[int(t) for t, k in zip(r, m) if k] for r, m in zip(encoded[key], keep)]
                out[f"ptd_teacher_{key}"] = left_pad(rows, 0, device)[0]
        image_token = self._image_pad_token_id
        if images is not None and image_token is not None:
            teacher_count = (out["ptd_teacher_prompt_ids"] == image_token).sum(1)
            student_count = ((student_prompt_ids == image_token) & student_prompt_mask.bool()).sum(1)
            if not torch.equal(teacher_count, student_count):
                raise RuntimeError("the hinted teacher prompt holds a different number of image tokens than the "
                                   "student's; the hint must not change how the images are rendered")
        return out

    # ------------------------------------------------------------------ rollouts

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._ptd_rewards_per_func = rewards_per_func  # all processes' rollouts
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if not self._ptd_enabled:
            return super()._generate_and_score_completions(inputs)
        hints = self._checked_hints(inputs)
        self._ptd_rewards_per_func = None
        output = dict(super()._generate_and_score_completions(inputs))
        rewards_per_func, self._ptd_rewards_per_func = self._ptd_rewards_per_func, None
        if rewards_per_func is None:
            raise RuntimeError("TRL's _generate_and_score_completions did not call _calculate_rewards")
        device = output["completion_ids"].device
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable: never in F
        # every process's rollouts grouped [prompts, G]; the hints are known for this process's rows only, and
        # a prompt's hint is the same in all its rows: a group has one if its rows here have one (the groups with
        # no row here are not used)
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        has_hint = torch.ones(rewards.shape[0], dtype=torch.bool, device=device)
        has_hint[local] = torch.tensor([h is not None for h in hints], device=device)
        grouped, group_hint = rewards.to(device).view(-1, group_size), has_hint.view(-1, group_size).all(dim=1)
        ptd_group = ptd_groups(grouped, group_hint, self.args.ptd_threshold).repeat_interleave(group_size)[local]
        ptd_rollout = ptd_set(grouped, group_hint, self.args.ptd_threshold).reshape(-1)[local]
        loss_mask = output["completion_mask"] if "tool_mask" not in output else output["completion_mask"] * output[
            "tool_mask"]
        local_stats = torch.stack([ptd_rollout.sum(), (loss_mask * ptd_rollout[:, None]).sum()]).float()
        global_stats = self.accelerator.gather(local_stats.unsqueeze(0)).sum(0)
        self._metrics[mode]["ptd/rollouts"].append(global_stats[0].item())
        output.update(ptd_rollout=ptd_rollout, ptd_group=ptd_group, ptd_num_tokens=global_stats[1])
        output.update(self._teacher_prompts(inputs, hints, output["prompt_ids"], output["prompt_mask"]))
        if self.ptd_teacher_client is not None:
            output.update(self._served_teacher(inputs, output, ptd_rollout))
        return output

    def _served_teacher(self, inputs, output, ptd_rollout) -> dict:
        """The served teacher's top-K on F's hinted sequences: [B, C, K] ids and log-probs (once per
        generation batch; the micro-batches and iterations reuse them)."""
        if self.args.ptd_support != "teacher":
            raise ValueError(f"ptd_support={self.args.ptd_support!r} with a teacher client: a served teacher gives its "
                             "own top-K only; set ptd_support='teacher'")
        rows = ptd_rollout.nonzero().squeeze(-1).tolist()
        prompt_ids, prompt_mask = output["ptd_teacher_prompt_ids"], output["ptd_teacher_prompt_mask"].bool()
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"].bool()
        sequences = [prompt_ids[r][prompt_mask[r]].tolist() + completion_ids[r][completion_mask[r]].tolist()
                     for r in rows]
        prompt_lengths = [int(prompt_mask[r].sum()) for r in rows]
        images = None
        if "images" in inputs[0] or "image" in inputs[0]:
            images = [inputs[r].get("images") or ([inputs[r]["image"]] if inputs[r].get("image") is not None
                                                  else None) for r in rows]
            images = images if any(images) else None
        vocab = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
        indices, logprobs = served_topk(self.ptd_teacher_client, sequences, prompt_lengths,
                                        min(self.args.ptd_k, vocab), self.temperature, completion_ids.shape[1],
                                        completion_ids.device, images=images)
        full_indices = torch.arange(indices.shape[-1], device=indices.device).expand(
            completion_ids.shape[0], completion_ids.shape[1], indices.shape[-1]).clone()
        full_logprobs = torch.full(full_indices.shape, float("-inf"), device=indices.device)
        full_indices[rows], full_logprobs[rows] = indices, logprobs
        return {"ptd_teacher_topk_ids": full_indices, "ptd_teacher_topk_logprobs": full_logprobs}

    # ------------------------------------------------------------------ loss

    def _teacher_states(self, inputs, rows: torch.Tensor) -> PTDTeacher:
        """The teacher's hidden states at the completion positions [B, C, H'] (zero off ``rows``)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        n_completion = completion_ids.size(1)
        input_ids = torch.cat([inputs["ptd_teacher_prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["ptd_teacher_prompt_mask"], completion_mask], dim=1)
        model_inputs = {k: inputs[k] for k in _IMAGE_KEYS if inputs.get(k) is not None}
        for key in _TOKEN_TYPE_KEYS:
            if f"ptd_teacher_{key}" in inputs:
                prompt_types = inputs[f"ptd_teacher_{key}"]
                model_inputs[key] = torch.cat([prompt_types, prompt_types.new_zeros(completion_ids.shape)], dim=1)
        select = None
        if not model_inputs:  # text only: run just the sequences that get a JSD
            select = rows.nonzero().squeeze(-1)
            input_ids, attention_mask = input_ids[select], attention_mask[select]
        with torch.no_grad(), self.accelerator.autocast():
            out = self.ptd_teacher_model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=True,
                                         **model_inputs)
        hidden = out.last_hidden_state[:, -n_completion - 1:-1]
        if select is not None:
            full = hidden.new_zeros((rows.shape[0], n_completion, hidden.shape[-1]))
            full[select] = hidden
            hidden = full
        args = self.args
        return PTDTeacher(hidden=hidden, layer=output_layer(self.accelerator.unwrap_model(self.ptd_teacher_model)),
                          rows=rows, k=args.ptd_k, beta=args.ptd_beta, support=args.ptd_support, tail=args.ptd_tail)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        pending = self._ptd_pending
        if pending is None or pending.consumed:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        # the policy pass of the loss: log-probs, entropy and the PTD terms from one sweep per side
        pending.consumed = True
        if compute_aux_loss:
            raise NotImplementedError("PTDGRPOTrainer does not compute the MoE load-balancing loss")
        if batch_size is not None and batch_size < input_ids.size(0):
            raise RuntimeError("the loss pass is expected in one chunk (TRL changed _compute_loss)")
        multimodal.pop("num_images", None)
        multimodal.pop("num_tiles", None)
        model_inputs = {k: v for k, v in multimodal.items() if v is not None}
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                        fused_teacher=pending.teacher, **model_inputs)
        logps = out.log_probs[:, -logits_to_keep:]
        entropies = out.entropy[:, -logits_to_keep:] if compute_entropy else None
        if pending.teacher is not None:
            pending.jsd = out.jsd[:, -logits_to_keep:]
            pending.overlap = out.overlap[:, -logits_to_keep:]
            pending.teacher_mass = out.teacher_mass[:, -logits_to_keep:]
        batch = pending.batch
        if self.args.ptd_drop_ref_kl and self.beta != 0.0 and batch.get("ref_per_token_logps") is not None:
            # k3 at r = logp (detached) is 0 with zero gradient: PTD groups lose their reference-KL term
            batch["ref_per_token_logps"] = torch.where(pending.ptd_group[:, None], logps.detach(),
                                                       batch["ref_per_token_logps"])
        return logps, entropies, None

    def one_sweep_unsupported(self, inputs) -> str | None:
        """Why this batch's loss cannot come from one sweep (None: it can). The one-sweep loss needs TRL's
        per-token loss to be a function of each token's own log-prob, entropy and divergence."""
        args = self.args
        checks = (
            (self.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"), f"loss_type={self.loss_type!r}"),
            (self.importance_sampling_level != "token", "importance_sampling_level='sequence' (a sequence's ratio)"),
            (args.delta is not None, "delta (two-sided clipping)"),
            (self.off_policy_mask_threshold is not None, "off_policy_mask_threshold (a sequence-level mask)"),
            (self.top_entropy_quantile < 1.0, "top_entropy_quantile < 1 (a mask from the batch's entropies)"),
            (self.use_vllm and self.vllm_importance_sampling_correction, "vLLM importance-sampling correction"),
            (self._entropy_bonus_enabled and self.use_adaptive_entropy, "the adaptive entropy bonus"),
            (self.aux_loss_enabled, "the MoE load-balancing loss"),
            ("tool_mask" in inputs, "a tool mask"),
            ("ptd_teacher_topk_ids" in inputs, "a served teacher (its top-K: the per-row sparse JSD)"),
        )
        return next((why for unsupported, why in checks if unsupported), None)

    def _compute_loss(self, model, inputs):
        if self.one_sweep_unsupported(inputs) is None:
            return self._one_sweep_loss(model, inputs)
        if not self._ptd_enabled or "ptd_rollout" not in inputs:
            return super()._compute_loss(model, inputs)
        rows = inputs["ptd_rollout"]
        if "ptd_teacher_topk_ids" in inputs:  # served: the teacher's top-K came with the rollouts
            teacher = None
            if bool(rows.any()):
                teacher = SparseTeacher(indices=inputs["ptd_teacher_topk_ids"],
                                        logprobs=inputs["ptd_teacher_topk_logprobs"], rows=rows,
                                        beta=self.args.ptd_beta, tail=self.args.ptd_tail)
        else:
            needs_teacher = rows.any()
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # a sharded teacher runs on every rank or none
                needs_teacher = self.accelerator.reduce(needs_teacher.float(), reduction="sum") > 0
            teacher = self._teacher_states(inputs, rows) if bool(needs_teacher) else None
        # TRL's loss reads this shallow copy; the buffered batch (reused when num_iterations > 1) is never changed
        pending = _PendingStep(batch=dict(inputs), teacher=teacher, ptd_group=inputs["ptd_group"])
        self._ptd_pending = pending
        try:
            loss = super()._compute_loss(model, pending.batch)
        finally:
            self._ptd_pending = None
        if not pending.consumed:
            raise RuntimeError("TRL's _compute_loss did not call _get_per_token_logps_and_entropies")

        mode = "train" if self.model.training else "eval"
        loss_mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs[
            "tool_mask"]
        f_mask = (loss_mask.bool() & rows[:, None]).float()
        if pending.jsd is not None:
            # Σ_F D_K / Σ_F |y| over the generation batch: the denominator is that batch's count, rescaled
            # to one process and one accumulation window as TRL's token-level losses do
            denominator = inputs["ptd_num_tokens"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                denominator = denominator * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = loss + self.ptd_coef * ptd_term(pending.jsd, loss_mask, rows, denominator)
            sums = torch.stack([(pending.jsd.detach() * f_mask).sum(), (pending.overlap * f_mask).sum(),
                                (pending.teacher_mass * f_mask).sum(), f_mask.sum()])
        else:
            sums = f_mask.new_zeros(4)
        sums = self.accelerator.reduce(sums, reduction="sum")
        if sums[3] > 0:
            for name, value in zip(("ptd/jsd", "ptd/overlap", "ptd/teacher_mass"), (sums[:3] / sums[3]).tolist()):
                self._metrics[mode][name].append(value)
        return loss


    # ------------------------------------------------------------------ the one-sweep loss

    def _local_teacher(self, inputs) -> PTDTeacher | None:
        """The local teacher's states for the rows of F (None: no row of F, or PTD off)."""
        if not self._ptd_enabled or "ptd_rollout" not in inputs:
            return None
        rows = inputs["ptd_rollout"]
        needs_teacher = rows.any()
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # a sharded teacher runs on every rank or none
            needs_teacher = self.accelerator.reduce(needs_teacher.float(), reduction="sum") > 0
        return self._teacher_states(inputs, rows) if bool(needs_teacher) else None

    def _policy_loss(self, inputs, mask: torch.Tensor, with_teacher: bool) -> tuple[PolicyLoss, float]:
        """TRL's per-token loss (its ``_compute_loss``) with PTD-PO's term, as named token losses [B, T]; and the
        factor from the loss's policy part to TRL's logged ``policy_loss``."""
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        per_token = mask.to(torch.float32)
        rows, length = per_token.shape
        factor = accumulation
        if self.loss_type in ("grpo", "bnpo", "dr_grpo"):  # this batch's counts: PolicyLoss's own normalizations
            weights = normalization_weights(mask, self.loss_type, max_length=self.max_completion_length)
            weights = weights.view(rows, length)
        else:  # dapo: the generation batch's token count, rescaled to one process and one accumulation window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            weights, factor, accumulation = per_token / normalizer, 1.0, 1.0
        weights = weights / accumulation
        advantages = inputs["advantages"]
        advantages = advantages[:, None].expand(rows, length) if advantages.dim() == 1 else advantages
        ref, kl_mask = None, None
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            if self._ptd_enabled and self.args.ptd_drop_ref_kl and "ptd_group" in inputs:
                kl_mask = (~inputs["ptd_group"])[:, None].expand(rows, length)
        ptd_tokens = 1.0
        if with_teacher:  # Σ_F |y| over the generation batch, rescaled as TRL's token-level losses are
            ptd_tokens = inputs["ptd_num_tokens"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                ptd_tokens = ptd_tokens * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        entropy_coef, entropy_weights = 0.0, None
        if self._entropy_bonus_enabled:  # a mean over the response tokens, scaled for gradient accumulation only
            entropy_coef = self.entropy_coef
            entropy_weights = per_token / per_token.sum().clamp(min=1.0) / (
                self.current_gradient_accumulation_steps if mode == "train" else 1.0)
        loss = PolicyLoss(advantages.float(), weights=weights, old_logprobs=inputs.get("old_per_token_logps"),
                          epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, ref_logprobs=ref,
                          kl_coef=self.beta, kl_mask=kl_mask, ptd_coef=self.ptd_coef if with_teacher else 0.0,
                          ptd_tokens=ptd_tokens, entropy_coef=entropy_coef, entropy_weights=entropy_weights,
                          kl_ratio=bool(self.args.use_bias_correction_kl))
        return loss, factor

    def _one_sweep_loss(self, model, inputs):
        """TRL's GRPO loss (+ PTD-PO's term) from one sweep per side, and TRL's metrics from its terms."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask
        teacher = self._local_teacher(inputs)
        policy_loss, factor = self._policy_loss(inputs, mask, teacher is not None)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        model_inputs = {k: inputs[k] for k in _IMAGE_KEYS + _TOKEN_TYPE_KEYS if inputs.get(k) is not None}
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                        fused_teacher=teacher, fused_policy_loss=policy_loss, **model_inputs)
        loss = out.loss
        logps = out.log_probs[:, -logits_to_keep:]
        entropies = out.entropy[:, -logits_to_keep:]
        self._log_one_sweep(policy_loss, factor, logps, entropies, mask)
        mode = "train" if self.model.training else "eval"
        if teacher is not None:
            f_mask = (mask.bool() & inputs["ptd_rollout"][:, None]).float()
            jsd, overlap, mass = (t[:, -logits_to_keep:] for t in (out.jsd, out.overlap, out.teacher_mass))
            sums = torch.stack([(jsd * f_mask).sum(), (overlap * f_mask).sum(), (mass * f_mask).sum(), f_mask.sum()])
        else:
            sums = mask.new_zeros(4, dtype=torch.float32)
        if self._ptd_enabled:
            sums = self.accelerator.reduce(sums, reduction="sum")
            if sums[3] > 0:
                for name, value in zip(("ptd/jsd", "ptd/overlap", "ptd/teacher_mass"), (sums[:3] / sums[3]).tolist()):
                    self._metrics[mode][name].append(value)
        return loss

    def _log_one_sweep(self, policy_loss: PolicyLoss, factor: float, logps, entropies, mask) -> None:
        """TRL's metrics of its ``_compute_loss`` (KL, entropy, clip ratios, the entropy bonus' policy loss and
        coefficient), from the one sweep's detached terms."""
        from trl.trainer.utils import nanmax, nanmin

        mode = "train" if self.model.training else "eval"
        mask = mask.to(logps.dtype)

        def global_masked_mean(x):
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):
            return (x * mask).sum(-1) / mask.sum(-1)

        shape = logps.shape
        old = logps if policy_loss.old_logprobs is None else policy_loss.old_logprobs.view(shape)
        ratio = torch.exp(logps - old)
        if self.beta != 0.0:
            per_token_kl = k3(logps, policy_loss.ref_logprobs.view(shape))
            if policy_loss.kl_mask is not None:
                per_token_kl = torch.where(policy_loss.kl_mask.view(shape), per_token_kl,
                                           torch.zeros_like(per_token_kl))
            if policy_loss.kl_ratio:
                per_token_kl = per_token_kl * ratio
            self._metrics[mode]["kl"].append(global_masked_mean(per_token_kl))
        self._metrics[mode]["entropy"].append(global_masked_mean(entropies))
        advantages = policy_loss.advantages.view(shape)
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        self._metrics[mode]["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        self._metrics[mode]["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
        if self._entropy_bonus_enabled:
            flat = (logps.reshape(-1), entropies.reshape(-1), torch.zeros_like(logps.reshape(-1)))
            parts = policy_loss.map_rows(lambda t: t.reshape(-1)).parts(*flat)
            policy = (parts["policy"] + self.beta * parts["kl"]) * factor
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy.detach()).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
