"""curves.png: reward, accuracy, entropy and JSD against the RL step (matplotlib, Agg)."""

from __future__ import annotations

import json


def _smooth(y: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(y):
        acc += v
        if i >= w:
            acc -= y[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot_curves(metrics_path: str, out_path: str, evals: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
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
