"""The report's two figures.

- ``<label>.png``, the headline: at one shape, for every op, the time and the working memory (peak −
  input gradients) of each ptd entry point next to each peer, with the bare GEMMs the op needs (the
  floor) and the size of one N×V fp32 tensor (computed) as reference lines.
- ``<label>-scaling.png``: time and working memory against N, each op family's ptd rows with their
  peers, and ptd's working memory against V next to the size of an N×V fp32 tensor.

Legends sit outside the axes, so they never cover data; a panel with a single method is not drawn.
"""

from __future__ import annotations

import math
import re

from report_data import Results, fmt_bytes, fmt_time, is_cuda, ok, series, working

# The headline's order: an op's cheapest form first, then the divergences, then the whole head.
OP_ORDER = ["logprobs", "logprobs+entropy", "teacher top-K K=100", "jsd", "topk_jsd K=64", "topk_jsd K=100",
            "ptd head K=100"]
OURS_COLOR, PEER_COLOR, EAGER_COLOR = "#1f6fb4", "#9a9a9a", "#d9822b"
MIB = 2**20


def short_method(method: str) -> str:
    """A method's name as a bar label: the benchmark's name without its call-site detail."""
    text = method.replace("(entropy; vocab chunk ", "(chunk ").replace("(vocab chunk ", "(chunk ")
    text = text.replace(", as its trainers call it)", ", TRL's trainers)")
    text = text.replace("eager reference (ptd_kernels.reference)", "eager reference (materialized logits)")
    return re.sub(r"^ptd ", "ptd: ", text)


def _is_eager(method: str) -> bool:
    return method.startswith("eager") or method.startswith("torch.topk")


def headline_shape(res: Results, meta) -> str | None:
    """The shape the headline shows: on CUDA the target shape (N=8192, V=151936) when measured, else
    the shape with the most measured rows."""
    shapes = res.shapes(res.main)
    if not shapes:
        return None
    if is_cuda(meta):
        preferred = [s for s in shapes if s.startswith("N=8192,") and s.endswith("V=151936")]
        if preferred:
            return preferred[0]
    return max(shapes, key=lambda s: sum(1 for r in res.main if r["shape"] == s and ok(r)))


def _dims(shape: str) -> dict:
    return {key: int(value) for key, value in (part.split("=") for part in shape.split(","))}


