"""TRL's own trainers on ptd's kernels, one trainer instance at a time.

``use_ptd_kernels(trainer)`` reroutes the output-layer math TRL does with its chunked kernels
(``trl/kernels/chunked_logprob.py``, ``chunked_divergence.py``) through ptd:

- ``GRPOTrainer`` (and subclasses, e.g. ``ptd_train.trl.PTDGRPOTrainer``): the per-token
  log-probs and entropy of the policy, and the log-probs of the reference model. TRL calls
  ``model(..., labels=labels, fused_lm_head=True)``; the policy's and the reference's
  ``forward`` (instance attributes) answer that call through ptd from then on, with the
  trainer's temperature and, under ``cast_lm_head_to_fp32``, a float32 output layer outside
  autocast, as TRL's own head computes it.
- ``ServerDistillationTrainer`` and ``AsyncDistillationTrainer`` (``trl.experimental``; the teacher
  behind a vLLM server): the student's side of TRL's served-teacher divergence, its log-probs at the
  teacher's candidate ids from one fused sweep, the divergence on those few atoms with TRL's own
  support, tail bucket and β paths (``ptd_kernels.integrations.trl_served``). The trainer's config
  decides everything; ``topk``/``support``/``tail`` do not apply.
- ``DistillationTrainer``: the divergence. ``topk=None`` is TRL's full-vocabulary generalized
  JSD (same β convention, docs/method.md §2), through ``ptd_kernels.linear_jsd_loss``; ``topk=K`` is
  PTD-PO's Top-K JSD with ``support`` ("union" by default) and a tail atom (``tail=True``),
  which TRL does not offer, through ``ptd_kernels.linear_topk_jsd_loss``. The trainer
  instance's ``_compute_loss`` is replaced; the student's entropy is still logged.

Nothing process-wide changes: other trainers, TRL's modules and the model classes are left
alone. Supported TRL: 1.16.x (tested with 1.16.0). The integration relies on these TRL
internals, checked on use: ``GRPOTrainer`` calls ``model(..., fused_lm_head=True)`` and reads
``log_probs`` / ``entropy``; ``DistillationTrainer._compute_loss(unwrapped_student, inputs,
num_items_in_batch)`` returns ``(loss, entropy_sum, n_valid)`` and runs inside the student's
forward (``_forward_redirection``), with ``_get_last_hidden_state`` for both models. Another
TRL version gets a warning.
"""

from __future__ import annotations

import importlib
import inspect
import types
import warnings
from dataclasses import dataclass

import torch
import trl
from accelerate.utils import is_peft_model
from packaging.version import Version

import ptd_kernels as ptd
from ptd_kernels._validate import SUPPORTS

from . import trl_served
from .hf import add_fused_head, output_layer, run_as_forward

__all__ = ["SUPPORTED_TRL", "use_ptd_kernels"]

SUPPORTED_TRL = ">=1.16,<1.17"
_LOW, _HIGH = Version("1.16"), Version("1.17")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


def check_trl_version() -> None:
    """Warn when the installed TRL is outside the tested range (its private hooks may have moved)."""
    version = Version(trl.__version__)
    if not (_LOW <= version < _HIGH):
        warnings.warn(f"ptd_kernels.integrations.trl is tested with TRL {SUPPORTED_TRL}; found {trl.__version__}",
                      stacklevel=3)


def _require(trainer, method: str, parameters: tuple[str, ...]) -> None:
    """Fail clearly when a TRL internal this integration hooks into is gone or changed shape."""
    found = getattr(type(trainer), method, None)
    names = tuple(inspect.signature(found).parameters)[1:] if callable(found) else None
    if names is None or names[: len(parameters)] != parameters:
        raise RuntimeError(f"{type(trainer).__name__}.{method}{parameters} not found (TRL {trl.__version__}); "
                           f"ptd_kernels.integrations.trl supports TRL {SUPPORTED_TRL}")


