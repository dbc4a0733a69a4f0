"""A work model of ptd's CUDA paths and of the peers, counted from the code that runs — a MODEL, not a
measurement.

    python bench/gpu_model.py            # writes bench/results/gpu_model.json and docs/gpu_model.md
    python bench/gpu_model.py --quick    # a small shape, nothing written (a smoke run)
    python bench/gpu_model.py --render   # docs/gpu_model.md again from the JSON (no counting)
    python bench/gpu_model.py --ops linear_policy_loss ...   # recount these ops only, merged into the JSON

Every public op of ptd_kernels (forward and backward; ``linear_topk`` forward only) runs on each CUDA
path ``backend=`` accepts (``gpu_cases.CUDA_PATHS``) and every peer runs its own code, at N=8192,
H=4096, V ∈ {151936, 128256}, bf16, K=100, on meta tensors that report a CUDA device
(``gpu_count``): the aten ops, Triton launches, host syncs and live bytes are counted, not estimated.
``gpu_kernels`` turns each Triton launch plan into FLOPs, bytes and atomics. This file turns the
counts into a predicted time per device from published peaks and the efficiencies stated in
``ASSUMPTIONS`` (a roofline per kernel, summed), compares each op with the GEMMs its form needs at
cuBLAS speed (its floor) and with the peers, and says which term holds an op back where a target
of issue 21.5 is not met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from gpu_cases import PTD_OPS, Shape, available_paths, available_peers, run_case  # noqa: E402
from gpu_count import StandIn, TritonLaunch, Work, counting  # noqa: E402
from gpu_kernels import Chip, cdiv, launch_work  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "gpu_model.json")
DOC = os.path.join(ROOT, "docs", "gpu_model.md")
GiB = 1 << 30


@dataclass(frozen=True)
class Device:
    """Published peaks (dense, no sparsity) and the derived per-SM rates of one GPU."""

    name: str
    sms: int
    peak_flops: dict  # GEMM operand precision -> FLOP/s
    hbm_bytes_per_s: float
    l2_bytes: int
    memory_bytes: int
    source: str
    clock_hz: float = 1.83e9  # the clock of the tensor peak: 989.4 TFLOP/s = 132 SMs × 4096 FLOP/clock

    @property
    def int32_per_s(self) -> float:
        return self.sms * 64 * self.clock_hz  # 64 INT32 lanes per Hopper SM

    @property
    def sfu_per_s(self) -> float:
        return self.sms * 16 * self.clock_hz  # 16 special-function units per SM

    def chip(self) -> Chip:
        return Chip(sms=self.sms, l2_bytes=int(self.l2_bytes * ASSUMPTIONS["l2_usable"]))


_HOPPER_PEAKS = {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "fp64": 66.9e12}
DEVICES = (
    Device("H100 SXM", 132, _HOPPER_PEAKS, 3.35e12, 50 * 10**6, 80 * 10**9,
           "NVIDIA H100 Tensor Core GPU datasheet (SXM5: BF16/FP16 1,979 and TF32 989 TFLOPS with sparsity, "
           "i.e. 989.4 / 494.7 dense; FP32 67 TFLOPS; FP64 tensor 67 TFLOPS; HBM3 3.35 TB/s, 80 GB) and the "
           "H100 whitepaper (132 SMs, 50 MB L2)"),
    Device("H200", 132, _HOPPER_PEAKS, 4.8e12, 50 * 10**6, 141 * 10**9,
           "NVIDIA H200 Tensor Core GPU datasheet (SXM: the H100 SXM's compute peaks; HBM3e 4.8 TB/s, 141 GB); "
           "the same GH100 die (132 SMs, 50 MB L2)"),
)

# Every number the prediction uses besides the published peaks. Change one here and regenerate.
ASSUMPTIONS = {
    "cublas_efficiency": 0.75,  # large bf16/fp16/tf32 cuBLAS GEMMs reach this fraction of the tensor peak
    "cublas_fp32_efficiency": 0.80,  # fp32 (tf32 off, torch's default) SIMT GEMMs: of the FP32 peak
    "cublas_tile": (128, 256),  # output tile of a tensor-core GEMM, for the wave count (fp32: 128×128)
    "triton_dot_efficiency": 0.60,  # a fused kernel's tl.dot main loop, when its operands arrive in time
    "stream_efficiency": 0.80,  # elementwise / reduction / copy kernels: this fraction of HBM bandwidth
    "l2_bytes_per_s": 7.0e12,  # SM ← L2 bandwidth (H100 and H200 alike)
    "l2_usable": 0.8,  # of the 50 MB L2 as the LRU capacity of the tile simulation
    "atomic_bytes_per_s": 3.5e12,  # fp32 red.add payload resolved in L2 (half its bandwidth: read-modify-write)
    "launch_s": 5e-6,  # host time per launch (eager PyTorch / Triton from Python): a kernel costs at least this
    "sync_s": 20e-6,  # a host read-back drains the queue and exposes the next launch
}

ASSUMPTION_TEXT = (
    ("GEMMs (cuBLAS)", "{cublas_efficiency:.0%} of the bf16/fp16/tf32 tensor peak for large GEMMs, times the "
     "occupancy of its waves of {tile[0]}×{tile[1]} output tiles over the SMs (an output of fewer tiles than SMs "
     "splits its reduction, split-K, as far as that fills the waves); fp32 operands (tf32 off, torch's default) run "
     "on the FP32 pipe at {cublas_fp32_efficiency:.0%} of its peak; a GEMM is never faster than moving its operands "
     "at the memory-pass rate, and one with at most 16 output rows or columns (a gather, a GEMV) is priced that "
     "way."),
    ("Fused Triton kernels", "tl.dot at {triton_dot_efficiency:.0%} of the tensor peak (64×64 to 128×128 tiles, one "
     "CTA of 8 warps per SM, cp.async loads, no TMA: below cuBLAS), plus the per-logit epilogue on the INT32/FP32 and "
     "SFU pipes in series with it (one CTA per SM: nothing hides it); their tile loads from L2 at "
     "{l2_tb:.1f} TB/s (Chips and Cheese measured ≈5.5 TB/s on the 114-SM H100 PCIe; scaled to 132 SMs) and "
     "fp32 atomics (ptd's Triton kernels have none: a backward program owns its gradient rows) at "
     "{atomic_tb:.1f} TB/s of payload (half the L2 bandwidth: each is a read-modify-write; no published "
     "figure: a GPU run should calibrate it); HBM traffic from a least-recently-used simulation of "
     "{l2_usable:.0%} of the 50 MB L2 over the programs' tiles in launch order (bench/gpu_kernels.py). A fused "
     "kernel takes the longest of: dots + epilogue, L2 loads + atomics, HBM."),
    ("Memory passes", "every other kernel (elementwise, reductions, copies, fills, sorts, gathers; the peers' "
     "Triton elementwise kernels) moves its operands once at {stream_efficiency:.0%} of HBM bandwidth, with no "
     "L2 reuse between kernels."),
    ("Launches and syncs", "each launch costs at least {launch_us:.0f} µs (host-side launch in eager mode; a "
     "kernel shorter than that is launch-bound) and each host read-back {sync_us:.0f} µs."),
    ("Data", "modelled data: every row live, every target and id in range, no tie at the k-th place, every "
     "boolean mask all True, logits in random order for the running top-K (K_PAD·(1 + ln tiles) insertion steps "
     "per program, plus one per tile: bench/gpu_kernels.py); the union support holds 2K distinct ids "
     "(SCALAR_RULES in bench/gpu_scalars.py)."),
    ("Floor", "an op's floor is the logits GEMMs its form needs (2·N·V·H FLOPs each) at cuBLAS speed in bf16; "
     "'× floor' divides the predicted time by it. Targets (issue 21.5): every op ≤ 1.2× its floor, teacher top-K "
     "≤ 1.2× one GEMM, working memory (peak beyond the inputs, less the input gradients) ≤ 1 GiB."),
)


def assumption_lines() -> list[str]:
    assume = ASSUMPTIONS
    values = dict(assume, tile=assume["cublas_tile"], l2_tb=assume["l2_bytes_per_s"] / 1e12,
                  atomic_tb=assume["atomic_bytes_per_s"] / 1e12, launch_us=assume["launch_s"] * 1e6,
                  sync_us=assume["sync_s"] * 1e6)
    return [f"**{title}**: {text.format(**values)}" for title, text in ASSUMPTION_TEXT]


# ----------------------------------------------------------------------------- time per kernel


def _waves(units: int, slots: int) -> float:
    """Fraction of the SM-time that works when ``units`` equal pieces run in waves of ``slots``."""
    return units / (cdiv(units, slots) * slots) if units else 1.0


SMALL_GEMM = 16  # a GEMM whose output has at most this many rows or columns is a gather or a GEMV


SPLIT_K_DEPTH = 1024  # a split-K slice keeps at least this much of the reduction


def _gemm_output(work: Work) -> tuple[int, int, int, int]:
    """(batch, rows, columns, reduction depth) of a GEMM, from the shapes the counter recorded."""
    left, right = work.detail.split("@")
    a_shape = tuple(int(s) for s in left.strip("()").split(",") if s.strip())
    b_shape = tuple(int(s) for s in right.strip("()").split(",") if s.strip()) if right != "vec" else (1,)
    return (a_shape[0] if len(a_shape) == 3 else 1), a_shape[-2], b_shape[-1], a_shape[-1]


def _gemm_waves(work: Work, device: Device) -> float:
    """Occupancy of the GEMM's waves of output tiles; an output of fewer tiles than SMs splits its
    reduction (split-K) into as many slices as fill the waves best."""
    m_tile, n_tile = ASSUMPTIONS["cublas_tile"] if work.gemm_dtype != "fp32" else (128, 128)
    batch, rows, cols, depth = _gemm_output(work)
    tiles = batch * cdiv(rows, m_tile) * cdiv(cols, n_tile)
    if tiles >= device.sms:
        return _waves(tiles, device.sms)
    splits = range(1, max(1, min(depth // SPLIT_K_DEPTH, 4 * device.sms)) + 1)
    return max(_waves(tiles * split, device.sms) for split in splits)


def one_gemm_s(shape: Shape, device: Device) -> float:
    """A logits GEMM of the shape at cuBLAS speed in bf16: the unit of every floor."""
    tiles = cdiv(shape.n, ASSUMPTIONS["cublas_tile"][0]) * cdiv(shape.v, ASSUMPTIONS["cublas_tile"][1])
    rate = device.peak_flops["bf16"] * ASSUMPTIONS["cublas_efficiency"] * _waves(tiles, device.sms)
    return shape.logits_gemm_flops / rate


def kernel_time(work: Work, device: Device) -> tuple[float, dict]:
    """(seconds, {term: seconds}) of one kernel; the terms say where its time goes beyond its GEMM FLOPs at
    cuBLAS speed in bf16 (term "gemm"), and sum to the seconds."""
    assume = ASSUMPTIONS
    ideal = work.gemm_flops / (device.peak_flops["bf16"] * assume["cublas_efficiency"])
    stream = work.hbm_bytes / (device.hbm_bytes_per_s * assume["stream_efficiency"])
    if work.kind == "sync":
        return assume["sync_s"], {"host syncs": assume["sync_s"]}
    if work.kind == "stream":
        seconds = stream
        terms = {"memory passes": stream}
    elif work.kind == "gemm":
        fp32 = work.gemm_dtype in ("fp32", "fp64")
        efficiency = assume["cublas_fp32_efficiency"] if fp32 else assume["cublas_efficiency"]
        _, rows, cols, _ = _gemm_output(work)
        small = min(rows, cols) <= SMALL_GEMM  # bandwidth-bound whatever its tiles
        waves = 1.0 if small else _gemm_waves(work, device)
        compute = work.gemm_flops / (device.peak_flops[work.gemm_dtype] * efficiency * waves)
        seconds = max(compute, stream)
        label = ("small GEMMs (gathers, GEMV)" if small
                 else f"GEMMs in {work.gemm_dtype}" if work.gemm_dtype != "bf16" and compute >= stream
                 else "thin GEMMs (bandwidth)" if stream > compute else "GEMM waves")
        terms = {"gemm": ideal, label: seconds - ideal}
    else:  # fused Triton kernel
        waves = _waves(work.programs, device.chip().sms * device.chip().ctas_per_sm)
        dots = work.gemm_flops / (device.peak_flops[work.gemm_dtype] * assume["triton_dot_efficiency"] * waves)
        epilogue = work.alu_ops / device.int32_per_s + work.sfu_ops / device.sfu_per_s
        loads = work.l2_bytes / assume["l2_bytes_per_s"]
        atomics = work.atomic_bytes / assume["atomic_bytes_per_s"]
        hbm = work.hbm_bytes / device.hbm_bytes_per_s
        limits = {"compute": dots + epilogue, "l2": loads + atomics, "hbm": hbm}
        binding = max(limits, key=limits.get)
        seconds = limits[binding]
        beyond = seconds - ideal
        if binding == "compute":
            parts = {"Triton dots below cuBLAS speed": dots - ideal, "epilogue ALU/SFU (incl. top-K merge)": epilogue}
        elif binding == "l2":
            parts = {"L2 tile loads": loads, "atomics": atomics}
        else:
            parts = {"HBM (tiles missing L2, accumulator write-backs)": hbm}
        share = sum(parts.values()) or 1.0
        terms = {"gemm": ideal, **{k: beyond * v / share for k, v in parts.items()}}
    if seconds < assume["launch_s"]:
        terms["launches"] = assume["launch_s"] - seconds
        seconds = assume["launch_s"]
    return seconds, terms


# ----------------------------------------------------------------------------- one case


def count(call, shape: Shape, stand_in: StandIn):
    with counting(stand_in) as trace:
        inputs = run_case(call, shape, trace)
        grad_bytes = inputs.grad_bytes
    return trace, grad_bytes


def costed(trace, chip: Chip) -> list[Work]:
    """The trace's works with every Triton launch turned into work on ``chip``."""
    return [launch_work(w, chip) if isinstance(w, TritonLaunch) else w for w in trace.works]


