"""The one door of every GEMM, kernel launch and work buffer of the cuBLAS backend, so that its work is
counted from the code that runs.

- ``gemm``: out = a @ b, or out += a @ b, with float32 output (float64 for float64 operands), or — for a
  product formed once, such as a vocabulary slice's d weight — the operands' own 16-bit dtype. On CUDA,
  16-bit operands stay 16-bit (cuBLAS tensor cores, fp32 accumulate, fp32 output through
  ``torch.mm(..., out_dtype=torch.float32)``, or a plain bf16/fp16 GEMM); elsewhere there is no such
  kernel, so the operands are upcast (the CPU path that the tests run).
- ``launch``: one Triton kernel launch; the launcher states the elements it touches and the bytes it
  reads and writes (the logits block dominates: everything per row is listed too, but it is O(rows)).
- ``workspace``: a working buffer of a sweep (``sweep`` groups them; the peak is the largest group).

Inside ``counting()`` every call is recorded. On meta tensors nothing runs (GEMMs and launches are
recorded only), so the work of a call at any shape — the target N = 8192, V = 151936 included — is
counted without a GPU and without memory (``statement.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GemmRecord:
    """out[m, n] (+)= a[m, k] @ b[k, n]."""

    name: str
    m: int
    n: int
    k: int
    operand_bytes: int  # bytes per operand element (2 for bf16/fp16)
    out_bytes: int  # bytes per output element (4; 8 for float64)
    accumulate: bool

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    @property
    def bytes(self) -> int:
        """Operands read once, the output written (and read first when accumulating): the least traffic."""
        out = self.m * self.n * self.out_bytes * (2 if self.accumulate else 1)
        return (self.m + self.n) * self.k * self.operand_bytes + out


@dataclass(frozen=True)
class LaunchRecord:
    name: str
    grid: tuple[int, ...]
    tiles: dict
    elements: int  # logits (or ids) the kernel works on
    bytes_read: int
    bytes_written: int


@dataclass
class WorkLog:
    """What the backend did inside ``counting()``."""

    gemms: list[GemmRecord] = field(default_factory=list)
    launches: list[LaunchRecord] = field(default_factory=list)
    sweeps: list[tuple[str, list[int]]] = field(default_factory=list)

    @property
    def gemm_flops(self) -> int:
        return sum(g.flops for g in self.gemms)

    @property
    def elementwise_bytes(self) -> int:
        return sum(r.bytes_read + r.bytes_written for r in self.launches)

    @property
    def working_bytes(self) -> int:
        """The largest sum of the work buffers of one sweep (they are alive together)."""
        return max((sum(sizes) for _, sizes in self.sweeps), default=0)

    def gemm_equivalents(self, n: int, v: int, h: int) -> float:
        """GEMM FLOPs in units of one logits GEMM [n, h] × [h, v]."""
        return self.gemm_flops / (2 * n * v * h) if n * v * h else 0.0


_LOGS: list[WorkLog] = []


@contextlib.contextmanager
def counting():
    """Record every GEMM, launch and work buffer of the cuBLAS backend in the block (nesting allowed)."""
    log = WorkLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


@contextlib.contextmanager
def sweep(name: str):
    """Group the work buffers allocated in the block (one sweep: they are alive together)."""
    for log in _LOGS:
        log.sweeps.append((name, []))
    yield


def account(*tensors: torch.Tensor | None) -> None:
    """Count existing tensors (a sweep's row state, its sparse layout) as work memory of the current sweep."""
    for log in _LOGS:
        if not log.sweeps:
            log.sweeps.append(("", []))
        log.sweeps[-1][1].extend(t.numel() * t.element_size() for t in tensors if t is not None)


def workspace(shape, dtype: torch.dtype, device, fill=None) -> torch.Tensor:
    """A work buffer (uninitialized, or filled with ``fill``), counted in the current sweep."""
    buffer = torch.empty(shape, dtype=dtype, device=device) if fill is None else torch.full(
        shape, fill, dtype=dtype, device=device)
    account(buffer)
    return buffer


def gpu_like(tensor: torch.Tensor) -> bool:
    """CUDA tensors, and meta tensors (counted as the GPU would run them)."""
    return tensor.is_cuda or tensor.is_meta


# ----------------------------------------------------------------------------- GEMMs


_ACCUMULATES_IN_PLACE: dict[torch.device, bool] = {}


def _baddbmm_accumulates(device: torch.device) -> bool:
    """Whether ``torch.baddbmm(c, a, b, out_dtype=torch.float32, out=c)`` adds 16-bit products into a
    float32 ``c`` in place on this device (cuBLAS with beta = 1; ``addmm``'s out_dtype form insists that
    ``c`` be 16-bit). Probed once per device on a tiny problem."""
    if device not in _ACCUMULATES_IN_PLACE:
        try:
            a = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16, device=device)
            b = torch.tensor([[3.0], [4.0]], dtype=torch.bfloat16, device=device)
            c = torch.full((1, 1), 0.5, dtype=torch.float32, device=device)
            torch.baddbmm(c[None], a[None], b[None], out_dtype=torch.float32, out=c[None])
            _ACCUMULATES_IN_PLACE[device] = float(c[0, 0]) == 11.5
        except (RuntimeError, TypeError):
            _ACCUMULATES_IN_PLACE[device] = False
    return _ACCUMULATES_IN_PLACE[device]


