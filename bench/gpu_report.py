"""docs/gpu_model.md from bench/results/gpu_model.json (written by ``bench/gpu_model.py``)."""

from __future__ import annotations

GiB = 1 << 30
MAIN_V = 151936


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def _rows(result, library=None, v=None):
    return [r for r in result["rows"] if (library is None or (r["library"] == "ptd") == (library == "ptd"))
            and (v is None or r["shape"]["v"] == v)]


def _peer_ratios(row, result, device) -> str:
    if not row.get("peers"):
        return "—"
    mine = row["devices"][device]["predicted_ms"]
    parts = []
    for name in row["peers"]:
        peer = next((r for r in _rows(result, "peer", row["shape"]["v"]) if r["op"] == name), None)
        if peer is not None:
            parts.append(f"{mine / peer['devices'][device]['predicted_ms']:.2f}× {name}")
    return "; ".join(parts) or "—"


def _met(row, device) -> str:
    ok_time = row["devices"][device]["x_floor"] <= row["target"]
    ok_memory = row["working_bytes"] <= GiB
    return "yes" if ok_time and ok_memory else "no (" + ", ".join(
        w for w, ok in (("time", ok_time), ("memory", ok_memory)) if not ok) + ")"


def _memory(row) -> str:
    """Working memory in GiB, with the fp32 gradient accumulators inside it in brackets."""
    accumulators = row.get("accumulator_bytes", 0)
    text = f"{row['working_bytes'] / GiB:.2f}"
    return text + (f" (fp32 grad buffers {accumulators / GiB:.2f})" if accumulators else "")


def _shape_text(shape) -> str:
    return f"N={shape['n']}, H={shape['h']}, V={shape['v']}, K={shape['k']}, {shape['dtype']}"


