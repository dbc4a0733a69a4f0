"""The one dtype rule of the library (docs/method.md §2): divergence math and statistics run in float64
when any input is float64, else in float32, whatever the input dtype."""

from __future__ import annotations

import torch


def compute_dtype(*items) -> torch.dtype:
    """float64 if any of ``items`` (tensors, dtypes or None) is float64, else float32."""
    for item in items:
        dtype = item.dtype if isinstance(item, torch.Tensor) else item
        if dtype == torch.float64:
            return torch.float64
    return torch.float32
