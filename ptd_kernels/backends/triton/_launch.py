"""Launch-time facts shared by the Triton launchers: the interpreter, the dot rules, tile sizes.

Imports no Triton at module level (the backend registry reads ``interpreting`` from here): what
needs Triton imports it where it runs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ..._dtypes import compute_dtype

# The oldest Triton with every language feature the kernels use: tl.dot's input_precision (Triton 3.0;
# 2.3 has only allow_tf32). The kernels were compiled for sm_90a with 3.0.0, 3.2.0 and 3.9.0
# (docs/gpu.md); tests/kernels/test_triton_floor.py keeps them to the tl names that 3.0 has (the cuBLAS
# backend's kernels to those plus its topk, 3.4: ``CUBLAS_TRITON_FLOOR``). The jit-helper
# modules every kernel imports first (``tiles``, ``rowmath``) call ``check_triton`` before they define
# a function: a first use on an older Triton stops there, with the version needed.
TRITON_FLOOR = (3, 0)


def check_triton(version: str) -> None:
    """Raise ImportError, naming the version needed, when ``version`` is older than the floor."""
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if release < TRITON_FLOOR:
        floor = ".".join(map(str, TRITON_FLOOR))
        raise ImportError(f"ptd's Triton kernels need triton>={floor} (tl.dot's input_precision); this is triton "
                          f"{version}: install triton>={floor}, or pass backend='torch'")


#: The cuBLAS backend's statistics kernel selects its top-K with ``triton.language.topk`` on a GPU, first in
#: Triton 3.4 (under the interpreter it ranks instead, and any floor version runs it).
CUBLAS_TRITON_FLOOR = (3, 4)


def check_triton_for_cublas(version: str, has_topk: bool) -> None:
    """Raise ImportError, naming the version needed, when the cuBLAS backend's kernels cannot compile."""
    if not has_topk and not interpreting():
        floor = ".".join(map(str, CUBLAS_TRITON_FLOOR))
        raise ImportError(f"backend='cublas' needs triton>={floor} on a GPU (triton.language.topk); this is triton "
                          f"{version}: install triton>={floor}, or pass backend='triton' or backend='torch'")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_properties() -> dict:
    """The current GPU's properties as Triton's active driver reports them (CUDA's names:
    ``multiprocessor_count``, ``max_shared_mem``, ``max_num_regs``, ...).

    The one place where a launcher learns about the device: a stand-in driver
    (``launch_plan.recording``) answers here for a GPU this machine does not have.
    """
    from triton.runtime import driver

    active = driver.active
    return active.utils.get_device_properties(active.get_current_device())


def multiprocessor_count() -> int:
    """SMs of the current GPU; under the interpreter, 4 (a CPU runs programs one after another;
    4 keeps the code that splits work across programs exercised at the tests' small shapes)."""
    if interpreting():
        return 4
    return device_properties()["multiprocessor_count"]


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


