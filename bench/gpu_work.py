"""What the counter records: one ``Work`` per kernel launch (or host sync), the raw Triton launches,
and the ``Trace`` of a call; and the work of one aten op, from its operands (``aten_work``).

An aten op's work: GEMM FLOPs of ``mm``/``addmm``/``bmm``/``baddbmm``/``mv`` in all their forms (``out=``,
in place, ``out_dtype=``) at their operands' precision; bytes read and written from the operands'
sizes (a gather reads only what it gathers, a scatter writes only what it scatters; an ``out=``
argument is written, not read; an in-place op reads what it overwrites); one launch, except views,
allocations and host-side ops, which launch nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Work:
    """One kernel launch (or one host synchronization) and what it costs, device-independently.

    kind: "gemm" (cuBLAS), "fused" (a Triton kernel with tensor-core dots), "stream" (a memory-bound
    kernel: elementwise, reduction, copy, fill, gather, sort), "sync" (a host read-back).
    """

    name: str
    kind: str
    phase: str
    gemm_flops: float = 0.0  # tensor-core (or cuBLAS) multiply-add FLOPs, 2 per MAC
    gemm_dtype: str = ""  # operand precision of those FLOPs: bf16, fp16, tf32, fp32, fp64
    gemm_tile_waves: float = 1.0  # fraction of the last wave's SMs that work (cuBLAS tiles / Triton programs)
    hbm_read: float = 0.0
    hbm_write: float = 0.0
    l2_bytes: float = 0.0  # SM ↔ L2 traffic of a fused kernel's tile loads (its HBM part is in hbm_*)
    atomics: float = 0.0  # atomic element updates
    atomic_bytes: float = 0.0
    alu_ops: float = 0.0  # non-tensor-core instructions of a fused kernel's per-logit work (int32/fp32)
    sfu_ops: float = 0.0  # transcendental (exp, log) evaluations
    programs: int = 0  # Triton grid size
    detail: str = ""

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_read + self.hbm_write


@dataclass
class TensorArg:
    """A tensor argument of a Triton launch: what the kernel can address."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype
    storage: int  # identity of the storage (arguments that alias share it)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def distinct_bytes(self) -> int:
        return distinct_elements(self.shape, self.stride) * self.itemsize


@dataclass
class TritonLaunch:
    kernel: str
    grid: tuple
    args: dict  # name -> TensorArg | scalar (constexprs and launch options included)
    jit: object  # the JITFunction / InterpretedFunction (its source, for the access analysis)
    phase: str

    def tensor(self, name) -> TensorArg:
        return self.args[name]


@dataclass
class Trace:
    """What one counted call did: the works in launch order and its memory."""

    works: list = field(default_factory=list)  # Work | TritonLaunch
    phase: str = "forward"
    live_bytes: int = 0
    baseline_bytes: int = 0
    peak_bytes: int = 0
    syncs: int = 0
    peak_allocations: list = field(default_factory=list)  # live allocations ≥ 64 MiB at the peak: (bytes,
    # description, shape, dtype, op that made them), largest first
    storages: dict = field(default_factory=dict)  # live storage -> (bytes, what made it); the mode's
    input_storages: frozenset = frozenset()

    def mark_baseline(self):
        """From here on, the peak is measured beyond what is live now (the inputs)."""
        self.baseline_bytes = self.peak_bytes = self.live_bytes
        self.input_storages = frozenset(self.storages)

    @property
    def peak_extra_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    def launches(self) -> list:
        return [w for w in self.works if not (isinstance(w, Work) and w.kind == "sync")]


def distinct_elements(shape, stride) -> int:
    """Elements a view addresses (broadcast dimensions, stride 0, count once)."""
    if any(s == 0 for s in shape):
        return 0
    return math.prod(s for s, st in zip(shape, stride) if st != 0)


def view_bytes(t: torch.Tensor) -> int:
    return distinct_elements(t.shape, t.stride()) * t.element_size()


GEMM_OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "addbmm_", "mv", "addmv", "addmv_",
          "_addmm_activation"}
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
# ops that launch nothing (aliases and metadata)
FREE_OPS = {"detach", "alias", "lift_fresh", "lift", "_unsafe_view", "unsafe_split", "set_", "resize_",
            "_reshape_alias", "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride",
            "sym_numel", "record_stream", "_conj", "_neg_view", "conj", "resolve_conj", "resolve_neg"}
