"""Numeric checks shared by the tests: one tolerance per dtype of the COMPUTATION.

A result computed in float32 is compared with a float64 oracle at float32 tolerance, whatever the dtype of
the comparison: ``torch.testing.assert_close(fp32_result.double(), oracle)`` would apply float64's defaults
(rtol 1e-7), which an fp32 sum passes or fails by the summation order of the machine's BLAS. Gradients of
bfloat16 inputs are computed with bfloat16 operands (∂L/∂z is rounded to bf16 before its GEMM, as on a
GPU): their computation dtype is bfloat16.
"""

from __future__ import annotations

import torch

#: Relative and absolute tolerance of a value computed in a dtype (sums over ≲ 10³ terms of O(1) values),
#: compared with a float64 oracle on the same (rounded) inputs.
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 3e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def tolerance(compute_dtype: torch.dtype) -> dict:
    """``rtol``/``atol`` for torch.testing.assert_close of a result computed in ``compute_dtype``."""
    tol = TOLERANCE[compute_dtype]
    return {"rtol": tol, "atol": tol}


def acc_dtype(dtype):
    """The accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close(actual, expected, compute_dtype, what=""):
    """Elementwise: |actual − expected| ≤ tol·(1 + |expected|), tol that of ``compute_dtype``; compared in
    float64 on the CPU (``actual`` may live on a GPU)."""
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), expected.detach().cpu().to(torch.float64),
                               **tolerance(compute_dtype), msg=lambda m: f"{what}: {m}" if what else m)


def assert_rel_close(actual, expected, tol, what):
    """max |actual − expected| ≤ tol · max |expected| (finite, same shape), compared in float64 on the CPU.
    ``tol``: a number, or the computation's dtype (its ``TOLERANCE``)."""
    if isinstance(tol, torch.dtype):
        tol = TOLERANCE[tol]
    actual, expected = actual.detach().cpu().to(torch.float64), expected.detach().cpu().to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-30) if expected.numel() else torch.tensor(1.0)
    err = (actual - expected).abs().max() / scale if actual.numel() else torch.tensor(0.0)
    assert err <= tol, f"{what}: relative error {err.item():.3e} > {tol:.1e}"
