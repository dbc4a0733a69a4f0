"""The miniature study: GRPO vs PTD-PO, its control and its ablations, paired seeds.

    python -m ptd_train.compare [--seeds 12] [--steps 150] [--methods grpo,ptd,...] [--jobs 2] [run flags]
    python -m ptd_train.compare --spread "label=dir,label=dir,..."   (no training: studies side by side)

Every method is a handful of ``run`` switches on top of one shared :class:`TrainConfig` (any
``python -m ptd_train.run`` flag is accepted and applies to all methods):

  grpo          λ = 0 (plain GRPO with the k3 reference KL)
  ptd           λ = 1 (embedded default), union support, tail, K = 8, spatial hint, frozen-ref teacher
  ptd-nohint    ptd, but the teacher gets no hint (control: the hint vs merely anchoring failures)
  ptd-coarse    ptd, but the hint names only the rows that hold red cells, not the cells: the
                teacher cannot count it into the answer (the stricter zero-spoiler test)
  ptd-leak      ptd, but the teacher's hint states the answer (answer-conditioned baseline)
  ptd-full      ptd with full-vocabulary JSD instead of Top-K (the referee's ablation)
  ptd-released  ptd with the authors' released surrogate: D_K is logged, its gradient is zero, so
                only the dropped reference KL of PTD groups differs from grpo

One warm-start checkpoint is trained first (``warmstart_seed``) and every run starts from it. Its
supervised data mixes hint kinds (``warmstart_hint_mix``; the study's default, STUDY_HINT_MIX, is
none 25 %, spatial 50 %, coarse 12.5 %, leak 12.5 %: the trainer's default with its procedure
share given to the coarse hint, so that the coarse teacher has seen its hint and every other
prompt of the warm start is drawn as before): the leak share (the hint states the answer) is there so that
ptd-leak's teacher is a competent answer-conditioned teacher — the random-init model has to learn
to copy a stated answer, which any real LLM does, or the baseline would measure a confused
teacher rather than answer conditioning. The warm start stops once the
spatial- and the leak-hinted dev accuracies both reach ``warmstart_hinted_min`` (0.9). All methods
share that checkpoint; no student ever sees a hint in RL, and only ptd-leak's teacher gets the
answer-stating hint (``allow_answer_leak``; the zero-spoiler check guards every other hint).
Seed s of every method draws the same prompts and sampling seed at each step (``run.step_seed``;
the trajectories diverge once the weights do). Runs go to ``<output_dir>/runs/<method>/seed<s>/``
(metrics.jsonl, eval.json), the study to ``<output_dir>/summary.md``, ``curves.png`` and
``runs.jsonl`` (one line per run: its measures and held-out curves). Finished runs with the same
configuration and build are reused, so an interrupted study continues where it stopped.

Reproducible: the same machine, torch build and thread count give identical numbers. Not
reproducible: another CPU, BLAS or thread count sums floats in another order; the last bits
differ, and RL amplifies them until trajectories diverge. ``--spread`` puts such studies side
by side, so that a conclusion can be checked against that spread.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

from .checkpoint import build_fingerprint
from .compare_tables import MEASURES, PAIRED, load_study, method_pairs, paired, spread_markdown, summary_markdown
from .config import TrainConfig

__all__ = ["METHODS", "MEASURES", "PAIRED", "CompareConfig", "compare", "main", "method_pairs", "paired",
           "parse_args", "run_config", "run_measures", "spread_markdown", "summary_markdown"]  # fmt: skip

METHODS: dict[str, dict] = {
    "grpo": dict(ptd_coef=0.0),
    "ptd": dict(),
    "ptd-nohint": dict(teacher_hint="none"),
    "ptd-coarse": dict(teacher_hint="coarse"),
    "ptd-leak": dict(teacher_hint="leak", allow_answer_leak=True),
    "ptd-full": dict(ptd_full_vocab=True),
    "ptd-released": dict(ptd_grad="released"),
}
# Everything else comes from the shared TrainConfig, whose defaults are the `ptd` method (union
# support, tail, K = 8, spatial hint, frozen-ref teacher, exact gradient); a flag given to compare
# changes it for every method alike.

DEFAULT_DIR = "runs/compare"
# The study's warm-start hint mix (the trainer's default with procedure → coarse, see above);
# an explicit --warmstart_hint_mix wins.
STUDY_HINT_MIX = "none:0.25,spatial:0.5,coarse:0.125,leak:0.125"


@dataclass
class CompareConfig:
    seeds: str = field(default="12", metadata={"help": "N (seeds 0..N-1) or a comma list of seeds."})
    steps: int | None = field(default=None, metadata={"help": "RL steps per run; None = --max_steps (150)."})
    methods: str = field(default=",".join(METHODS), metadata={"help": f"Comma list of {', '.join(METHODS)}."})
    jobs: int = field(default=2, metadata={"help": "Parallel worker processes (one run each at a time)."})
    rerun: bool = field(default=False, metadata={"help": "Retrain runs that already finished."})
    spread: str | None = field(
        default=None,
        metadata={"help": "label=dir,...: no training; the finished studies in those dirs side by side."},
    )

    def seed_list(self) -> list[int]:
        s = self.seeds.strip()
        return list(range(int(s))) if "," not in s and s.isdigit() else [int(x) for x in s.split(",") if x.strip()]

    def method_list(self) -> list[str]:
        ms = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in ms if m not in METHODS]
        if bad or not ms:
            raise ValueError(f"methods: unknown {bad}; expected some of {list(METHODS)}")
        return ms


def run_config(base: TrainConfig, study_dir: str, method: str, seed: int) -> TrainConfig:
    return dataclasses.replace(
        base,
        **METHODS[method],
        seed=seed,
        output_dir=os.path.join(study_dir, "runs", method, f"seed{seed}"),
        progress=False,
        save_steps=0,
        plot=False,  # the study draws its own plot
        resume=False,
    )


# fields that do not change what a run computes: a finished run is reused across them
# (not num_threads: another thread count sums in another order, and the trajectory moves)
NOT_RESULTS = ("progress", "save_steps", "plot", "resume")


def _stamp(cfg_dict: dict) -> str:
    return json.dumps({k: v for k, v in cfg_dict.items() if k not in NOT_RESULTS}, sort_keys=True)


# ============================================================================ running


def _train_one(job: tuple[str, int, dict]) -> dict:
    """Worker: train one (method, seed) run, or reuse it when it finished with this config."""
    from .checkpoint import atomic_write_text
    from .run import train

    method, seed, cfg_dict = job
    cfg = TrainConfig(**cfg_dict)
    stamp = os.path.join(cfg.output_dir, "study_config.json")
    want = _stamp({**cfg_dict, "build": build_fingerprint()})
    eval_path = os.path.join(cfg.output_dir, "eval.json")
    reused = os.path.exists(eval_path) and os.path.exists(stamp) and _stamp(json.load(open(stamp))) == want
    t0 = time.time()
    if not reused:
        if os.path.exists(stamp):
            os.remove(stamp)
        train(cfg)
        atomic_write_text(want, stamp)
    return {"method": method, "seed": seed, "dir": cfg.output_dir, "wall_s": time.time() - t0, "reused": reused}


def shared_warm_start(base: TrainConfig, log) -> dict | None:
    """Train (or load) the one warm-start checkpoint all runs start from."""
    if base.model_name_or_path is not None or base.dataset is not None or base.warmstart_max_steps <= 0:
        return None
    import torch

    from .model import build_tiny_model
    from .prompts import Env, build_tokenizer
    from .run import resolve_device
    from .tasks import GridCountTask
    from .vision import VisionGeometry
    from .warmstart import warm_start

    cfg = base.resolved()
    device, backend = resolve_device(cfg)
    if device.type == "cpu":
        torch.set_num_threads(max(1, cfg.num_threads))
    task = GridCountTask(eval_size=cfg.eval_size)
    tok = build_tokenizer(GridCountTask.words)
    policy = build_tiny_model(tok, seed=cfg.warmstart_seed).to(device)
    env = Env(cfg, tok, VisionGeometry.of(policy), device, backend)
    return warm_start(policy, env, task, log)


# ============================================================================ measures


def _load_run(d: str) -> tuple[list[dict], dict]:
    with open(os.path.join(d, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(d, "eval.json")) as f:
        ev = json.load(f)
    return rows, ev


def _auc(curve: list[tuple[int, float]]) -> float:
    """Trapezoid area under (step, value) divided by the step span: the curve's mean level."""
    if len(curve) < 2:
        return curve[0][1] if curve else float("nan")
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(curve, curve[1:]))
    return area / (curve[-1][0] - curve[0][0])


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def run_measures(method: str, seed: int, d: str) -> dict:
    rows, ev = _load_run(d)
    steps = ev["steps"]
    acc = [(0, ev["accuracy_before"])] + [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    acc.append((steps, ev["accuracy_after"]))
    pc = [(0, ev["p_correct_before"])] + [(r["step"], r["eval_p_correct"]) for r in rows if "eval_p_correct" in r]
    pc.append((steps, ev["p_correct_after"]))
    tail = rows[-max(1, len(rows) // 6) :]
    ptd_rows = [r for r in rows if r["ptd_rollouts"] > 0]
    has_overlap = METHODS[method].get("ptd_coef", 1.0) != 0 and not METHODS[method].get("ptd_full_vocab", False)
    return {
        "method": method,
        "seed": seed,
        "steps": steps,
        "acc_before": ev["accuracy_before"],
        "teacher_acc": ev.get("accuracy_hinted_before"),
        "acc_final": ev["accuracy_after"],
        "acc_auc": _auc(acc),
        "p_correct_final": ev["p_correct_after"],
        "p_correct_auc": _auc(pc),
        "train_reward": _mean(r["reward_mean"] for r in rows),
        "entropy": _mean(r["entropy"] for r in rows),
        "entropy_last": _mean(r["entropy"] for r in tail),
        "overlap": _mean(r["overlap"] for r in ptd_rows) if has_overlap else None,
        "teacher_mass": _mean(r["teacher_mass"] for r in ptd_rows) if has_overlap else None,
        "jsd": _mean(r["jsd"] for r in ptd_rows) if METHODS[method].get("ptd_coef", 1.0) != 0 else None,
        "ptd_rollouts": _mean(r["ptd_rollouts"] for r in rows),
        "all_fail_groups": _mean(r["all_fail_groups"] for r in rows),
        "seconds": ev.get("seconds_this_process"),
        "warmstart_steps": ev.get("warmstart", {}).get("steps"),
        "acc_curve": acc,
        "p_correct_curve": pc,
    }


# ============================================================================ main


def compare(study: CompareConfig, base: TrainConfig) -> dict:
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    study_dir = DEFAULT_DIR if base.output_dir == TrainConfig.output_dir else base.output_dir
    seeds, methods = study.seed_list(), study.method_list()
    base = dataclasses.replace(base, output_dir=study_dir)
    if study.steps is not None:
        base = dataclasses.replace(base, max_steps=study.steps)
    if base.warmstart_dir is None:
        base = dataclasses.replace(base, warmstart_dir=os.path.join(study_dir, "warmstart"))
    os.makedirs(study_dir, exist_ok=True)
    load_before = os.getloadavg()
    for m in methods:  # fail fast on a bad combination before any training
        run_config(base, study_dir, m, 0).resolved()

    warm = shared_warm_start(base, log)
    jobs = []
    for s in seeds:  # seed-major: an interrupted study leaves whole seeds
        for m in methods:
            cfg = run_config(base, study_dir, m, s)
            d = dataclasses.asdict(cfg)
            jobs.append((m, s, d))
    if study.rerun:
        for _, _, d in jobs:
            p = os.path.join(d["output_dir"], "study_config.json")
            if os.path.exists(p):
                os.remove(p)
    log(f"compare: {len(methods)} methods × {len(seeds)} seeds = {len(jobs)} runs, {study.jobs} jobs, "
        f"{base.max_steps} steps → {study_dir}")  # fmt: skip
    done = []
    if study.jobs <= 1:
        it = map(_train_one, jobs)
        pool = None
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(study.jobs)
        it = pool.imap_unordered(_train_one, jobs)
    try:
        for res in it:
            done.append(res)
            tag = "reused" if res["reused"] else f"{res['wall_s']:.0f} s"
            log(f"[{len(done)}/{len(jobs)}] {res['method']} seed {res['seed']} ({tag}, {time.time() - t0:.0f} s total)")
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    results = [run_measures(r["method"], r["seed"], r["dir"]) for r in done]
    results.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
    wall = time.time() - t0
    with open(os.path.join(study_dir, "runs.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    fresh = sum(not r["reused"] for r in done)
    header = "\n".join(
        [
            "# PTD-PO miniature study",
            "",
            f"`python -m ptd_train.compare {' '.join(sys.argv[1:])}`".replace(" `", "`"),
            "",
            f"- methods: {', '.join(methods)}; seeds: {seeds} (paired); RL steps: {base.max_steps}; "
            f"held-out eval every {base.eval_steps} steps on {base.eval_size} prompts",
            f"- shared: {base.prompts_per_step} prompts × {base.group_size} rollouts, lr "
            f"{base.resolved().lr}, λ = {base.resolved().ptd_coef} for ptd*, K = {base.resolved().ptd_k}, "
            f"β = {base.ptd_beta}, kl_coef = {base.kl_coef} (dropped for PTD groups in ptd*)",
            f"- warm start: {json.dumps(warm) if warm else 'none'}",
            f"- build: {_machine()}, {json.dumps(build_fingerprint())}, {base.num_threads} torch thread(s) per run",
            f"- wall time {wall / 60:.1f} min ({fresh} runs trained, {len(done) - fresh} reused) with "
            f"{study.jobs} jobs on {os.cpu_count()} CPUs; the runs' own process times add up to "
            f"{sum(r['seconds'] or 0 for r in results) / 60:.1f} min; load average before "
            f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, after "
            + " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        ]
    )
    md = summary_markdown(results, methods, header, base.warmstart_hint_mix if warm else None)
    with open(os.path.join(study_dir, "summary.md"), "w") as f:
        f.write(md)
    try:
        from .plots import plot_study

        plot_study(results, methods, study_dir, os.path.join(study_dir, "curves.png"))
    except Exception as e:  # the table must survive a plotting problem
        log(f"plot failed: {e!r}")
    log(md)
    log(f"compare: done in {wall:.0f} s")
    return {"results": results, "summary": md, "wall_s": wall, "study_dir": study_dir}


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else 'CPU'} ({os.cpu_count()} CPUs)"


def parse_args(argv: list[str] | None = None) -> tuple[CompareConfig, TrainConfig]:
    """The study's flags and the run flags shared by every method; the warm-start hint mix
    defaults to STUDY_HINT_MIX here (not the trainer's default)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((CompareConfig, TrainConfig))
    parser.set_defaults(warmstart_hint_mix=STUDY_HINT_MIX)
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict:
    study, base = parse_args(argv)
    if study.spread:
        studies = {}
        for item in study.spread.split(","):
            label, _, d = item.partition("=")
            studies[label.strip()] = load_study(d.strip())
        md = f"# The study across settings\n\n`python -m ptd_train.compare --spread {study.spread}`\n\n"
        md += spread_markdown(studies)
        print(md)
        return {"spread": md}
    return compare(study, base)


if __name__ == "__main__":
    main()
