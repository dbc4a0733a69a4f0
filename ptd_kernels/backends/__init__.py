"""Backends: implementations of the vocabulary sweeps behind one interface (``base.Backend``).

``select_backend(name, *tensors)`` picks one: ``"auto"`` takes Triton for CUDA tensors (or under
``TRITON_INTERPRET=1``), else the chunked PyTorch path.
"""

from __future__ import annotations

from .base import Backend
from .selection import select_backend

__all__ = ["Backend", "select_backend"]
