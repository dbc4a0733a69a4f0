"""Counting the GPU work of a call on a machine without a GPU.

The call runs for real — the library's own Python, its autograd Functions, its launchers — on tensors
that have shapes and dtypes but no data (``meta`` tensors that report ``device="cuda"``, so every
device check of the code takes its CUDA branch). Nothing is computed and nothing of size N·V is
allocated, so the target shapes (N=8192, H=4096, V=151936) count in seconds. What is recorded:

- every aten op (a ``TorchDispatchMode``): GEMM FLOPs of ``mm``/``addmm``/``bmm``/``baddbmm`` in all
  their forms (``out=``, in place, ``out_dtype=``: ``FlopCounterMode`` misses the out and in-place
  ones), the bytes each op reads and writes (from its operands' sizes), and one launch per op that
  would launch a kernel (views, allocations and host-side scalars launch nothing);
- every Triton launch (``JITFunction.run`` is replaced while counting): kernel, grid, tensor
  arguments, constexprs — turned into work by ``gpu_kernels``;
- host synchronizations (``.item()``, ``bool(tensor)``, ops whose output size depends on data), and
  the live bytes the call allocates (the peak beyond its inputs).

Without data, a branch on a tensor's value cannot be evaluated: every scalar the code reads back is
answered by a stated rule for the *modelled data* (every row live, every target and id in range, no
tie at the k-th place, every boolean mask all True; ``SCALAR_RULES``). A read-back at a site no rule
names raises ``UnmodelledScalar``, so a changed branch in the library shows up instead of being
guessed.
"""

from __future__ import annotations

import contextlib
import linecache
import math
import os
import sys
import types
import weakref
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

META = torch.device("meta")
LARGE_ALLOCATION = 64 << 20  # allocations at least this large are named (with their Python site) at the peak
CUDA = torch.device("cuda", 0)
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


# ----------------------------------------------------------------------------- records


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
    peak_allocations: list = field(default_factory=list)  # the largest live allocations at the peak
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


# ----------------------------------------------------------------------------- tensors that say "cuda"