# ops whose output overwrites its first argument without reading it
_WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "index_put_", "index_copy_",
               "index_fill_", "scatter_", "masked_scatter_", "put_", "masked_fill_"}
# ops that read only the elements they gather from their first argument
_GATHERS = {"index", "index_select", "gather", "embedding", "take", "take_along_dim"}
# ops that write only the elements they scatter into their first argument
_SCATTERS = {"index_put_", "index_add_", "index_copy_", "scatter_", "scatter_add_", "scatter_reduce_",
             "index_fill_", "masked_scatter_", "put_", "index_reduce_"}


def _gemm_dtype(dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(dtype, str(dtype))


def _gemm_flops(name, args):
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in ("mm",):
        a, b = tensors[:2]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1], a, f"{tuple(a.shape)}@{tuple(b.shape)}"
    if name in ("addmm", "addmm_", "_addmm_activation"):
        a, b = tensors[1:3]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1], a, f"{tuple(a.shape)}@{tuple(b.shape)}"
    if name == "bmm":
        a, b = tensors[:2]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], a, f"{tuple(a.shape)}@{tuple(b.shape)}"
    if name in ("baddbmm", "baddbmm_", "addbmm", "addbmm_"):
        a, b = tensors[1:3]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], a, f"{tuple(a.shape)}@{tuple(b.shape)}"
    if name == "mv":
        a = tensors[0]
        return 2 * a.shape[0] * a.shape[1], a, f"{tuple(a.shape)}@vec"
    a = tensors[1]  # addmv
    return 2 * a.shape[0] * a.shape[1], a, f"{tuple(a.shape)}@vec"


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


_SCHEMAS: dict = {}


def _schema(func):
    """(name, writes, kwarg_only) of each argument of ``func``, cached (parsing the schema per op is slow)."""
    found = _SCHEMAS.get(func)
    if found is None:
        found = tuple((a.name, a.alias_info is not None and a.alias_info.is_write, a.kwarg_only)
                      for a in func._schema.arguments)
        _SCHEMAS[func] = found
    return found


def tensors_of(value):
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(t for item in value for t in tensors_of(item))
    return ()


def aten_work(func, args, kwargs, out, phase) -> Work | None:
    """The work of one aten op on the modelled device (None: launches nothing)."""
    name = func.overloadpacket.__name__
    if func.is_view or name in FREE_OPS or name in _ALLOCATIONS:
        return None
    written, read = [], []
    for index, (arg_name, writes, kwarg_only) in enumerate(_schema(func)):
        value = kwargs.get(arg_name, args[index] if index < len(args) else None)
        for t in tensors_of(value):
            if writes:
                written.append(t)
                if not kwarg_only and name not in _WRITE_ONLY and name not in _SCATTERS:
                    read.append(t)
            else:
                read.append(t)
    if not written:
        written = list(tensors_of(out))
    tensors = read + written
    if not any(_on_device(t) for t in tensors):
        return None  # host-side work (CPU scalars)
    if name in GEMM_OPS:
        flops, operand, detail = _gemm_flops(name, args)
        return Work(f"aten.{name}", "gemm", phase, gemm_flops=flops, gemm_dtype=_gemm_dtype(operand.dtype),
                    hbm_read=sum(view_bytes(t) for t in read), hbm_write=sum(view_bytes(t) for t in written),
                    detail=detail)
    if name in _GATHERS:
        # the source is read only where gathered: as many elements as the output holds
        source, rest = read[0], read[1:]
        gathered = sum(view_bytes(t) for t in written) // max(1, written[0].element_size()) * source.element_size()
        reads = gathered + sum(view_bytes(t) for t in rest)
    elif name in _SCATTERS:
        values = read  # indices and values; the destination is touched where scattered
        reads = sum(view_bytes(t) for t in values)
        written_bytes = sum(view_bytes(t) for t in values if t.dtype == written[0].dtype) or view_bytes(written[0])
        return Work(f"aten.{name}", "stream", phase, hbm_read=reads, hbm_write=written_bytes,
                    detail=str(tuple(written[0].shape)))
    else:
        reads = sum(view_bytes(t) for t in read if _on_device(t) or name == "_to_copy")
    detail = str(tuple(written[0].shape)) if written else ""
    return Work(f"aten.{name}", "stream", phase, hbm_read=reads, hbm_write=sum(view_bytes(t) for t in written),
                detail=detail)
