"""All plotting (matplotlib, Agg): a run's ``curves.png`` and the study's ``curves.png``."""

from __future__ import annotations

import json
import math
import os


def _smooth(y: list[float], w: int) -> list[float]:
    """Moving mean over the last ``w`` values (fewer at the start)."""
    out = []
    for i in range(len(y)):
        lo = max(0, i - w + 1)
        out.append(sum(y[lo : i + 1]) / (i + 1 - lo))
    return out


def _nan_fill(vals: list[float]) -> list[float]:
    """Carry the last defined value forward (steps with no PTD rollout have no overlap)."""
    out, last = [], float("nan")
    for v in vals:
        last = v if not (isinstance(v, float) and math.isnan(v)) else last
        out.append(last)
    return out


def _metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics_path: str, out_path: str, evals: dict | None = None) -> None:
    """One run: reward, accuracy, entropy and JSD against the RL step."""
    plt = _pyplot()
    rows = _metrics(metrics_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    w = max(1, len(rows) // 15)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = [
        ("reward_mean", "mean reward (rollouts)"),
        ("accuracy", "accuracy"),
        ("entropy", "token entropy H(p) (nats)"),
        ("jsd", "mean Top-K JSD on PTD rollouts"),
    ]
    for ax, (key, title) in zip(axes.flat, panels):
        y = [r[key] for r in rows]
        ax.plot(steps, y, color="0.75", lw=0.8, label="per step")
        ax.plot(steps, _smooth(y, w), color="C0", lw=1.8, label=f"moving mean ({w})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    acc_ax = axes.flat[1]
    ev = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    if evals and "accuracy_before" in evals:
        ev = [(0, evals["accuracy_before"])] + ev
    if evals and "accuracy_after" in evals:
        ev = ev + [(steps[-1], evals["accuracy_after"])]
    if ev:
        acc_ax.plot(*zip(*ev), "o-", color="C3", label="held-out greedy")
    acc_ax.legend(fontsize=8)
    jsd_ax = axes.flat[3]
    tw = jsd_ax.twinx()
    tw.plot(steps, _smooth([r["ptd_rollouts"] for r in rows], w), color="C2", lw=1, alpha=0.7)
    tw.set_ylabel("|F| (PTD rollouts)", color="C2")
    for ax in axes[1]:
        ax.set_xlabel("RL step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_study(results: list[dict], methods: list[str], study_dir: str, out_path: str) -> None:
    """The study: held-out accuracy and p(correct), entropy and Top-K overlap per method, mean ± sd
    over seeds (``results`` from ``compare.run_measures``; per-step rows from each run's folder)."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [
        ("acc", "held-out greedy accuracy"),
        ("p_correct", "held-out p(correct)"),
        ("entropy", "student token entropy on rollouts (nats, moving mean 10)"),
        ("overlap", "Top-K overlap |TopK(p) ∩ TopK(q)|/K on F (moving mean 10)"),
    ]
    for ax, (key, title) in zip(axes.flat, panels):
        for ci, m in enumerate(methods):
            rs = [r for r in results if r["method"] == m]
            if not rs or (key == "overlap" and rs[0]["overlap"] is None):
                continue
            if key in ("acc", "p_correct"):
                xs = [s for s, _ in rs[0][f"{key}_curve"]]
                ys = np.array([[v for _, v in r[f"{key}_curve"]] for r in rs])
            else:
                per = []
                for r in rs:
                    rows = _metrics(os.path.join(study_dir, "runs", m, f"seed{r['seed']}", "metrics.jsonl"))
                    vals = [row[key] if (key != "overlap" or row["ptd_rollouts"] > 0) else np.nan for row in rows]
                    vals = list(np.asarray(_nan_fill(vals)))
                    per.append(_smooth(vals, 10))
                    xs = [row["step"] for row in rows]
                ys = np.array(per)
            mu = ys.mean(0)
            sd = ys.std(0, ddof=1) if len(ys) > 1 else np.zeros_like(mu)
            ax.plot(xs, mu, color=f"C{ci}", lw=1.8, marker="o" if key in ("acc", "p_correct") else None, ms=3, label=m)
            ax.fill_between(xs, mu - sd, mu + sd, color=f"C{ci}", alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    n = len({r["seed"] for r in results})
    fig.suptitle(f"mean ± sd over {n} paired seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