class ModelTensor(torch.Tensor):
    """A meta tensor that reports a CUDA device to Python code (``.device``, ``.is_cuda``).

    Below Python (dispatch, autograd) it stays a meta tensor, so autograd runs without a CUDA
    runtime. ``data_ptr`` gives distinct addresses per storage, as a real allocation would, so that
    code comparing pointers (a shared output layer) sees distinct tensors as distinct.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self):
        return CUDA

    @property
    def is_cuda(self):
        return True

    @property
    def is_cpu(self):
        return False

    def get_device(self):
        return 0

    def data_ptr(self):
        return self.untyped_storage()._cdata + self.storage_offset() * self.element_size()


def _wrap(t):
    if isinstance(t, torch.Tensor) and not isinstance(t, ModelTensor) and t.device.type == "meta":
        return t.as_subclass(ModelTensor)
    return t


def _to_meta(value):
    if isinstance(value, torch.device) and value.type == "cuda":
        return META
    if isinstance(value, str) and value.startswith("cuda"):
        return META
    return value


# ----------------------------------------------------------------------------- host read-backs


class UnmodelledScalar(RuntimeError):
    """A value read back to the host at a site with no rule: the modelled branch is unknown."""


@dataclass(frozen=True)
class ScalarRule:
    """The value a read-back at a site takes under the modelled data.

    function: the name of the Python function reading it back; fragment: a piece of its source line;
    value: the answer, or a callable (frame locals, tensor) → answer.
    """

    function: str
    fragment: str
    value: object
    why: str


def _local(name):
    return lambda frame_locals, _tensor: frame_locals[name]


SCALAR_RULES = (
    ScalarRule("live_index", "live.all()", True, "every row is live (no ignored target, no masked row)"),
    ScalarRule("weighted_loss", "live.sum()", lambda _f, t: t.numel(), "every row is live"),
    ScalarRule("check_targets", ".any()", False, "every target lies in [0, V)"),
    ScalarRule("check_sparse_teacher", ".any()", False, "teacher ids lie in [0, V) and do not repeat"),
    ScalarRule("topk_ids", "ambiguous.any()", False, "no tie straddles the k-th place"),
    ScalarRule("_add_sparse", "inside.any()", True, "every block holds some sparse term"),
    ScalarRule("pad_sparse", "ids.max()", lambda f, _t: f["vocab"] - 1, "ids span the vocabulary"),
    ScalarRule("pad_sparse", "ids.min()", 0, "ids span the vocabulary"),
    ScalarRule("pad_sparse", "counts.max()", lambda f, _t: f["rows"].numel() // max(1, f["n"]),
               "every row has all its sparse terms (distinct support ids: |S| = 2K for the union)"),
    ScalarRule("head_backward", "row_index.min()", 0, "sparse rows are rows of the call"),
    ScalarRule("head_backward", "row_index.max()", lambda f, _t: f["n"] - 1, "sparse rows are rows of the call"),
    ScalarRule("backward", "grad == 1", True, "the loss is the last node (incoming gradient 1)"),
    # peers
    ScalarRule("fused_linear_jsd_backward", "torch.equal", True, "the loss is the last node (gradient 1)"),
    ScalarRule("fused_linear_cross_entropy_backward", "torch.equal", True, "the loss is the last node"),
    ScalarRule("fused_linear_cross_entropy_forward", ".item()", lambda _f, t: _all_rows(t), "no ignored target"),
    ScalarRule("fused_linear_cross_entropy_forward", "torch.all", True, "no ignored target"),
    ScalarRule("backward", "grad_output != 1.0", False, "the loss is the last node (gradient 1)"),
)


def _all_rows(tensor):
    return tensor.numel() if tensor.dtype != torch.bool else True


def _calling_site():
    """(function name, source line, frame locals) of the innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_TORCH_DIR) and filename != _THIS_FILE:
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            return frame.f_code.co_name, line, frame.f_locals, f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "?", "", {}, "?"


def modelled_scalar(tensor):
    function, line, frame_locals, where = _calling_site()
    for rule in SCALAR_RULES:
        if rule.function == function and rule.fragment in line:
            value = rule.value(frame_locals, tensor) if callable(rule.value) else rule.value
            return value
    raise UnmodelledScalar(
        f"a value is read back to the host in {function}() at {where} ({line!r}) and no rule of "
        "bench/gpu_count.SCALAR_RULES says what it is under the modelled data: add one")


# ----------------------------------------------------------------------------- aten ops → work

_GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "addbmm_", "mv", "addmv", "addmv_",
          "_addmm_activation"}
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
_FREE = {"detach", "alias", "lift_fresh", "lift", "_unsafe_view", "unsafe_split", "set_", "resize_", "_reshape_alias",
         "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel",
         "record_stream", "_conj", "_neg_view", "conj", "resolve_conj", "resolve_neg"}
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


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(t for item in value for t in _tensors(item))
    return ()


def aten_work(func, args, kwargs, out, phase) -> Work | None:
    """The work of one aten op on the modelled device (None: launches nothing)."""
    name = func.overloadpacket.__name__
    if func.is_view or name in _FREE or name in _ALLOCATIONS:
        return None
    written, read = [], []
    for index, (arg_name, writes, kwarg_only) in enumerate(_schema(func)):
        value = kwargs.get(arg_name, args[index] if index < len(args) else None)
        for t in _tensors(value):
            if writes:
                written.append(t)
                if not kwarg_only and name not in _WRITE_ONLY and name not in _SCATTERS:
                    read.append(t)
            else:
                read.append(t)
    if not written:
        written = list(_tensors(out))
    tensors = read + written
    if not any(_on_device(t) for t in tensors):
        return None  # host-side work (CPU scalars)
    if name in _GEMMS:
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


