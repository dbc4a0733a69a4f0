"""Which backend runs a call."""

from __future__ import annotations

import torch

from .base import Backend
from .cublas import CublasBackend
from .torch import TorchBackend
from .triton import TritonBackend
from .triton._launch import interpreting

_TORCH = TorchBackend()
_TRITON = TritonBackend()
_CUBLAS = CublasBackend()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency, but may fail to load on odd platforms
        return False
    return True


def select_backend(name: str, *tensors) -> Backend:
    """``auto``: Triton for CUDA tensors or under TRITON_INTERPRET=1, else the chunked PyTorch path."""
    if name == "torch":
        return _TORCH
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but triton cannot be imported")
        if not interpreting() and not all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor)):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
        return _TRITON
    if name == "cublas":  # cuBLAS GEMMs with Triton elementwise kernels; not (yet) a choice of "auto"
        if not triton_available():
            raise RuntimeError("backend='cublas' was requested but triton cannot be imported")
        if not interpreting() and not all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor)):
            raise ValueError("backend='cublas' needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
        return _CUBLAS
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
    if (on_cuda or interpreting()) and triton_available():
        return _TRITON
    return _TORCH