def device_scalars(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A kernel's few per-call numbers (the logit transform's s/τ, s/c, c/τ; the JSD's β, log β, log(1 − β))
    as a device tensor of ``dtype``, each element filled from its Python float (a fill kernel takes its
    value as an argument). ``torch.tensor(values, device=...)`` would copy them from pageable host memory,
    which makes the host wait for the device on every call. A float64 tensor holds the values exactly, a
    float32 one the same roundings as ``torch.tensor(values, dtype=torch.float32)``."""
    values = [float(value) for value in values]
    out = torch.empty(len(values), dtype=dtype, device=device)
    for index, value in enumerate(values):
        out[index].fill_(value)
    return out


def check_tile(name: str, size: int) -> None:
    if size < 16 or size & (size - 1):
        raise ValueError(f"{name} must be a power of 2 and at least 16, got {size}")


# The tiles below are read back from the launch plan at N = 8192, H = 4096 (``launch_plan``,
# ``bench/results/kernel_plan_sm90.md``): for every configuration of a launcher on an H100 they
# take as much of the 255 registers per thread as they can without spilling, keep shared memory
# within 227 KiB, and their 16-bit and TF32 dots become wgmma. Float32 without TF32 runs its dots
# on FMAs, whose operands live in registers: smaller steps along H. Float64 has no tensor cores
# and twice the register footprint.


@dataclass(frozen=True)
class ForwardTiles:
    """Tiles of the forward sweep (``row_stats``): a block_n × block_v logits tile, block_h steps along H."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


def forward_tiles(dtype: torch.dtype, k_pad: int = 0) -> ForwardTiles:
    """The forward sweep's tiles for ``dtype`` operands with a running top-K of ``k_pad`` keys per row
    (0: none). The top-K holds block_n × k_pad int64 keys next to the logits tile and its own
    block_n × block_v keys: a narrower tile leaves it the registers."""
    if dtype == torch.float64:
        return ForwardTiles(32, 64, 32, 4, 2)
    if dot_precision(dtype) == "ieee":  # float32 on FMAs
        return ForwardTiles(64, 64, 16, 8, 3)
    if k_pad:
        return ForwardTiles(64, 64, 64, 8, 3)
    # 128 × 128: each weight tile serves 128 rows and each hidden tile 128 columns.
    return ForwardTiles(128, 128, 32 if dtype == torch.float32 else 64, 8, 3)


@dataclass(frozen=True)
class BackwardTiles:
    """Tiles of the backward sweeps (``head_backward``, ``jsd_backward``; ``jsd_forward`` uses their
    logits tile too, so that the JSD's sweeps round the logits alike).

    block_n × block_v: the logits tile (block_h: its step along H); chunk: the swept entries a
    program buffers before it adds buffer @ operand into its gradient rows, in steps of block_c
    entries and block_k gradient columns.
    """

    block_n: int
    block_v: int
    block_h: int
    chunk: int
    block_c: int
    block_k: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return dict(BLOCK_N=self.block_n, BLOCK_V=self.block_v, BLOCK_H=self.block_h, CHUNK=self.chunk,
                    BLOCK_C=self.block_c, BLOCK_K=self.block_k)


def backward_tiles(dtype, block_n=None, block_v=None, block_h=None, chunk=None, *, dense=False,
                   own_rows=True) -> BackwardTiles:
    """The backward sweeps' tiles for ``dtype`` operands, with the caller's overrides.

    ``dense``: the tile's ∂L/∂z has only per-row coefficients (``head_backward`` without sparse
    terms): the rows-owned sweep (``own_rows``) affords a 64 × 128 logits tile; the sparse terms'
    search, the JSD's two logits tiles and the vocabulary-owned sweep (whose gradient block is 64
    weight rows wide) take 64 × 64. The chunk buffer of a program is max(block_n, block_v) × chunk
    entries in the operands' dtype: 1024 entries keep it at 64-256 KiB (in L2 with one program
    per SM) while a program's gradient rows are rewritten once per 1024 swept entries instead of
    once per tile. Under the interpreter the chunk is two tiles, so that tests cross chunk
    boundaries at small shapes.
    """
    if dtype == torch.float64:
        bn, bv, bh, block_c, block_k, warps, stages = 32, 64, 32, 32, 64, 4, 2
    elif dot_precision(dtype) == "ieee":  # float32 on FMAs
        if dense:
            bn, bv, bh, block_c, block_k, warps, stages = 64, 64, 32, 32, 64, 8, 3
        else:
            bn, bv, bh, block_c, block_k, warps, stages = 64, 64, 16, 32, 32, 8, 2
    elif dense and own_rows and dtype != torch.float32:
        bn, bv, bh, block_c, block_k, warps, stages = 64, 128, 64, 64, 128, 8, 3
    else:
        bn, bv, bh, block_c, block_k, warps, stages = 64, 64, 64, 64, 128, 8, 3
    bn, bv, bh = block_n or bn, block_v or bv, block_h or bh
    for name, size in (("block_n", bn), ("block_v", bv), ("block_h", bh)):
        check_tile(name, size)
    sweep_tile = max(bn, bv)
    chunk = chunk or (2 * sweep_tile if interpreting() else max(1024, sweep_tile))
    check_tile("chunk", chunk)
    if chunk % bn or chunk % bv:
        raise ValueError(f"chunk ({chunk}) must be a multiple of block_n ({bn}) and block_v ({bv})")
    return BackwardTiles(bn, bv, bh, chunk, min(block_c, chunk), block_k, warps, stages)


MAX_SEGMENTS = 8  # partial gradients a sweep may sum (memory: segments × owned rows × H)


def segments_to_fill(blocks: int, tiles: int, max_segments: int | None = None) -> int:
    """Segments of the swept axis per owned block, so that blocks × segments programs (one per SM at
    a time: the tiles take most of an SM's registers) fill the GPU's waves: the fewest segments whose
    waves are at least 90 % busy, else the best filled. At most ``tiles`` (no empty segment)."""
    sms = multiprocessor_count()
    cap = max(1, min(tiles, max_segments or tiles))
    best, best_fill = 1, 0.0
    for segments in range(1, cap + 1):
        programs = blocks * segments
        fill = programs / (cdiv(programs, sms) * sms)
        if fill >= 0.9:
            return segments
        if fill > best_fill + 1e-9:
            best, best_fill = segments, fill
    return best


def grad_segments(blocks: int, tiles: int) -> int:
    """Segments of a backward sweep: each adds a partial gradient as large as the owned one, so
    they are only for owned blocks that leave more than half the SMs idle, and only as many as it
    takes to give 90 % of the SMs a program (at most MAX_SEGMENTS)."""
    sms = multiprocessor_count()
    if 2 * blocks >= sms:
        return 1
    return max(1, min(cdiv(9 * sms, 10 * blocks), tiles, MAX_SEGMENTS))


@dataclass
class GradSweep:
    """One launch of a backward kernel: what its programs own, its grid and its buffers.

    own_rows: programs own rows of grad_hidden (else rows of grad_weight and grad_bias). grid:
    (programs, segments): about one program per SM, each looping over the owned blocks
    pid, pid + programs, ...; segments split the swept axis when the owned blocks cannot fill the
    GPU, each writing its own partial gradient. out/out_bias: [segments, owned, H] / [segments, V].
    """

    own_rows: bool
    tiles: BackwardTiles
    grid: tuple[int, int]
    tiles_per_segment: int
    out: torch.Tensor
    out_bias: torch.Tensor
    scratch: torch.Tensor
    need_out: bool
    need_bias: bool

    def collect(self, grads) -> None:
        """Sum the segments' partial gradients into ``grads`` (HeadGrads)."""
        out = self.out[0] if self.out.shape[0] == 1 else self.out.sum(0)
        if self.own_rows:
            grads.hidden = out
            return
        if self.need_out:
            grads.weight = out
        if self.need_bias:
            grads.bias = self.out_bias[0] if self.out_bias.shape[0] == 1 else self.out_bias.sum(0)


def grad_sweeps(tile_for, n: int, v: int, h: int, needs, acc_dtype, operand_dtype, device):
    """The launches that form the gradients in ``needs``: rows-owned for grad_hidden, then
    vocabulary-owned for grad_weight and grad_bias (each only if needed). ``tile_for(own_rows)``
    gives a sweep's tiles."""
    sweeps = []
    for own_rows in (True, False):
        need_out = needs.hidden if own_rows else needs.weight
        need_bias = not own_rows and needs.bias
        if not (need_out or need_bias):
            continue
        tiles = tile_for(own_rows)
        own_len, sweep_len = (n, v) if own_rows else (v, n)
        block_own, block_sweep = (tiles.block_n, tiles.block_v) if own_rows else (tiles.block_v, tiles.block_n)
        owned_blocks = cdiv(own_len, block_own)
        sweep_tiles = cdiv(sweep_len, block_sweep)
        programs = min(owned_blocks, multiprocessor_count())
        segments = grad_segments(owned_blocks, sweep_tiles)
        tiles_per_segment = cdiv(sweep_tiles, segments)
        segments = cdiv(sweep_tiles, tiles_per_segment)  # no empty segment
        # Accumulated by read-modify-write from zero (a program owns its rows: no atomics).
        out = torch.zeros((segments, own_len, h) if need_out else (1, 1, 1), dtype=acc_dtype, device=device)
        out_bias = torch.zeros((segments, v) if need_bias else (1,), dtype=acc_dtype, device=device)
        scratch = torch.empty((segments * programs, block_own, tiles.chunk) if need_out else (1,),
                              dtype=operand_dtype, device=device)
        sweeps.append(GradSweep(own_rows, tiles, (programs, segments), tiles_per_segment, out, out_bias, scratch,
                                need_out, need_bias))
    return sweeps


def check_operand(name: str, tensor, ndim: int) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}")


