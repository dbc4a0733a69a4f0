"""The trainer's command line: ``python -m ptd_train.run [--flags]``.

Parses and checks every flag before torch is imported (``--help`` answers at once, a mistake is
one line and exit code 2), then runs :func:`ptd_train.trainer.train` — the set-up, the RL step and
the loop live there — and prints the results in words on stdout (the phases and the progress bar
go to stderr). Data parallel: ``torchrun --nproc_per_node N -m ptd_train.run [--fsdp true]``.
"""

from __future__ import annotations

import os
import sys

from .cli import Command, Section, run_command
from .config import FLAG_TEXT, SECTIONS, TrainConfig

PROG = "python -m ptd_train.run"

DESCRIPTION = """\
Train a vision-language (or text) model with GRPO plus PTD-PO: failed rollouts are pulled toward
a teacher that sees a privileged hint (never the answer), through a Top-K Jensen-Shannon
divergence computed by ptd's fused output-layer kernels.

With no flags: the embedded tiny Qwen3-VL on the embedded grid-count task (count the red cells),
a cached supervised warm start, then 150 RL steps, on CPU or CUDA. Nothing is downloaded.
"""

EPILOG = """\
output (in --output_dir):
  eval.json      held-out accuracy and p(correct) before and after RL, the curve, the phase times
  metrics.jsonl  one line per RL step (reward, entropy, JSD, loss terms, ...)
  curves.png     the run's curves          checkpoints/  model and optimizer, for --resume
  final/         the trained model: --model_name_or_path DIR/final trains it further (no new warm start)
  The phases are printed on stderr, the results on stdout.

the progress bar:
  reward=0.41     mean reward of this step's rollouts (the fraction correct)
  ptd=23/64       rollouts of this step pulled toward the hinted teacher (failed rollouts of groups
                  not all correct) out of all the step's rollouts
  jsd=0.052       their mean Top-K JSD to the teacher (nats)
  held_out=0.45   held-out greedy accuracy, on the steps with an evaluation (--eval_steps)

the warm-start cache:
  One cache for every run, keyed by what determines the warm start (model, task, warm-start
  settings and seed, device, torch build and thread count): $PTD_CACHE/warmstart, else
  ~/.cache/ptd/warmstart. Move it with --warmstart_dir, bypass it with --no_warmstart_cache.

examples:
  python -m ptd_train.run --ptd_coef 0                  plain GRPO through the same code
  python -m ptd_train.run --max_steps 300 --resume true continue a finished 150-step run
  python -m ptd_train.run --model_name_or_path DIR --dataset train.jsonl
  torchrun --nproc_per_node 2 -m ptd_train.run --fsdp true

Exit code 2 and one line for a mistake in the flags, files or folders; --debug (or PTD_DEBUG=1)
shows the traceback.
"""


def command(prog: str = PROG, defaults: dict | None = None, exclude: tuple[str, ...] = (),
            extra: list[Section] | None = None, title_suffix: str = "", description: str = DESCRIPTION,
            epilog: str = EPILOG) -> Command:  # fmt: skip
    """The trainer's command line; ``compare`` reuses it with its own sections in front, other
    defaults and some trainer flags left out."""
    placed = {name for _, names in SECTIONS for name in names}
    fields = [f.name for f in TrainConfig.__dataclass_fields__.values()]
    sections = list(extra or [])
    for title, names in SECTIONS + [("other options", [n for n in fields if n not in placed])]:
        keep = [n for n in names if n not in exclude]
        if keep:
            sections.append(Section(title + title_suffix, TrainConfig, keep, defaults or {}, texts=FLAG_TEXT))
    return Command(prog, description, sections, epilog)


def summary(evals: dict, cfg: TrainConfig) -> str:
    """The results of a run in words (what ``main`` prints on stdout)."""
    lines = []
    if evals.get("accuracy_before") is None or evals.get("accuracy_after") is None:
        lines.append("No held-out evaluation (--eval_size 0).")
    else:
        before, after = evals["accuracy_before"], evals["accuracy_after"]
        steps = evals["steps"]
        lines.append(f"Held-out accuracy (greedy, {evals.get('eval_size', '?')} prompts): {before:.3f} before RL, "
                     f"{after:.3f} after {steps} RL steps ({after - before:+.3f}).")
        lines.append(f"Held-out p(correct), the mean probability of the reference answer: "
                     f"{evals['p_correct_before']:.3f} → {evals['p_correct_after']:.3f}.")
        if "accuracy_hinted_before" in evals:
            lines.append(f"The teacher (the model before RL, with {evals.get('teacher_hint', 'its')} hint) scored "
                         f"{evals['accuracy_hinted_before']:.3f} before RL.")
    seconds = {name: s for name, s in evals.get("seconds", {}).items() if s >= 0.05}
    if seconds:
        parts = ", ".join(f"{name} {_seconds(s)}" for name, s in seconds.items())
        lines.append(f"Time: {_seconds(evals.get('seconds_this_process', sum(seconds.values())))} in all ({parts}).")
    out = cfg.output_dir
    lines.append(f"Results in {out}: eval.json, metrics.jsonl" + (", curves.png" if cfg.plot else "")
                 + f"; the trained model in {os.path.join(out, 'final')} (--model_name_or_path "
                 f"{os.path.join(out, 'final')} trains it further).")  # fmt: skip
    return "\n".join(lines)


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def _main(argv: list[str]) -> dict:
    cfg = command().parse(argv)[TrainConfig]
    cfg.resolved().check_files()  # every check that needs no torch, before importing it
    if not cfg.quiet and os.environ.get("RANK", "0") == "0":  # a first line at once: importing torch takes seconds
        print(f"ptd_train.run: a run in {cfg.output_dir}; importing torch and transformers ...", file=sys.stderr,
              flush=True)  # fmt: skip
    from .trainer import train

    evals = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(summary(evals, cfg), flush=True)
    return evals


def main(argv: list[str] | None = None) -> dict:
    """Run the trainer on ``argv`` (default: the command line); returns the evaluations. A mistake
    exits with code 2 after one line on stderr."""
    return run_command(PROG, _main, argv)


def train(cfg: TrainConfig) -> dict:
    """:func:`ptd_train.trainer.train` (imported when called: this module stays light)."""
    from .trainer import train as train_

    return train_(cfg)


# the loop's parts, reachable as run.<name> as well (trainer is imported on first use)
TRAINER_NAMES = ("rl_step", "step_seed", "sample_prompts", "load_data", "load_model", "resolve_device")


def __getattr__(name: str):
    if name in TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'ptd_train.run' has no attribute {name!r}")


if __name__ == "__main__":
    main()
