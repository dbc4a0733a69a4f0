"""Turn pytest-benchmark JSON into the results table and plot.

    pytest bench --benchmark-only --benchmark-json bench/results/cpu.json
    python bench/report.py bench/results/cpu.json            # -> bench/results/cpu.md, cpu.png

Rows the session's time budget cut are kept as "not run"; to measure them in a second session:

    pytest $(python bench/report.py bench/results/cpu.json --missing) --benchmark-only \
        --benchmark-json bench/results/cpu-2.json
    python bench/report.py bench/results/cpu.json bench/results/cpu-2.json

Writes ``<out-dir>/<label>.md`` (op, shape, method, median time, ratio to ours, ratio to the GEMM
floor, peak memory; then the targets of issue 5 with the measured ratios, and the scaling sweep)
and ``<out-dir>/<label>.png`` (time and peak memory vs N, ours vs peers, log scale). The label is
the device label recorded by bench/conftest.py ("cpu", or the CUDA device's name).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))

TARGETS_CPU = "full JSD ≤ 1.0× Liger chunked time at ≤ 1/10 its peak memory; log-prob + entropy ≤ 1.5× the 3-GEMM floor"


def load(paths):
    """Rows of one or more pytest-benchmark JSON files. With several (a run, then a run of the rows
    its time budget cut), a measured row replaces an unmeasured one of the same op, method and
    shape; each file's session (load, wall time) is kept in meta["sessions"]."""
    rows, meta, index = [], {}, {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        session = dict(data.get("ptd", {}))
        if not meta:
            meta = dict(session)
            meta.setdefault("datetime", data.get("datetime"))
        meta.setdefault("sessions", []).append(
            {"file": os.path.basename(path), "datetime": data.get("datetime"), "load_start": session.get("load_start"),
             "load_end": session.get("load_end"), "wall_s": session.get("wall_s"), "rows": 0})
        for b in data["benchmarks"]:
            e = dict(b.get("extra_info", {}))
            if "op" not in e:
                continue
            e["median"] = b["stats"]["median"]
            e["test"] = b.get("fullname", b.get("name"))
            e["session"] = len(meta["sessions"])
            key = (e.get("suite"), e["op"], e["method"], e["shape"])
            if key in index:
                if ok(rows[index[key]]) or not ok(e):
                    continue
                rows[index[key]] = e
            else:
                index[key] = len(rows)
                rows.append(e)
    for r in rows:
        meta["sessions"][r["session"] - 1]["rows"] += 1
    return rows, meta


# ----------------------------------------------------------------------------- formatting


def fmt_time(s):
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def fmt_bytes(b):
    if b is None:
        return "—"
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB"


def fmt_ratio(x):
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.2f}×" if x < 100 else f"{x:.0f}×"


def ok(row):
    return row.get("status", "ok") == "ok"


def peak(row):
    return row.get("peak_bytes") if ok(row) else None


def working(row):
    p = peak(row)
    return None if p is None else max(0, p - row.get("grad_bytes", 0))


def mem_cell(row, value):
    if value is None:
        return "—"
    mark = " †" if row.get("mem_method") == "peak RSS" else ""
    return fmt_bytes(value) + mark


# ----------------------------------------------------------------------------- analysis


class Results:
    def __init__(self, rows):
        self.rows = rows
        self.main = [r for r in rows if r.get("suite", "main") == "main"]
        self.scaling = [r for r in rows if r.get("suite") == "scaling"]

    def find(self, rows, **kw):
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]

    def best_ours(self, rows, op, shape):
        cands = [r for r in self.find(rows, op=op, shape=shape, ours=True) if ok(r)]
        return min(cands, key=lambda r: r["median"]) if cands else None

    def floor(self, shape, kind):
        if not kind:
            return None
        cands = [r for r in self.find(self.main, op="floor", shape=shape, method=kind) if ok(r)]
        return cands[0] if cands else None

    def shapes(self, rows):
        seen = []
        for r in rows:
            if r["shape"] not in seen:
                seen.append(r["shape"])
        return seen


def is_cuda(meta) -> bool:
    return meta.get("kind", "cuda" if not str(meta.get("label", "cpu")).startswith("cpu") else "cpu") == "cuda"


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def time_ratios(a, b):
    """(wall-time ratio, CPU-time ratio) of rows a over b (CPU time only where both have it)."""
    if a is None or b is None:
        return None, None
    return _ratio(a["median"], b["median"]), _ratio(a.get("cpu_s"), b.get("cpu_s"))