# ----------------------------------------------------------------------------- the dispatch mode


def _map(fn, value):
    """``fn`` on every tensor of a (nested) tuple/list, the rest kept: pytree's tree_map, for the op
    arguments only (a tenth of its cost per op)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map(fn, item) for item in value)
    if isinstance(value, list):
        return [_map(fn, item) for item in value]
    return value


class _Uncacheable(Exception):
    pass


_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _describe(value):
    """A hashable key of an op argument: tensors by shape, stride, dtype and offset (their data is none)."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.storage_offset())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_describe(v) for v in value))
    if isinstance(value, _SCALARS):
        return value
    raise _Uncacheable


def _template(out, inputs):
    """How to rebuild ``out`` without the meta kernel: a written input by position, or a fresh tensor."""
    if isinstance(out, torch.Tensor):
        for index, t in enumerate(inputs):
            if t is out:
                return ("arg", index)
        if out.storage_offset() != 0:
            raise _Uncacheable
        return ("new", tuple(out.shape), out.stride(), out.dtype)
    if isinstance(out, (list, tuple)):
        return (type(out).__name__, tuple(_template(o, inputs) for o in out))
    if isinstance(out, _SCALARS):
        return ("value", out)
    raise _Uncacheable


def _rebuild(template, inputs):
    kind = template[0]
    if kind == "arg":
        return inputs[template[1]]
    if kind == "new":
        return torch.empty_strided(template[1], template[2], dtype=template[3], device=META)
    if kind == "value":
        return template[1]
    items = [_rebuild(t, inputs) for t in template[1]]
    return tuple(items) if kind == "tuple" else items


def _all_true_indices(mask: torch.Tensor) -> list:
    """Integer indices standing for a boolean mask under the all-True assumption."""
    return [torch.empty(mask.numel(), dtype=torch.int64, device=META) for _ in range(mask.dim())]


_FILLS = {"zeros": 0, "zeros_like": 0, "new_zeros": 0, "zero_": 0, "ones": 1, "ones_like": 1, "new_ones": 1}
_FILL_VALUE = {"full", "full_like", "new_full", "fill_", "scalar_tensor"}
_REDUCTIONS = {"any": lambda c, n: bool(c), "all": lambda c, n: bool(c), "sum": lambda c, n: c * n,
               "amax": lambda c, n: c, "amin": lambda c, n: c, "max": lambda c, n: c, "min": lambda c, n: c}