def predict(works, shape: Shape, floor: int, device: Device) -> dict:
    """Predicted time of the works on ``device``, its terms, and the ratio to the floor."""
    terms = defaultdict(float)
    total = 0.0
    for work in works:
        seconds, parts = kernel_time(work, device)
        total += seconds
        for name, value in parts.items():
            terms[name] += value
    gemm = one_gemm_s(shape, device)
    counted = terms.pop("gemm", 0.0)
    # the counted GEMM FLOPs split into the floor and the GEMMs beyond it
    terms = {"floor GEMMs": min(counted, floor * gemm), "extra GEMMs": max(0.0, counted - floor * gemm), **terms}
    return {"predicted_ms": total * 1e3, "floor_ms": floor * gemm * 1e3, "x_floor": total / (floor * gemm),
            "terms_ms": {k: v * 1e3 for k, v in terms.items() if abs(v) > 1e-9}}


_NEW_BUFFERS = {"empty", "empty_like", "empty_strided", "new_empty", "zeros", "zeros_like", "new_zeros", "full"}


def _accumulator_bytes(trace, shape: Shape) -> int:
    """Bytes of the float32 buffers of an input gradient's shape live at the peak: the gradient
    accumulators (made empty or zeroed; a cast copy of the weight has the same shape but is no buffer)."""
    gradient_shapes = {(shape.n, shape.h), (shape.v, shape.h)}
    return sum(size for size, _what, tensor_shape, dtype, op_name in trace.peak_allocations
               if dtype == torch.float32 and tensor_shape in gradient_shapes and op_name in _NEW_BUFFERS)


