"""Backends: implementations of the vocabulary sweeps behind one interface (``base.Backend``), and the
registry that names them (``registry``).

``select_backend(name, *tensors)`` picks one: ``"auto"`` takes Triton for CUDA tensors (or under
``TRITON_INTERPRET=1``), else the chunked PyTorch path. With a process group, the selected backend runs
on this rank's vocabulary slice inside ``vocab_parallel.VocabParallelBackend`` (``open_call``).

A new backend registers here with one line (see ``registry``); its factory runs on first use, so nothing
of it is imported until a call selects it. The cuBLAS backend (cuBLAS GEMMs with fused Triton elementwise
kernels) is registered with ``auto=False``: ``auto`` keeps its rule (Triton for CUDA tensors, the torch
path on a CPU) and ``backend="cublas"`` selects it; tests that iterate over ``registered_backends()`` or
``backends_for(device)`` pick up every registered backend.
"""

from __future__ import annotations

from .base import Backend
from .registry import (
    backend_names,
    backends_for,
    get_backend,
    register_backend,
    registered_backends,
    select_backend,
)

register_backend("triton", "ptd_kernels.backends.triton:TritonBackend", devices=("cuda",),
                 interpreted_devices=("cpu",), requires=("triton",))
register_backend("torch", "ptd_kernels.backends.torch:TorchBackend", devices=("cpu", "cuda"))
register_backend("cublas", "ptd_kernels.backends.cublas:CublasBackend", devices=("cuda",),
                 interpreted_devices=("cpu",), requires=("triton",), auto=False)

__all__ = ["Backend", "backend_names", "backends_for", "get_backend", "register_backend", "registered_backends",
           "select_backend"]