def use_ptd_kernels(trainer, *, topk: int | None = None, support: str = "union", tail: bool = True):
    """Make this TRL trainer compute its output-layer terms with ptd. Returns the trainer.

    Call it after constructing the trainer and before ``train()``. For a ``DistillationTrainer``,
    ``topk`` (K) switches from the full JSD to the Top-K JSD with ``support`` and ``tail``; a
    ``GRPOTrainer`` takes no options.
    """
    check_trl_version()
    served = _served_trainer_kind(trainer)
    if served is not None:
        if (topk, support, tail) != (None, "union", True):
            raise ValueError(f"topk, support and tail do not apply to {type(trainer).__name__}: its support and tail "
                             "bucket come from its config (loss_top_k / teacher_top_k, beta, loss_add_tail / "
                             "add_tail_bucket)")
        if getattr(trainer, "_ptd_kernels_on", False):
            return trainer
        if served == "server":
            if trainer.reverse_kl_top_1_mode != "sampled":
                raise ValueError(f"reverse_kl_top_1_mode={trainer.reverse_kl_top_1_mode!r}: a teacher server scores "
                                 "only the sampled token and its own top-k; use 'sampled'")
            _require(trainer, "_get_teacher_token_logprobs_from_server", ("inputs", "aligned_prompt_length"))
            _require(trainer, "_compute_prompt_length", ("inputs",))
            _require(trainer, "_get_last_hidden_state", ("unwrapped_model", "input_ids", "attention_mask"))
            trl_served.use_on_server_distillation(trainer)
        else:
            _require_async_hook(trainer)
            trl_served.use_on_async_distillation(trainer)
        trainer._ptd_kernels_on = True
        return trainer
    if isinstance(trainer, trl.GRPOTrainer):
        if topk is not None:
            raise ValueError("topk applies to DistillationTrainer only (GRPOTrainer has no divergence)")
        _require(trainer, "_get_per_token_logps_and_entropies", ("model", "input_ids", "attention_mask"))
        _use_on_grpo(trainer)
    elif isinstance(trainer, trl.DistillationTrainer):
        _require(trainer, "_compute_loss", ("unwrapped_student", "inputs", "num_items_in_batch"))
        _require(trainer, "_get_last_hidden_state", ("unwrapped_model", "input_ids", "attention_mask"))
        _use_on_distillation(trainer, topk, support, tail)
    else:
        raise TypeError(f"use_ptd_kernels supports trl.GRPOTrainer, trl.DistillationTrainer and trl.experimental's "
                        f"ServerDistillationTrainer and AsyncDistillationTrainer, got {type(trainer).__name__}")
    return trainer


def _served_trainer_kind(trainer) -> str | None:
    """"server" / "async" for TRL's served-teacher trainers, else None (their modules are imported only
    when the trainer's class comes from them)."""
    modules = {cls.__module__ for cls in type(trainer).__mro__}
    for kind, module, name in (("server", "trl.experimental.server_distillation", "ServerDistillationTrainer"),
                               ("async", "trl.experimental.async_distillation", "AsyncDistillationTrainer")):
        if any(m.startswith(module) for m in modules):
            cls = getattr(importlib.import_module(module), name, None)
            if cls is not None and isinstance(trainer, cls):
                return kind
    return None


def _require_async_hook(trainer) -> None:
    """The async trainer's ``_compute_loss`` must call the module-level ``_chunked_jsd_loss`` with the
    arguments ptd's replacement takes."""
    method = getattr(type(trainer), "_compute_loss", None)
    target = getattr(method, "__globals__", {}).get("_chunked_jsd_loss")
    expected = ("hidden_valid", "lm_head_weight", "lm_head_bias", "logit_scale", "final_logit_softcapping",
                "target_ids", "teacher_target_logps", "valid_candidate_mask", "beta", "temperature",
                "add_tail_bucket", "teacher_id_idx", "num_teachers", "chunk_size")
    if (method is None or "_chunked_jsd_loss" not in method.__code__.co_names or target is None
            or tuple(inspect.signature(target).parameters) != expected):
        raise RuntimeError(f"{type(trainer).__name__}._compute_loss no longer calls _chunked_jsd_loss{expected} "
                           f"(TRL {trl.__version__}); ptd_kernels.integrations.trl supports TRL {SUPPORTED_TRL}")