def evaluate(trace, grad_bytes: int, shape: Shape, floor: int, devices=DEVICES, keep=None) -> dict:
    """Counts and, per device, the predicted time and its terms. ``keep``: a dict that receives the
    costed works per device name (for the sensitivity runs)."""
    row = {"launches": len(trace.launches()), "syncs": trace.syncs,
           "peak_bytes": trace.peak_extra_bytes, "working_bytes": trace.peak_extra_bytes - grad_bytes,
           "accumulator_bytes": _accumulator_bytes(trace, shape),
           "peak_allocations": [f"{size / GiB:.2f} GiB {what}" for size, what, *_ in trace.peak_allocations[:4]],
           "devices": {}}
    by_chip = {}
    for device in devices:
        chip = device.chip()
        if chip not in by_chip:
            by_chip[chip] = costed(trace, chip)
        row["devices"][device.name] = predict(by_chip[chip], shape, floor, device)
        if keep is not None:
            keep[device.name] = by_chip[chip]
    works = next(iter(by_chip.values()))
    gemm_works = [w for w in works if w.gemm_flops]
    row.update({
        "gemm_flops": sum(w.gemm_flops for w in works),
        "gemm_equivalents": sum(w.gemm_flops for w in works) / shape.logits_gemm_flops,
        "gemm_precisions": sorted({w.gemm_dtype for w in gemm_works}),
        "hbm_bytes": sum(w.hbm_bytes for w in works),
        "l2_bytes": sum(w.l2_bytes for w in works),
        "atomics": sum(w.atomics for w in works),
        "atomic_bytes": sum(w.atomic_bytes for w in works),
        "kernels": _kernel_summary(works),
    })
    return row


