"""All plotting (matplotlib, Agg): a run's ``curves.png`` and the study's figure.

Conventions of both: integer RL-step ticks, no offset or scientific notation on the axes (it
would print over the titles), plain-words titles, legends placed outside the data.
"""

from __future__ import annotations

import json
import math


def _smooth(y: list[float], w: int) -> list[float]:
    """Moving mean over the last ``w`` defined values (fewer at the start); NaN stays NaN where
    nothing is defined yet."""
    out = []
    for i in range(len(y)):
        window = [v for v in y[max(0, i - w + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def _metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_axes(ax) -> None:
    """Whole-number step ticks; numbers written out (no offset text above the axis)."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    ax.yaxis.set_major_formatter(formatter)
    ax.grid(alpha=0.3)


def plot_curves(metrics_path: str, out_path: str, evals: dict | None = None, title: str = "") -> None:
    """One run against the RL step: accuracy (the step's rollouts, and held-out greedy), token
    entropy, and with PTD-PO the JSD to the teacher and how many rollouts got it."""
    plt = _pyplot()
    rows = _metrics(metrics_path)
    if not rows:
        return
    evals = evals or {}
    steps = [r["step"] for r in rows]
    w = max(1, len(rows) // 15)
    ptd = any(r["ptd_rollouts"] > 0 for r in rows)
    panels = [("accuracy", "accuracy: the step's rollouts, and held-out prompts (red)"),
              ("entropy", "student token entropy (nats)")]  # fmt: skip
    if ptd:
        panels += [("jsd", "JSD to the hinted teacher, on the rollouts that get it (nats)"),
                   ("ptd_rollouts", "rollouts pulled toward the teacher, per step")]  # fmt: skip
    fig, axes = plt.subplots(2 if ptd else 1, 2, figsize=(11, 7.6 if ptd else 4.4), sharex=True, squeeze=False)
    for ax, (key, panel_title) in zip(axes.flat, panels):
        y = [float(r[key]) if not (key == "jsd" and r["ptd_rollouts"] == 0) else float("nan") for r in rows]
        ax.plot(steps, y, color="0.7", lw=0.8, label="per step")
        if w > 1:
            ax.plot(steps, _smooth(y, w), color="C0", lw=1.8, label=f"mean of the last {w} steps")
        ax.set_title(panel_title, fontsize=10)
        _plain_axes(ax)
    acc_ax = axes.flat[0]
    curve = [(s, a) for s, a, _ in evals.get("held_out", [])]
    if not curve:  # a run written before the curve was kept: the points of metrics.jsonl
        curve = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    if curve:
        acc_ax.plot(*zip(*curve), "o-", color="C3", ms=4, label="held-out accuracy (greedy)")
    acc_ax.set_ylim(-0.02, 1.02)
    for ax in axes[-1]:
        ax.set_xlabel("RL step")
    # one legend for every panel, between the title and the panels: it covers no data
    handles, labels = acc_ax.get_legend_handles_labels()
    top = 0.925 if ptd else 0.85
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, top), ncol=3, frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10, y=0.99)
    fig.tight_layout(rect=(0, 0, 1, top + (0.03 if ptd else 0.06)))  # the padding above the panel titles
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- the study


def _paired_curves(results: list[dict], method: str, baseline: str, key: str):
    """(steps, [per-seed differences method − baseline of the held-out curve ``key``]) on the seeds
    both ran, at the steps both evaluated."""
    by = {(r["method"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results if (method, r["seed"]) in by and (baseline, r["seed"]) in by})
    if not seeds:
        return [], []
    curves = []
    for s in seeds:
        a, b = dict(map(tuple, by[method, s][key])), dict(map(tuple, by[baseline, s][key]))
        steps = sorted(set(a) & set(b))
        curves.append([a[t] - b[t] for t in steps])
    return steps, curves


def plot_study(results: list[dict], methods: list[str], out_path: str, title: str = "") -> None:
    """The study at a glance, from ``runs.jsonl`` alone: each method's paired difference against
    ``grpo`` (same seed, same prompts), one column per method.

    Top row: held-out accuracy difference against the RL step, one thin line per seed, the mean
    in bold and ± one sd shaded. Bottom row: the per-seed differences of the two summary measures
    (accuracy AUC, p(correct) AUC: the curves' mean levels), one dot per seed, the mean ± sd as a
    bar. Every panel shares its row's y axis and has a zero line: above it the method beat grpo."""
    import numpy as np

    plt = _pyplot()
    others = [m for m in methods if m != "grpo"]
    if "grpo" not in methods or not others:
        raise ValueError("plot_study: needs grpo and at least one other method")
    n = len(others)
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n + 1.2, 6.4), sharey="row", squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})  # fmt: skip
    seeds = sorted({r["seed"] for r in results})
    for col, m in enumerate(others):
        ax = axes[0, col]
        steps, curves = _paired_curves(results, m, "grpo", "acc_curve")
        if curves:
            ys = np.asarray(curves)
            for y in ys:
                ax.plot(steps, y, color=f"C{col}", lw=0.6, alpha=0.35)
            mu = ys.mean(0)
            sd = ys.std(0, ddof=1) if len(ys) > 1 else np.zeros_like(mu)
            ax.fill_between(steps, mu - sd, mu + sd, color=f"C{col}", alpha=0.18, lw=0)
            ax.plot(steps, mu, color=f"C{col}", lw=2.2)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"{m} − grpo", fontsize=10)
        ax.set_xlabel("RL step", fontsize=9)
        _plain_axes(ax)
        ax.tick_params(labelsize=8)

        ax = axes[1, col]
        by = {(r["method"], r["seed"]): r for r in results}
        for x, key in enumerate(("acc_auc", "p_correct_auc")):
            d = [by[m, s][key] - by["grpo", s][key] for s in seeds if (m, s) in by and ("grpo", s) in by]
            if not d:
                continue
            jitter = np.linspace(-0.12, 0.12, len(d)) if len(d) > 1 else np.zeros(1)
            ax.scatter(x + jitter, d, s=10, color=f"C{col}", alpha=0.6, lw=0)
            mean = float(np.mean(d))
            sd = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
            ax.errorbar([x + 0.3], [mean], yerr=[sd], fmt="o", color="k", ms=4, capsize=3, lw=1.2)
            above = sum(v > 0 for v in d)
            ax.annotate(f"{mean:+.3f}\n{above}/{len(d)} > 0", (x, 1.0), xycoords=("data", "axes fraction"),
                        ha="center", va="top", fontsize=7.5)  # fmt: skip
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks([0, 1], ["acc\nAUC", "p(correct)\nAUC"], fontsize=8)
        ax.set_xlim(-0.5, 1.6)
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="y", labelsize=8)
    axes[0, 0].set_ylabel("held-out accuracy,\nmethod − grpo", fontsize=9)
    axes[1, 0].set_ylabel("per-seed difference\n(mean ± sd in black)", fontsize=9)
    # room above the dots for the labels: the row's top at 1.5× its largest value
    low, high = axes[1, 0].get_ylim()
    axes[1, 0].set_ylim(low, high + 0.45 * (high - low))
    fig.suptitle(title or f"paired differences against grpo over {len(seeds)} seeds: thin lines = seeds, bold = "
                 "mean, band = ± 1 sd; above 0, the method beat grpo", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
