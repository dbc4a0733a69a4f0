"""Where a test's tensors live: the devices the backend registry says a backend runs on in this process.

On a CUDA host the kernel backends (Triton, cuBLAS) run compiled kernels on CUDA tensors; only where CUDA
is absent do they run on CPU tensors under Triton's interpreter (tests/conftest.py switches it on then).
Every kernel test takes its device from here (the ``device`` fixture of conftest.py reads
:func:`device_for`), and backend parametrizations come from the registry, so that a newly registered
backend is tested wherever it runs.
"""

from __future__ import annotations

import pytest
import torch

import ptd_kernels as ptd
from ptd_kernels.backends.registry import interpreting


def host_device_types() -> tuple[str, ...]:
    """The device types this process has: "cpu", and "cuda" when a GPU is visible."""
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def _entry(name: str):
    return next(e for e in ptd.registered_backends() if e.name == name)


def backend_devices(name: str) -> tuple[str, ...]:
    """The device types backend ``name`` runs on in this process, native ones first (empty when its
    requirements do not import)."""
    entry = _entry(name)
    if not entry.available():
        return ()
    native = [d for d in host_device_types() if d in entry.native_devices]
    interpreted = [d for d in host_device_types() if d in entry.devices and d not in native]
    return (*native, *interpreted)


def device_for(name: str) -> str | None:
    """The one device a test of backend ``name`` uses: the CPU for a backend that runs there natively
    (the torch path), else its GPU when there is one, else the CPU under the interpreter (None: nowhere).
    "auto" runs where the tensors are: the CPU."""
    if name == "auto":
        return "cpu"
    devices = backend_devices(name)
    if not devices:
        return None
    entry = _entry(name)
    return "cpu" if "cpu" in entry.native_devices else devices[0]


def kernel_backends() -> tuple[str, ...]:
    """Registered backends that do not run natively on a CPU: their kernels need a GPU or the interpreter."""
    return tuple(e.name for e in ptd.registered_backends() if "cpu" not in e.native_devices)


def backend_params(exclude=()) -> list:
    """One ``pytest.param(name)`` per registered backend that runs in this process (the ``device`` fixture
    then gives its device), in registration order."""
    return [pytest.param(e.name, id=e.name) for e in ptd.registered_backends()
            if e.name not in exclude and device_for(e.name) is not None]


def backend_device_params(exclude=()) -> list:
    """``pytest.param(name, device)`` for every registered backend and every device it runs on here."""
    return [pytest.param(e.name, device, id=f"{e.name}-{device}") for e in ptd.registered_backends()
            if e.name not in exclude for device in backend_devices(e.name)]


def tile(size: int) -> int:
    """A tile size a test asks for: as given under the interpreter, raised to tl.dot's GPU minimum of 16
    for compiled kernels (the launchers reject smaller tiles on a GPU)."""
    return size if interpreting() else max(size, 16)


def tiles(**sizes: int) -> dict:
    """``tile`` applied to every ``block_*`` size of a launcher override (other keys as given)."""
    return {key: tile(value) if key.startswith("block_") else value for key, value in sizes.items()}