def check_row_vector(name: str, tensor, n: int) -> None:
    if tuple(tensor.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(tensor.shape)}")


def check_head(head, prefix: str = "") -> tuple[int, int, int]:
    """The shapes and dtypes the kernels read one output layer with; returns (N, V, H).

    Values, devices and the logit transform are the public layer's checks (``_validate``), made
    once per call; this checks what a direct caller of a launcher could get wrong in a way the
    kernel would not report itself.
    """
    hidden, weight, bias = head.hidden, head.weight, head.bias
    check_operand(prefix + "hidden", hidden, 2)
    check_operand(prefix + "weight", weight, 2)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{prefix}hidden ({hidden.dtype}) and {prefix}weight ({weight.dtype}) must share a dtype")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{prefix}hidden has H={hidden.shape[1]} but {prefix}weight has H={weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{prefix}bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return hidden.shape[0], weight.shape[0], hidden.shape[1]


def gradient_buffers(head, needs, acc_dtype):
    """Zeroed compute-dtype gradients (hidden, weight, bias) for the gradients in ``needs``."""
    from ..base import HeadGrads

    n, v, h = head.rows, head.vocab, head.hidden.shape[1]
    device = head.hidden.device
    return HeadGrads(torch.zeros((n, h), dtype=acc_dtype, device=device) if needs.hidden else None,
                     torch.zeros((v, h), dtype=acc_dtype, device=device) if needs.weight else None,
                     torch.zeros((v,), dtype=acc_dtype, device=device) if needs.bias else None)
