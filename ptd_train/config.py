"""Training configuration: one dataclass whose fields are the flags of ``python -m ptd_train.run``.

``ptd_train/cli.py`` builds the command line from the fields (their ``help``, ``no_help`` for the
``--no_`` form of a flag that defaults to true, ``choices``, and ``default_text`` where a ``None``
default is resolved later). :meth:`TrainConfig.check` validates every value before any work
starts and raises :class:`UsageError` naming the value and what to do; the command line prints
that as one line. Fields left at ``None`` resolve per setting (:meth:`TrainConfig.resolved`).

This module imports nothing heavy (no torch, no transformers): ``--help`` and every check of the
configuration run before those are imported. :meth:`TrainConfig.check` reads values only,
:meth:`TrainConfig.check_files` the files and folders they name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field


class UsageError(ValueError):
    """A mistake in how the trainer was called — a flag, a file, a folder — that the user fixes;
    the command line prints its message as one line and exits with code 2."""


# hint kinds of the embedded task (ptd_train.hints.HINT_KINDS, spelled here to keep this module light)
EMBEDDED_HINT_KINDS = ("spatial", "coarse", "procedure", "both")
# the marker ptd_train.run writes into final/: the trained model and what trained it
TRAINED_MARKER = "ptd_train.json"


def cache_root() -> str:
    """Where ptd keeps what runs share: ``$PTD_CACHE``, else ``$XDG_CACHE_HOME/ptd``, else ``~/.cache/ptd``."""
    if os.environ.get("PTD_CACHE"):
        return os.path.expanduser(os.environ["PTD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ptd")


# --help's texts beyond a field's own help (filled by _opt, read through FLAG_TEXT below): the
# --no_ form of a flag that defaults to true, and what a None default means. They stay out of the
# fields' metadata, which other parsers (transformers' HfArgumentParser) pass to argparse as is.
_EXTRA_TEXT: dict[int, dict[str, str]] = {}


def _opt(default, help: str, *, no_help: str | None = None, default_text: str | None = None, **argparse_kwargs):
    """A field with its help (and argparse's ``choices`` / ``metavar``)."""
    f = field(default=default, metadata={"help": help, **argparse_kwargs})
    extra = {key: text for key, text in (("no_help", no_help), ("default_text", default_text)) if text}
    if extra:
        _EXTRA_TEXT[id(f)] = extra  # dataclass() keeps this very Field object: FLAG_TEXT finds it by name
    return f


@dataclass
class TrainConfig:
    """GRPO + PTD-PO on the embedded tiny task (defaults) or on a local checkpoint + JSONL.

    Fields left at ``None`` resolve per setting (:meth:`resolved`); "the embedded model" is the
    tiny Qwen3-VL built from a config, or a ``final/`` folder a run of it wrote:

    - ``ptd_coef`` (λ): 0.05 on a checkpoint; 1.0 on the embedded model, where with AdamW and
      clipping at 1.0 a λ of 0.05 leaves the JSD term too weak to change training.
    - ``ptd_k``: 100 on a checkpoint; 8 on the embedded model, whose 71-token vocabulary K = 100
      would cover whole (D_K = the full JSD, the overlap trivially 1).
    - ``lr``: 1e-6 on a checkpoint, 5e-4 on the embedded model.
    - ``warmstart``: on for the embedded model built from scratch on the embedded task, off for a
      checkpoint (a trained ``final/`` is not warm-started again unless ``--warmstart true``).
    - ``warmstart_dir``: the cache shared by every run, ``<cache>/warmstart`` (:func:`cache_root`).

    Warm start (embedded task only): it stops at the first evaluation where the hinted dev
    accuracy reaches ``warmstart_hinted_min``, so RL starts with a competent hinted teacher and a
    hint-free student that still fails often. Its prompts mix hint kinds (``warmstart_hint_mix``):
    a model that never saw a hint cannot use one, and the ``leak`` share (the hint states the
    answer) teaches copying a stated answer, so that the ptd-leak baseline's teacher is a
    competent answer-conditioned one. The student never sees a hint in RL, and RL teachers get
    the leak only with ``--allow_answer_leak``.
    """

    # --- run and output
    output_dir: str = _opt("runs/default", "Folder of the run: metrics.jsonl, eval.json, curves.png, checkpoints/, "
                           "final/ (the trained model).", metavar="DIR")
    resume: bool = _opt(False, "Continue the run in --output_dir from its last checkpoint (model, optimizer, step); "
                        "to train a finished run further, give a larger --max_steps.")
    seed: int = _opt(0, "Seed of the prompt stream and of sampling (each step's draws depend on seed and step only).")
    device: str = _opt("auto", "Where to train: auto (CUDA when available, else CPU), cpu or cuda.",
                       choices=("auto", "cpu", "cuda"))
    backend: str = _opt("auto", "Kernel backend of the output layer: auto (cublas or triton per call on CUDA, the "
                        "chunked torch path on CPU), triton, cublas (cuBLAS GEMMs with Triton elementwise kernels; "
                        "CUDA) or torch.",
                        choices=("auto", "triton", "cublas", "torch"))
    num_threads: int = _opt(1, "torch CPU threads per process (1 is fastest for the tiny model).")
    fsdp: bool = _opt(False, "Under torchrun: shard the policy and the reference with FSDP2 (else DDP with full "
                      "replicas); one process ignores it.")
    save_steps: int = _opt(50, "Write a checkpoint every N RL steps (and always at the end); 0: only at the end.")
    progress: bool = _opt(True, "Show a progress bar of the RL steps (its fields are explained below).",
                          no_help="Hide the progress bar (the phase lines and the summary stay).")
    plot: bool = _opt(True, "Draw curves.png at the end.", no_help="Do not draw curves.png.")
    quiet: bool = _opt(False, "Print no log lines on stderr (phases, warm start, progress bar); the summary is "
                       "still printed on stdout.")

    # --- model and data
    model_name_or_path: str | None = _opt(
        None, "Local checkpoint folder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL or a text-only causal LM, as written by "
        "save_pretrained, or a run's final/); nothing is ever downloaded.",
        default_text="the embedded tiny Qwen3-VL, built from a config", metavar="DIR")
    dataset: str | None = _opt(
        None, 'JSONL training data, one {"image", "question", "answer", "hint"} object per line (image: a path '
        "relative to the file, or null for a text task).", default_text="the embedded grid-count task",
        metavar="FILE")
    eval_dataset: str | None = _opt(
        None, "Held-out JSONL, used whole.",
        default_text="with --dataset, its last --eval_size lines (at most half of the file) are held out",
        metavar="FILE")
    eval_size: int = _opt(200, "Held-out prompts (greedy accuracy before, during and after RL); 0: no held-out "
                          "split and no evaluation (with --dataset every line trains).")
    eval_steps: int = _opt(25, "Also evaluate on the held-out prompts every N RL steps; 0: only before and after.")
    max_pixels: int | None = _opt(None, "Cap on the pixels of a dataset image.",
                                  default_text="the checkpoint's image processor decides (512·512 without one)")

    # --- warm start (embedded task only; cached, shared by every run)
    warmstart: bool | None = _opt(
        None, "Supervised warm start on the embedded task before RL: true, false or auto.",
        default_text="auto: on for the embedded model built from scratch, off for a checkpoint")
    warmstart_max_steps: int = _opt(1500, "Upper bound on warm-start steps; 0: no warm start.")
    warmstart_hinted_min: float = _opt(0.9, "Stop the warm start at the first evaluation where the hinted (teacher) "
                                       "dev accuracy is at least this ...")
    warmstart_target: float = _opt(0.0, "... and the hint-free dev accuracy at least this.")
    warmstart_seed: int = _opt(0, "Seed of the embedded model's initialisation and of the warm-start data (not "
                               "--seed: runs with different seeds share one warm start).")
    warmstart_batch: int = _opt(32, "Prompts per warm-start step.")
    warmstart_lr: float = _opt(3e-3, "AdamW learning rate of the warm start.")
    warmstart_eval_every: int = _opt(10, "Evaluate on the dev split every N warm-start steps.")
    warmstart_hint_mix: str = _opt(
        "none:0.25,spatial:0.5,procedure:0.125,leak:0.125",
        "Hint kinds of the warm-start prompts, kind:weight,... (none: no hint; spatial, coarse, procedure, both; "
        "leak: the hint states the answer, so that the answer-conditioned baseline has a competent teacher).",
        metavar="MIX")
    warmstart_dir: str | None = _opt(None, "Folder of the warm-start cache.",
                                     default_text="$PTD_CACHE/warmstart, else ~/.cache/ptd/warmstart", metavar="DIR")
    warmstart_cache: bool = _opt(True, "Reuse a cached warm start with the same key, and cache a new one.",
                                 no_help="Train the warm start afresh and cache nothing.")

    # --- RL
    max_steps: int = _opt(150, "RL steps (the run's total, counted from step 0 also when resuming); 0: evaluate "
                          "and save the model unchanged.")
    prompts_per_step: int = _opt(8, "Prompts per RL step (the global batch, shared by the processes under torchrun).")
    group_size: int = _opt(8, "Rollouts per prompt (G, at least 2: advantages compare the rollouts of a prompt).")
    max_new_tokens: int = _opt(4, "Longest response, in tokens.")
    temperature: float = _opt(1.0, "Sampling temperature of the rollouts (also divides the logits of every loss term).")
    lr: float | None = _opt(None, "AdamW learning rate.", default_text="5e-4 on the embedded model, 1e-6 on a "
                            "checkpoint")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Clip the gradient to this global norm.")
    scale_rewards: str = _opt("group", "Advantage: group ((r − mean) / std per prompt) or none (r − mean, Dr. GRPO).",
                              choices=("group", "none"))
    epsilon_low: float = _opt(0.2, "Clipping of the probability ratio below: 1 − epsilon_low.")
    epsilon_high: float = _opt(0.3, "Clipping of the probability ratio above: 1 + epsilon_high.")
    kl_coef: float = _opt(0.01, "Weight of the k3 KL to the frozen initial model; 0: none.")

    # --- PTD-PO
    ptd_coef: float | None = _opt(None, "λ, the weight of the teacher's Top-K JSD on failed rollouts; 0: plain GRPO.",
                                  default_text="1.0 on the embedded model, 0.05 on a checkpoint")
    ptd_k: int | None = _opt(None, "K of the Top-K support (capped at the vocabulary size).",
                             default_text="8 on the embedded model, 100 on a checkpoint")
    ptd_beta: float = _opt(0.5, "β of the generalized JSD, in [0, 1] (0: KL(teacher ‖ student), 1: KL(student ‖ "
                           "teacher)).")
    ptd_support: str = _opt("union", "Top-K support: union (both models' top K), teacher or student.",
                            choices=("union", "teacher", "student"))  # ptd_kernels.SUPPORTS: --help imports no torch
    ptd_tail: bool = _opt(True, "Add one tail atom holding the mass outside the support.",
                          no_help="Renormalise both distributions over the support instead of adding a tail atom.")
    ptd_full_vocab: bool = _opt(False, "Use the full-vocabulary JSD instead of the Top-K one (an ablation).")
    ptd_threshold: float = _opt(1.0, "Groups whose mean reward is below this get the teacher's JSD on their failed "
                                "rollouts (1: every group that is not all correct).")
    ptd_drop_ref_kl: bool = _opt(True, "Drop the reference-KL term for the rollouts of those groups.",
                                 no_help="Keep the reference-KL term for every rollout.")
    teacher: str = _opt("ref", "The teacher: ref (the frozen initial model) or policy (the current model, no "
                        "gradient).", choices=("ref", "policy"))
    teacher_hint: str = _opt(
        "spatial", "Hint in the teacher's context on the embedded task: spatial (the red cells), coarse (only their "
        "rows), procedure, both, none (a control) or leak (states the answer; needs --allow_answer_leak). A dataset "
        "uses its own hint column.", choices=("spatial", "coarse", "procedure", "both", "none", "leak"))
    allow_answer_leak: bool = _opt(False, "Let --teacher_hint leak pass the zero-spoiler check (the answer-"
                                   "conditioned baseline, on purpose).")
    teacher_server: str | None = _opt(
        None, "A served hinted teacher (its top-K; needs --ptd_support teacher): local (the frozen copy answering "
        "the served-teacher call in-process, a check, one process) or an http(s) URL of a vLLM server holding the "
        "initial checkpoint (TRL's VLLMClient, text-only models).", default_text="the local frozen copy, no server",
        metavar="local|URL")
    ptd_grad: str = _opt("exact", "exact (the true derivative of the JSD) or released (the authors' surrogate: the "
                         "same value, zero gradient).", choices=("exact", "released"))

    # ------------------------------------------------------------------ resolution and checks

    def embedded_model(self) -> bool:
        """The embedded tiny model: built from scratch, or a ``final/`` a run of it wrote."""
        return self.model_name_or_path is None or trained_marker(self.model_name_or_path).get("embedded", False)

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` field resolved for its setting, its values checked (:meth:`check`)."""
        self.check()
        embedded = self.embedded_model()
        c = dataclasses.replace(self)
        if c.lr is None:
            c.lr = 5e-4 if embedded else 1e-6
        if c.ptd_coef is None:
            c.ptd_coef = 1.0 if embedded else 0.05
        if c.ptd_k is None:
            c.ptd_k = 8 if embedded else 100
        if c.warmstart is None:
            c.warmstart = c.model_name_or_path is None and c.dataset is None
        c.warmstart = bool(c.warmstart and c.warmstart_max_steps > 0)
        if c.warmstart_dir is None:
            c.warmstart_dir = os.path.join(cache_root(), "warmstart")
        return c

    def check(self) -> None:
        """Every value, before any work: raise :class:`UsageError` naming the first bad one and what
        to do (the files and folders named: :meth:`check_files`)."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise UsageError(f"--{f.name} {value}: expected one of {', '.join(choices)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{f.name} {value}: expected a finite number")
        at_least = {
            "num_threads": 1, "save_steps": 0, "eval_size": 0, "eval_steps": 0, "warmstart_max_steps": 0,
            "warmstart_seed": 0, "warmstart_batch": 1, "warmstart_eval_every": 1, "max_steps": 0,
            "prompts_per_step": 1, "max_new_tokens": 1, "seed": 0, "max_pixels": 1, "ptd_k": 1,
        }  # fmt: skip
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                what = "a whole number ≥ 1" if low == 1 else "a whole number ≥ 0"
                raise UsageError(f"--{name} {value}: expected {what}")
        if self.group_size < 2:
            raise UsageError(f"--group_size {self.group_size}: GRPO compares the rollouts of a prompt; use at least 2")
        for name in ("lr", "warmstart_lr", "temperature", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{name} {value}: expected a number > 0")
        for name in ("weight_decay", "kl_coef", "ptd_coef", "epsilon_high"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"--{name} {value}: expected a number ≥ 0")
        if not 0 <= self.epsilon_low < 1:
            raise UsageError(f"--epsilon_low {self.epsilon_low}: expected a number in [0, 1) (the ratio is clipped "
                             "below at 1 − epsilon_low)")
        for name in ("ptd_beta", "ptd_threshold", "warmstart_hinted_min", "warmstart_target"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise UsageError(f"--{name} {value}: expected a number in [0, 1]")
        if self.teacher_server is not None:
            from .teacher_server import check_config  # imports torch: only when a server is asked for

            try:
                check_config(self)
            except ValueError as e:
                raise UsageError(str(e)) from None
        if self.teacher_hint == "leak" and not self.allow_answer_leak:
            raise UsageError("--teacher_hint leak states the answer and fails the zero-spoiler check; pass "
                             "--allow_answer_leak true to run the answer-conditioned baseline on purpose")
        parse_hint_mix(self.warmstart_hint_mix)
        if self.eval_dataset is not None and self.dataset is None:
            raise UsageError("--eval_dataset needs --dataset (the embedded task has its own held-out split)")
        if self.eval_dataset is not None and self.eval_size == 0:
            raise UsageError("--eval_size 0 turns the held-out evaluation off, but --eval_dataset was given; drop one")
        if self.warmstart and self.dataset is not None:
            raise UsageError("--warmstart true: the warm start trains on the embedded task; it cannot run with "
                             "--dataset")
        check_world_size(self.prompts_per_step, int(os.environ.get("WORLD_SIZE", "1")))

    def check_files(self) -> None:
        """The files and folders named exist and are what they should be (a :class:`UsageError`
        otherwise): the datasets, the model folder (config.json, weights, tokenizer; nothing more is
        read), the output folder."""
        for name in ("dataset", "eval_dataset"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
                raise UsageError(f"--{name} {path}: {what}; give a JSONL file")
        if self.model_name_or_path is not None:
            check_model_folder(self.model_name_or_path)
        if os.path.isfile(self.output_dir):
            raise UsageError(f"--output_dir {self.output_dir}: is a file; give a folder")


def check_world_size(prompts_per_step: int, world: int) -> None:
    """Under torchrun every rank takes an equal, non-empty share of the step's prompts."""
    if world > prompts_per_step:
        raise UsageError(f"--prompts_per_step {prompts_per_step}: {prompts_per_step} prompts cannot be shared by "
                         f"{world} processes; each rank needs at least one prompt (use prompts_per_step ≥ world size)")
    if prompts_per_step % world:
        raise UsageError(f"--prompts_per_step {prompts_per_step}: {prompts_per_step} prompts do not divide evenly "
                         f"over {world} processes; use a multiple of the world size")


FLAG_TEXT: dict[str, dict[str, str]] = {
    f.name: _EXTRA_TEXT[id(f)] for f in dataclasses.fields(TrainConfig) if id(f) in _EXTRA_TEXT
}


def parse_hint_mix(mix: str) -> tuple[list[str], list[float]]:
    """``kind:weight,...`` → (kinds, weights); a :class:`UsageError` for anything else."""
    kinds, weights = [], []
    for item in mix.split(","):
        kind, sep, weight = item.strip().partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not sep or not math.isfinite(w) or w < 0:
            raise UsageError(f"--warmstart_hint_mix {mix}: expected kind:weight,... with weights ≥ 0, e.g. "
                             "none:0.25,spatial:0.75")
        if kind not in ("none", "leak", *EMBEDDED_HINT_KINDS):
            raise UsageError(f"--warmstart_hint_mix {mix}: unknown hint kind {kind!r}; the kinds are none, leak, "
                             f"{', '.join(EMBEDDED_HINT_KINDS)}")
        kinds.append(kind)
        weights.append(w)
    if sum(weights) <= 0:
        raise UsageError(f"--warmstart_hint_mix {mix}: the weights add up to 0")
    return kinds, weights


def check_model_folder(path: str) -> None:
    """A local checkpoint folder as ``save_pretrained`` writes it; a :class:`UsageError` saying what
    is missing otherwise (nothing is ever downloaded, so a hub name is a missing folder)."""
    flag = f"--model_name_or_path {path}"
    if not os.path.exists(path):
        raise UsageError(f"{flag}: no such folder (nothing is downloaded: give a local checkpoint folder, e.g. a "
                         "run's final/)")
    if not os.path.isdir(path):
        raise UsageError(f"{flag}: is a file; give the checkpoint's folder")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        what = "is empty" if not os.listdir(path) else "has no config.json"
        raise UsageError(f"{flag}: the folder {what}; give a folder written by save_pretrained (config.json, "
                         "weights, tokenizer)")
    try:
        with open(config, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"{flag}: config.json is not a readable JSON object ({e})") from None
    if not model_type:
        raise UsageError(f"{flag}: config.json has no model_type; give a folder written by save_pretrained")
    names = set(os.listdir(path))
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not names & set(weights):
        raise UsageError(f"{flag}: no weights (model.safetensors or pytorch_model.bin) in the folder")
    tokenizer = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not names & set(tokenizer):
        raise UsageError(f"{flag}: no tokenizer (tokenizer.json or tokenizer_config.json) in the folder")


def trained_marker(path: str) -> dict:
    """What a run wrote about the model in ``path`` (a ``final/`` folder), or {}."""
    try:
        with open(os.path.join(path, TRAINED_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


# Flags grouped as --help shows them; a field missing here is listed under "other options".
SECTIONS = [
    ("run and output", ["output_dir", "resume", "seed", "device", "backend", "num_threads", "fsdp", "save_steps",
                        "progress", "plot", "quiet"]),
    ("model and data", ["model_name_or_path", "dataset", "eval_dataset", "eval_size", "eval_steps", "max_pixels"]),
    ("warm start (embedded task; cached and shared by every run)",
     ["warmstart", "warmstart_max_steps", "warmstart_hinted_min", "warmstart_target", "warmstart_seed",
      "warmstart_batch", "warmstart_lr", "warmstart_eval_every", "warmstart_hint_mix", "warmstart_dir",
      "warmstart_cache"]),
    ("RL (GRPO)", ["max_steps", "prompts_per_step", "group_size", "max_new_tokens", "temperature", "lr",
                   "weight_decay", "max_grad_norm", "scale_rewards", "epsilon_low", "epsilon_high", "kl_coef"]),
    ("PTD-PO (the teacher's Top-K JSD on failed rollouts)",
     ["ptd_coef", "ptd_k", "ptd_beta", "ptd_support", "ptd_tail", "ptd_full_vocab", "ptd_threshold",
      "ptd_drop_ref_kl", "teacher", "teacher_hint", "allow_answer_leak", "teacher_server", "ptd_grad"]),
]  # fmt: skip