def plot_headline(rows, meta, path) -> bool:
    """Bars per op at the headline shape: time (left) and working memory (right), log scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = Results([r for r in rows if not r.get("variant")])  # the logit transforms have their own table
    shape = headline_shape(res, meta)
    if shape is None:
        return False
    ops = [op for op in OP_ORDER if res.find(res.main, op=op, shape=shape)]
    ops += [op for op in dict.fromkeys(r["op"] for r in res.main if r["shape"] == shape)
            if op not in ops and op != "floor"]
    groups = []
    for op in ops:
        bars = res.find(res.main, op=op, shape=shape)
        bars.sort(key=lambda r: (not r.get("ours"), r["median"] if ok(r) else math.inf))
        if len({r["method"] for r in bars}) >= 2:  # a panel compares something
            groups.append((op, bars))
    if not groups:
        return False
    dims = _dims(shape)
    nv_bytes = dims["N"] * dims["V"] * 4
    times = [r["median"] for _, bars in groups for r in bars if ok(r)]
    floors = {op: res.floor(shape, next((r.get("floor") for r in bars if r.get("floor")), None)) for op, bars in groups}
    times += [f["median"] for f in floors.values() if f]
    mems = [working(r) for _, bars in groups for r in bars if ok(r) and working(r)] + [nv_bytes]
    t_lo, t_hi = min(times) / 1.6, max(times) * 2.5
    m_lo, m_hi = min(mems) / MIB / 1.6, max(mems) / MIB * 2.5

    heights = [len(bars) + 1.4 for _, bars in groups]
    fig_height = 0.36 * sum(heights) + 1.6
    layout = dict(height_ratios=heights, hspace=0.6, wspace=0.12, top=1 - 1.15 / fig_height)
    fig, axes = plt.subplots(len(groups), 2, figsize=(14, fig_height), squeeze=False, gridspec_kw=layout)
    for i, (op, bars) in enumerate(groups):
        ax_t, ax_m = axes[i]
        labels = [short_method(r["method"]) + (" †" if r.get("mem_method") == "peak RSS" else "") for r in bars]
        ypos = list(range(len(bars)))[::-1]
        colors = [OURS_COLOR if r.get("ours") else EAGER_COLOR if _is_eager(r["method"]) else PEER_COLOR
                  for r in bars]
        for ax, value_of, fmt, lo in ((ax_t, lambda r: r["median"], fmt_time, t_lo),
                                      (ax_m, lambda r: (working(r) or 0) / MIB, lambda v: fmt_bytes(v * MIB), m_lo)):
            for y, r, color in zip(ypos, bars, colors):
                if not ok(r):
                    ax.text(lo * 1.1, y, r.get("status", "not run"), va="center", fontsize=8, color="#b00000")
                    continue
                value = value_of(r)
                hatch = "///" if ax is ax_m and r.get("mem_method") == "peak RSS" else None
                ax.barh(y, value, color=color, hatch=hatch, edgecolor="white" if hatch else None, height=0.7)
                ax.text(value * 1.08, y, fmt(value), va="center", fontsize=7.5)
            ax.set_xscale("log")
            ax.set_yticks(ypos)
            ax.set_ylim(-0.8, len(bars) - 0.2)
            ax.grid(True, axis="x", which="both", alpha=0.25)
            ax.set_axisbelow(True)
        ax_t.set_yticklabels(labels, fontsize=8)
        for tick, r in zip(ax_t.get_yticklabels(), bars):
            if r.get("ours"):
                tick.set_fontweight("bold")
        ax_m.set_yticklabels([])
        ax_t.set_xlim(t_lo, t_hi)
        ax_m.set_xlim(m_lo, m_hi)
        floor = floors[op]
        if floor:
            ax_t.axvline(floor["median"], color="black", ls="--", lw=1)
            ax_t.text(floor["median"], len(bars) - 0.25, f" floor: {floor['method']}, {fmt_time(floor['median'])}",
                      fontsize=7, va="bottom", ha="left")
        ax_m.axvline(nv_bytes / MIB, color="black", ls=":", lw=1)
        ax_m.text(nv_bytes / MIB, len(bars) - 0.25, f" one N×V fp32 tensor (computed): {fmt_bytes(nv_bytes)}",
                  fontsize=7, va="bottom", ha="left")
        ax_t.set_title(f"{op}: time ({'forward only' if op.startswith('teacher top-K') else 'forward + backward'})",
                       fontsize=9, loc="left", pad=14)
        ax_m.set_title(f"{op}: working memory (peak − input gradients)", fontsize=9, loc="left", pad=14)
    axes[-1][0].set_xlabel("median wall time, s (log scale)")
    axes[-1][1].set_xlabel("MiB (log scale)")
    device = meta.get("device", "?") + ("" if is_cuda(meta) else f", {meta.get('cpus', '?')} CPUs")
    fig.suptitle(f"ptd against its peers at {shape}, {meta.get('dtype', '?')}, {device}: measured\n"
                 "blue: ptd; orange: eager PyTorch on materialized logits; grey: other fused kernels; "
                 "† memory as peak RSS growth (torch.compile'd peers), approximate", fontsize=9.5)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _plain_log_ticks(ax) -> None:
    """Log-axis tick labels as plain numbers (0.1, 1, 10; 20, 50, 100), not powers of ten; under two
    decades the 2× and 5× ticks are labelled too."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda value, _position: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    if hi / lo < 100:
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _family(op: str) -> str:
    if op.startswith("logprobs"):
        return "log-probs"
    if "jsd" in op:
        return "JSD and Top-K JSD"
    return op


