"""Turn pytest-benchmark JSON into the results table and plot.

    pytest bench --benchmark-only --benchmark-json bench/results/cpu.json
    python bench/report.py bench/results/cpu.json     # -> bench/results/cpu.md, cpu.png, cpu-scaling.png
    python bench/report.py --docs                     # every run in bench/results/, docs/benchmarks.md, README table
    python bench/report.py LABEL.jsonl --json-out LABEL.json   # a benchmark journal (a GPU check's rows, written
                                                      # as they ran) as pytest-benchmark JSON, and its report

Rows the session's time budget cut are kept as "not run"; to measure them in a second session:

    pytest $(python bench/report.py bench/results/cpu.json --missing) --benchmark-only \
        --benchmark-json bench/results/cpu-2.json
    python bench/report.py bench/results/cpu.json bench/results/cpu-2.json

Writes ``<out-dir>/<label>.md`` (op, shape, method, median time, ratio to ours, ratio to the GEMM
floor, peak memory; then the performance targets with the measured ratios, and the scaling sweep),
``<out-dir>/<label>.png`` (the headline: every op's time and working memory, ptd against each peer
and the GEMM floor, at one shape) and ``<out-dir>/<label>-scaling.png`` (time and working memory
against N and V). The label is the device label recorded by bench/conftest.py ("cpu", or the CUDA
device's name). ``--docs`` also writes docs/benchmarks.md and the README's table (report_docs.py).
A CUDA run's report adds the work model's predictions beside the measurements, ``auto``'s pick against
the faster backend, and the correctness tier and steps of its GPU check (report_model.py; files found
beside the results by their names, or given). The markdown is written with or without matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os

from report_data import (
    Results,
    fmt_bytes,
    fmt_ratio,
    fmt_time,
    is_cuda,
    journal_data,
    load,
    mem_cell,
    ok,
    peak,
    ratio,
    ratio_cell,
    series,
    time_ratios,
    working,
)
from report_docs import benchmark_files, benchmarks_page, readme_table, replace_readme_table
from report_model import MODEL_FILE, check_files, cuda_sections
from report_plot import plot_headline, plot_scaling
from report_sections import transform_table, trl_table

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")
DOCS_PAGE = os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md")

TARGETS_CPU = "full JSD ≤ 1.0× Liger chunked time at ≤ 1/10 its peak memory; log-prob + entropy ≤ 1.5× the 3-GEMM floor"


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
    """The measured ratios behind the performance targets, with a plain verdict for each."""
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
            m = ratio(m_ours, m_lig) if m_ours and m_lig else None
            verdict = "(see working memory)" if m is not None else "not measurable (a peak RSS did not grow)"
            out.append(f"| full JSD peak memory, input gradients included ({how}) vs {what} | {fmt_bytes(m_ours)} vs "
                       f"{fmt_bytes(m_lig)} = {fmt_ratio(m)} | {verdict} |")
            # The target compares working memory: both sides must return the same input gradients
            # (d weight alone is V·H·4 bytes), so a total peak can never fall to 1/10 of a peer
            # whose own working memory is smaller than d weight. Ours: MemTracker, exact.
            w_ours, w_lig = working(jsd), working(liger)
            w = ratio(w_ours, w_lig) if w_ours and w_lig else None
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


def scaling_claims(res: Results) -> list[str]:
    out = []
    for vary, what in (("n", "N"), ("v", "V")):
        for (op, method, fixed, ours), pts in series(res.scaling, vary).items():
            good = [(x, r) for x, r in pts if ok(r) and working(r) is not None]
            if len(good) < 2:
                continue
            (x0, r0), (x1, r1) = good[0], good[-1]
            growth = ratio(working(r1), working(r0))
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
        by_value = series(res.scaling, vary)
        if not by_value:
            continue
        xs = sorted({x for pts in by_value.values() for x, _ in pts})
        fixed_names = ("H", "V") if vary == "n" else ("N", "H")
        out += ["", f"Scaling in {title} (one timed call per point; cells: time / peak memory / peak − input grads):",
                "",
                "| op | method | fixed | " + " | ".join(f"{title}={x}" for x in xs) + " |",
                "| --- | --- | --- | " + " | ".join("---:" for _ in xs) + " |"]
        for (op, method, fixed, ours), pts in sorted(by_value.items(), key=lambda kv: (kv[0][0], not kv[0][3])):
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


def _sections(res: Results, show_cpu: bool, level: str) -> list[str]:
    """The side-by-side tables: ptd vs TRL's fused kernels, and the logit transforms vs plain."""
    out = []
    trl = trl_table(res, show_cpu)
    if trl:
        out += ["", f"{level} ptd vs TRL 1.16's fused kernels", "", *trl]
    transforms = transform_table(res, show_cpu)
    if transforms:
        out += ["", f"{level} Soft-capping and logit scale vs plain (ptd; the suite's rows, two rounds each: "
                "bench/transform_cost.py times them paired)", "", *transforms]
    return out


