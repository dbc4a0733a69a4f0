"""A CUDA run against the GPU work model (bench/gpu_model.py → bench/results/gpu_model.json): the measured
time, GEMM-floor ratio and working memory of each row beside the model's prediction for the same call,
in separate columns; which ptd backend ``backend="auto"`` picked against which one measured faster; the
ceilings the run measured against the ones the model assumes; the correctness tier, the training steps
and the TRL steps of the same check (bench/gpu_check.sh's files beside the journal).

A row is matched to the model by the ``model_op`` / ``model_path`` it records (bench/conftest.py's
``measure(model=...)``) and its shape; the model's rows are at K=100, bf16.
"""

from __future__ import annotations

import json
import os

from report_data import Results, fmt_bytes, fmt_ratio, fmt_time, ok, ratio, working

MODEL_FILE = "gpu_model.json"
GIB = 2**30


def load_model(path: str | None) -> dict | None:
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def model_device(meta, model) -> str | None:
    """The model's device closest to the measured one: the H200 on an H200, else the H100 SXM."""
    names = [d["name"] for d in model.get("devices", [])]
    device = str(meta.get("device", "")).lower()
    if "h200" in device and "H200" in names:
        return "H200"
    return "H100 SXM" if "H100 SXM" in names else (names[0] if names else None)


def model_row(model, op, path, n, h, v):
    """The model's row of ``op`` (a ptd op on ``path``, or a peer with ``path`` None) at the shape."""
    for r in model.get("rows", []):
        shape = r.get("shape", {})
        if r.get("op") == op and (path is None or r.get("path") == path) and \
                (shape.get("n"), shape.get("h"), shape.get("v")) == (n, h, v):
            return r
    return None


def _measured_floor(res: Results, r):
    fl = res.floor(r["shape"], r.get("floor"))
    return (ratio(r["median"], fl["median"]) if fl else None), r.get("floor", "").split(" ")[0]


