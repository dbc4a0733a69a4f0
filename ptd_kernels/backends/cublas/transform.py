"""The scalars of the cuBLAS backend's kernels, passed as kernel arguments, and the logit transform.

A kernel's few per-call numbers (the logit transform's s/τ, s/c, c/τ; the JSD's β, log β, log(1 − β))
travel as launch arguments, not as a small device tensor: building such a tensor from host numbers is a
copy from pageable memory, which makes the host wait for the device on every call.

A Python float reaches a Triton kernel as a float32 argument, which would round a float64 model's
scalars. So each float travels as the int64 bits of its float64 value (``pack``), and the kernel turns
them back into the float64 value and rounds that to the block's dtype (``unpack``): a float32 block
gets the same float32 scalars as ``torch.tensor(values, dtype=torch.float32)`` would hold, a float64
block the exact float64 ones, on every Triton version and under the interpreter alike.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

from ..triton.tiles import tanh

#: The JSD kernels' scalar arguments, in the order ``jsd.jsd_scalars`` packs them.
JSD_SCALARS = ["beta_bits", "log_beta_bits", "log1m_beta_bits", "scale_bits", "cap_in_bits", "cap_out_bits",
               "t_scale_bits", "t_cap_in_bits", "t_cap_out_bits"]


def pack(*values: float) -> tuple[int, ...]:
    """The int64 bit patterns of ``values`` as float64: kernel arguments that ``unpack`` reads exactly."""
    return tuple(struct.unpack("<q", struct.pack("<d", float(value)))[0] for value in values)


@triton.jit
def unpack(bits, dtype: tl.constexpr):
    """The float64 value whose bits ``pack`` gave, rounded to ``dtype`` (a kernel argument: an int32 or
    int64 scalar by its value)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(dtype)


@triton.jit
def to_logits(a, scale, cap_in, cap_out, HAS_CAP: tl.constexpr):
    """z = cap_c(s·a)/τ from a = x·w + b and the transform's scalars in a's dtype (``Head.transform_scalars``:
    scale = s/τ, cap_in = s/c, cap_out = c/τ). Returns (z, t): t = tanh(s·a/c) with a cap (∂z/∂a =
    (1 − t²)·s/τ), else z."""
    if HAS_CAP:
        t = tanh(a * cap_in)
        z = t * cap_out
    else:
        z = a * scale
        t = z
    return z, t