def plot_scaling(rows, meta, path) -> bool:
    """Time and working memory against N per op family (ptd with its peers), and ptd's working
    memory against V beside the size of one N×V fp32 tensor. False when nothing spans N or V."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = Results([r for r in rows if not r.get("variant")])
    series_rows = res.scaling or [r for r in res.main if r["op"] != "floor"]
    by_n, by_v = series(series_rows, "n"), series(res.scaling, "v")
    families = {}
    for key in by_n:
        families.setdefault(_family(key[0]), []).append(key)
    families = {name: keys for name, keys in families.items() if len({key[1] for key in keys}) >= 2}
    if not families and not by_v:
        return False
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(f"{key[0]}: {key[1]}" for key in list(by_n) + list(by_v)))
    color = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    nrows = max(len(families), 1)
    fig = plt.figure(figsize=(17, 4.2 * nrows + 0.8))
    grid = fig.add_gridspec(nrows, 4, width_ratios=[1, 1, 0.8, 1.1], wspace=0.35, hspace=0.45)
    styles = ["-", "--", ":", "-."]
    for i, (family, keys) in enumerate(families.items()):
        ax_t, ax_m = fig.add_subplot(grid[i, 0]), fig.add_subplot(grid[i, 1])
        fixed_values = list(dict.fromkeys(key[2] for key in keys))
        for key in sorted(keys, key=lambda k: (not k[3], k[0], k[1])):
            op, method, fixed, ours = key
            good = [(x, r) for x, r in by_n[key] if ok(r)]
            label = f"{op}: {method}" + (f" (H={fixed[0]}, V={fixed[1]})" if len(fixed_values) > 1 else "")
            style = dict(marker="o", lw=2.6 if ours else 1.3, color=color[f"{op}: {method}"],
                         ls=styles[fixed_values.index(fixed) % len(styles)], label=label)
            if good:
                ax_t.plot([x for x, _ in good], [r["median"] for _, r in good], **style)
                memory = [(x, working(r)) for x, r in good if working(r)]
                ax_m.plot([x for x, _ in memory], [b / MIB for _, b in memory], **style)
            failed = [(x, r) for x, r in by_n[key] if not ok(r)]
            if failed:
                style.pop("label")
                ax_t.plot([], [], **style, label=f"  {failed[0][1].get('status')} at N ≥ {failed[0][0]}")
        dims = ", ".join(f"{name}={value}" for name, value in zip(("H", "V"), fixed_values[0]))
        for ax, what in ((ax_t, "median time, s"), (ax_m, "working memory, MiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (rows)")
            ax.set_ylabel(what)
            ax.grid(True, which="both", alpha=0.25)
            _plain_log_ticks(ax)
        ax_t.set_title(f"{family}: time vs N ({dims if len(fixed_values) == 1 else 'several shapes'})", fontsize=9)
        ax_m.set_title(f"{family}: working memory vs N", fontsize=9)
        ax_m.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.03, 1.0), frameon=False)
    if by_v:
        ax_v = fig.add_subplot(grid[:, 3])
        fixed = None
        for key, points in by_v.items():
            op, method, fixed, ours = key
            good = [(x, working(r)) for x, r in points if ok(r) and working(r)]
            ax_v.plot([x for x, _ in good], [b / MIB for _, b in good], marker="o", lw=2.6 if ours else 1.3,
                      color=color[f"{op}: {method}"], label=f"{op}: {method}")
        vs = sorted({x for points in by_v.values() for x, _ in points})
        n = fixed[0]
        ax_v.plot(vs, [n * v * 4 / MIB for v in vs], color="black", ls=":", lw=1.2,
                  label=f"one N×V fp32 tensor at N={n} (computed, not measured)")
        ax_v.set_xscale("log", base=2)
        ax_v.set_yscale("log")
        ax_v.set_xlabel("V (vocabulary)")
        ax_v.set_ylabel("working memory, MiB")
        ax_v.set_title(f"working memory vs V (N={fixed[0]}, H={fixed[1]})", fontsize=9)
        ax_v.grid(True, which="both", alpha=0.25)
        _plain_log_ticks(ax_v)
        ax_v.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.suptitle(f"ptd scaling — {meta.get('label', '?')} ({meta.get('device', '')}, {meta.get('dtype', '?')}), "
                 "measured; thick lines: ptd", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