def ratio_cell(wall, cpu, show_cpu):
    return fmt_ratio(wall) + (f" ({fmt_ratio(cpu)})" if show_cpu and cpu is not None else "")


def main_table(res: Results, show_cpu: bool) -> list[str]:
    cpu_col = " CPU time |" if show_cpu else ""
    ratio_note = " (CPU time)" if show_cpu else ""
    out = [f"| op | shape | method | median |{cpu_col} × ours{ratio_note} | × floor{ratio_note} | peak memory | "
           "peak − input grads |",
           "| --- | --- | --- | ---: |" + (" ---: |" if show_cpu else "") + " ---: | ---: | ---: | ---: |"]
    ops = []
    for r in res.main:
        if r["op"] not in ops:
            ops.append(r["op"])
    ops = [o for o in ops if o != "floor"] + (["floor"] if "floor" in ops else [])
    for shape in res.shapes(res.main):
        for op in ops:
            rows = res.find(res.main, op=op, shape=shape)
            if not rows:
                continue
            best = res.best_ours(res.main, op, shape)
            rows.sort(key=lambda r: (not r.get("ours"), not ok(r), r["median"] if ok(r) else 0))
            for r in rows:
                if not ok(r):
                    status = r.get("status", "?") + (f" ({r['note']})" if r.get("note") else "")
                    dashes = " — |" * (5 if show_cpu else 4)
                    out.append(f"| {op} | {shape} | {r['method']} | {status} |{dashes}")
                    continue
                fl = res.floor(shape, r.get("floor"))
                x_ours = ratio_cell(*time_ratios(r, best), show_cpu) if best and op != "floor" else "—"
                x_floor = ratio_cell(*time_ratios(r, fl), show_cpu) if fl else "—"
                name = f"**{r['method']}**" if r.get("ours") else r["method"]
                if r.get("session", 1) > 1:
                    name += f" [session {r['session']}]"
                cpu = f" {fmt_time(r.get('cpu_s'))} |" if show_cpu else ""
                out.append(f"| {op} | {shape} | {name} | {fmt_time(r['median'])} |{cpu} {x_ours} | {x_floor} | "
                           f"{mem_cell(r, peak(r))} | {mem_cell(r, working(r))} |")
    return out


def _verdict(value, target, lower_is_better=True, cpu=None):
    """'met' / '**short**' on the wall-time (or memory) ratio; with a CPU-time ratio too, both
    must agree, else the verdict says which measure meets the target."""
    if value is None:
        return "not measured"

    def good(v):
        return v <= target if lower_is_better else v >= target

    if cpu is None or good(cpu) == good(value):
        return "met" if good(value) else "**short**"
    return "mixed: met on " + ("wall time, short on CPU time" if good(value) else "CPU time, short on wall time")


