"""Backends: implementations of the vocabulary sweeps behind one interface (``base.Backend``), and the
registry that names them (``registry``).

``select_backend(name, *tensors)`` picks one: ``"auto"`` takes the cuBLAS backend for CUDA calls that
form gradients or have more than a few rows (``registry.cublas_takes``: a provisional rule from the GPU
work model), Triton for the other CUDA calls (and on the CPU under ``TRITON_INTERPRET=1``), else the
chunked PyTorch path. With a process group, the selected backend runs on this rank's vocabulary slice
inside ``vocab_parallel.VocabParallelBackend`` (``open_call``).

A new backend registers here with one line (see ``registry``); its factory runs on first use, so nothing
of it is imported until a call selects it. Tests that iterate over ``registered_backends()`` or
``backends_for(device)`` pick up every registered backend.
"""

from __future__ import annotations

from .base import Backend
from .registry import (
    backend_names,
    backends_for,
    cublas_takes,
    get_backend,
    register_backend,
    registered_backends,
    select_backend,
)

register_backend("triton", "ptd_kernels.backends.triton:TritonBackend", devices=("cuda",),
                 interpreted_devices=("cpu",), requires=("triton",))
register_backend("torch", "ptd_kernels.backends.torch:TorchBackend", devices=("cpu", "cuda"))
register_backend("cublas", "ptd_kernels.backends.cublas:CublasBackend", devices=("cuda",),
                 interpreted_devices=("cpu",), requires=("triton",), auto=cublas_takes)

__all__ = ["Backend", "backend_names", "backends_for", "get_backend", "register_backend", "registered_backends",
           "select_backend"]
