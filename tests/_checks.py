"""Small numeric checks shared by the Triton kernel unit tests."""

from __future__ import annotations

import torch


def acc_dtype(dtype):
    """The accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_rel_close(actual, expected, tol, what):
    """max |actual − expected| ≤ tol · max |expected| (finite, same shape), compared in float64."""
    actual = actual.to(torch.float64)
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max() / scale
    assert err <= tol, f"{what}: relative error {err.item():.3e} > {tol:.1e}"
