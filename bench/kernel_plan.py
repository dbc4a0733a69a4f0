"""The Triton kernels' launch plan on an H100 (and a B200), without either: every configuration compiled.

    python bench/kernel_plan.py                      # sm_90a, all configurations; 2 worker processes
    python bench/kernel_plan.py --gpu sm100 --jobs 4
    python bench/kernel_plan.py --no-peers --out /tmp/plan

Calls the real launchers of ``ptd_kernels.backends.triton`` at N = 8192, H = 4096, V ∈ {128256,
151936} for every dtype (bf16, fp16, fp32 with TF32 on and off), soft-cap on and off, bias on and
off, K ∈ {1, 8, 20, 64, 100, 128, 256} and β ∈ {0, 0.5, 1} (``launch_plan.configurations``) under a
stand-in driver for the GPU (``launch_plan.recording``), on meta tensors: Triton compiles every
kernel they launch for the GPU's target, and the table lists per launch the kernel, its tiles,
warps and stages, its grid at the target shape, and what ptxas made of it: registers and spilled
bytes per thread, shared memory per block, and whether its dots became wgmma (tcgen05 on sm_100a).
Liger-Kernel's (fused linear cross-entropy and JSD) and cut-cross-entropy's Triton kernels are
compiled the same way beside them (their launchers on meta tensors; their GEMMs are torch
matmuls, i.e. cuBLAS, and not in a Triton plan).

Writes ``<out>/kernel_plan_<gpu>.{json,md}`` (``--ops``/``--dtypes``: a part of it, for a quick look
elsewhere than the committed results); the JSON also holds the compile figures of every
kernel by Triton's compile hash, which the launch-plan test reads as a cache (a kernel whose
source, constexprs, options or compiler changed has another hash and is compiled again there).
Re-run after changing a kernel or its launcher. Exits 1 if a configuration breaks a limit
(``launch_plan.check``). Compiles only; no GPU, no timing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from ptd_kernels.backends.triton import launch_plan  # noqa: E402

PEER_DTYPES = ("bf16", "fp32")


# ----------------------------------------------------------------------------- peers


@contextlib.contextmanager
def _meta_scalars(value: float):
    """Liger reads data on the host: ``Tensor.item()`` (the non-ignored rows, which only divide the
    loss) returns ``value`` for a meta tensor, and ``torch.equal`` (is the incoming gradient 1.0,
    which skips a scaling kernel) says no for one, so the scaling kernel is planned too."""
    import torch

    item, equal = torch.Tensor.item, torch.equal

    def meta_item(self):
        return value if self.is_meta else item(self)

    def meta_equal(a, b):
        return False if a.is_meta or b.is_meta else equal(a, b)

    torch.Tensor.item, torch.equal = meta_item, meta_equal
    try:
        yield
    finally:
        torch.Tensor.item, torch.equal = item, equal


def _peer_calls():
    """(peer, op, dtypes, call(dtype, vocab, softcap)) for each peer kernel family."""
    import torch

    n, h = launch_plan.ROWS, launch_plan.HIDDEN

    def meta(*shape, dtype, grad=False):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

    def liger_cross_entropy(dtype, vocab, softcap):
        from liger_kernel.ops.fused_linear_cross_entropy import (
            fused_linear_cross_entropy_backward,
            fused_linear_cross_entropy_forward,
        )

        x, w = meta(n, h, dtype=dtype, grad=True), meta(vocab, h, dtype=dtype, grad=True)
        with _meta_scalars(float(n)):
            out = fused_linear_cross_entropy_forward(x, w, meta(n, dtype=torch.int64), softcap=softcap)
            grad_input, grad_weight, grad_bias = out[4:7]
            fused_linear_cross_entropy_backward(meta((), dtype=torch.float32), grad_input, grad_weight, grad_bias)

    def liger_jsd(dtype, vocab, softcap):
        from liger_kernel.ops.fused_linear_jsd import fused_linear_jsd_backward, fused_linear_jsd_forward

        x, w = meta(n, h, dtype=dtype, grad=True), meta(vocab, h, dtype=dtype, grad=True)
        tx, tw = meta(n, launch_plan.TEACHER_HIDDEN, dtype=dtype), meta(vocab, launch_plan.TEACHER_HIDDEN, dtype=dtype)
        with _meta_scalars(float(n)):
            _, grad_input, grad_weight = fused_linear_jsd_forward(x, w, tx, tw, None, 0.5, -100, False, 1.0)
            fused_linear_jsd_backward(meta((), dtype=torch.float32), grad_input, grad_weight)

    def cce(dtype, vocab, softcap):
        from cut_cross_entropy.cce_backward import cce_backward_kernel
        from cut_cross_entropy.cce_lse_forward import cce_lse_forward_kernel
        from cut_cross_entropy.indexed_dot import indexed_neg_dot_forward_kernel
        from cut_cross_entropy.utils import _handle_eps

        e, c = meta(n, h, dtype=dtype), meta(vocab, h, dtype=dtype, grad=True)
        targets = meta(n, dtype=torch.int64)
        lse, logit_avg = cce_lse_forward_kernel(e, c, None, softcap=softcap, return_logit_avg=True)
        indexed_neg_dot_forward_kernel(e, c, targets, False, None, softcap, lse.dtype)
        vocab_ordering = torch.argsort(logit_avg).to(torch.int32)  # cce.py's sort_logit_avg, uncompiled
        cce_backward_kernel(meta(n, dtype=torch.float32), e, c, lse, None, softcap, _handle_eps("auto", dtype),
                            targets=targets, vocab_ordering=vocab_ordering, grad_scale=1.0 / n)

    return [
        ("Liger-Kernel", "fused linear cross-entropy (fwd+bwd)", ("bf16", "fp32"), liger_cross_entropy),
        ("Liger-Kernel", "fused linear JSD (fwd+bwd)", ("bf16", "fp32"), liger_jsd),
        ("cut-cross-entropy", "linear cross-entropy (fwd+bwd)", ("bf16",), cce),
    ]


def peer_rows(gpu: launch_plan.GPU, vocabs, cache: dict) -> tuple[list[dict], dict]:
    """The peers' launches (each distinct kernel once, with how often it is launched), and their
    compile figures. In this process: the interpreter must be off."""
    import torch

    rows, compiled = [], {}
    for peer, op, dtypes, fn in _peer_calls():
        for dtype in dtypes:
            torch_dtype = getattr(torch, launch_plan.DTYPES[dtype][0])
            for softcap in (False, True):
                for vocab in vocabs:
                    base = dict(peer=peer, op=op, dtype=dtype, softcap=softcap, vocab=vocab)
                    try:
                        with launch_plan.recording(gpu, cache) as stand_in:
                            fn(torch_dtype, vocab, launch_plan.SOFTCAP if softcap else None)
                    except Exception as exc:  # a peer's launcher that cannot run on meta tensors
                        rows.append({**base, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                        continue
                    compiled.update(stand_in.compiled)
                    seen: dict = {}
                    for launch in stand_in.launches:
                        key = launch.compiled.compile_hash
                        if key not in seen:
                            seen[key] = {**base, **launch_plan.as_row(launch, gpu), "launches": 0}
                            rows.append(seen[key])
                        seen[key]["launches"] += 1
    return rows, compiled


# ----------------------------------------------------------------------------- table

def _tiles(row) -> str:
    tiles = row["tiles"]
    parts = [f"{k.replace('BLOCK_', '')}{v}" for k, v in tiles.items()
             if k != "OWN_ROWS" and not (k == "K_PAD" and not row.get("k"))]
    if "OWN_ROWS" in tiles:
        parts.insert(0, "rows" if tiles["OWN_ROWS"] else "vocab")
    return " ".join(parts)


def _dots(row) -> str:
    if not row["dots"]:
        return "no dot"
    async_dots = row["wgmma_dots"] + row["tcgen05_dots"]
    kind = "tcgen05" if row["tcgen05_dots"] else "wgmma"
    if async_dots == row["dots"] and not row["mma_sync"]:
        return f"{kind} {async_dots}/{row['dots']}" if async_dots else "FMA"
    if async_dots:
        return f"**{kind} {async_dots}/{row['dots']}, mma.sync {row['mma_sync']}**"
    return f"mma.sync {row['mma_sync']}" if row["mma_sync"] else "FMA"


def _figures(row, gpu) -> list[str]:
    spill = row["spill_bytes"]
    shared = row["shared_bytes"]
    return [str(row["registers"]), f"**{spill}**" if spill else "0",
            f"**{shared:,}**" if shared > gpu.max_shared_mem else f"{shared:,}", _dots(row)]


def markdown(data: dict, rows: list[dict], gpu: launch_plan.GPU) -> str:
    peers, problems = data["peers"], data["problems"]
    vocabs = data["shape"]["vocabs"]
    lines = [
        f"# Triton launch plan on {gpu.name}: compiled, not run",
        "",
        f"Written by `python bench/kernel_plan.py --gpu {data['gpu']}`: every kernel the launchers of "
        f"`ptd_kernels.backends.triton` launch at N = {data['shape']['rows']}, H = {data['shape']['hidden']} "
        f"(a separate teacher: H' = {data['shape']['teacher_hidden']}), compiled for {gpu.name} with Triton "
        f"{data['triton']} and its bundled ptxas under a stand-in driver ({gpu.multiprocessor_count} SMs, "
        f"{gpu.max_shared_mem:,} B of shared memory per block). Figures are the compiler's: registers and "
        "spilled bytes per thread (cuobjdump on the cubin), shared memory per block, and the dot operations "
        "of the kernel's TTGIR with how many became the asynchronous tensor-core MMA. Grids are the "
        "launchers' at the target shape; waves = programs / SMs. Nothing here is a measurement of time.",
        "",
        f"Limits checked (`launch_plan.check`): shared memory ≤ {gpu.max_shared_mem:,} B everywhere; "
        + ("no spill for bf16/fp16 at K ≤ 128; " if data["spills_checked"] else "")
        + "every bf16/fp16 dot on the async MMA. "
        + (f"**{len(problems)} launch(es) break a limit** (listed at the end)." if problems
           else "Every configuration is within them.")
        + ("" if data["spills_checked"] else
           f" Spills are reported, not checked, on this GPU: the tiles are chosen on sm_90a, and here ptxas "
           f"caps some of the same kernels at 64 or 128 registers; {data['spilling_16bit_launches']} bf16/fp16 "
           "launches at K ≤ 128 spill (the **bold** figures)."),
        "",
        f"{data['configurations']} configurations, {data['distinct_kernels']} distinct compiled kernels, "
        f"{data['compile_s']:.0f} s to plan ({data['cached']} kernels from the plan cache).",
        "",
        "Columns: the configuration (op, dtype, soft-cap, bias, K or β), the launch (in launch order), the "
        "kernel, its tiles (rows/vocab: what a backward program owns; N×V the logits tile, H its step, "
        "CHUNK the swept entries buffered per gradient update), warps, stages, the grid at each vocabulary, "
        "registers, spilled bytes, shared memory, dots.",
        "",
    ]
    by_op: dict = {}
    for row in rows:
        by_op.setdefault(row["op"], []).append(row)
    for op, op_rows in by_op.items():
        lines += [f"## {op}", "", launch_plan.OPS[op], "",
                  "| configuration | # | kernel | tiles | warps | stages | "
                  + " | ".join(f"grid V={v}" for v in vocabs) + " | regs | spill B | shared B | dots |",
                  "|---|---|---|---|---|---|" + "---|" * len(vocabs) + "---|---|---|---|"]
        merged: dict = {}
        for row in op_rows:
            key = (row["config"].rsplit("-V", 1)[0], row["launch"])
            merged.setdefault(key, {})[row["vocab"]] = row
        for (label, launch), per_vocab in merged.items():
            row = next(iter(per_vocab.values()))
            grids = [("×".join(str(g) for g in per_vocab[v]["grid"] if g > 1) or "1") + f" ({per_vocab[v]['waves']})"
                     if v in per_vocab else "—" for v in vocabs]
            lines.append("| " + " | ".join([label, str(launch), row["kernel"], _tiles(row), str(row["num_warps"]),
                                            str(row["num_stages"]), *grids, *_figures(row, gpu)]) + " |")
        lines.append("")
    if peers:
        lines += ["## Peers, compiled the same way", "",
                  "Their launchers on meta tensors under the same stand-in driver; each distinct kernel once "
                  "(launches: how many times one call launches it). Liger-Kernel's GEMMs are torch matmuls "
                  "(cuBLAS) between its Triton kernels; cut-cross-entropy fuses them as ptd does.", "",
                  "| peer | op | dtype | cap | V | kernel | tiles | warps | stages | grid | launches | regs | "
                  "spill B | shared B | dots |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in peers:
            head = [row["peer"], row["op"], row["dtype"], "cap" if row["softcap"] else "—", str(row["vocab"])]
            if "error" in row:
                lines.append("| " + " | ".join(head + [f"not planned: {row['error']}"] + [""] * 9) + " |")
                continue
            grid = "×".join(str(g) for g in row["grid"] if g > 1) or "1"
            lines.append("| " + " | ".join(head + [row["kernel"], _tiles(row), str(row["num_warps"]),
                                                  str(row["num_stages"]), grid, str(row["launches"]),
                                                  *_figures(row, gpu)]) + " |")
        lines.append("")
    if problems:
        lines += ["## Configurations over a limit", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(launch_plan.GPUS), default="sm90")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--no-peers", action="store_true", help="only ptd's kernels")
    parser.add_argument("--ops", nargs="*", choices=list(launch_plan.OPS), help="only these ops (a quick look)")
    parser.add_argument("--dtypes", nargs="*", choices=list(launch_plan.DTYPES), help="only these dtypes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the plan compiles the kernels")
    import triton

    gpu = launch_plan.GPUS[args.gpu]
    stem = f"kernel_plan_{args.gpu}"
    cache = {}
    previous = os.path.join(args.out, stem + ".json")
    if os.path.exists(previous):
        with open(previous) as file:
            cache = launch_plan.plan_cache(json.load(file))
    configs = [c for c in launch_plan.configurations()
               if (not args.ops or c.op in args.ops) and (not args.dtypes or c.dtype in args.dtypes)]
    start = time.time()
    rows, compiled, _ = launch_plan.run_plan(configs, args.gpu, cache, args.jobs)
    peers, peer_compiled = ([], {}) if args.no_peers else peer_rows(gpu, launch_plan.VOCABS, cache)
    elapsed = time.time() - start
    problems = launch_plan.check(rows, gpu, spills=launch_plan.CHECK_SPILLS[args.gpu])
    spilling = [r for r in rows if r["dtype"] in ("bf16", "fp16") and r["k"] <= 128 and r["spill_bytes"]]
    data = {
        "gpu": args.gpu, "device": dataclasses.asdict(gpu), "triton": triton.__version__,
        "shape": {"rows": launch_plan.ROWS, "hidden": launch_plan.HIDDEN, "teacher_hidden": launch_plan.TEACHER_HIDDEN,
                  "vocabs": list(launch_plan.VOCABS)},
        "configurations": len(configs), "distinct_kernels": len({r["compile_hash"] for r in rows}),
        "cached": len({r["compile_hash"] for r in rows if r["cached"]}), "compile_s": round(elapsed, 1),
        "problems": problems, "spills_checked": launch_plan.CHECK_SPILLS[args.gpu],
        "spilling_16bit_launches": len(spilling), "peers": peers, **launch_plan.pack(rows, compiled),
    }
    packed = {k["hash"] for k in data["kernels"]}
    data["kernels"] += [{"hash": k, **v} for k, v in peer_compiled.items() if k not in packed]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as file:  # compact: a kernel's figures once
        json.dump(data, file, separators=(",", ":"))
    with open(os.path.join(args.out, stem + ".md"), "w") as file:
        file.write(markdown(data, rows, gpu))
    print(f"{len(configs)} configurations, {data['distinct_kernels']} kernels ({data['cached']} cached), "
          f"{elapsed:.0f} s; "
          f"{len(problems)} over a limit; wrote {os.path.join(args.out, stem)}.{{json,md}}")
    for problem in problems:
        print("  " + problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
