"""Training configuration: one dataclass, parsed from the command line by ``HfArgumentParser``.

``python -m ptd_train.run --help`` lists every field. Fields left at ``None`` are resolved by
:meth:`TrainConfig.resolved`: the embedded task gets the values tuned for it, a real checkpoint
(``--model_name_or_path``) gets the paper's / library defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """GRPO + PTD-PO on the embedded tiny task (defaults) or on a local checkpoint + JSONL.

    Fields left at ``None`` resolve per setting (:meth:`resolved`):

    - ``ptd_coef`` (λ): 0.05 on a real checkpoint (SPEC); 1.0 on the embedded task, where with
      AdamW and clipping at 1.0 a λ of 0.05 leaves the JSD term too weak to change training.
    - ``ptd_k``: 100 on a real checkpoint (SPEC); 8 on the embedded task, whose ~90-token
      vocabulary K = 100 would cover whole (D_K = the full JSD, the overlap trivially 1).
    - ``lr``: 1e-6 on a real checkpoint, 5e-4 on the embedded task.

    Warm start (embedded task only): it stops at the first evaluation where the hinted dev
    accuracy reaches ``warmstart_hinted_min``, so RL starts with a competent hinted teacher and a
    hint-free student that still fails often. Its prompts mix hint kinds (``warmstart_hint_mix``):
    a model that never saw a hint cannot use one, and the ``leak`` share (the hint states the
    answer) teaches copying a stated answer, so that the ptd-leak baseline's teacher is a
    competent answer-conditioned one. The student never sees a hint in RL, and RL teachers get
    the leak only with ``--allow_answer_leak``.
    """

    # --- run / IO
    output_dir: str = field(default="runs/default", metadata={"help": "Where metrics, eval, plots and checkpoints go."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in output_dir."})
    seed: int = field(default=0, metadata={"help": "Seed of the prompt stream and sampling (per step)."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda (auto: CUDA when available)."})
    backend: str = field(
        default="auto", metadata={"help": "Kernel backend: auto (CUDA→triton, CPU→torch) | triton | torch."}
    )
    num_threads: int = field(
        default=1, metadata={"help": "torch CPU threads per process (1 is fastest for the tiny model)."}
    )
    fsdp: bool = field(
        default=False,
        metadata={"help": "Under torchrun: shard policy and reference with FSDP2 (default: DDP, full replicas)."},
    )
    save_steps: int = field(
        default=50, metadata={"help": "Checkpoint every N steps (and at the end); 0 = only at the end."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    plot: bool = field(default=True, metadata={"help": "Write curves.png at the end."})

    # --- model and data
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local checkpoint dir (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, or a text-only causal LM); "
            "None = the embedded tiny Qwen3-VL."
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "JSONL (image or null, question, answer, hint); None = the embedded grid-count task."},
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "Held-out JSONL; None with --dataset = the last eval_size lines."}
    )
    eval_size: int = field(default=200, metadata={"help": "Held-out prompts (greedy accuracy before/after training)."})
    eval_steps: int = field(default=25, metadata={"help": "Also evaluate the held-out split every N steps (0 = off)."})
    max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Cap on the pixels of a dataset image; None = the checkpoint's image processor decides "
            "(512·512 without one)."
        },
    )

    # --- warm start (embedded model only; cached in warmstart_dir)
    warmstart_max_steps: int = field(
        default=1500, metadata={"help": "Upper bound on supervised warm-start steps (0 = none)."}
    )
    warmstart_hinted_min: float = field(
        default=0.9, metadata={"help": "Stop at the first eval where the hinted (teacher) dev accuracy is ≥ this …"}
    )
    warmstart_target: float = field(default=0.0, metadata={"help": "… and the hint-free dev accuracy ≥ this."})
    warmstart_seed: int = field(
        default=0, metadata={"help": "Seed of the tiny model's init and warm-start data (not --seed: runs share it)."}
    )
    warmstart_batch: int = 32
    warmstart_lr: float = 3e-3
    warmstart_eval_every: int = 10
    warmstart_hint_mix: str = field(
        default="none:0.25,spatial:0.5,procedure:0.125,leak:0.125",
        metadata={"help": "Hint kinds of warm-start prompts (leak: the hint states the answer; see class doc)."},
    )
    warmstart_dir: str | None = field(
        default=None, metadata={"help": "Cache of the warm-start checkpoint; None = output_dir/warmstart."}
    )

    # --- RL
    max_steps: int = field(default=150, metadata={"help": "RL steps."})
    prompts_per_step: int = 8
    group_size: int = field(default=8, metadata={"help": "G rollouts per prompt."})
    max_new_tokens: int = 4
    temperature: float = 1.0
    lr: float | None = field(default=None, metadata={"help": "AdamW lr; None = 5e-4 embedded, 1e-6 real checkpoint."})
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scale_rewards: str = field(default="group", metadata={"help": "group | none (Dr. GRPO)."})
    epsilon_low: float = 0.2
    epsilon_high: float = 0.3
    kl_coef: float = field(default=0.01, metadata={"help": "k3 reference-KL coefficient."})

    # --- PTD (SPEC §3)
    ptd_coef: float | None = field(
        default=None, metadata={"help": "λ; 0 = plain GRPO. None = 1.0 embedded, 0.05 real (see class doc)."}
    )
    ptd_k: int | None = field(default=None, metadata={"help": "Top-K; None = 8 embedded, 100 real (capped at V)."})
    ptd_beta: float = 0.5
    ptd_support: str = field(default="union", metadata={"help": "union | teacher | student."})
    ptd_tail: bool = True
    ptd_full_vocab: bool = field(default=False, metadata={"help": "Full-vocabulary JSD instead of Top-K (ablation)."})
    ptd_threshold: float = field(default=1.0, metadata={"help": "PTD groups: mean reward below this."})
    ptd_drop_ref_kl: bool = field(default=True, metadata={"help": "No reference KL for members of PTD groups."})
    teacher: str = field(
        default="ref", metadata={"help": "ref (frozen initial policy) | policy (current policy, no grad)."}
    )
    teacher_hint: str = field(
        default="spatial",
        metadata={
            "help": "Teacher-context hint: spatial (the red cells) | coarse (only their rows) | procedure | both | "
            "none (control) | leak (states the answer; needs --allow_answer_leak); datasets use their own hint."
        },
    )
    allow_answer_leak: bool = field(
        default=False,
        metadata={"help": "Let --teacher_hint leak skip the zero-spoiler check (the ptd-leak baseline only)."},
    )
    teacher_server: str | None = field(
        default=None,
        metadata={
            "help": "Served hinted teacher (its top-K, support 'teacher'): None = the local frozen copy; 'local' = "
            "that copy answering the served-teacher call in-process (a check, one process); an http(s) URL = a vLLM "
            "server holding the initial checkpoint (TRL's VLLMClient, text-only models)."
        },
    )
    ptd_grad: str = field(
        default="exact",
        metadata={
            "help": "exact (the true derivative of D_K) | released (the authors' stop-grad surrogate: D_K is "
            "logged but its gradient is zero, see grpo.released_surrogate)."
        },
    )

    def resolved(self) -> TrainConfig:
        embedded = self.model_name_or_path is None
        c = dataclasses.replace(self)
        if c.lr is None:
            c.lr = 5e-4 if embedded else 1e-6
        if c.ptd_coef is None:
            c.ptd_coef = 1.0 if embedded else 0.05
        if c.ptd_k is None:
            c.ptd_k = 8 if embedded else 100
        if c.warmstart_dir is None:
            import os

            c.warmstart_dir = os.path.join(c.output_dir, "warmstart")
        for name, value, allowed in (
            ("scale_rewards", c.scale_rewards, ("group", "none")),
            ("ptd_support", c.ptd_support, ("union", "teacher", "student")),
            ("teacher", c.teacher, ("ref", "policy")),
            ("teacher_hint", c.teacher_hint, ("spatial", "coarse", "procedure", "both", "none", "leak")),
            ("ptd_grad", c.ptd_grad, ("exact", "released")),
            ("device", c.device, ("auto", "cpu", "cuda")),
            ("backend", c.backend, ("auto", "triton", "torch")),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        if c.teacher_hint == "leak" and not c.allow_answer_leak:
            raise ValueError(
                "teacher_hint: 'leak' states the answer and fails the zero-spoiler check; "
                "pass --allow_answer_leak true to run the answer-conditioned baseline on purpose"
            )
        if c.teacher_server is not None:
            from .teacher_server import check_config

            check_config(c)
        if c.group_size < 2:
            raise ValueError("group_size: GRPO needs at least 2 rollouts per prompt")
        return c
