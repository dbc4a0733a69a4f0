"""The study's tables (``python -m ptd_train.compare``): per method (mean ± sd over seeds), paired
differences per seed, and ``--spread``: studies of one design run in different settings side by
side, with whether each difference kept its sign."""

from __future__ import annotations

import json
import math
import os


def _sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _fmt(xs: list, digits: int = 3) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {_sd(xs):.{digits}f}"


MEASURES = [  # key, column title
    ("teacher_acc", "teacher acc (hinted, t=0)"),
    ("acc_final", "held-out acc (final)"),
    ("acc_auc", "acc AUC"),
    ("p_correct_final", "p(correct) (final)"),
    ("p_correct_auc", "p(correct) AUC"),
    ("train_reward", "train reward"),
    ("entropy", "entropy (mean)"),
    ("entropy_last", "entropy (last 1/6)"),
    ("overlap", "Top-K overlap"),
    ("teacher_mass", "teacher mass on S"),
    ("jsd", "mean D"),
    ("ptd_rollouts", "PTD rollouts/step"),
    ("all_fail_groups", "all-fail groups/step"),
]
PAIRED = [("acc_auc", "acc AUC"), ("acc_final", "acc final"), ("p_correct_auc", "p(correct) AUC"),
          ("p_correct_final", "p(correct) final"), ("entropy", "entropy (mean)")]  # fmt: skip


def paired(results: list[dict], a: str, b: str, key: str) -> tuple[list[float], int]:
    """Per-seed differences a − b on the seeds both methods finished."""
    by = {(r["method"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    d = [by[a, s][key] - by[b, s][key] for s in seeds if (a, s) in by and (b, s) in by]
    return d, sum(x > 0 for x in d)


# besides every method − grpo: the hint's own value; the coarse hint against no hint and against
# the exact cells; the answer-stating teacher against the zero-spoiler one; Top-K vs full JSD
CONTROL_PAIRS = [("ptd", "ptd-nohint"), ("ptd-coarse", "ptd-nohint"), ("ptd-coarse", "ptd"), ("ptd-leak", "ptd"),
                 ("ptd-full", "ptd")]  # fmt: skip


def method_pairs(methods: list[str]) -> list[tuple[str, str]]:
    pairs = [(m, "grpo") for m in methods if m != "grpo" and "grpo" in methods]
    return pairs + [(a, b) for a, b in CONTROL_PAIRS if a in methods and b in methods]


def summary_markdown(results: list[dict], methods: list[str], header: str, warm_mix: str | None = None) -> str:
    lines = [header, "", "## Per method (mean ± sd over seeds)", ""]
    lines.append("| method | n | " + " | ".join(t for _, t in MEASURES) + " |")
    lines.append("|---" * (len(MEASURES) + 2) + "|")
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        if rs:
            lines.append(f"| {m} | {len(rs)} | " + " | ".join(_fmt([r[k] for r in rs]) for k, _ in MEASURES) + " |")
    pairs = method_pairs(methods)
    if pairs:
        lines += ["", "## Paired differences (per seed, a − b): mean ± sd, seeds with a > b", ""]
        lines.append("| a − b | " + " | ".join(t for _, t in PAIRED) + " |")
        lines.append("|---" * (len(PAIRED) + 1) + "|")
        for a, b in pairs:
            cells = []
            for k, _ in PAIRED:
                d, pos = paired(results, a, b, k)
                cells.append(f"{_fmt(d)} ({pos}/{len(d)})" if d else "—")
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Definitions. Held-out = the task's fixed test split, greedy decoding, hint-free. AUC = trapezoid "
        "area under the held-out curve (step 0, every eval step, final) divided by the steps: the curve's "
        "mean level. p(correct) = mean probability of the reference completion. Train reward, entropy "
        "(exact H(p) of the student on its rollouts), PTD rollouts |F| and all-fail groups are per-step "
        "means; overlap |TopK(p) ∩ TopK(q)|/K, teacher mass Σ_S q and D (D_K, or the full JSD for "
        "ptd-full) are means over steps with |F| > 0. Teacher acc = greedy accuracy of the initial model "
        "with the method's teacher hint (— for no hint). sd = sample sd over seeds."
        + (
            f" Warm start (shared by all methods): supervised on the hint mix {warm_mix} (kind:weight; none = "
            "hint-free, leak = the hint states the answer), stopped once the spatial- and leak-hinted dev "
            "accuracies reach the threshold; no hint reaches the student in RL."
            if warm_mix
            else ""
        ),
    ]
    return "\n".join(lines) + "\n"


# ============================================================================ spread


SPREAD_KEYS = [("acc_auc", "acc AUC"), ("p_correct_auc", "p(correct) AUC"), ("entropy", "entropy")]
TEACHER_HINTS = {"ptd": "spatial hint", "ptd-coarse": "coarse hint", "ptd-leak": "answer in the hint"}
TIMING = ("seconds",)  # the only measures that may differ between identical runs


def spread_markdown(studies: dict[str, list[dict]]) -> str:
    """Studies of one design run in different settings (machine, thread count, instruction set),
    side by side: the start point, every paired difference, and whether its sign held everywhere.
    The first study is the reference for counting runs that came out bit-identical."""
    labels = list(studies)
    ref = {(r["method"], r["seed"]): r for r in studies[labels[0]]}
    methods = list(dict.fromkeys(r["method"] for r in studies[labels[0]]))
    lines = ["| | " + " | ".join(labels) + " | same sign in all |", "|---" * (len(labels) + 2) + "|"]

    def row(title: str, cells: list[str], signs: list[float] | None = None) -> None:
        agree = ""
        if signs is not None:
            agree = "yes" if all(x > 0 for x in signs) or all(x < 0 for x in signs) else "**no**"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {agree} |")

    def same(a: dict, b: dict) -> bool:
        return {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}

    cells = []
    for label in labels:
        rs = studies[label]
        n = sum(same(r, ref[r["method"], r["seed"]]) for r in rs if (r["method"], r["seed"]) in ref)
        cells.append(f"{n}/{len(rs)}")
    row(f"runs identical to {labels[0]} (every measure and curve)", cells)
    row("warm-start steps", [str(studies[la][0].get("warmstart_steps")) for la in labels])
    row("hint-free held-out acc at RL start", [f"{studies[la][0]['acc_before']:.3f}" for la in labels])
    for m, hint in TEACHER_HINTS.items():
        accs = [next((r["teacher_acc"] for r in studies[la] if r["method"] == m), None) for la in labels]
        if any(a is not None for a in accs):
            row(f"teacher acc at RL start, {hint} ({m})", ["—" if a is None else f"{a:.3f}" for a in accs])
    for a, b in method_pairs(methods):
        for key, title in SPREAD_KEYS:
            diffs = [paired(studies[la], a, b, key) for la in labels]
            means = [sum(d) / len(d) if d else float("nan") for d, _ in diffs]
            row(f"{a} − {b}, {title}", [f"{_fmt(d)} ({pos}/{len(d)})" for d, pos in diffs], means)
    return "\n".join(lines) + "\n"


def load_study(study_dir: str) -> list[dict]:
    with open(os.path.join(study_dir, "runs.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