@contextlib.contextmanager
def assumed(**changes):
    """ASSUMPTIONS with ``changes`` inside the block (the sensitivity runs)."""
    saved = dict(ASSUMPTIONS)
    ASSUMPTIONS.update(changes)
    try:
        yield
    finally:
        ASSUMPTIONS.clear()
        ASSUMPTIONS.update(saved)


# How the predictions move when one uncertain assumption moves (the ones a first GPU run should calibrate).
SENSITIVITY = (
    ("atomics 2× faster", {"atomic_bytes_per_s": 7.0e12}),
    ("L2 1.5× faster", {"l2_bytes_per_s": 10.5e12}),
    ("Triton dots at cuBLAS efficiency", {"triton_dot_efficiency": 0.75}),
    ("cuBLAS at 65 %", {"cublas_efficiency": 0.65}),
    ("launches 2.5 µs", {"launch_s": 2.5e-6}),
)


def sensitivity(kept: dict, shape: Shape, device: Device) -> dict:
    """{variant: {"op path": predicted ms}} for the kept rows' works on ``device``."""
    out = {"base": {name: predict(works, shape, floor, device)["predicted_ms"]
                    for name, (works, floor) in kept.items()}}
    for label, changes in SENSITIVITY:
        with assumed(**changes):
            out[label] = {name: predict(works, shape, floor, device)["predicted_ms"]
                          for name, (works, floor) in kept.items()}
    return out


