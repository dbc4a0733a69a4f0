"""The miniature study: GRPO vs PTD-PO, its control and its ablations, paired seeds.

    python -m ptd_train.compare [--seeds 12] [--steps 150] [--methods grpo,ptd,...] [--jobs 2] [trainer flags]
    python -m ptd_train.compare --quick            a smoke test of the pipeline (its numbers mean nothing)
    python -m ptd_train.compare --replot DIR       redraw DIR/curves.png from DIR/runs.jsonl (no training)
    python -m ptd_train.compare --spread "label=dir,label=dir,..."   finished studies side by side

Every method is a handful of trainer switches on top of one shared :class:`TrainConfig` (the
trainer flags given to compare apply to every method):

  grpo          λ = 0 (plain GRPO with the k3 reference KL)
  ptd           λ = 1 (embedded default), union support, tail, K = 8, spatial hint, frozen-ref teacher
  ptd-nohint    ptd, but the teacher gets no hint (control: the hint vs merely anchoring failures)
  ptd-coarse    ptd, but the hint names only the rows that hold red cells, not the cells: the
                teacher cannot count it into the answer (the stricter zero-spoiler test)
  ptd-leak      ptd, but the teacher's hint states the answer (answer-conditioned baseline)
  ptd-full      ptd with full-vocabulary JSD instead of Top-K (the referee's ablation)
  ptd-released  ptd with the authors' released surrogate: D_K is logged, its gradient is zero, so
                only the dropped reference KL of PTD groups differs from grpo

One warm start is trained first (``warmstart_seed``; from the shared warm-start cache when an
identical one exists) and every run starts from it. Its supervised data mixes hint kinds
(``warmstart_hint_mix``; the study's default, STUDY_HINT_MIX, is none 25 %, spatial 50 %, coarse
12.5 %, leak 12.5 %: the trainer's default with its procedure share given to the coarse hint, so
that the coarse teacher has seen its hint and every other prompt of the warm start is drawn as
before): the leak share (the hint states the answer) is there so that ptd-leak's teacher is a
competent answer-conditioned teacher — the random-init model has to learn to copy a stated answer,
which any real LLM does, or the baseline would measure a confused teacher rather than answer
conditioning. The warm start stops once the spatial- and the leak-hinted dev accuracies both reach
``warmstart_hinted_min`` (0.9). No student ever sees a hint in RL, and only ptd-leak's teacher gets
the answer-stating hint (``allow_answer_leak``; the zero-spoiler check guards every other hint).
Seed s of every method draws the same prompts and sampling seed at each step (``trainer.step_seed``;
the trajectories diverge once the weights do). Runs go to ``<output_dir>/runs/<method>/seed<s>/``
(metrics.jsonl, eval.json), the study to ``<output_dir>/summary.md``, ``curves.png`` (each method's
paired difference against grpo) and ``runs.jsonl`` (one line per run: its measures and held-out
curves). Finished runs with the same configuration and build are reused, so an interrupted study
continues where it stopped.

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

from .cli import Section, run_command
from .compare_tables import MEASURES, PAIRED, load_study, method_pairs, paired, spread_markdown, summary_markdown
from .config import TrainConfig, UsageError

__all__ = ["METHODS", "MEASURES", "PAIRED", "CompareConfig", "compare", "main", "method_pairs", "paired",
           "parse_args", "replot", "run_config", "run_measures", "spread_markdown", "summary_markdown"]  # fmt: skip

PROG = "python -m ptd_train.compare"

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
# --quick: what it changes (unless given explicitly), and the warning it prints
QUICK = dict(seeds="2", steps=20, methods="grpo,ptd")
QUICK_TRAIN = dict(eval_steps=10, output_dir="runs/compare-quick")  # the study's warm start, from the cache
QUICK_WARNING = ("quick form: a smoke test of the pipeline (2 seeds × 20 steps of grpo and ptd); its numbers mean "
                 "nothing")
# trainer flags compare sets itself for each run: not forwarded
NOT_FORWARDED = ("seed", "resume", "save_steps", "progress", "plot", "quiet", "max_steps")


@dataclass
class CompareConfig:
    seeds: str = field(default="12", metadata={"help": "Paired seeds: N (seeds 0 to N-1) or a comma list.",
                                               "metavar": "N|LIST"})
    steps: int = field(default=150, metadata={"help": "RL steps of every run."})
    methods: str = field(default=",".join(METHODS), metadata={"help": "Comma list of the methods to run.",
                                                              "metavar": "LIST"})
    jobs: int = field(default=2, metadata={"help": "Worker processes, each training one run at a time."})
    rerun: bool = field(default=False, metadata={"help": "Train again the runs that already finished (else they "
                                                          "are reused when their configuration and build match)."})
    quick: bool = field(default=False, metadata={"help": "A smoke test of the whole pipeline: 2 seeds × 20 steps of "
                                                         "grpo and ptd, evaluated every 10 steps, in "
                                                         "runs/compare-quick (flags given explicitly still win). "
                                                         "Its numbers mean nothing."})
    replot: str | None = field(default=None, metadata={
        "help": "No training: redraw DIR/curves.png from DIR/runs.jsonl (e.g. docs/compare).", "metavar": "DIR"})
    spread: str | None = field(default=None, metadata={
        "help": "No training: finished studies side by side, label=dir,label=dir,...", "metavar": "LIST"})

    def seed_list(self) -> list[int]:
        s = self.seeds.strip()
        try:
            seeds = list(range(int(s))) if "," not in s else [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            seeds = []
        if not seeds or min(seeds) < 0:
            raise UsageError(f"--seeds {self.seeds}: expected a count ≥ 1 or a comma list of seeds ≥ 0")
        return seeds

    def method_list(self) -> list[str]:
        ms = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in ms if m not in METHODS]
        if bad or not ms:
            raise UsageError(f"--methods {self.methods}: unknown {', '.join(bad) or 'none given'}; the methods are "
                             f"{', '.join(METHODS)}")
        return ms

    def check(self) -> None:
        self.seed_list()
        self.method_list()
        if self.steps < 1:
            raise UsageError(f"--steps {self.steps}: expected a whole number ≥ 1")
        if self.jobs < 1:
            raise UsageError(f"--jobs {self.jobs}: expected a whole number ≥ 1")


def run_config(base: TrainConfig, study_dir: str, method: str, seed: int) -> TrainConfig:
    return dataclasses.replace(
        base,
        **METHODS[method],
        seed=seed,
        output_dir=os.path.join(study_dir, "runs", method, f"seed{seed}"),
        progress=False,
        quiet=True,
        save_steps=0,
        plot=False,  # the study draws its own plot
        resume=False,
    )


# fields that do not change what a run computes: a finished run is reused across them
# (not num_threads: another thread count sums in another order, and the trajectory moves)
NOT_RESULTS = ("progress", "save_steps", "plot", "resume", "quiet", "warmstart_dir", "warmstart_cache")


def _stamp(cfg_dict: dict) -> str:
    return json.dumps({k: v for k, v in cfg_dict.items() if k not in NOT_RESULTS}, sort_keys=True)


# ============================================================================ running


def _train_one(job: tuple[str, int, dict]) -> dict:
    """Worker: train one (method, seed) run, or reuse it when it finished with this config."""
    import torch

    from .checkpoint import atomic_write_text, build_fingerprint
    from .trainer import train

    method, seed, cfg_dict = job
    cfg = TrainConfig(**cfg_dict)
    if cfg.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(cfg.num_threads)  # what train() sets: the build fingerprint records it
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
    """Train (or load from the shared cache) the one warm start all runs start from."""
    cfg = base.resolved()
    if not cfg.warmstart or cfg.dataset is not None:
        return None
    import torch

    from .model import build_tiny_model
    from .prompts import Env, build_tokenizer
    from .tasks import GridCountTask
    from .trainer import resolve_device
    from .vision import VisionGeometry
    from .warmstart import warm_start

    device, backend = resolve_device(cfg)
    if device.type == "cpu":
        torch.set_num_threads(max(1, cfg.num_threads))
    log(f"compare: the warm start shared by every run (cache: {cfg.warmstart_dir if cfg.warmstart_cache else 'off'})")
    task = GridCountTask(eval_size=cfg.eval_size)
    tok = build_tokenizer(GridCountTask.words)
    policy = build_tiny_model(tok, seed=cfg.warmstart_seed).to(device)
    env = Env(cfg, tok, VisionGeometry.of(policy), device, backend)
    return warm_start(policy, env, task, lambda text: log(f"  warm start {text}"))


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


def held_out_curves(rows: list[dict], ev: dict) -> tuple[list, list]:
    """(accuracy curve, p(correct) curve) as [(step, value)]: the run's own record, or for a run
    written before it kept one, before + every evaluation in metrics.jsonl + after."""
    if ev.get("held_out"):
        return [(s, a) for s, a, _ in ev["held_out"]], [(s, p) for s, _, p in ev["held_out"]]
    acc = [(0, ev["accuracy_before"])] + [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    pc = [(0, ev["p_correct_before"])] + [(r["step"], r["eval_p_correct"]) for r in rows if "eval_p_correct" in r]
    return acc + [(ev["steps"], ev["accuracy_after"])], pc + [(ev["steps"], ev["p_correct_after"])]


def run_measures(method: str, seed: int, d: str) -> dict:
    rows, ev = _load_run(d)
    acc, pc = held_out_curves(rows, ev)
    tail = rows[-max(1, len(rows) // 6) :]
    ptd_rows = [r for r in rows if r["ptd_rollouts"] > 0]
    has_overlap = METHODS[method].get("ptd_coef", 1.0) != 0 and not METHODS[method].get("ptd_full_vocab", False)
    return {
        "method": method,
        "seed": seed,
        "steps": ev["steps"],
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
    """Run (or reuse) every (method, seed) run of the study in ``base.output_dir``; write
    runs.jsonl, summary.md and curves.png there."""
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    study.check()
    if base.eval_size < 1:
        raise UsageError(f"--eval_size {base.eval_size}: the study compares held-out curves; give at least 1")
    seeds, methods = study.seed_list(), study.method_list()
    base = dataclasses.replace(base, max_steps=study.steps)
    study_dir = base.output_dir
    base.resolved().check_files()
    for m in methods:  # fail fast on a bad combination before any training
        run_config(base, study_dir, m, 0).resolved()
    if study.quick:
        log(f"compare: {QUICK_WARNING}")
    load_before = os.getloadavg()
    warm = shared_warm_start(base, log)
    os.makedirs(study_dir, exist_ok=True)
    jobs = []
    for s in seeds:  # seed-major: an interrupted study leaves whole seeds
        for m in methods:
            cfg = run_config(base, study_dir, m, s)
            jobs.append((m, s, dataclasses.asdict(cfg)))
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
    from .checkpoint import build_fingerprint

    resolved = base.resolved()
    header = "\n".join(
        [
            "# PTD-PO miniature study",
            "",
            f"`python -m ptd_train.compare {' '.join(sys.argv[1:])}`".replace(" `", "`"),
            "",
            *([f"**{QUICK_WARNING[0].upper() + QUICK_WARNING[1:]}.**", ""] if study.quick else []),
            f"- methods: {', '.join(methods)}; seeds: {seeds} (paired); RL steps: {base.max_steps}; "
            f"held-out eval every {base.eval_steps} steps on {base.eval_size} prompts",
            f"- shared: {base.prompts_per_step} prompts × {base.group_size} rollouts, lr "
            f"{resolved.lr}, λ = {resolved.ptd_coef} for ptd*, K = {resolved.ptd_k}, "
            f"β = {base.ptd_beta}, kl_coef = {base.kl_coef} (dropped for PTD groups in ptd*)",
            f"- warm start: {json.dumps(_warm_summary(warm)) if warm else 'none'}",
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
        if "grpo" in methods and len(methods) > 1:
            from .plots import plot_study

            plot_study(results, methods, os.path.join(study_dir, "curves.png"))
    except Exception as e:  # the table must survive a plotting problem
        log(f"plot failed: {e!r}")
    print(md, flush=True)
    if study.quick:
        log(f"compare: {QUICK_WARNING}")
    log(f"compare: done in {wall:.0f} s; {study_dir}: summary.md, runs.jsonl, curves.png, runs/")
    return {"results": results, "summary": md, "wall_s": wall, "study_dir": study_dir}


def _warm_summary(warm: dict) -> dict:
    """The warm start as the summary states it (not where this machine caches it)."""
    return {k: v for k, v in warm.items() if k not in ("cache", "cached")}


def replot(study_dir: str) -> str:
    """Redraw ``study_dir/curves.png`` from ``study_dir/runs.jsonl``; its path."""
    from .plots import plot_study

    path = os.path.join(study_dir, "runs.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"--replot {study_dir}: no runs.jsonl there; give the folder of a finished study")
    results = load_study(study_dir)
    methods = list(dict.fromkeys(r["method"] for r in results))
    if "grpo" not in methods or len(methods) < 2:
        raise UsageError(f"--replot {study_dir}: the figure compares methods with grpo; runs.jsonl holds "
                         f"{', '.join(methods)}")
    out = os.path.join(study_dir, "curves.png")
    plot_study(results, methods, out)
    return out


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else 'CPU'} ({os.cpu_count()} CPUs)"


DESCRIPTION = """\
The miniature study on the embedded task: GRPO against PTD-PO, its control and its ablations,
from one shared warm start, on paired seeds (seed s of every method sees the same prompts).
Writes summary.md (every measure, paired differences), runs.jsonl (one line per run) and
curves.png (each method's paired difference against grpo) in --output_dir.

methods: grpo (λ = 0), ptd, ptd-nohint (teacher without hint), ptd-coarse (a hint that cannot be
counted into the answer), ptd-leak (the hint states the answer), ptd-full (full-vocabulary JSD),
ptd-released (the authors' zero-gradient surrogate).
"""

EPILOG = """\
forms:
  python -m ptd_train.compare                 the study: 7 methods × 12 seeds × 150 steps (about
                                              10 min with 2 jobs on a 2-core CPU)
  python -m ptd_train.compare --quick         a smoke test of the pipeline: 2 seeds × 20 steps of grpo
                                              and ptd; ITS NUMBERS MEAN NOTHING (too few seeds and steps)
  python -m ptd_train.compare --replot DIR    redraw DIR/curves.png from DIR/runs.jsonl
  python -m ptd_train.compare --spread a=DIR1,b=DIR2   studies run in different settings side by side

Finished runs with the same configuration and build are reused: an interrupted study continues.
Exit code 2 and one line for a mistake; --debug (or PTD_DEBUG=1) shows the traceback.
"""


def command():
    from .run import command as trainer_command

    off = {"default_text": "off"}
    study = [Section("study options", CompareConfig, texts={"replot": off, "spread": off}),
             Section("study options", TrainConfig, ["output_dir"], {"output_dir": DEFAULT_DIR},
                     {"output_dir": "Folder of the study: summary.md, runs.jsonl, curves.png, and runs/<method>/"
                                    "seed<s>/ for each run."})]  # fmt: skip
    return trainer_command(PROG, defaults={"warmstart_hint_mix": STUDY_HINT_MIX},
                           exclude=("output_dir", *NOT_FORWARDED), extra=study,
                           title_suffix=" — trainer options, applied to every run", description=DESCRIPTION,
                           epilog=EPILOG)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> tuple[CompareConfig, TrainConfig]:
    """The study's flags and the trainer flags shared by every method (``--quick`` fills in its
    values where no flag was given); the warm-start hint mix defaults to STUDY_HINT_MIX here."""
    argv = [] if argv is None else list(argv)
    parsed = command().parse(argv)
    study, base = parsed[CompareConfig], parsed[TrainConfig]
    if study.quick:
        given = {a.split("=", 1)[0].lstrip("-") for a in argv if a.startswith("--")}
        study = dataclasses.replace(study, **{k: v for k, v in QUICK.items() if k not in given})
        base = dataclasses.replace(base, **{k: v for k, v in QUICK_TRAIN.items() if k not in given})
    return study, base


def _main(argv: list[str]) -> dict:
    study, base = parse_args(argv)
    if study.replot:
        out = replot(study.replot)
        print(f"wrote {out}")
        return {"replot": out}
    if study.spread:
        studies = {}
        for item in study.spread.split(","):
            label, _, d = item.partition("=")
            if not os.path.isfile(os.path.join(d.strip(), "runs.jsonl")):
                raise UsageError(f"--spread {item}: no runs.jsonl in {d.strip() or '(no folder)'}; expected "
                                 "label=folder of a finished study")
            studies[label.strip()] = load_study(d.strip())
        md = f"# The study across settings\n\n`python -m ptd_train.compare --spread {study.spread}`\n\n"
        md += spread_markdown(studies)
        print(md)
        return {"spread": md}
    return compare(study, base)


def main(argv: list[str] | None = None) -> dict:
    """The study's command line (see ``--help``); a mistake exits with code 2 after one line."""
    return run_command(PROG, _main, argv)


if __name__ == "__main__":
    main()
