"""The counted work of the cuBLAS backend per public op, at any shape, without a GPU.

Each op's primitive calls — as the autograd layer composes them, forward and backward — run on meta
tensors inside ``_work.counting()``: the GEMMs and kernel launches are the ones the code issues (recorded,
not executed), the work buffers the ones it allocates, and a dispatch mode counts the small torch ops
beside them (per-row math on [rows, ≤ 2K] support arrays, buffer fills, casts). Nothing here is a
measurement; ``model_ms`` turns the counts into a time from stated peaks (a model, labelled as one)::

    python -m ptd_kernels.backends.cublas.statement            # N = 8192, H = 4096, V = 151936, K = 100, bf16
    python -m ptd_kernels.backends.cublas.statement --n 4096 --v 128256
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..base import ALL_GRADS, DivergenceSpec, Head, HeadGradCoefs, JSDStats, LogitSpec, SparseTerms
from . import CublasBackend, _work, fused_loss

# Published peaks (dense bf16 tensor-core FLOP/s, HBM bytes/s) and the stated efficiencies of the model.
DEVICES = {"H100 SXM": (989.4e12, 3.35e12), "H200": (989.4e12, 4.8e12)}
GEMM_EFFICIENCY = 0.75  # of peak, for GEMMs of these shapes (assumed, to be replaced by a measurement)
MEMORY_EFFICIENCY = 0.85  # of peak bandwidth for the streaming kernels (assumed)
LAUNCH_SECONDS = 4e-6  # per kernel launch or GEMM call, host and device overhead (assumed)

_METADATA_OPS = {"view", "_unsafe_view", "as_strided", "slice", "select", "t", "transpose", "unsqueeze", "squeeze",
                 "expand", "detach", "alias", "empty", "empty_strided", "lift_fresh", "_to_copy", "unbind",
                 "split", "permute", "reshape", "new_empty", "size", "stride", "numel", "dim", "sym_size"}


class _TorchOps(TorchDispatchMode):
    """Counts the aten ops that launch a kernel (views and allocations excluded)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _METADATA_OPS and not name.startswith(("mm", "addmm", "baddbmm", "bmm")):
            self.count += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class OpWork:
    op: str
    gemm_records: tuple[_work.GemmRecord, ...]
    gemm_equivalents: float
    launches: int
    torch_ops: int
    elementwise_gb: float
    working_gib: float

    @property
    def gemms(self) -> int:
        return len(self.gemm_records)

    @property
    def gemm_tflop(self) -> float:
        return sum(g.flops for g in self.gemm_records) / 1e12

    def model_ms(self, device: str) -> tuple[float, float]:
        """(floor, total) in ms on ``device``. The floor: the GEMM FLOPs at the assumed cuBLAS efficiency.
        The total: each GEMM at the slower of its FLOPs and its least bytes (a d weight accumulated over few
        rows is bound by its float32 read-modify-write), plus the elementwise bytes at the assumed
        bandwidth and every launch."""
        flops, bandwidth = DEVICES[device]
        floor = self.gemm_tflop * 1e12 / (flops * GEMM_EFFICIENCY)
        gemms = sum(max(g.flops / (flops * GEMM_EFFICIENCY), g.bytes / (bandwidth * MEMORY_EFFICIENCY))
                    for g in self.gemm_records)
        passes = self.elementwise_gb * 1e9 / (bandwidth * MEMORY_EFFICIENCY)
        launches = (self.gemms + self.launches + self.torch_ops) * LAUNCH_SECONDS
        return floor * 1e3, (gemms + passes + launches) * 1e3


def _head(n, h, v, dtype, softcap=None):
    meta = dict(device="meta", dtype=dtype)
    return Head(torch.empty(n, h, **meta), torch.empty(v, h, **meta), None, LogitSpec(1.0, 1.0, softcap))