def predict_op(op_name: str, path: str, shape: Shape | None = None, device: Device = DEVICES[0]) -> dict:
    """The model of one ptd op on one path (e.g. for a provisional ``backend="auto"`` rule): counts and
    the predicted time on ``device`` (default shape: the target one)."""
    shape = shape or Shape()
    op = next(op for op in PTD_OPS if op.name == op_name)
    trace, grad_bytes = count(lambda x: op.call(x, path), shape, StandIn())
    return evaluate(trace, grad_bytes, shape, op.floor, devices=(device,))


KERNEL_GROUPS = 16  # per-kernel groups kept in the JSON per row (the rest summed as "other")


def _kernel_summary(works) -> list[dict]:
    """The works grouped by (name, phase, kind, precision): launches and sums, the largest launch's shape
    as the example (the JSON's per-kernel detail)."""
    groups: dict = {}
    largest: dict = {}
    for w in works:
        key = (w.name, w.phase, w.kind, w.gemm_dtype)
        g = groups.setdefault(key, {"kernel": w.name, "phase": w.phase, "kind": w.kind, "precision": w.gemm_dtype,
                                    "launches": 0, "gemm_flops": 0.0, "hbm_bytes": 0.0, "l2_bytes": 0.0,
                                    "atomic_bytes": 0.0, "example": w.detail})
        g["launches"] += 1
        g["gemm_flops"] += w.gemm_flops
        g["hbm_bytes"] += w.hbm_bytes
        g["l2_bytes"] += w.l2_bytes
        g["atomic_bytes"] += w.atomic_bytes
        size = w.gemm_flops + w.hbm_bytes
        if size > largest.get(key, -1.0):
            largest[key] = size
            g["example"] = w.detail
    ordered = sorted(groups.values(), key=lambda g: -(g["gemm_flops"] + g["hbm_bytes"] + g["launches"]))
    kept, rest = ordered[:KERNEL_GROUPS], ordered[KERNEL_GROUPS:]
    if rest:
        kept.append({"kernel": f"other ({len(rest)} groups)", "launches": sum(g["launches"] for g in rest),
                     **{k: sum(g[k] for g in rest) for k in ("gemm_flops", "hbm_bytes", "l2_bytes", "atomic_bytes")}})
    return kept