def model_table(res: Results, meta, model) -> list[str]:
    """Every CUDA row the model also predicts: measurement and model side by side, never in one column."""
    device = model_device(meta, model)
    if device is None:
        return []
    out = [f"Model device: {device} (published peaks and the assumptions stated in docs/gpu_model.md). "
           "Measured working memory: `torch.cuda.max_memory_allocated` during one call beyond its inputs, less "
           "the input gradients; the model's: its counted peak, likewise. measured ÷ model: below 1, faster "
           "than predicted.", "",
           "| op | shape | method | measured: median | measured: × GEMM floor (GEMMs) | measured: working memory | "
           "model: predicted | model: × floor (GEMM-eq) | model: working memory | measured ÷ model (time) |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res.main:
        if not r.get("model_op") or r.get("variant"):
            continue
        m = model_row(model, r["model_op"], r.get("model_path"), r.get("n"), r.get("h"), r.get("v"))
        if m is None:
            continue
        pred = m["devices"].get(device, {})
        pred_s = pred.get("predicted_ms", 0) / 1e3 or None
        model_cells = (f"{fmt_time(pred_s)} | {fmt_ratio(pred.get('x_floor'))} ({m.get('floor_gemms', '?')}) | "
                       f"{fmt_bytes(m.get('working_bytes'))}")
        name = f"**{r['method']}**" if r.get("ours") else r["method"]
        if not ok(r):
            out.append(f"| {r['op']} | {r['shape']} | {name} | {r.get('status')} | — | — | {model_cells} | — |")
            continue
        x_floor, gemms = _measured_floor(res, r)
        out.append(f"| {r['op']} | {r['shape']} | {name} | {fmt_time(r['median'])} | {fmt_ratio(x_floor)} ({gemms}) | "
                   f"{fmt_bytes(working(r))} | {model_cells} | {fmt_ratio(ratio(r['median'], pred_s))} |")
    return out if len(out) > 4 else []


def auto_table(res: Results, meta, model) -> list[str]:
    """Per ptd entry point and shape: the backend ``auto`` picked, each backend's measured time, which was
    faster, and which the model predicts faster."""
    groups: dict = {}
    for r in res.main:
        if not r.get("ours") or r.get("variant") or not r.get("auto_backend") or not r.get("model_path"):
            continue
        key = (r["op"], r.get("entry_point") or r["method"].rsplit(" (", 1)[0], r["shape"])
        groups.setdefault(key, []).append(r)
    paths = sorted({r["model_path"] for rows in groups.values() for r in rows})
    if len(paths) < 2:
        return []
    out = ["| op | entry point | shape | auto picked | " + " | ".join(f"measured: {p}" for p in paths)
           + " | measured faster | model predicts faster | auto's pick measured |",
           "| --- | --- | --- | --- | " + " | ".join("---:" for _ in paths) + " | --- | --- | --- |"]
    for (op, entry, shape), rows in groups.items():
        by_path = {r["model_path"]: r for r in rows}
        timed = {p: r["median"] for p, r in by_path.items() if ok(r)}
        fastest = min(timed, key=timed.get) if timed else None
        picked = rows[0]["auto_backend"]
        margin = ""
        if fastest and len(timed) > 1:
            second = sorted(timed.values())[1]
            margin = f" ({fmt_ratio(second / timed[fastest])} faster)"
        predicted = "—"
        if model:
            device = model_device(meta, model)
            times = {}
            for p in paths:
                m = model_row(model, rows[0].get("model_op"), p, rows[0].get("n"), rows[0].get("h"), rows[0].get("v"))
                if m:
                    times[p] = m["devices"].get(device, {}).get("predicted_ms")
            times = {p: t for p, t in times.items() if t}
            predicted = min(times, key=times.get) if len(times) > 1 else "—"
        verdict = ("—" if not fastest else "the faster" if picked == fastest else
                   f"slower: {fmt_ratio(timed[picked] / timed[fastest])} of the faster" if picked in timed
                   else "not timed")
        cells = " | ".join(fmt_time(timed.get(p)) if p in timed else by_path.get(p, {}).get("status", "—")
                           for p in paths)
        out.append(f"| {op} | {entry} | {shape} | {picked} | {cells} | {fastest or '—'}{margin} | {predicted} | "
                   f"{verdict} |")
    return out


# The CUDA path's time targets: an op at most this many times the GEMMs its form needs at the measured
# GEMM speed (the one-sweep losses against 3 and 4 GEMMs, the teacher top-K against one).
TARGETS = {"linear_policy_loss": 1.3, "linear_policy_loss (no teacher)": 1.3,
           "linear_policy_loss (one sweep, budget + accumulator)": 1.3, "linear_topk": 1.2}
DEFAULT_TARGET = 1.2
# The GEMMs each form needs where the model has no row for it (the model's own count wins).
FORM_GEMMS = {"linear_policy_loss": 4, "linear_policy_loss (no teacher)": 3,
              "linear_policy_loss (one sweep, budget + accumulator)": 4}


def _gemm_unit(res: Results, shape):
    """One logits-GEMM's measured time at ``shape``: the 4-GEMM floor row ÷ 4 (else the 3-GEMM ÷ 3, the
    1-GEMM), and how it was read."""
    for kind, count in (("4 GEMMs", 4), ("3 GEMMs", 3), ("1 GEMM", 1)):
        rows = [r for r in res.main if r["op"] == "floor" and r["shape"] == shape and r["method"].startswith(kind)
                and ok(r)]
        if rows:
            return rows[0]["median"] / count, f"the {kind} floor row ÷ {count}"
    return None, None


def target_lines(res: Results, model) -> list[str]:
    """Each plain ptd row of the model's ops against its time target, measured: its time over the GEMMs its
    form needs at the GEMM speed this run measured."""
    out = ["| target (measured) | form's GEMMs | measured | GEMM floor of the form | ratio | verdict |",
           "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in res.main:
        if not r.get("ours") or r.get("variant") or not r.get("model_op") or not ok(r):
            continue
        m = model_row(model, r["model_op"], r.get("model_path"), r.get("n"), r.get("h"), r.get("v")) if model else None
        gemms = m.get("floor_gemms") if m else FORM_GEMMS.get(r["model_op"])
        unit, how = _gemm_unit(res, r["shape"])
        if not gemms or unit is None:
            continue
        target = TARGETS.get(r["model_op"], DEFAULT_TARGET)
        floor = unit * gemms
        x = r["median"] / floor
        out.append(f"| {r['method']} ≤ {target}× its GEMMs ({r['shape']}) | {gemms} | {fmt_time(r['median'])} | "
                   f"{fmt_time(floor)} ({how} × {gemms}) | {fmt_ratio(x)} | {'met' if x <= target else '**short**'} |")
    return out if len(out) > 2 else []


def ceilings_lines(meta, model) -> list[str]:
    """The ceilings this run measured (environment phase) and the ones the model assumes, on two lines."""
    c = meta.get("ceilings")
    out = []
    if c:
        out.append(f"- ceilings, measured at the start of this run: bf16 GEMM {c.get('bf16_gemm_tflops')} TFLOP/s "
                   f"({c.get('gemm')}); copy {c.get('copy_gb_s')} GB/s ({c.get('copy')})")
    if model:
        device = model_device(meta, model)
        d = next((x for x in model.get("devices", []) if x["name"] == device), None)
        a = model.get("assumptions", {})
        if d and a:
            gemm = d["peak_flops"]["bf16"] * a.get("cublas_efficiency", 1) / 1e12
            copy = d["hbm_bytes_per_s"] * a.get("stream_efficiency", 1) / 1e9
            out.append(f"- ceilings the model assumes ({device}): bf16 GEMM {gemm:.0f} TFLOP/s (peak "
                       f"{d['peak_flops']['bf16'] / 1e12:.1f} × {a.get('cublas_efficiency')}), memory passes "
                       f"{copy:.0f} GB/s (HBM {d['hbm_bytes_per_s'] / 1e9:.0f} × {a.get('stream_efficiency')})")
    return out


def memory_lines(res: Results, meta) -> list[str]:
    """The working-memory target (≤ 1 GiB beyond the inputs and their gradients) per ptd row, measured."""
    rows = [r for r in res.main if r.get("ours") and not r.get("variant") and ok(r) and working(r) is not None]
    if not rows:
        return []
    over = [r for r in rows if working(r) > GIB]
    worst = max(rows, key=working)
    line = (f"- working memory ≤ 1 GiB (measured, every plain ptd row): {len(rows) - len(over)} of {len(rows)} rows "
            f"within; the largest {fmt_bytes(working(worst))} ({worst['method']}, {worst['op']}, {worst['shape']})")
    return [line] + [f"  - over: {r['method']} ({r['op']}, {r['shape']}): {fmt_bytes(working(r))}" for r in over]


# ----------------------------------------------------------------------------- the check's other files


def tier_lines(path: str) -> list[str]:
    """The correctness tier's journal (bench/cuda_tier.py), summarized: counts per status and backend,
    every case that did not pass."""
    from journal import read_records

    records = [r for r in read_records(path) if "status" in r]
    if not records:
        return []
    by = {}
    for r in records:
        by.setdefault(r.get("backend", "?"), {}).setdefault(r["status"], 0)
        by[r.get("backend", "?")][r["status"]] += 1
    statuses = sorted({s for d in by.values() for s in d})
    out = ["| backend | " + " | ".join(statuses) + " |", "| --- | " + " | ".join("---:" for _ in statuses) + " |"]
    for backend, counts in sorted(by.items()):
        out.append(f"| {backend} | " + " | ".join(str(counts.get(s, 0)) for s in statuses) + " |")
    bad = [r for r in records if r["status"] not in ("ok", "not run")]
    if bad:
        out += ["", "Cases that did not pass:", ""]
        out += [f"- `{r['case']}`: {r['status']}: {str(r.get('message', ''))[:300]}" for r in bad]
    passed = [r for r in records if r["status"] == "ok"]
    if passed:
        worst = max(passed, key=lambda r: max(r.get("value_err_over_tol", 0), r.get("grad_err_over_tol", 0)))
        out += ["", f"Closest pass: `{worst['case']}` (error ÷ tolerance: values {worst.get('value_err_over_tol')}, "
                f"gradients {worst.get('grad_err_over_tol')})."]
    return out


def steps_lines(trl_path: str | None, train_path: str | None) -> list[str]:
    """The TRL steps (bench/trl_step_time.py's JSON) and the bf16 training runs (ptd_train.run's metrics,
    one run per backend) of the check, when their files exist."""
    out = []
    if trl_path and os.path.exists(trl_path):
        with open(trl_path) as f:
            data = json.load(f)
        out += [f"TRL steps (tiny Qwen3, {data.get('device')} {data.get('dtype')}, TRL {data.get('trl')}; "
                "`bench/trl_step_time.py`):", "",
                "| trainer | median ms/step | × stock | steps |", "| --- | ---: | ---: | ---: |"]
        stock = next(iter(data["rows"].values()))["median_s"]
        for kind, r in data["rows"].items():
            out.append(f"| {kind} | {r['median_s'] * 1e3:.1f} | {r['median_s'] / stock:.2f}× | {r['n']} |")
    if train_path and os.path.exists(train_path):
        from journal import read_records

        runs: dict = {}
        for r in read_records(train_path):
            runs.setdefault(r.get("backend", "?"), []).append(r)
        if runs:
            out += ["", "Training steps (`python -m ptd_train.run`; bf16 autocast on CUDA; metrics of the last step):",
                    "",
                    "| backend | steps | last step's metrics |", "| --- | ---: | --- |"]
            for backend, rows in runs.items():
                last = rows[-1]
                fields = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items()
                                   if k not in ("backend",) and isinstance(v, (int, float)))[:400]
                out.append(f"| {backend} | {len(rows)} | {fields} |")
    return out


def check_files(results_dir: str, label: str) -> dict:
    """The other files of one GPU check beside its results (bench/gpu_check.sh's names), those present."""
    names = {"tier": f"{label}-tier.jsonl", "trl": f"{label}-trl_steps.json", "train": f"{label}-train.jsonl",
             "model": MODEL_FILE}
    return {key: os.path.join(results_dir, name) for key, name in names.items()
            if os.path.exists(os.path.join(results_dir, name))}


def cuda_sections(res: Results, meta, files: dict, level: str = "##") -> list[str]:
    """The sections of a CUDA run beyond the CPU report's: the model beside the measurement, auto's choice,
    the correctness tier, the steps. ``files``: paths by key (``check_files``)."""
    model = load_model(files.get("model"))
    out = []
    head = ceilings_lines(meta, model) + memory_lines(res, meta)
    table = model_table(res, meta, model) if model else []
    if head or table:
        out += ["", f"{level} Measured, and the work model's prediction beside it", "", *head]
        out += (["", *table] if table else ["", "(no row of this run is in the model)" if model else
                                            "(no work model file: bench/results/gpu_model.json)"])
    targets = target_lines(res, model)
    if targets:
        out += ["", f"{level} The CUDA path's time targets, measured", "", *targets]
    auto = auto_table(res, meta, model)
    if auto:
        out += ["", f"{level} backend=\"auto\": its pick and the measured faster backend", "", *auto]
    tier = tier_lines(files["tier"]) if files.get("tier") else []
    if tier:
        out += ["", f"{level} CUDA correctness tier (`bench/cuda_tier.py`: every public function, bf16 and fp32, "
                "every backend, against the reference on the GPU)", "", *tier]
    steps = steps_lines(files.get("trl"), files.get("train"))
    if steps:
        out += ["", f"{level} Training and TRL steps", "", *steps]
    return out