def targets(res: Results, meta, show_cpu: bool = False) -> list[str]:
    """The measured ratios behind issue 5's targets, with a plain verdict for each."""
    cuda = is_cuda(meta)
    show_cpu = show_cpu and not cuda
    out = ["| target | measured" + (" (wall time; CPU time in parentheses)" if show_cpu else "") + " | verdict |",
           "| --- | --- | --- |"]
    shapes = res.shapes(res.main)
    if cuda:
        pref = [s for s in shapes if s.startswith("N=8192,") and s.endswith("V=151936")]
        shapes = pref or shapes[:1]

    def time_line(what, a, b, target):
        wall, cpu = time_ratios(a, b)
        cpu = cpu if show_cpu else None
        cpu_txt = f" (CPU {fmt_time(a.get('cpu_s'))} vs {fmt_time(b.get('cpu_s'))})" if cpu is not None else ""
        verdict = _verdict(wall, target, cpu=cpu) if target is not None else "(no target)"
        return (f"| {what} | {fmt_time(a['median'])} vs {fmt_time(b['median'])}{cpu_txt} = "
                f"{ratio_cell(wall, cpu, show_cpu)} | {verdict} |")

    for shape in shapes:
        def row(op, method_part, rows=res.main, shape=shape):
            cands = [r for r in rows if r["op"] == op and r["shape"] == shape and method_part in r["method"]]
            return cands[0] if cands else None

        jsd = res.best_ours(res.main, "jsd", shape)
        for mode in ("compiled", "eager", "triton"):
            liger = row("jsd", f"({mode})" if mode == "triton" else f"chunked, {mode}")
            if liger is None or jsd is None:
                continue
            what = "LigerFusedLinearJSD (triton)" if mode == "triton" else f"LigerFusedLinearJSDLoss (chunked, {mode})"
            if not ok(liger):
                out.append(f"| full JSD vs {what} ({shape}) | Liger: {liger.get('status')} | ours ran |")
                continue
            tgt = 0.5 if mode == "triton" else 1.0
            cuda_note = " (CPU target)" if cuda and mode != "triton" else ""
            out.append(time_line(f"full JSD time ≤ {tgt}× {what}{cuda_note}, {jsd['method']} ({shape})",
                                 jsd, liger, tgt))
            # like-for-like memory: the same measurement method on both sides
            if liger.get("mem_method") == "peak RSS":
                m_ours, m_lig, how = jsd.get("rss_peak_bytes"), liger.get("rss_peak_bytes"), "peak RSS"
            else:
                m_ours, m_lig, how = peak(jsd), peak(liger), liger.get("mem_method", "")
            m = _ratio(m_ours, m_lig) if m_ours and m_lig else None
            verdict = "(see working memory)" if m is not None else "not measurable (a peak RSS did not grow)"
            out.append(f"| full JSD peak memory, input gradients included ({how}) vs {what} | {fmt_bytes(m_ours)} vs "
                       f"{fmt_bytes(m_lig)} = {fmt_ratio(m)} | {verdict} |")
            # The target compares working memory: both sides must return the same input gradients
            # (d weight alone is V·H·4 bytes), so a total peak can never fall to 1/10 of a peer
            # whose own working memory is smaller than d weight. Ours: MemTracker, exact.
            w_ours, w_lig = working(jsd), working(liger)
            w = _ratio(w_ours, w_lig) if w_ours and w_lig else None
            verdict = _verdict(w, 0.1) if w is not None else "not measurable"
            if liger.get("mem_method") == "peak RSS" and w is not None:
                verdict += " (Liger's side from peak RSS: approximate)"
            out.append(f"| full JSD working memory (peak − input grads) ≤ 1/10 {what} | {fmt_bytes(w_ours)} vs "
                       f"{fmt_bytes(w_lig)} = {fmt_ratio(w)} | {verdict} |")
        lp = res.best_ours(res.main, "logprobs+entropy", shape)
        fl3 = res.floor(shape, lp.get("floor")) if lp else None
        if lp and fl3:
            tgt = 1.3 if cuda else 1.5
            out.append(time_line(f"log-prob + entropy ≤ {tgt}× the 3-GEMM floor ({shape})", lp, fl3, tgt))
        for k in (64, 100):
            # like for like: each Top-K entry point against the same full-JSD entry point
            for part, full_part in (("linear_topk_jsd_loss", "linear_jsd_loss"), ("per row", "per row")):
                top, full = row(f"topk_jsd K={k}", part), row("jsd", f"ptd {full_part}" if "loss" in full_part
                                                               else "linear_jsd (per row)")
                if top and full and ok(top) and ok(full):
                    out.append(time_line(f"Top-K JSD (K={k}) faster than full JSD: {top['method']} vs "
                                         f"{full['method']} ({shape})", top, full, 1.0))
        head = res.best_ours(res.main, "ptd head K=100", shape)
        sep = row("ptd head K=100", "separate calls")
        if head and sep and ok(sep):
            out.append(time_line(f"one-sweep PTD head vs the separate calls ({shape})", head, sep, 1.0))
        if head:
            fl4 = res.floor(shape, head.get("floor"))
            if fl4:
                out.append(time_line(f"PTD head ≤ 1.6× the 4-GEMM floor{'' if cuda else ' (a CUDA target)'} "
                                     f"({shape})", head, fl4, 1.6))
            if cuda:
                w = working(head)
                out.append(f"| PTD head extra memory ≤ 1 GiB ({shape}) | {fmt_bytes(w)} (peak − input grads) | "
                           f"{_verdict(w, 2**30)} |")
        top = res.best_ours(res.main, "teacher top-K K=100", shape)
        tt = row("teacher top-K K=100", "torch.topk")
        if top and tt and ok(tt):
            out.append(time_line(f"teacher top-K vs torch.topk on logits ({shape}; peak {fmt_bytes(peak(top))} "
                                 f"vs {fmt_bytes(peak(tt))})", top, tt, None))
    out += scaling_claims(res)
    return out


def _series(rows, vary):
    """{(op, method, fixed dims): [(value of `vary`, row)]} with ≥ 2 points."""
    fixed = {"n": ("h", "v"), "v": ("n", "h")}[vary]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["method"], tuple(r[k] for k in fixed), bool(r.get("ours")))].append(r)
    out = {}
    for key, rs in groups.items():
        pts = sorted({r[vary]: r for r in rs}.items())
        if len(pts) >= 2:
            out[key] = pts
    return out


