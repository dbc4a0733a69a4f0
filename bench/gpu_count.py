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
import importlib
import operator
import os
import pkgutil
import types
import weakref
from dataclasses import dataclass
from unittest import mock

import torch
from gpu_scalars import SCALAR_RULES, UnmodelledScalar, calling_site, modelled_scalar
from gpu_work import FREE_OPS, GEMM_OPS, TensorArg, Trace, TritonLaunch, Work, aten_work, tensors_of
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SCALAR_RULES", "CountingMode", "StandIn", "TensorArg", "Trace", "TritonLaunch", "UnmodelledScalar",
           "Work", "counting", "cuda_tensor"]

META = torch.device("meta")
LARGE_ALLOCATION = 64 << 20  # allocations at least this large are named (with their Python site) at the peak
CUDA = torch.device("cuda", 0)


# ----------------------------------------------------------------------------- tensors that say "cuda"


class ModelTensor(torch.Tensor):
    """A meta tensor that reports a CUDA device to Python code (``.device``, ``.is_cuda``, not ``.is_meta``).

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

    @property
    def is_meta(self):  # code that skips its kernels on meta tensors must run them here, to be counted
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
_COMPARISONS = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
                "ge": operator.ge}


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
        if func.is_view or name in FREE_OPS:
            return func(*args, **kwargs)
        if name in GEMM_OPS and isinstance(kwargs.get("out"), torch.Tensor):
            return kwargs["out"]  # a GEMM into out= returns out (torch's meta baddbmm with out_dtype= fails)
        try:
            key = (func, _describe(args), _describe(tuple(sorted(kwargs.items()))))
        except _Uncacheable:
            return func(*args, **kwargs)
        inputs = [t for t in tensors_of(args) + tensors_of(tuple(kwargs.values()))]
        template = self.meta_results.get(key)
        if template is not None:
            return _rebuild(template, inputs)
        out = func(*args, **kwargs)
        outputs = tensors_of(out)
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
            for t in tensors_of(out):
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
        elif name in ("_to_copy", "clone", "lift_fresh_copy") and isinstance(args[0], torch.Tensor):
            source = args[0]
            if source.device.type == "cpu" and source.numel():  # a host value moved to the device
                flat = source.reshape(-1)
                value = flat[0].item() if bool((flat == flat[0]).all()) else None
            else:
                value = self._constant(source)
        elif name in _COMPARISONS and len(args) == 2 and self._constant(args[0]) is not None:
            other = self._constant(args[1]) if isinstance(args[1], torch.Tensor) else args[1]
            if isinstance(other, (bool, int, float)):
                value = _COMPARISONS[name](self._constant(args[0]), other)
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
            function, _line, _locals, site = calling_site()
            where += f" in {function}() ({os.path.basename(site)})"
        self.storages[key] = (nbytes, where, tuple(t.shape), t.dtype, op_name)
        self.trace.live_bytes += nbytes
        if self.trace.live_bytes > self.trace.peak_bytes:
            self.trace.peak_bytes = self.trace.live_bytes
            if nbytes >= LARGE_ALLOCATION:  # the peak's large allocations (small ones do not explain it)
                large = sorted((v for k, v in self.storages.items()
                                if v[0] >= LARGE_ALLOCATION and k not in self.trace.input_storages),
                               key=lambda v: -v[0])
                self.trace.peak_allocations = large
        weakref.finalize(storage, self._release, key)

    def _release(self, key):
        self.trace.live_bytes -= self.storages.pop(key, (0,))[0]

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
        if name == "equal":
            self._sync(name)
            left, right = self._constant(args[0]), self._constant(args[1])
            return left == right if None not in (left, right) else modelled_scalar(args[0])
        if name == "is_nonzero":
            self._sync(name)
            return self._scalar(args[0])
        if name == "_to_copy" and args[0].device.type == "meta" and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cpu":  # a copy to the host: ``tolist``, ``cpu``
            self._sync("copy to host")
            values = modelled_scalar(args[0])
            return torch.tensor(values, dtype=kwargs.get("dtype") or args[0].dtype).reshape(args[0].shape)
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


# Modules whose @triton.jit kernels a counted call may run. A kernel is decorated once, for the
# interpreter or for the compiler, by the TRITON_INTERPRET of the moment its module is first imported:
# they are imported before ``counting`` sets it to 0, so that a process running under the interpreter
# (the test suite) keeps interpreter kernels after a count.
KERNEL_PACKAGES = ("ptd_kernels.backends", "liger_kernel.ops", "trl.kernels")


def _import_kernel_modules() -> None:
    for package_name in KERNEL_PACKAGES:
        try:
            package = importlib.import_module(package_name)
        except ImportError:  # a peer that is not installed is not counted either
            continue
        for module in pkgutil.walk_packages(package.__path__, package_name + "."):
            try:
                importlib.import_module(module.name)
            except Exception:  # a peer module that cannot load here is not counted either
                continue


@contextlib.contextmanager
def counting(stand_in: StandIn = StandIn()):
    """Count everything run inside the block; yields the ``Trace``. Make inputs with ``cuda_tensor``."""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit
    from triton.runtime import driver

    from ptd_kernels.backends.triton import launch_plan

    _import_kernel_modules()
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
        # ptd's Triton launchers read the SM count from Triton's active driver (_launch.device_properties)
        mock.patch.object(driver, "_active", launch_plan.StandInDriver(launch_plan.GPU(
            stand_in.name, 10 * stand_in.capability[0] + stand_in.capability[1], stand_in.multi_processor_count,
            232_448))),
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