# ----------------------------------------------------------------------------- GRPO


def _policy_module(trainer):
    """The module whose forward TRL patched with its fused head (the base model under PEFT)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if is_peft_model(model) else model


def _use_on_grpo(trainer) -> None:
    if getattr(trainer, "_ptd_kernels_on", False):
        return
    # cast_lm_head_to_fp32: TRL casts the head's weight to float32 and runs its GEMM in float32 outside autocast
    fp32_head = bool(getattr(trainer.args, "cast_lm_head_to_fp32", False))
    add_fused_head(_policy_module(trainer), temperature=trainer.temperature, flag="fused_lm_head", with_entropy=True,
                   fp32_head=fp32_head)
    if trainer.ref_model is not None:
        add_fused_head(trainer.accelerator.unwrap_model(trainer.ref_model), temperature=trainer.temperature,
                       flag="fused_lm_head", with_entropy=False, fp32_head=fp32_head)
    trainer._ptd_kernels_on = True


# ----------------------------------------------------------------------------- distillation


@dataclass(frozen=True)
class _Divergence:
    topk: int | None
    support: str
    tail: bool


def _use_on_distillation(trainer, topk, support, tail) -> None:
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    if getattr(trainer, "teacher_model", None) is None:
        raise ValueError("this DistillationTrainer has no teacher_model (a server teacher has no output layer to fuse)")
    options = _Divergence(topk, support, bool(tail))
    trainer._compute_loss = types.MethodType(_distillation_loss_factory(options), trainer)


def _distillation_loss_factory(options: _Divergence):
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """ptd's divergence between the student and the teacher on the completion tokens.

        Runs inside the student wrapper's forward (TRL's ``compute_loss`` redirects it there).
        Returns (loss, Σ student entropy, number of completion tokens), as TRL's does.
        """
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        n_completion = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}

        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, n_completion,
                                                     **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            # through the teacher's wrapper too, so a sharded teacher gathers its parameters
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, n_completion, **multimodal)
        teacher = output_layer(unwrapped_teacher)  # frozen: a gathered copy is fine
        head = unwrapped_student.get_output_embeddings()
        valid = loss_mask.to(head.weight.device) != 0
        rows = student_hidden.to(head.weight.device)[valid]
        teacher_rows = teacher_hidden.to(teacher.weight.device)[valid].to(teacher.weight.dtype)
        n_valid = valid.sum()
        if num_items_in_batch is None:
            denominator = n_valid.clamp(min=1).to(torch.float32)
        else:
            denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=rows.device)
        weights = torch.ones(rows.shape[0], dtype=torch.float32, device=rows.device) / denominator

        def divergence(rows, teacher_rows, weights):
            # runs as the student's output layer's forward, so FSDP2 un-shards it and reduces its gradient
            student = output_layer(unwrapped_student)
            # under autocast ptd casts rows and layers to its dtype, as nn.Linear would; else the layer's
            if not torch.is_autocast_enabled(rows.device.type):
                rows = rows.to(student.weight.dtype)
            common = dict(beta=self.beta, bias=student.bias, teacher_bias=teacher.bias, temperature=self.temperature,
                          weights=weights, **student.kernel_kwargs(), **teacher.kernel_kwargs("teacher_"))
            if options.topk is None:
                loss = ptd.linear_jsd_loss(rows, student.weight, teacher_rows, teacher.weight, **common)
            else:
                loss = ptd.linear_topk_jsd_loss(rows, student.weight, teacher_rows, teacher.weight, options.topk,
                                                support=options.support, tail=options.tail, **common)
            with torch.no_grad():  # the logged entropy; one more sweep, no gradient
                _, entropy = ptd.linear_logprobs(
                    rows.detach(), student.weight.detach(),
                    torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device),
                    bias=None if student.bias is None else student.bias.detach(), temperature=self.temperature,
                    with_entropy=True, **student.kernel_kwargs())
            return loss, entropy.sum()

        loss, entropy_sum = run_as_forward(head, divergence, rows, teacher_rows, weights)
        return loss, entropy_sum, n_valid

    return _compute_loss