def scaling_claims(res: Results) -> list[str]:
    out = []
    for vary, what in (("n", "N"), ("v", "V")):
        for (op, method, fixed, ours), pts in _series(res.scaling, vary).items():
            good = [(x, r) for x, r in pts if ok(r) and working(r) is not None]
            if len(good) < 2:
                continue
            (x0, r0), (x1, r1) = good[0], good[-1]
            growth = _ratio(working(r1), working(r0))
            dims = ",".join(f"{k}={v}" for k, v in zip(("H", "V") if vary == "n" else ("N", "H"), fixed))
            if not ours and vary == "v":
                continue
            claim = "at most linear in N" if vary == "n" else "flat in V"
            expect = x1 / x0 if vary == "n" else 1.0
            verdict = (_verdict(growth, expect * 1.25) if ours else "(peer)")
            out.append(f"| working memory {claim if ours else 'growth'}: {op}, {method} ({dims}) | "
                       f"{what} {x0}→{x1} (×{x1 / x0:g}): {fmt_bytes(working(r0))} → {fmt_bytes(working(r1))} "
                       f"= {fmt_ratio(growth)} | {verdict} |")
    return out


def scaling_table(res: Results) -> list[str]:
    if not res.scaling:
        return []
    out = []
    for vary, title in (("n", "N"), ("v", "V")):
        series = _series(res.scaling, vary)
        if not series:
            continue
        xs = sorted({x for pts in series.values() for x, _ in pts})
        fixed_names = ("H", "V") if vary == "n" else ("N", "H")
        out += ["", f"Scaling in {title} (one timed call per point; cells: time / peak memory / peak − input grads):",
                "",
                "| op | method | fixed | " + " | ".join(f"{title}={x}" for x in xs) + " |",
                "| --- | --- | --- | " + " | ".join("---:" for _ in xs) + " |"]
        for (op, method, fixed, ours), pts in sorted(series.items(), key=lambda kv: (kv[0][0], not kv[0][3])):
            by_x = dict(pts)
            cells = []
            for x in xs:
                r = by_x.get(x)
                if r is None:
                    cells.append("")
                elif not ok(r):
                    cells.append(r.get("status", "?"))
                else:
                    cells.append(f"{fmt_time(r['median'])} / {mem_cell(r, peak(r))} / {fmt_bytes(working(r))}")
            name = f"**{method}**" if ours else method
            fx = ",".join(f"{k}={v}" for k, v in zip(fixed_names, fixed))
            out.append(f"| {op} | {name} | {fx} | " + " | ".join(cells) + " |")
    return out


def header(meta, rows, show_cpu=False) -> list[str]:
    v = meta.get("versions", {})
    sessions = meta.get("sessions") or [meta]
    loads = []
    for i, sess in enumerate(sessions):
        load_s, load_e = sess.get("load_start"), sess.get("load_end")
        which = f"session {i + 1} ({sess.get('file')}, {sess.get('rows')} rows, {sess.get('wall_s')} s): " \
            if len(sessions) > 1 else ""
        loads.append(f"{which}load average (1/5/15 min) {', '.join(map(str, load_s))} at the start, "
                     f"{', '.join(map(str, load_e))} at the end" if load_s and load_e else f"{which}load not recorded")
    load = "; ".join(loads)
    loads = [r.get("load1") for r in rows if r.get("load1") is not None]
    per_row = f"; 1-min load during the rows: {min(loads):.1f}–{max(loads):.1f}" if loads else ""
    return [
        f"# Benchmarks: {meta.get('label', '?')}",
        "",
        f"- device: {meta.get('device', '?')} ({meta.get('cpus', '?')} CPUs, torch threads "
        f"{meta.get('threads', '?')}), dtype {meta.get('dtype', '?')}",
        f"- {load}{per_row}. The machine is shared: timings of one run compare with each other, not across runs.",
        f"- torch {v.get('torch')}, triton {v.get('triton')}, liger-kernel {v.get('liger_kernel')}, "
        f"cut-cross-entropy {v.get('cut_cross_entropy') or 'not installed'}; {meta.get('datetime', '')}; "
        f"session wall time {' + '.join(str(x.get('wall_s', '?')) for x in sessions)} s",
        "- median: wall time, median of the timed rounds (fwd+bwd; teacher top-K fwd only); "
        + ("CPU time: this process's CPU seconds per call (all threads; OpenMP spin-waits count, so "
           "load still moves it); ratios read wall (CPU time). " if show_cpu else "")
        + "× ours: against the fastest ptd entry point of the op (bold); × floor: against the bare GEMMs "
        "the op needs (the floor rows).",
        "- peak memory: live tensor bytes of one call beyond its inputs (MemTracker on CPU, "
        "`torch.cuda.max_memory_allocated` on CUDA), including the input gradients; † = peak RSS growth "
        "(torch.compile'd peers cannot run under MemTracker). OOM: ran out of memory, or on CPU would exceed "
        f"the memory budget{' of ' + str(meta['mem_budget_gib']) + ' GiB' if meta.get('mem_budget_gib') else ''} "
        "(estimated from its N×V buffers; a real CPU OOM would kill the session).",
    ]


