"""The registry of backends: which implementations of ``Backend`` exist, where each runs, and how ``auto``
chooses.

An entry holds a name, the device types whose tensors the backend takes (``"cpu"``, ``"cuda"``), the
device types it takes only under Triton's interpreter (``TRITON_INTERPRET=1``), whether ``auto`` may
choose it, and a factory. The factory runs on the first call that selects the backend, so that
importing ptd_kernels never imports or compiles code it does not run. A new backend plugs in with one
call::

    register_backend("cublas", "ptd_kernels.backends.cublas:CublasBackend", devices=("cuda",))

``backend="auto"`` takes, in registration order, the first entry registered with ``auto=True`` that runs
on the devices of the call's tensors and whose requirements import: today Triton for CUDA tensors (and on
the CPU under the interpreter), else the chunked PyTorch path. A backend registered with ``auto=False``
runs only when named.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .base import Backend
from .triton._launch import interpreting  # the launch facts only: imports no Triton

__all__ = ["BackendEntry", "register_backend", "registered_backends", "backend_names", "backends_for",
           "get_backend", "select_backend", "interpreting"]


@functools.cache
def _importable(*modules: str) -> bool:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # a dependency may fail to load in any way on an odd platform
            return False
    return True


@dataclass(frozen=True)
class BackendEntry:
    """One registered backend (see the module docstring)."""

    name: str
    factory: Callable[[], Backend] | str  # a callable, or "module:attribute" of a Backend class
    native_devices: frozenset[str]
    interpreted_devices: frozenset[str] = frozenset()
    auto: bool = True
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
                     auto: bool = True, requires=()) -> BackendEntry:
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


def select_backend(name: str, *tensors) -> Backend:
    """The backend that runs a call on ``tensors``: the named one (checked to run on their devices), or
    ``auto``'s choice."""
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
    for entry in _REGISTRY.values():
        if entry.auto and all(entry.runs_on(t) for t in _auto_devices(device_types)):
            return entry.instance()
    raise ValueError(f"no registered backend runs on {', '.join(sorted(device_types))} tensors")


def _auto_devices(device_types: set[str]) -> set[str]:
    """The device types auto must serve: any CUDA tensor makes it a CUDA call (a CPU tensor beside it is
    an error the argument checks name)."""
    return {"cuda"} if "cuda" in device_types else device_types