def holds_back(row: dict, device: str, target: float) -> str:
    """Where the op misses a target: the terms beyond its floor, largest first, and its memory."""
    result = row["devices"][device]
    misses = []
    if result["x_floor"] > target:
        terms = sorted(((v, k) for k, v in result["terms_ms"].items() if k != "floor GEMMs" and v > 0), reverse=True)
        top = ", ".join(f"{k} {v:.1f} ms" for v, k in terms[:3])
        misses.append(f"{result['x_floor']:.2f}× > {target}×: {top}")
    if row["working_bytes"] > GiB:
        what = "; ".join(row["peak_allocations"][:2])
        misses.append(f"working memory {row['working_bytes'] / GiB:.2f} GiB > 1 GiB ({what})")
    return " — ".join(misses)


# ----------------------------------------------------------------------------- backend="auto" on CUDA

AUTO_OPS = ("linear_logprobs", "linear_topk", "linear_ptd_terms", "linear_jsd")


def auto_grid(quick: bool) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """The call shapes ``auto_rule`` prices: rows (from decode-like to a training batch), vocabularies, H."""
    return ((1, 32, 64), (8192,), 256) if quick else ((1, 32, 64, 1024), (32000, 151936), 4096)


def auto_rule(quick: bool = False, device: Device = DEVICES[0], log=print) -> dict:
    """Both CUDA kernel paths on a grid of call shapes (forward-only and with gradients, rows from decode-like
    to a training batch), and the path ``backend="auto"``'s rule (``registry.cublas_takes``) picks for each:
    the model the provisional rule was read from, regenerated with it."""
    from ptd_kernels.backends.registry import CallShape, cublas_takes

    paths = ("triton", "cublas")
    if not set(paths) <= set(available_paths()):
        return {}
    grid_n, grid_v, h = auto_grid(quick)
    stand_in = StandIn()
    rows = []
    for op in AUTO_OPS:
        call = next(o for o in PTD_OPS if o.name == op).call
        for grad in ((False,) if op == "linear_topk" else (False, True)):
            for v in grid_v:
                for n in grid_n:
                    shape = Shape(n=n, h=h, v=v, k=16 if quick else 100)
                    times = {}
                    for path in paths:
                        def run(x, path=path, call=call, grad=grad):
                            if grad:
                                return call(x, path)
                            with torch.no_grad():
                                call(x, path)
                            return None

                        trace, grad_bytes = count(run, shape, stand_in)
                        times[path] = evaluate(trace, grad_bytes, shape, 1, devices=(device,))["devices"][device.name][
                            "predicted_ms"]
                    rule = "cublas" if cublas_takes(CallShape("cuda", n, v, h, grad, op)) else "triton"
                    rows.append({"op": op, "grad": grad, "n": n, "v": v, "h": h, "k": shape.k, **times, "rule": rule})
                    log(f"auto rule: {op:18s} grad={grad!s:5s} N={n:5d} V={v:6d}: triton {times['triton']:.3f} ms, "
                        f"cublas {times['cublas']:.3f} ms, the rule picks {rule}")
    return {"device": device.name, "rows": rows}


# ----------------------------------------------------------------------------- all cases


def shapes(quick: bool) -> list[Shape]:
    if quick:
        return [Shape(n=256, h=256, v=8192, k=16)]
    return [Shape(v=151936), Shape(v=128256)]