# Rows of the float32 partial product that the accumulate fallback adds in at once (bounded memory).
_FALLBACK_BYTES = 64 << 20


def _accumulate_16bit(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if _baddbmm_accumulates(out.device):
        torch.baddbmm(out[None], a[None], b[None], out_dtype=out.dtype, out=out[None])
        return
    step = max(1, _FALLBACK_BYTES // max(1, out.shape[1] * out.element_size()))
    partial = workspace((min(step, out.shape[0]), out.shape[1]), out.dtype, out.device)
    for r0 in range(0, out.shape[0], step):
        r1 = min(out.shape[0], r0 + step)
        torch.mm(a[r0:r1], b, out_dtype=out.dtype, out=partial[: r1 - r0])
        out[r0:r1] += partial[: r1 - r0]


_NARROW = (torch.bfloat16, torch.float16)


def gemm(name: str, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool = False) -> None:
    """out = a @ b (``accumulate``: out += a @ b). ``out`` is float32 (float64 for float64 operands), or the
    16-bit dtype of 16-bit operands without ``accumulate``: the product accumulated in float32 and rounded
    once (cuBLAS's own bf16/fp16 GEMM on CUDA; a float32 product, then rounded, elsewhere)."""
    narrow_out = out.dtype in _NARROW
    if narrow_out and (accumulate or a.dtype != out.dtype or b.dtype != out.dtype):
        raise ValueError(f"a {out.dtype} GEMM output takes {out.dtype} operands and no accumulation, got "
                         f"{a.dtype} @ {b.dtype} (accumulate={accumulate})")
    for log in _LOGS:
        log.gemms.append(GemmRecord(name, a.shape[0], b.shape[1], a.shape[1], a.element_size(), out.element_size(),
                                    accumulate))
    if out.is_meta or out.numel() == 0:
        return
    if a.shape[1] == 0:  # an empty contraction: the product is 0
        if not accumulate:
            out.zero_()
        return
    if narrow_out:
        if out.is_cuda:
            torch.mm(a, b, out=out)
        else:
            out.copy_(torch.mm(a.to(torch.float32), b.to(torch.float32)))
        return
    if out.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        if accumulate:
            _accumulate_16bit(out, a, b)
            return
        try:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        except TypeError as exc:  # torch without mm's out_dtype form
            raise RuntimeError("backend='cublas' needs torch.mm(..., out_dtype=torch.float32) for 16-bit operands "
                               f"on CUDA (this torch {torch.__version__} has none): use backend='triton'") from exc
        return
    if a.dtype != out.dtype:  # no mm with a wider output here: upcast the operands
        a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


# ----------------------------------------------------------------------------- launches


def _is_meta(arg) -> bool:
    return isinstance(arg, torch.Tensor) and arg.is_meta


def launch(name: str, kernel, grid: tuple[int, ...], args: tuple, meta: dict, *, elements: int, bytes_read: int,
           bytes_written: int) -> None:
    """Launch ``kernel[grid](*args, **meta)`` and record it (on meta tensors: record only)."""
    tiles = {key: value for key, value in meta.items() if key.startswith("BLOCK") or key in ("K_PAD", "CAP",
                                                                                            "num_warps")}
    for log in _LOGS:
        log.launches.append(LaunchRecord(name, tuple(grid), tiles, elements, bytes_read, bytes_written))
    if any(_is_meta(arg) for arg in args) or 0 in grid:
        return
    kernel[grid](*args, **meta)


def torch_pass(name: str, elements: int, bytes_moved: int) -> None:
    """Record a pass over a block that torch ops make (a bias gradient's column sums, the wide top-K's
    ranking): counted with the launches, all its bytes as read."""
    for log in _LOGS:
        log.launches.append(LaunchRecord(name, (), {}, elements, bytes_moved, 0))


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()
