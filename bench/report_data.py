"""Rows of pytest-benchmark JSON and the small helpers every part of the report uses (loading,
formatting, row accessors, the series of the scaling sweep), plus what the stand-alone bench scripts
share: the CPU's name and the writer of their ``<stem>.{json,md}`` results."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections import defaultdict


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows where that is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def describe_tree(tree: str) -> str:
    """A source tree as ``commit <short hash>`` (``+`` when its work tree differs from it), else its path."""
    try:
        commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return tree
    return f"commit {commit}{' +' if dirty else ''}"


def write_results(out_dir, stem, data, md):
    """Write a bench script's results as ``out_dir/stem.json`` and ``out_dir/stem.md``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(md)


def journal_data(path) -> dict:
    """A benchmark journal (bench/conftest.py's PTD_BENCH_JOURNAL: JSON lines written as the rows ran,
    maybe over several processes after a crash or a hang) as pytest-benchmark's JSON: ``benchmarks``
    (one per row, its ``stats.median`` None where it was not timed) and ``ptd`` (the first session's
    metadata, the load at the start of the first and the end of the last, the sessions' wall times
    summed, the rows skipped or failed before they recorded anything)."""
    from journal import read_records

    records = read_records(path)
    metas = [r for r in records if r.get("record") == "meta"]
    ends = [r for r in records if r.get("record") == "end"]
    meta = {k: v for k, v in (metas[0] if metas else {}).items() if k not in ("record", "pid", "datetime")}
    meta["sessions_in_journal"] = len(metas)
    if ends:
        meta["load_end"] = ends[-1].get("load_end")
    meta["wall_s"] = round(sum(e.get("wall_s") or 0 for e in ends), 1)
    benchmarks, skipped = [], []
    for r in records:
        if r.get("record") != "row":
            continue
        info = {k: v for k, v in r.items() if k not in ("record", "test", "median")}
        if "op" not in info:  # skipped or failed before measure() began: no row of the tables
            skipped.append({"test": r["test"], "reason": f"{r.get('status')}: {r.get('note', '')}".rstrip(": ")})
            continue
        benchmarks.append({"name": r["test"].split("::")[-1], "fullname": r["test"],
                           "stats": {"median": r.get("median")}, "extra_info": info})
    meta["skipped"] = skipped
    return {"datetime": metas[0].get("datetime") if metas else None, "benchmarks": benchmarks, "ptd": meta}


def _read_results(path) -> dict:
    if path.endswith(".jsonl"):
        return journal_data(path)
    with open(path) as f:
        return json.load(f)


def load(paths):
    """Rows of one or more pytest-benchmark JSON files (or benchmark journals, ``.jsonl``). With several
    (a run, then a run of the rows its time budget cut), a measured row replaces an unmeasured one of
    the same op, method and shape; each file's session (load, wall time) is kept in meta["sessions"]."""
    rows, meta, index = [], {}, {}
    for path in paths:
        data = _read_results(path)
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
            if e["median"] is None and e.get("status", "ok") == "ok":
                e["status"] = "not timed"
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
        """The fastest plain ptd entry point of an op (rows with a logit transform, ``variant``, excluded)."""
        cands = [r for r in self.find(rows, op=op, shape=shape, ours=True) if ok(r) and not r.get("variant")]
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


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def time_ratios(a, b):
    """(wall-time ratio, CPU-time ratio) of rows a over b (CPU time only where both have it)."""
    if a is None or b is None:
        return None, None
    return ratio(a["median"], b["median"]), ratio(a.get("cpu_s"), b.get("cpu_s"))


def ratio_cell(wall, cpu, show_cpu):
    return fmt_ratio(wall) + (f" ({fmt_ratio(cpu)})" if show_cpu and cpu is not None else "")


def series(rows, vary):
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
