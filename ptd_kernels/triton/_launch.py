"""Launch-time facts shared by the Triton launchers."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast tiles to float32 before ``tl.dot``.

    Under the interpreter ``tl.dot`` on bfloat16 operands returns garbage (measured with
    Triton 3.9), while float16/float32/float64 are exact. On a GPU the bf16 tensor-core dot is
    kept; only the interpreter upcasts.
    """
    return interpreting() and dtype == torch.bfloat16


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
