"""The report's plot: time and peak memory against N (and working memory against V), ours vs peers."""

from __future__ import annotations

import math
import sys

from report_data import Results, ok, peak, series, working


def _decade_at_least(ax):
    """Log axes over a narrow range zoom into noise: show at least one decade around the data."""
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 10:
        mid = math.sqrt(lo * hi)
        ax.set_ylim(mid / math.sqrt(10), mid * math.sqrt(10))


def plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The soft-cap / logit-scale rows have their own table; the plot shows the plain methods.
    res = Results([r for r in rows if not r.get("variant")])
    # Scaling suite on CPU; on CUDA the main shapes themselves span N (one line style per V).
    series_rows = res.scaling or [r for r in res.main if r["op"] != "floor"]
    by_n = series(series_rows, "n")
    by_v = series(res.scaling, "v")
    ops = []
    for (op, *_rest) in list(by_n) + list(by_v):
        if op not in ops:
            ops.append(op)
    if not ops:
        print("report: no series with ≥ 2 points, no plot", file=sys.stderr)
        return False
    methods = []
    for (_op, method, *_rest) in list(by_n) + list(by_v):
        if method not in methods:
            methods.append(method)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    ncols = 3 if by_v else 2
    fig, axes = plt.subplots(len(ops), ncols, figsize=(6 * ncols, 3.6 * len(ops)), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for i, op in enumerate(ops):
        ax_t, ax_m = axes[i][0], axes[i][1]
        fixed_seen = []
        for (sop, method, fixed, ours), pts in by_n.items():
            if sop != op:
                continue
            if fixed not in fixed_seen:
                fixed_seen.append(fixed)
            ls = styles[fixed_seen.index(fixed) % len(styles)]
            label = f"{method} (H={fixed[0]},V={fixed[1]})" if len(fixed_seen) > 1 or not res.scaling else method
            good = [(x, r) for x, r in pts if ok(r)]
            oom = [x for x, r in pts if not ok(r)]
            if oom:
                label += f" — {pts[[x for x, _ in pts].index(oom[0])][1].get('status')} at N≥{oom[0]}"
            kw = dict(marker="o", lw=2.4 if ours else 1.2, color=color[method], label=label)
            if good:
                ax_t.plot([x for x, _ in good], [r["median"] for _, r in good], ls, **kw)
                mem = [(x, peak(r)) for x, r in good if peak(r)]
                if mem:
                    ax_m.plot([x for x, _ in mem], [b / 2**20 for _, b in mem], ls, **kw)
        for ax, ylabel in ((ax_t, "median time (s)"), (ax_m, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (rows)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{op}: {ylabel.split(' (')[0]} vs N")
            ax.grid(True, which="both", alpha=0.3)
            _decade_at_least(ax)
        if ax_m.lines:
            ax_m.legend(fontsize=7)
        if by_v:
            ax_v = axes[i][2]
            for (sop, method, fixed, ours), pts in by_v.items():
                good = [(x, working(r)) for x, r in pts if sop == op and ok(r) and working(r)]
                if good:
                    ax_v.plot([x for x, _ in good], [b / 2**20 for _, b in good], marker="o", color=color[method],
                              lw=2.4 if ours else 1.2, label=f"{method} (N={fixed[0]},H={fixed[1]})")
            ax_v.set_xscale("log", base=2)
            ax_v.set_yscale("log")
            ax_v.set_xlabel("V (vocabulary)")
            ax_v.set_ylabel("peak − input grads (MiB)")
            ax_v.set_title(f"{op}: working memory vs V")
            ax_v.grid(True, which="both", alpha=0.3)
            _decade_at_least(ax_v)
            if ax_v.lines:
                ax_v.legend(fontsize=7)
    fig.suptitle(f"ptd benchmarks — {meta.get('label', '?')} ({meta.get('device', '')}); ours in bold lines",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