def _ops(n: int, h: int, v: int, k: int, dtype: torch.dtype):
    """name → a callable issuing the op's primitive calls (forward and backward) on meta tensors."""
    backend = CublasBackend()
    student, teacher = _head(n, h, v, dtype), _head(n, h, v, dtype)
    f32, f64, meta = torch.float32, torch.float64, "meta"
    targets = torch.empty(n, dtype=torch.int64, device=meta)
    rows = torch.empty(n, device=meta, dtype=f32)

    def logprobs():
        stats = backend.row_stats(student, targets=targets, lse_dtype=f64)
        coefs = HeadGradCoefs(rows, rows, stats.mean_logit.to(f32), targets, rows)
        backend.head_backward(student, stats.lse.to(f32), coefs, ALL_GRADS)

    def teacher_topk():
        backend.row_stats(teacher, k=k, with_mean_logit=False, lse_dtype=f64)

    def ptd_terms():
        stats = backend.row_stats(student, targets=targets, k=k, lse_dtype=f64)
        top = backend.row_stats(teacher, k=k, with_mean_logit=False, lse_dtype=f64)
        backend.gather_logits(student, top.topk_indices, f32)
        backend.gather_logits(teacher, stats.topk_indices, f32)
        support = torch.empty(n, 2 * k, dtype=torch.int64, device=meta)
        sparse = (SparseTerms(torch.empty(n, dtype=torch.int64, device=meta), support,
                              torch.empty(n, 2 * k, dtype=f32, device=meta)),)
        coefs = HeadGradCoefs(rows, rows, stats.mean_logit.to(f32), targets, rows, sparse)
        backend.head_backward(student, stats.lse.to(f32), coefs, ALL_GRADS)

    def jsd():
        stats = backend.jsd_forward(student, teacher, 0.5)
        backend.jsd_backward(student, teacher, 0.5, JSDStats(*stats.__dict__.values()), rows, ALL_GRADS)

    def one_sweep(spec):
        # As the work model's row "one sweep, budget + accumulator": a 16-bit weight's float32 d weight
        # accumulator (2.32 GiB at the target) held beside the budget, where the one sweep can run at all
        # (inside it the loss functions take the per-row path: ``fused_loss.fused_loss_pays``).
        saved = fused_loss.ACCUMULATOR_IN_BUDGET
        fused_loss.ACCUMULATOR_IN_BUDGET = False
        try:
            backend.fused_loss(student, teacher, spec, rows, ALL_GRADS)
        finally:
            fused_loss.ACCUMULATOR_IN_BUDGET = saved

    def topk_loss():
        one_sweep(DivergenceSpec(0.5, k, "union", True))

    def jsd_loss():
        one_sweep(DivergenceSpec(0.5))

    return {
        "linear_logprobs (+entropy), fwd+bwd": logprobs,
        f"linear_topk (teacher top-{k})": teacher_topk,
        f"linear_ptd_terms / linear_topk_jsd (K={k}, union), fwd+bwd": ptd_terms,
        "linear_jsd (per row), fwd+bwd": jsd,
        f"linear_topk_jsd_loss (one sweep, K={k}, accumulator beside the budget)": topk_loss,
        "linear_jsd_loss (one sweep, accumulator beside the budget)": jsd_loss,
    }


def count(n: int = 8192, h: int = 4096, v: int = 151936, k: int = 100, dtype: torch.dtype = torch.bfloat16):
    """OpWork of every op at this shape (the default budget unless ``config.CUDA_BLOCK_BYTES`` is set)."""
    out = []
    for name, op in _ops(n, h, v, k, dtype).items():
        with _work.counting() as log, _TorchOps() as torch_ops:
            op()
        out.append(OpWork(name, tuple(log.gemms), log.gemm_equivalents(n, v, h), len(log.launches), torch_ops.count,
                          log.elementwise_bytes / 1e9, log.working_bytes / 2**30))
    return out


def table(n: int = 8192, h: int = 4096, v: int = 151936, k: int = 100, dtype: torch.dtype = torch.bfloat16) -> str:
    """The statement as a markdown table: counts, then the modelled times (labelled as a model)."""
    lines = [f"Counted (meta tensors, code as it runs): N={n}, H={h}, V={v}, K={k}, {str(dtype).replace('torch.', '')}",
             "",
             "| op | GEMMs | GEMM-equiv. | GEMM TFLOP | kernel launches | small torch ops | elementwise GB |"
             " working GiB | model H100 floor / total ms | model H200 floor / total ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w in count(n, h, v, k, dtype):
        h100, h200 = w.model_ms("H100 SXM"), w.model_ms("H200")
        lines.append(f"| {w.op} | {w.gemms} | {w.gemm_equivalents:.3f} | {w.gemm_tflop:.1f} | {w.launches} | "
                     f"{w.torch_ops} | {w.elementwise_gb:.1f} | {w.working_gib:.2f} | "
                     f"{h100[0]:.1f} / {h100[1]:.1f} ({h100[1] / h100[0]:.2f}×) | "
                     f"{h200[0]:.1f} / {h200[1]:.1f} ({h200[1] / h200[0]:.2f}×) |")
    lines += ["", f"Model (not a measurement): GEMMs at {GEMM_EFFICIENCY:.0%} of the dense bf16 peak "
              "(989 TFLOP/s), elementwise bytes at "
              f"{MEMORY_EFFICIENCY:.0%} of HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s), "
              f"{LAUNCH_SECONDS * 1e6:.0f} µs per launch (GEMM, kernel or small torch op); a GEMM takes the longer "
              "of its FLOPs and its least bytes; the floor is the GEMM FLOPs alone."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("n", 8192), ("h", 4096), ("v", 151936), ("k", 100)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    print(table(args.n, args.h, args.v, args.k, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
