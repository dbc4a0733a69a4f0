"""The registry of backends: which implementations of ``Backend`` exist, where each runs, and how ``auto``
chooses.

An entry holds a name, the device types whose tensors the backend takes (``"cpu"``, ``"cuda"``), the
device types it takes only under Triton's interpreter (``TRITON_INTERPRET=1``), whether ``auto`` may
choose it, and a factory. The factory runs on the first call that selects the backend, so that
importing ptd_kernels never imports or compiles code it does not run. A new backend plugs in with one
call::

    register_backend("cublas", "ptd_kernels.backends.cublas:CublasBackend", devices=("cuda",))

``backend="auto"`` looks at what runs on the devices of the call's tensors and whose requirements import.
An entry's ``auto`` is ``True`` (a default choice), ``False`` (only when named), or a per-call rule: a
function of the call's ``CallShape`` (device type, rows, vocabulary and hidden sizes, whether it forms
gradients, the function; read from the tensors' shapes and flags, no device value). Auto takes the first
entry, in registration order, whose rule accepts the call; else the first default choice. Today:
``cublas`` by ``cublas_takes`` on CUDA (PROVISIONAL, from the GPU work model: every call that forms
gradients, and every forward-only call of more than ``TRITON_MAX_ROWS`` rows), Triton for the other CUDA
calls (and on the CPU under the interpreter), else the chunked PyTorch path.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .base import Backend
from .triton._launch import interpreting  # the launch facts only: imports no Triton

__all__ = ["BackendEntry", "CallShape", "register_backend", "registered_backends", "backend_names", "backends_for",
           "get_backend", "select_backend", "cublas_takes", "interpreting"]


@functools.cache
def _importable(*modules: str) -> bool:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # a dependency may fail to load in any way on an odd platform
            return False
    return True


@dataclass(frozen=True)
class CallShape:
    """What a per-call ``auto`` rule reads of a call: the device type of its tensors, its rows (N), vocabulary
    rows (V, a vocabulary-parallel rank's slice) and hidden size (H) where its first two tensors are hidden
    [N, H] and weight [V, H] (None otherwise), whether it forms gradients (grad mode on and a tensor that
    requires grad; ``linear_topk`` never does), and the public function (None when not known). Read from
    shapes and flags only: choosing reads no device value."""

    device_type: str
    rows: int | None = None
    vocab: int | None = None
    hidden_size: int | None = None
    needs_grad: bool = False
    function: str | None = None

    @classmethod
    def of(cls, device_type: str, tensors, function: str | None = None) -> CallShape:
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)] if tensors else []
        rows = vocab = hidden_size = None
        if len(tensors) >= 2 and tensors[0].dim() == 2 and tensors[1].dim() == 2 and (
                tensors[0].shape[1] == tensors[1].shape[1]):
            (rows, hidden_size), vocab = tensors[0].shape, tensors[1].shape[0]
        needs_grad = (function != "linear_topk" and torch.is_grad_enabled()
                      and any(t.requires_grad for t in tensors))
        return cls(device_type, rows, vocab, hidden_size, needs_grad, function)


#: Forward-only CUDA calls of at most this many rows go to Triton under ``auto`` (``cublas_takes``).
TRITON_MAX_ROWS = 32
#: Functions whose forward-only calls the model puts on cuBLAS at every row count.
_CUBLAS_AT_ANY_ROWS = frozenset({"linear_jsd", "linear_jsd_loss"})


@functools.cache
def _cublas_can_run() -> bool:
    """Whether the installed torch and Triton have what the cuBLAS backend uses: ``torch.mm``'s out_dtype
    form (16-bit operands into a float32 output) and ``tl.topk`` (its statistics kernel's top-K)."""
    try:
        import triton.language as tl
    except Exception:  # noqa: BLE001 - a Triton that fails to import in any way
        return False
    return hasattr(torch.ops.aten.mm, "dtype") and hasattr(tl, "topk")


def cublas_takes(call: CallShape) -> bool:
    """``auto``'s rule for the cuBLAS backend — PROVISIONAL: derived from the GPU work model
    (docs/gpu_model.md, "backend='auto' on CUDA"), not from a measurement, until a lent GPU times both paths
    (``bench/gpu_check.sh``).

    On the model (H100, V ∈ {32000, 151936}, H ∈ {2048, 4096}) cuBLAS is ahead on every call that forms
    gradients, at any row count (its d weight is one bf16 GEMM per slice; the fused Triton kernels fill and
    cast a float32 V×H buffer), and on forward-only calls from 64 rows up; a forward-only call of at most
    32 rows (decode-like: the weight read once, a few launches) is up to 1.6× faster as one fused Triton
    kernel, except the full JSD, where cuBLAS stays ahead. Unknown rows count as many."""
    if call.device_type != "cuda" or not _cublas_can_run():
        return False
    if call.needs_grad or call.rows is None or call.function in _CUBLAS_AT_ANY_ROWS:
        return True
    return call.rows > TRITON_MAX_ROWS


@dataclass(frozen=True)
class BackendEntry:
    """One registered backend (see the module docstring)."""

    name: str
    factory: Callable[[], Backend] | str  # a callable, or "module:attribute" of a Backend class
    native_devices: frozenset[str]
    interpreted_devices: frozenset[str] = frozenset()
    auto: bool | Callable[[CallShape], bool] = True  # a default choice, never, or a per-call rule
    requires: tuple[str, ...] = ()  # modules that must import for the backend to run
    _instance: list = field(default_factory=list, compare=False, repr=False)

    @property
    def devices(self) -> frozenset[str]:
        """The device types this backend runs on in this process (the interpreter's included when it is on)."""
        return self.native_devices | (self.interpreted_devices if interpreting() else frozenset())

    def available(self) -> bool:
        """Whether its requirements import (checked once per process)."""
        return _importable(*self.requires)

    def runs_on(self, device_type: str) -> bool:
        return device_type in self.devices and self.available()

    def instance(self) -> Backend:
        """The backend object, made on first use."""
        if not self._instance:
            factory = self.factory
            if isinstance(factory, str):
                module, _, attribute = factory.partition(":")
                factory = getattr(importlib.import_module(module), attribute)
            backend = factory()
            if not isinstance(backend, Backend):
                raise TypeError(f"the factory of backend {self.name!r} made a {type(backend).__name__}, not a Backend")
            self._instance.append(backend)
        return self._instance[0]


_REGISTRY: dict[str, BackendEntry] = {}


def register_backend(name: str, factory: Callable[[], Backend] | str, *, devices, interpreted_devices=(),
                     auto: bool | Callable[[CallShape], bool] = True, requires=()) -> BackendEntry:
    """Register a backend under ``name`` (``backend=name`` selects it; see the module docstring)."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend name must be a non-empty string other than 'auto', got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"a backend named {name!r} is already registered")
    entry = BackendEntry(name, factory, frozenset(devices), frozenset(interpreted_devices), auto, tuple(requires))
    _REGISTRY[name] = entry
    return entry


def registered_backends() -> tuple[BackendEntry, ...]:
    """Every registered backend, in registration order (``auto``'s order of preference)."""
    return tuple(_REGISTRY.values())


def backend_names() -> tuple[str, ...]:
    """The values ``backend=`` accepts: "auto" and every registered name."""
    return ("auto", *_REGISTRY)


def backends_for(device) -> tuple[str, ...]:
    """The names of the backends that run on ``device`` (a device, a device type or a tensor) in this process."""
    device_type = _device_type(device)
    return tuple(entry.name for entry in _REGISTRY.values() if entry.runs_on(device_type))


def _device_type(device) -> str:
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device).type


def check_backend_name(name) -> None:
    if name not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")


def get_backend(name: str) -> Backend:
    """The backend registered under ``name`` (made on first use)."""
    check_backend_name(name)
    if name == "auto":
        raise ValueError("'auto' names no backend: select_backend resolves it for a call's tensors")
    return _REGISTRY[name].instance()


def select_backend(name: str, *tensors, function: str | None = None) -> Backend:
    """The backend that runs a call on ``tensors`` (a fused function's: hidden, weight, bias, the teacher's):
    the named one (checked to run on their devices), or ``auto``'s choice (``function``: the public
    function, for the per-call rules)."""
    check_backend_name(name)
    device_types = {t.device.type for t in tensors if isinstance(t, torch.Tensor)} or {"cpu"}
    if name != "auto":
        entry = _REGISTRY[name]
        if not entry.available():
            raise RuntimeError(f"backend={name!r} was requested but {', '.join(entry.requires)} cannot be imported")
        missing = sorted(device_types - entry.devices)
        if missing:
            hint = (" (or TRITON_INTERPRET=1 to run on the CPU)" if set(missing) <= entry.interpreted_devices
                    else "")
            raise ValueError(f"backend={name!r} needs {' or '.join(sorted(t.upper() for t in entry.native_devices))} "
                             f"tensors{hint}; got tensors on {', '.join(missing)}")
        return entry.instance()
    devices = _auto_devices(device_types)
    candidates = [entry for entry in _REGISTRY.values() if entry.auto and all(entry.runs_on(t) for t in devices)]
    ruled = [entry for entry in candidates if callable(entry.auto)]
    if ruled:
        call = CallShape.of(next(iter(devices)) if len(devices) == 1 else "mixed", tensors, function)
        for entry in ruled:
            if entry.auto(call):
                return entry.instance()
    for entry in candidates:
        if entry.auto is True:
            return entry.instance()
    raise ValueError(f"no registered backend runs on {', '.join(sorted(device_types))} tensors")


def _auto_devices(device_types: set[str]) -> set[str]:
    """The device types auto must serve: any CUDA tensor makes it a CUDA call (a CPU tensor beside it is
    an error the argument checks name)."""
    return {"cuda"} if "cuda" in device_types else device_types
