"""How the cuBLAS backend cuts a sweep into blocks, each side's operands, and the kernels' tiles.

A block is [rows × columns] of a = hidden · weightᵀ, written by one GEMM into a float32 buffer of the
sweep (float64 for float64 inputs) and then worked on in place. Two shapes of sweep:

- ``vocab_plan``: all rows (when a block of them and ``MIN_BLOCK_COLS`` columns fits the budget) and as
  many vocabulary columns as fit: each weight slice is read once per sweep, d weight of a slice is
  written once, d hidden [N, H] is accumulated (small). The row statistics, the recomputing backward
  sweeps.
- ``full_row_plan``: whole vocabulary rows, as many as fit: where a row must be complete before its
  gradient is known (the one-sweep loss, the full JSD's forward). Then d weight [V, H] is accumulated
  once per row block: fewer, larger row blocks matter.

Blocks are of equal size (a thin last block is a slow GEMM) and their column counts multiples of 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import config
from ..base import Head
from ..triton._launch import interpreting
from . import _work
from .transform import pack

#: Fewest columns of a vocabulary block before the sweep takes fewer rows instead (GEMM efficiency).
MIN_BLOCK_COLS = 8192
_ALIGN = 16
#: Largest k kept by the statistics kernel's in-register top set; above it the block's logits are
#: ranked by torch (``row_stats``'s wide path).
MAX_K = 256

# (BLOCK_R, BLOCK_C, num_warps) per kernel family; gather: (BLOCK_M, BLOCK_H, num_warps). On a GPU one
# row per program streams its columns; the interpreter prefers few, wide tiles (each tile is a Python
# step), which at the test shapes still gives several tiles per row and partial last ones.
GPU_TILES = {"stats": (1, 1024, 4), "stats_topk": (1, 512, 4), "grad": (1, 1024, 4), "jsd": (1, 1024, 4),
             "gather": (16, 128, 4), "block_gather": (1, 256, 4)}
INTERPRETER_TILES = {"stats": (8, 64, 1), "stats_topk": (8, 32, 1), "grad": (8, 64, 1), "jsd": (8, 64, 1),
                     "gather": (16, 32, 1), "block_gather": (8, 16, 1)}


def tiles(kind: str) -> tuple[int, int, int]:
    return (INTERPRETER_TILES if interpreting() else GPU_TILES)[kind]


@dataclass(frozen=True)
class Plan:
    """Blocks of ``rows`` × ``cols`` over an n × v problem (the last ones may be smaller)."""

    n: int
    v: int
    rows: int
    cols: int

    def blocks(self, columns_outer: bool = False):
        """(row slice, column slice) of every block, rows outer (``columns_outer``: the row blocks of a
        vocabulary slice one after another, so that the slice's d weight is complete after them). The
        order changes no block: the GEMMs, hence the logits, are the same."""
        row_starts, col_starts = range(0, self.n, self.rows), range(0, self.v, self.cols)
        pairs = ((r0, c0) for c0 in col_starts for r0 in row_starts) if columns_outer else (
            (r0, c0) for r0 in row_starts for c0 in col_starts)
        for r0, c0 in pairs:
            yield slice(r0, min(self.n, r0 + self.rows)), slice(c0, min(self.v, c0 + self.cols))

    @property
    def elements(self) -> int:
        return self.rows * self.cols


def _even(total: int, step: int) -> int:
    """The step that cuts ``total`` into as many equal parts as ``step`` would."""
    parts = -(-total // max(1, step))
    return -(-total // parts)


def vocab_plan(n: int, v: int, bytes_per_logit: int, bytes_per_col: int = 0) -> Plan:
    """Blocks of all rows (fewer when the budget cannot hold MIN_BLOCK_COLS columns of them) × as many
    columns as the budget holds. ``bytes_per_col``: a work buffer per vocabulary column that a sweep needs
    when the rows take several blocks (a 16-bit weight's d weight slice, summed over them in float32:
    ``slice_bytes``); it then shares the budget.

    The plan depends on the problem and these byte counts only (not on a top-K's scratch), so that a
    forward sweep and the backward sweep of the same rows cut the logits alike: their GEMMs are then the
    same calls and round every logit alike, and p = e^{z − lse} of the backward is the forward's exactly
    (a one-hot row's dense and sparse gradient terms cancel to 0 even at logits of 1e4)."""
    budget = config.CUDA_BLOCK_BYTES
    n1 = max(n, 1)
    min_cols = min(v, MIN_BLOCK_COLS)
    rows = budget // (min_cols * bytes_per_logit)
    if rows < n1 and bytes_per_col:  # several row blocks: the slice buffer shares the budget
        rows = (budget - min_cols * bytes_per_col) // (min_cols * bytes_per_logit)
    rows = _even(n1, min(n1, max(1, rows)))
    per_col = rows * bytes_per_logit + (bytes_per_col if rows < n1 else 0)
    cols = max(1, min(v, budget // per_col))
    if cols < v:
        aligned = cols // _ALIGN * _ALIGN if cols >= _ALIGN else cols
        cols = _even(v, aligned)
        if aligned >= _ALIGN:
            cols = -(-cols // _ALIGN) * _ALIGN
    return Plan(n, v, rows, cols)


def slice_bytes(head: Head) -> int:
    """Bytes per vocabulary column of the compute-dtype d weight slice a backward sweep over several row
    blocks sums into for a weight of a narrower dtype (``head_backward.SweepGrads``); 0 when d weight is
    formed in place. A function of the head alone, so that its forward sweep plans alike."""
    dtype = head.dtype
    return 0 if head.weight.dtype == dtype else head.weight.shape[1] * _work.itemsize(dtype)


def full_row_plan(n: int, v: int, bytes_per_logit: int, bytes_per_row: int = 0) -> Plan:
    """Blocks of whole rows, as many as the budget holds (at least one)."""
    n1 = max(n, 1)
    rows = max(1, config.CUDA_BLOCK_BYTES // (v * bytes_per_logit + bytes_per_row))
    return Plan(n, v, _even(n1, min(n1, rows)), v)


@dataclass(frozen=True)
class Side:
    """One side's output layer as the sweeps use it: GEMM operands, the block dtype, and the logit
    transform's scalars (s/τ, s/c, c/τ) as kernel arguments (``transform.pack``: no device copy)."""

    head: Head
    dtype: torch.dtype  # the block (and statistics) dtype: float32, or float64 for float64 inputs
    scalars: tuple[int, int, int]

    @classmethod
    def of(cls, head: Head) -> Side:
        return cls(head, head.dtype, pack(*head.transform_scalars()))

    @property
    def hidden(self) -> torch.Tensor:
        return self.head.hidden

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.head.bias

    @property
    def has_cap(self) -> bool:
        return self.head.softcap is not None

    @property
    def itemsize(self) -> int:
        return _work.itemsize(self.dtype)

    def logits(self, out: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        """out [r, c] = hidden[rows] @ weight[cols]ᵀ (the transform and the bias are the kernels')."""
        _work.gemm("logits", out, self.hidden[rows], self.weight[cols].T)
        return out

    def grads_into(self, grads, dz: torch.Tensor, rows: slice, cols: slice, *, first_col: bool, first_row: bool):
        """The two gradient GEMMs of one block's operand ``dz`` [r, c] (and Σ_r dz for the bias):
        d hidden[rows] (+)= dz @ weight[cols], d weight[cols] (+)= dzᵀ @ hidden[rows]."""
        if grads.hidden is not None:
            _work.gemm("grad_hidden", grads.hidden[rows], dz, self.weight[cols], accumulate=not first_col)
        if grads.weight is not None:
            _work.gemm("grad_weight", grads.weight[cols], dz.T, self.hidden[rows], accumulate=not first_row)
        if grads.bias is not None:
            grads.bias[cols] += dz.sum(0, dtype=grads.bias.dtype)
            _work.torch_pass("grad_bias", dz.numel(), dz.numel() * dz.element_size())


def block_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] block at the start of a sweep's flat buffer."""
    return buffer[: rows * cols].view(rows, cols)


def operand_view(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient operand written over ``block`` [r, c]: the block itself, or for a 16-bit ``dtype``
    over a float32 block the first half of each row's storage (row stride 2c elements)."""
    if dtype == block.dtype:
        return block
    return block.view(dtype)[:, : block.shape[1]]