def _full_table(result, device, v) -> list[str]:
    lines = ["| op | path | GEMM-eq (floor) | GEMM precision | HBM GB | L2 loads GB | atomics GB | launches | syncs "
             "| working memory GiB | predicted ms | × floor | ÷ peer (ptd time / peer time) | targets met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in _rows(result, "ptd", v):
        d = r["devices"][device]
        lines.append(
            f"| {r['op']} | {r['path']} | {r['gemm_equivalents']:.2f} ({r['floor_gemms']}) | "
            f"{', '.join(r['gemm_precisions'])} | {_fmt(r['hbm_bytes'] / 1e9)} | {_fmt(r['l2_bytes'] / 1e9)} | "
            f"{_fmt(r['atomic_bytes'] / 1e9)} | {r['launches']:,} | {r['syncs']} | "
            f"{_memory(r)} | {_fmt(d['predicted_ms'])} | {d['x_floor']:.2f} | "
            f"{_peer_ratios(r, result, device)} | {_met(r, device)} |")
    return lines


def _compact_table(result, devices, v) -> list[str]:
    head = "| op | path | " + " | ".join(f"{d} ms | {d} × floor | {d} ÷ peer" for d in devices) + " |"
    lines = [head, "|---|---|" + "---|" * (3 * len(devices))]
    for r in _rows(result, "ptd", v):
        cells = []
        for d in devices:
            cells += [_fmt(r["devices"][d]["predicted_ms"]), f"{r['devices'][d]['x_floor']:.2f}",
                      _peer_ratios(r, result, d)]
        lines.append(f"| {r['op']} | {r['path']} | " + " | ".join(cells) + " |")
    return lines


def _peer_table(result, devices, v) -> list[str]:
    lines = ["| peer | what | GEMM-eq (floor) | GEMM precision | HBM GB | launches | syncs | working memory GiB | "
             + " | ".join(f"{d} ms | {d} × floor" for d in devices) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * (2 * len(devices))]
    for r in _rows(result, "peer", v):
        cells = []
        for d in devices:
            cells += [_fmt(r["devices"][d]["predicted_ms"]), f"{r['devices'][d]['x_floor']:.2f}"]
        lines.append(f"| {r['op']} ({r['library']}) | {r['what']} | {r['gemm_equivalents']:.2f} ({r['floor_gemms']}) "
                     f"| {', '.join(r['gemm_precisions'])} | {_fmt(r['hbm_bytes'] / 1e9)} | {r['launches']:,} | "
                     f"{r['syncs']} | {_memory(r)} | " + " | ".join(cells) + " |")
    return lines


def _terms_table(result, device, v) -> list[str]:
    rows = _rows(result, None, v)
    names = []
    for r in rows:
        for k in r["devices"][device]["terms_ms"]:
            if k not in names:
                names.append(k)
    lines = ["| op | path | " + " | ".join(names) + " | total ms |", "|---|---|" + "---|" * (len(names) + 1)]
    for r in rows:
        terms = r["devices"][device]["terms_ms"]
        lines.append(f"| {r['op']} | {r['path']} | " + " | ".join(_fmt(terms[k]) if k in terms else "" for k in names)
                     + f" | {_fmt(r['devices'][device]['predicted_ms'])} |")
    return lines


def _sensitivity_section(result) -> list[str]:
    table = result.get("sensitivity")
    if not table:
        return []
    variants = list(table["predicted_ms"])
    names = list(table["predicted_ms"]["base"])
    lines = [f"## How the predictions move with the uncertain assumptions — {table['device']}, "
             f"V={table['shape']['v']} (model, ms)", "",
             "Each column changes one assumption from the list above and keeps the others; the atomics rate and",
             "the L2 bandwidth have no published figure, so a first GPU run should settle them.", "",
             "| op | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt(table["predicted_ms"][v][name]) for v in variants) + " |")
    return lines + [""]


def _auto_rule_section(result) -> list[str]:
    table = result.get("auto_rule")
    if not table:
        return []
    rows = table["rows"]
    faster = [min(("triton", "cublas"), key=lambda path, r=r: r[path]) for r in rows]
    agree = sum(r["rule"] == f for r, f in zip(rows, faster))
    worst = max((r[r["rule"]] / r[f] for r, f in zip(rows, faster)), default=1.0)
    lines = ['## backend="auto" on CUDA', "",
             "**PROVISIONAL, read from this model, not measured.** On CUDA tensors `backend=\"auto\"` asks",
             "`registry.cublas_takes` (a rule of the call's shape alone: rows N, vocabulary V, hidden size H, whether",
             "it forms gradients, the function): cuBLAS for every call that forms gradients and every forward-only",
             "call of more than 32 rows (the full JSD at any size), the fused Triton kernels for a forward-only call",
             "of at most 32 rows. Below, both kernel paths on the model at each shape (bf16, "
             f"H={rows[0]['h']}, K={rows[0]['k']}, {table['device']}) and the path the rule picks: it picks the faster",
             f"one in {agree} of {len(rows)} cases, and where it does not, its pick is at most {worst:.2f}× the faster "
             "one.",
             "What settles it: `bash bench/gpu_check.sh` on a GPU times both CUDA backends on every benchmark (its",
             "default shapes, N = 2048 to 32768: the many-rows side of the rule) and its report puts auto's pick",
             "beside the faster backend; the decode-like side needs the same script with `PTD_BENCH_SHAPES` at a few",
             "rows (e.g. N = 1, 32, 64 at H = 4096, V = 151936; the teacher top-K benchmark is forward-only). Until",
             "then the rule stays as is.",
             "", "| op | forms gradients | N | V | Triton ms | cuBLAS ms | faster | the rule picks |",
             "|---|---|---|---|---|---|---|---|"]
    for r, f in zip(rows, faster):
        lines.append(f"| {r['op']} | {'yes' if r['grad'] else 'no'} | {r['n']:,} | {r['v']:,} | {r['triton']:.3f} | "
                     f"{r['cublas']:.3f} | {f} | {r['rule']} |")
    return lines + [""]


def markdown(result) -> str:
    from gpu_model import holds_back

    devices = [d["name"] for d in result["devices"]]
    main = devices[0]
    vs = sorted({r["shape"]["v"] for r in result["rows"]}, key=lambda v: v != MAIN_V)
    shape = next(r["shape"] for r in result["rows"] if r["shape"]["v"] == vs[0])
    out = [
        "# GPU work model of ptd's CUDA paths and the peers",
        "",
        "**This is a model, not a measurement.** No GPU has run these numbers. `bench/gpu_model.py` runs every",
        "public op of ptd_kernels (forward and backward; `linear_topk` forward only) on each CUDA path",
        "`backend=` accepts, and the peers' own code, on tensors without data that report a CUDA device: the",
        "aten ops, Triton launches, host syncs and live bytes below are **counted** from that execution; the",
        "times are **predicted** from them with the published peaks and the assumptions listed here. Measured",
        "figures go in their own section at the end, never into these columns.",
        "",
        f"Regenerate: `python bench/gpu_model.py` ({result.get('seconds_to_count', 0) / 60:.0f} minutes here, on a "
        "shared 2-core machine; the JSON with the counts per kernel is `bench/results/gpu_model.json`).",
        "",
        "## How it counts",
        "",
        "- **Aten ops** (a `TorchDispatchMode`): every GEMM form — `mm`, `addmm`, `bmm`, `baddbmm`, their `out=`,",
        "  in-place and `out_dtype=` variants — gives 2·M·N·K FLOPs at its operands' precision; every op gives the",
        "  bytes it reads and writes from its operands' sizes (a gather reads only what it gathers) and one launch,",
        "  except views and allocations.",
        "- **Triton launches** (`JITFunction.run` replaced while counting): grid, constexprs and tensor arguments.",
        "  ptd's fused tile kernels become dot FLOPs (padded tiles included), tile loads from L2, fp32 atomics and",
        "  epilogue instructions from their launch plan, and HBM traffic from an L2 simulation over their programs;",
        "  any other kernel moves each tensor it loads or stores once per loop that touches it.",
        "- **Host read-backs** (`.item()`, `bool(t)`, data-sized outputs) are counted as syncs and answered by the",
        "  rules for the modelled data (`SCALAR_RULES` in `bench/gpu_scalars.py`).",
        "- **Memory**: every storage a call allocates is live until its last tensor goes; the peak beyond the",
        "  inputs is the call's, the largest allocations at the peak are named with the code that made them.",
        "- **Why meta tensors**: `FakeTensorMode` can make CUDA tensors on a CPU-only build, but autograd then needs",
        "  a CUDA device guard and aborts in the backward; meta tensors that *report* `cuda` to Python run forward",
        "  and backward, and every device check of ptd, Liger-Kernel and TRL takes its CUDA branch.",
        "",
        "## Assumptions of the model",
        "",
        *[f"- {line}" for line in result["assumption_text"]],
        "",
        "Devices (published peaks, dense):",
        "",
        "| device | SMs | bf16 tensor TFLOP/s | tf32 | fp32 | HBM TB/s | L2 | memory | source |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {d['name']} | {d['sms']} | {d['peak_flops']['bf16'] / 1e12:.1f} | {d['peak_flops']['tf32'] / 1e12:.1f} | "
          f"{d['peak_flops']['fp32'] / 1e12:.1f} | {d['hbm_bytes_per_s'] / 1e12:.2f} | {d['l2_bytes'] / 1e6:.0f} MB | "
          f"{d['memory_bytes'] / 1e9:.0f} GB | {d['source']} |" for d in result["devices"]],
        "",
        "Columns: GEMM-eq = counted GEMM and tensor-core FLOPs ÷ 2·N·V·H (padded tiles included), with the",
        "op's floor in brackets; HBM GB = bytes every kernel moves to or from HBM; L2 loads = a fused kernel's",
        "tile loads from L2; atomics = fp32 atomic payload; launches = kernels launched (views and",
        "allocations launch none); syncs = host read-backs; working memory = peak live bytes beyond the",
        "inputs, less the input gradients the call returns, with the float32 gradient accumulators (buffers of",
        "∂weight's or ∂hidden's shape) inside it in brackets; ÷ peer = ptd's predicted time ÷ the peer's",
        "(below 1: ptd faster).",
        "",
        "Floors (logits GEMMs each op's form needs):",
        "",
        "| op | floor | the GEMMs |",
        "|---|---|---|",
        *[f"| {r['op']} | {r['floor_gemms']} | {r['floor_why']} |" for r in _rows(result, "ptd", vs[0])
          if r["path"] == _rows(result, "ptd", vs[0])[0]["path"]],
        "",
        f"## Model: ptd at {_shape_text(shape)} — {main}",
        "",
        *_full_table(result, main, vs[0]),
        "",
    ]
    for v in vs:
        out += [f"## Model: ptd at V={v} — all devices", "", *_compact_table(result, devices, v), ""]
    for v in vs:
        out += [f"## Model: the peers at V={v}", "", *_peer_table(result, devices, v), ""]
    out += [f"## Where the time goes — {main}, V={vs[0]} (model, ms)", "",
            "'floor GEMMs' is the op's floor; 'extra GEMMs' the counted GEMM FLOPs beyond it at cuBLAS speed; the",
            "other columns are time beyond the GEMMs' FLOPs at cuBLAS speed, by the term that binds each kernel.",
            "", *_terms_table(result, main, vs[0]), ""]
    out += _sensitivity_section(result)
    out += _auto_rule_section(result)
    out += [f"## What holds each op back — {main}, V={vs[0]} (model)", "",
            "Where a target of issue 21.5 is not met (≤ 1.2× the floor, teacher top-K ≤ 1.2× one GEMM, working",
            "memory ≤ 1 GiB), the largest terms beyond the floor. The one-sweep PTD-PO loss",
            "(`linear_policy_loss`, ≤ 1.3× its 4 GEMMs; the policy loss alone ≤ 1.3× its 3) forms its gradients in",
            "blocks of whole rows, so it accumulates ∂weight over the row blocks in float32: with a 16-bit weight",
            "that buffer (V·H·4 bytes) does not fit the 1 GiB budget at this shape, and the cuBLAS path runs the",
            "per-row path (`fused_loss_pays`: 5 GEMMs with a teacher, 4 without, each ∂weight slice written once);",
            "the row 'one sweep, accumulator beyond the budget' counts the one sweep holding that buffer anyway.",
            ""]
    for r in _rows(result, "ptd", vs[0]):
        reason = holds_back(r, main, r["target"])
        out.append(f"- **{r['op']}** ({r['path']}): " + (reason or "meets the targets"))
    out += ["", "## Measured on a GPU", "",
            "Not measured yet: no GPU has been lent to this project. `bench/gpu_check.sh` times the same ops",
            "and peers on a device; its figures go in this section, in their own table, with the device and",
            "the date of the run. The model's columns above are never overwritten by measurements.", "",
            "| op | path | device | measured ms | run |", "|---|---|---|---|---|", "| — | — | — | — | — |", ""]
    return "\n".join(out)