def markdown(rows, meta, png_names, show_cpu=False, files=None) -> str:
    """The report of one run; ``files``: a CUDA run's other files (report_model.check_files)."""
    res = Results(rows)
    show_cpu = show_cpu and not is_cuda(meta)
    lines = header(meta, rows, show_cpu)
    lines += ["", "## Targets", ""] + targets(res, meta, show_cpu)
    files = files or {}
    if is_cuda(meta) or any(key in files for key in ("tier", "trl", "train")):  # a GPU check (or its rehearsal)
        lines += cuda_sections(res, meta, files, level="##")
    lines += _sections(res, show_cpu, level="##")
    lines += ["", "## All rows", ""] + main_table(res, show_cpu)
    lines += scaling_table(res)
    skipped = meta.get("skipped") or []
    if skipped:
        lines += ["", "Skipped here:", ""]
        for s in skipped:
            lines.append(f"- `{s['test'].split('::')[-1]}`: {s['reason']}")
    lines += ["", "Plots: " + (", ".join(f"[{name}]({name})" for name in png_names) or "none"), ""]
    return "\n".join(lines)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(rows, meta, out_dir, label, show_cpu=False, files=None, plots=True) -> list[str]:
    """``<label>.md``, ``<label>.png`` and ``<label>-scaling.png`` in ``out_dir`` (the figures where
    matplotlib imports and ``plots``); returns the paths written. ``files``: a CUDA run's other files
    (default: those beside it in ``out_dir``)."""
    os.makedirs(out_dir, exist_ok=True)
    pngs = []
    if plots and not _has_matplotlib():
        print("matplotlib is not installed: the markdown only, no figures")
        plots = False
    if plots:
        png = os.path.join(out_dir, f"{label}.png")
        scaling_png = os.path.join(out_dir, f"{label}-scaling.png")
        drawn = [(png, plot_headline(rows, meta, png)), (scaling_png, plot_scaling(rows, meta, scaling_png))]
        pngs = [path for path, done in drawn if done]
    md_path = os.path.join(out_dir, f"{label}.md")
    if files is None:
        files = check_files(out_dir, label)
    with open(md_path, "w") as f:
        f.write(markdown(rows, meta, [os.path.basename(p) for p in pngs], show_cpu=show_cpu, files=files))
    return [md_path, *pngs]


def docs_text(results_dir, readme_text: str, link_dir: str = "../bench/results") -> tuple[str, str]:
    """(docs/benchmarks.md, the README with its table) from every benchmark run in ``results_dir``."""
    devices, table = [], None
    for label, files in benchmark_files(results_dir).items():
        rows, meta = load(files)
        res = Results(rows)
        parts = dict(header=header(meta, rows), targets=targets(res, meta), sections=_sections(res, False, "###"),
                     main=main_table(res, False), scaling=scaling_table(res),
                     cuda=cuda_sections(res, meta, check_files(results_dir, label), "###") if is_cuda(meta) else [])
        devices.append((label, rows, meta, parts))
        if table is None or label == "cpu":  # the README states what this repository's CPU measured
            table = readme_table(rows, meta)
    page = benchmarks_page(devices, results_dir, link_dir)
    return page, replace_readme_table(readme_text, table) if table else readme_text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="*", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--label", default=None, help="file name stem (default: the device label in the JSON)")
    parser.add_argument("--docs", action="store_true",
                        help="from every run in --out-dir: each run's table and plots, docs/benchmarks.md and the "
                        "README's table")
    parser.add_argument("--missing", action="store_true",
                        help="only print the node ids of the rows not measured (time budget), to run them again")
    parser.add_argument("--cpu-time", action="store_true", help="CPU rows: also show process CPU time and its ratios")
    parser.add_argument("--json-out", default=None,
                        help="also write the rows as one pytest-benchmark JSON file (e.g. from a journal, .jsonl)")
    parser.add_argument("--no-plots", action="store_true", help="write the markdown only")
    parser.add_argument("--model", default=None, help=f"the work model's JSON (default: {MODEL_FILE} in --out-dir, "
                        "else bench/results/)")
    parser.add_argument("--tier", default=None, help="a CUDA check's correctness-tier journal")
    parser.add_argument("--trl", default=None, help="a CUDA check's TRL step times (bench/trl_step_time.py JSON)")
    parser.add_argument("--train", default=None, help="a CUDA check's training metrics (JSON lines)")
    args = parser.parse_args(argv)
    if args.docs:
        for label, files in benchmark_files(args.out_dir).items():
            rows, meta = load(files)
            print("wrote " + ", ".join(write_report(rows, meta, args.out_dir, label, show_cpu=args.cpu_time)))
        with open(README) as f:
            page, readme = docs_text(args.out_dir, f.read())
        with open(DOCS_PAGE, "w") as f:
            f.write(page)
        with open(README, "w") as f:
            f.write(readme)
        print(f"wrote {DOCS_PAGE} and the table of {README}")
        return
    if not args.json:
        parser.error("give the pytest-benchmark JSON file(s), or --docs")
    rows, meta = load(args.json)
    if not rows:
        parser.error("no benchmark rows with extra_info in the JSON")
    if args.missing:
        print("\n".join(r["test"] for r in rows if r.get("status", "").startswith("not run")))
        return
    label = args.label or meta.get("label") or "unknown"
    written = []
    os.makedirs(args.out_dir, exist_ok=True)
    if args.json_out:
        write_json(args.json, args.json_out)
        written.append(args.json_out)
    files = check_files(args.out_dir, label)
    files.setdefault("model", os.path.join(HERE, "results", MODEL_FILE))
    files.update({k: v for k, v in (("model", args.model), ("tier", args.tier), ("trl", args.trl),
                                    ("train", args.train)) if v})
    written += write_report(rows, meta, args.out_dir, label, show_cpu=args.cpu_time, files=files,
                            plots=not args.no_plots)
    print("wrote " + ", ".join(written))


def write_json(paths, out_path):
    """One pytest-benchmark JSON file of the rows of ``paths`` (JSON files or journals): the form
    bench/results/ keeps (``report.py --docs`` reads it)."""
    data = None
    for path in paths:
        if path.endswith(".jsonl"):
            part = journal_data(path)
        else:
            with open(path) as f:
                part = json.load(f)
        if data is None:
            data = part
        else:
            data["benchmarks"] += part["benchmarks"]
    with open(out_path, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