class CountingMode(TorchDispatchMode):
    """Records the work of every aten op into a ``Trace``, on meta tensors that say "cuda".

    Tensors filled with a constant (``zeros_like``, ``full``...) carry their value (per storage,
    forgotten when anything else writes there), so that a branch on a known-constant mask follows
    the code; every other read-back goes to ``SCALAR_RULES``.
    """

    def __init__(self, trace: Trace):
        super().__init__()
        self.trace = trace
        self.storages = trace.storages
        self.constants: dict[int, object] = {}
        self.meta_results: dict = {}  # (op, argument key) -> output template: the meta kernels are slow

    def _run(self, func, name, args, kwargs):
        """``func`` on meta tensors, from a cached output template when this op has run on alike arguments."""
        if func.is_view or name in _FREE:
            return func(*args, **kwargs)
        try:
            key = (func, _describe(args), _describe(tuple(sorted(kwargs.items()))))
        except _Uncacheable:
            return func(*args, **kwargs)
        inputs = [t for t in _tensors(args) + _tensors(tuple(kwargs.values()))]
        template = self.meta_results.get(key)
        if template is not None:
            return _rebuild(template, inputs)
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        if len({t.untyped_storage()._cdata for t in outputs}) == len(outputs):
            try:
                self.meta_results[key] = _template(out, inputs)
            except _Uncacheable:
                pass
        return out

    def _constant(self, t):
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            return self.constants.get(t.untyped_storage()._cdata)
        return None

    def _scalar(self, t):
        known = self._constant(t)
        if known is not None:
            return bool(known) if t.dtype == torch.bool else known
        return modelled_scalar(t)

    def _note_constants(self, name, args, kwargs, out, work):
        """Forget the value of every storage this op wrote; remember it for fills and reductions of constants."""
        if work is not None:
            for t in _tensors(out):
                if t.device.type == "meta":
                    self.constants.pop(t.untyped_storage()._cdata, None)
        value = None
        if name in _FILLS:
            value = _FILLS[name]
        elif name in _FILL_VALUE:
            candidates = [a for a in list(args[1:]) + [kwargs.get("fill_value"), kwargs.get("value")]
                          if isinstance(a, (bool, int, float))]
            value = candidates[0] if candidates else None
        elif name in _REDUCTIONS and len(args) == 1 and self._constant(args[0]) is not None:
            value = _REDUCTIONS[name](self._constant(args[0]), args[0].numel())
        if value is not None and isinstance(out, torch.Tensor) and out.device.type == "meta":
            self.constants[out.untyped_storage()._cdata] = value

    # memory: each new storage is live until its last tensor goes
    def _track(self, t, op_name):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.storages:
            return
        nbytes = storage.nbytes()
        where = f"{op_name} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        if nbytes >= LARGE_ALLOCATION:
            function, _line, _locals, site = _calling_site()
            where += f" in {function}() ({os.path.basename(site)})"
        self.storages[key] = (nbytes, where)
        self.trace.live_bytes += nbytes
        if self.trace.live_bytes > self.trace.peak_bytes:
            self.trace.peak_bytes = self.trace.live_bytes
            if nbytes >= LARGE_ALLOCATION:  # the peak's large allocations (small ones do not explain it)
                large = sorted((v for k, v in self.storages.items()
                                if v[0] >= LARGE_ALLOCATION and k not in self.trace.input_storages), reverse=True)
                self.trace.peak_allocations = large[:4]
        weakref.finalize(storage, self._release, key)

    def _release(self, key):
        self.trace.live_bytes -= self.storages.pop(key, (0, ""))[0]

    def _sync(self, what):
        self.trace.syncs += 1
        self.trace.works.append(Work(what, "sync", self.trace.phase))

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = {k: _to_meta(v) for k, v in (kwargs or {}).items()}
        name = func.overloadpacket.__name__
        originals = {}

        def unwrap(t):
            if isinstance(t, ModelTensor):
                plain = t.as_subclass(torch.Tensor)
                originals[id(plain)] = (plain, t)
                return plain
            return t

        args, kwargs = _map(unwrap, args), {k: _map(unwrap, v) for k, v in kwargs.items()}
        if name == "_local_scalar_dense":
            self._sync("item")
            return self._scalar(args[0])
        if name in ("equal", "is_nonzero"):
            self._sync(name)
            return self._scalar(args[0])
        if name == "nonzero":
            self._sync("nonzero")
            mask = args[0]
            known = self._constant(mask)
            count = mask.numel() if known is None or bool(known) else 0
            out = torch.empty((count, mask.dim()), dtype=torch.int64, device=META)
        elif name == "masked_select":
            self._sync("masked_select")
            source, mask = args[0], args[1]
            out = torch.empty(torch.broadcast_shapes(source.shape, mask.shape).numel(), dtype=source.dtype,
                              device=META)
        elif name == "bincount":
            self._sync("bincount")
            minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
            if not minlength:
                raise UnmodelledScalar("bincount without minlength: its output size depends on the data")
            out = torch.empty(minlength, dtype=torch.int64, device=META)
        else:
            if name in ("index", "index_put", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                self._sync(f"{name} (boolean mask)")
                indices = []
                for i in args[1]:
                    is_mask = isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    indices.extend(_all_true_indices(i) if is_mask else [i])
                args = (args[0], indices, *args[2:])
            out = self._run(func, name, args, kwargs)
        work = aten_work(func, args, kwargs, out, self.trace.phase)
        if work is not None:
            self.trace.works.append(work)
        self._note_constants(name, args, kwargs, out, work)

        def rewrap(t):
            if isinstance(t, torch.Tensor):
                known = originals.get(id(t))
                if known is not None and known[0] is t:
                    return known[1]
                if t.device.type == "meta":
                    self._track(t, name)
                return _wrap(t)
            return t

        return _map(rewrap, out)


# ----------------------------------------------------------------------------- Triton launches


def _launch_arg(value):
    if isinstance(value, torch.Tensor):
        return TensorArg(tuple(value.shape), tuple(value.stride()), value.dtype, value.untyped_storage()._cdata)
    return value


def _recording_run(trace: Trace):
    def run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))
        grid = grid + (1,) * (3 - len(grid))
        trace.works.append(TritonLaunch(self.fn.__name__, grid, {k: _launch_arg(v) for k, v in bound.items()},
                                        self, trace.phase))
        return None

    return run


