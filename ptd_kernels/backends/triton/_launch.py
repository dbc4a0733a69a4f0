"""Launch-time facts shared by the Triton launchers: the interpreter, the dot rules, tile sizes."""

from __future__ import annotations

import math
import os

import torch

from ..._dtypes import compute_dtype

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of every ``tl.dot`` on ``dtype`` operands — the one rule of all kernels,
    so that a forward's lse and a backward's p = exp(z − lse) come from the same logits.

    float32 follows torch's switch ``torch.backends.cuda.matmul.allow_tf32`` (as ``nn.Linear``
    does); float64 is always IEEE; the argument does not apply to 16-bit operands.
    """
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dot_meta(dtype: torch.dtype, prefix: str = "") -> dict:
    """The constexprs of ``tiles.logits_tile`` and ``accumulate_head_grads`` for ``dtype`` operands."""
    return {f"{prefix}DOT_UPCAST": dot_upcast(dtype), f"{prefix}PRECISION": dot_precision(dtype)}


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return compute_dtype(dtype)


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of an accumulator dtype."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


# Tiles of the (rows × vocabulary) programs, sized for an H100 (BLOCK_N × BLOCK_V fp32 logits in
# registers, 64-wide H steps); float64 has no tensor cores and twice the register footprint.
BLOCK_N, BLOCK_V, BLOCK_H, NUM_WARPS = 64, 128, 64, 8
FP64_TILES = (32, 64, 32, 4)
GROUP_N = 8  # row tiles that share one sweep of weight tiles (L2 reuse)


def default_tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps) for ``dtype``."""
    if dtype == torch.float64:
        return FP64_TILES
    return BLOCK_N, BLOCK_V, BLOCK_H, NUM_WARPS


def resolve_tiles(dtype, block_n, block_v, block_h):
    """Default tiles with the caller's overrides; checks tl.dot's constraints (powers of 2, ≥ 16)."""
    bn, bv, bh, warps = default_tiles(dtype)
    tiles = (block_n or bn, block_v or bv, block_h or bh)
    for name, size in zip(("block_n", "block_v", "block_h"), tiles):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of 2 and at least 16, got {size}")
    return (*tiles, warps)


def check_operand(name: str, tensor, ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}")


def check_row_vector(name: str, tensor, n: int, device: torch.device) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def check_head(head, prefix: str = "") -> tuple[int, int, int]:
    """Validates one output layer for the kernels; returns (N, V, H)."""
    hidden, weight, bias = head.hidden, head.weight, head.bias
    check_operand(prefix + "hidden", hidden, 2)
    check_operand(prefix + "weight", weight, 2)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{prefix}hidden ({hidden.dtype}) and {prefix}weight ({weight.dtype}) must share a dtype")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{prefix}hidden has H={hidden.shape[1]} but {prefix}weight has H={weight.shape[1]}")
    if weight.device != hidden.device:
        raise ValueError(f"{prefix}weight is on {weight.device}, {prefix}hidden on {hidden.device}")
    if bias is not None:
        check_operand(prefix + "bias", bias, 1)
        if bias.dtype != weight.dtype:
            raise TypeError(f"{prefix}bias ({bias.dtype}) and {prefix}weight ({weight.dtype}) must share a dtype")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}bias has {bias.shape[0]} entries, {prefix}weight has V={weight.shape[0]}")
        if bias.device != hidden.device:
            raise ValueError(f"{prefix}bias is on {bias.device}, {prefix}hidden on {hidden.device}")
    if not (head.temperature > 0 and math.isfinite(head.temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {head.temperature}")
    return hidden.shape[0], weight.shape[0], hidden.shape[1]


def gradient_buffers(head, needs, acc_dtype):
    """Zeroed compute-dtype accumulators (hidden, weight, bias) for the gradients in ``needs``."""
    from ..base import HeadGrads

    n, v, h = head.rows, head.vocab, head.hidden.shape[1]
    device = head.hidden.device
    return HeadGrads(torch.zeros((n, h), dtype=acc_dtype, device=device) if needs.hidden else None,
                     torch.zeros((v, h), dtype=acc_dtype, device=device) if needs.weight else None,
                     torch.zeros((v,), dtype=acc_dtype, device=device) if needs.bias else None)
