"""Shared set-up of the benchmark suites: shapes, peak-memory measurement, the GEMM floor.

Every benchmark records ``extra_info["peak_bytes"]``: live tensor bytes at the peak of one
fwd+bwd call beyond the inputs (MemTracker on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).
Times are pytest-benchmark's; compare rows of one run only (same machine, same load).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small enough to finish in minutes on a 2-core CPU; override with PTD_BENCH_SHAPE="N,H,V".
_default_shape = "8192,4096,151936" if DEVICE == "cuda" else "2048,1024,32000"
N, H, V = (int(x) for x in os.environ.get("PTD_BENCH_SHAPE", _default_shape).split(","))
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
ROUNDS = int(os.environ.get("PTD_BENCH_ROUNDS", "3" if DEVICE == "cuda" else "2"))


def peak_bytes(fn, *inputs) -> int:
    """Peak live tensor bytes of ``fn()`` beyond ``inputs`` (which are already allocated)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*inputs)
    with tracker:
        fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    total = sum(stats.get("Total", 0) for stats in snapshot.values())
    # Inputs tracked as external are counted in the snapshot: report only what the call adds.
    inputs_bytes = sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
    return max(0, total - inputs_bytes)


def run_benchmark(benchmark, fn, *inputs, method: str, op: str, memory: bool = True):
    """Time fn (fwd+bwd) and record its peak memory; one warm-up call first."""
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()

    def timed():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(op=op, method=method, shape=f"N={N},H={H},V={V}", dtype=str(DTYPE),
                                device=DEVICE)
    if memory:
        benchmark.extra_info["peak_bytes"] = peak_bytes(fn, *inputs)
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=0)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    hidden = (torch.randn(N, H, device=DEVICE) * 0.5).to(DTYPE).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) * H**-0.5).to(DTYPE).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    return hidden, weight, targets


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(1)
    hidden = (torch.randn(N, H, device=DEVICE) * 0.5).to(DTYPE)
    weight = (torch.randn(V, H, device=DEVICE) * H**-0.5).to(DTYPE)
    return hidden, weight


def gemm_floor(hidden, weight):
    """The three GEMMs any fused output-layer fwd+bwd needs: logits, d hidden, d weight."""
    with torch.no_grad():
        logits = hidden @ weight.T
        logits @ weight
        logits.T @ hidden


def zero_grads(*tensors):
    for t in tensors:
        t.grad = None