def run(quick: bool = False, log=print, ops: set | None = None) -> dict:
    logging.getLogger("liger_kernel").setLevel(logging.ERROR)
    stand_in = StandIn()
    rows = []
    paths = available_paths()
    peers = available_peers()
    main_shape, main_device = shapes(quick)[0], DEVICES[0]
    kept = {}  # the main shape's costed works on the main device, for the sensitivity runs
    for shape in shapes(quick):
        for op in PTD_OPS:
            if ops is not None and op.name not in ops:
                continue
            for path in paths:
                started = time.time()
                trace, grad_bytes = count(lambda x, op=op, path=path: op.call(x, path), shape, stand_in)
                works = {}
                row = {"op": op.name, "path": path, "library": "ptd", "shape": asdict(shape) | {"dtype": "bf16"},
                       "floor_gemms": op.floor, "floor_why": op.floor_why, "target": op.target,
                       "peers": list(op.peers), **evaluate(trace, grad_bytes, shape, op.floor, keep=works)}
                if shape == main_shape:
                    kept[f"{op.name} ({path})"] = (works[main_device.name], op.floor)
                rows.append(row)
                log(f"{shape.label()}  {op.name:22s} {path:7s} counted in {time.time() - started:5.1f} s: "
                    f"{row['gemm_equivalents']:.2f} GEMM-eq, {row['launches']} launches, "
                    f"{row['devices'][DEVICES[0].name]['predicted_ms']:.1f} ms on {DEVICES[0].name}")
        for peer in peers if ops is None else ():
            started = time.time()
            trace, grad_bytes = count(peer.call, shape, stand_in)
            works = {}
            row = {"op": peer.name, "path": peer.library, "library": peer.library, "what": peer.what,
                   "shape": asdict(shape) | {"dtype": "bf16"}, "floor_gemms": peer.floor,
                   **evaluate(trace, grad_bytes, shape, peer.floor, keep=works)}
            if shape == main_shape:
                kept[peer.name] = (works[main_device.name], peer.floor)
            rows.append(row)
            log(f"{shape.label()}  {peer.name:32s} counted in {time.time() - started:5.1f} s: "
                f"{row['gemm_equivalents']:.2f} GEMM-eq, {row['devices'][DEVICES[0].name]['predicted_ms']:.1f} ms")
    return {"kind": "model", "note": "a work model counted from the code that runs; predicted times, not measured",
            "devices": [asdict(d) for d in DEVICES], "assumptions": ASSUMPTIONS,
            "assumption_text": assumption_lines(), "rows": rows,
            "sensitivity": {"device": main_device.name, "shape": asdict(main_shape) | {"dtype": "bf16"},
                            "predicted_ms": sensitivity(kept, main_shape, main_device)},
            "auto_rule": auto_rule(quick, main_device, log)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small shape; writes nothing")
    parser.add_argument("--render", action="store_true", help=f"rewrite {os.path.relpath(DOC, ROOT)} from the "
                        "JSON of the last run (no counting)")
    parser.add_argument("--ops", nargs="+", metavar="OP", help="count only these ptd ops (names in "
                        "gpu_cases.PTD_OPS) and put their rows into the JSON of the last run in place of their old "
                        "ones; then rewrite the doc")
    args = parser.parse_args(argv)
    if args.ops:
        unknown = sorted(set(args.ops) - {op.name for op in PTD_OPS})
        if unknown:
            parser.error(f"--ops: no op named {', '.join(map(repr, unknown))} in gpu_cases.PTD_OPS")
    if args.render:
        from gpu_report import markdown

        with open(RESULTS) as f:
            result = json.load(f)
        with open(DOC, "w") as f:
            f.write(markdown(result))
        return result
    started = time.time()
    result = run(quick=args.quick, log=lambda line: print(line, flush=True), ops=set(args.ops or ()) or None)
    if args.quick:
        return result
    if args.ops:
        with open(RESULTS) as f:
            result = merged(json.load(f), result, set(args.ops))
    else:
        result["seconds_to_count"] = round(time.time() - started, 1)
    from gpu_report import markdown

    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    with open(DOC, "w") as f:
        f.write(markdown(result))
    print(f"wrote {os.path.relpath(RESULTS, ROOT)} and {os.path.relpath(DOC, ROOT)} "
          f"({result['seconds_to_count']} s)")
    return result


def merged(old: dict, new: dict, ops: set) -> dict:
    """``old``'s result with the rows (and sensitivity entries) of ``ops`` replaced by ``new``'s, the ptd rows in
    the order of ``PTD_OPS`` and of the paths."""
    order = {op.name: i for i, op in enumerate(PTD_OPS)}
    paths = {path: i for i, path in enumerate(available_paths())}
    kept = [r for r in old["rows"] if not (r["library"] == "ptd" and r["op"] in ops)]
    ptd = sorted([r for r in kept if r["library"] == "ptd"] + new["rows"],
                 key=lambda r: (-r["shape"]["v"], order.get(r["op"], len(order)), paths.get(r["path"], len(paths))))
    rows = []
    for v in sorted({r["shape"]["v"] for r in ptd}, reverse=True):
        rows += [r for r in ptd if r["shape"]["v"] == v]
        rows += [r for r in kept if r["library"] != "ptd" and r["shape"]["v"] == v]
    out = dict(old, rows=rows)
    for variant, times in new["sensitivity"]["predicted_ms"].items():
        out["sensitivity"]["predicted_ms"].setdefault(variant, {}).update(times)
    return out


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


if __name__ == "__main__":
    main()