def _first_config_run(self, *args, **kwargs):
    """An autotuned kernel runs its first config (benchmarking needs a device)."""
    config = self.configs[0]
    kwargs.update(config.all_kwargs())
    return self.fn.run(*args, **kwargs)


# ----------------------------------------------------------------------------- the stand-in device


@dataclass(frozen=True)
class StandIn:
    """The CUDA device the code sees while counting (its launch plans read the SM count)."""

    name: str = "NVIDIA H100 80GB HBM3"
    multi_processor_count: int = 132
    capability: tuple = (9, 0)
    total_memory: int = 80 << 30
    l2_cache_size: int = 50 << 20


def _device_properties(stand_in: StandIn):
    return types.SimpleNamespace(name=stand_in.name, multi_processor_count=stand_in.multi_processor_count,
                                 major=stand_in.capability[0], minor=stand_in.capability[1],
                                 total_memory=stand_in.total_memory, L2_cache_size=stand_in.l2_cache_size,
                                 warp_size=32)


@contextlib.contextmanager
def counting(stand_in: StandIn = StandIn()):
    """Count everything run inside the block; yields the ``Trace``. Make inputs with ``cuda_tensor``."""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    trace = Trace()
    original_tensor = torch.tensor

    def tensor(data, *args, device=None, **kwargs):  # torch.tensor bypasses dispatch modes for its device
        made = original_tensor(data, *args, **kwargs)
        return made if device is None else made.to(device)

    properties = _device_properties(stand_in)
    patches = [
        mock.patch("torch.cuda._lazy_init", lambda: None),
        mock.patch("torch.cuda.is_available", lambda: True),
        mock.patch("torch.cuda.device_count", lambda: 1),
        mock.patch("torch.cuda.current_device", lambda: 0),
        mock.patch("torch.cuda.get_device_capability", lambda device=None: stand_in.capability),
        mock.patch("torch.cuda.get_device_properties", lambda device=None: properties),
        mock.patch("torch.cuda.get_device_name", lambda device=None: stand_in.name),
        mock.patch("torch.cuda.synchronize", lambda device=None: None),
        mock.patch("torch.tensor", tensor),
        mock.patch.object(jit.JITFunction, "run", _recording_run(trace)),
        mock.patch.object(interpreter.InterpretedFunction, "run", _recording_run(trace)),
        mock.patch.object(autotuner.Autotuner, "run", _first_config_run),
        mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(CountingMode(trace))
        yield trace


def cuda_tensor(shape, dtype, *, requires_grad=False) -> torch.Tensor:
    """An input of the counted call (inside ``counting``): a meta tensor that says "cuda"."""
    made = torch.empty(shape, dtype=dtype, device="cuda")
    return made.requires_grad_(requires_grad) if requires_grad else made