def readme_block(rows, meta, link_dir="bench/results", show_cpu=False) -> str:
    """A compact version for the README: the targets and the main rows without the shape column."""
    res = Results(rows)
    label = meta.get("label", "?")
    sessions = meta.get("sessions") or [meta]
    loads = ", ".join(f"{x['load_start'][0]} → {x['load_end'][0]}" for x in sessions
                      if x.get("load_start") and x.get("load_end")) or "?"
    lines = [f"{meta.get('device', '?')}, {meta.get('cpus', '?')} CPUs, {meta.get('dtype', '?')}; "
             f"1-min load average {loads} ({len(sessions)} session{'s' if len(sessions) > 1 else ''}, shared machine); "
             f"full table: [{link_dir}/{label}.md]({link_dir}/{label}.md), plot: "
             f"[{link_dir}/{label}.png]({link_dir}/{label}.png).", ""]
    show_cpu = show_cpu and not is_cuda(meta)
    lines += targets(res, meta, show_cpu)
    lines.append("")
    table = main_table(res, show_cpu)
    lines.append(table[0].replace("| shape ", ""))
    lines.append(table[1].replace("| --- | --- | --- |", "| --- | --- |", 1))
    shapes = res.shapes(res.main)
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(shapes) > 1:
            cells[0] = f"{cells[0]} ({cells[1]})"
        del cells[1]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows, meta, png_name, show_cpu=False) -> str:
    res = Results(rows)
    show_cpu = show_cpu and not is_cuda(meta)
    lines = header(meta, rows, show_cpu)
    lines += ["", "## Targets (issue 5)", ""] + targets(res, meta, show_cpu)
    lines += ["", "## All rows", ""] + main_table(res, show_cpu)
    lines += scaling_table(res)
    skipped = meta.get("skipped") or []
    if skipped:
        lines += ["", "Skipped here:", ""]
        for s in skipped:
            lines.append(f"- `{s['test'].split('::')[-1]}`: {s['reason']}")
    lines += ["", f"Plot: [{png_name}]({png_name})", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot


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

    res = Results(rows)
    # Scaling suite on CPU; on CUDA the main shapes themselves span N (one line style per V).
    series_rows = res.scaling or [r for r in res.main if r["op"] != "floor"]
    by_n = _series(series_rows, "n")
    by_v = _series(res.scaling, "v")
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--label", default=None, help="file name stem (default: the device label in the JSON)")
    parser.add_argument("--readme", action="store_true", help="also print a compact block for the README")
    parser.add_argument("--missing", action="store_true",
                        help="only print the node ids of the rows not measured (time budget), to run them again")
    parser.add_argument("--cpu-time", action="store_true", help="CPU rows: also show process CPU time and its ratios")
    args = parser.parse_args(argv)
    rows, meta = load(args.json)
    if not rows:
        parser.error("no benchmark rows with extra_info in the JSON")
    if args.missing:
        print("\n".join(r["test"] for r in rows if r.get("status", "").startswith("not run")))
        return
    label = args.label or meta.get("label") or "unknown"
    os.makedirs(args.out_dir, exist_ok=True)
    png = os.path.join(args.out_dir, f"{label}.png")
    has_plot = plot(rows, meta, png)
    md = markdown(rows, meta, os.path.basename(png) if has_plot else "(none)", show_cpu=args.cpu_time)
    with open(os.path.join(args.out_dir, f"{label}.md"), "w") as f:
        f.write(md)
    print(f"wrote {os.path.join(args.out_dir, label + '.md')}" + (f" and {png}" if has_plot else ""))
    if args.readme:
        print()
        print(readme_block(rows, meta, show_cpu=args.cpu_time))


if __name__ == "__main__":
    main()
