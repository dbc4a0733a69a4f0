"""Block plumbing of the chunked PyTorch backend: bounded logits blocks and cache-sized sub-blocks.

Logits exist only as blocks within the budgets of ``ptd_kernels.config``; every block is
written into one reused flat buffer (a new block per loop would keep two alive while the next
GEMM writes), and its elementwise math walks sub-blocks of ``SUB_BLOCK_BYTES`` per buffer.
"""

from __future__ import annotations

import torch

from ... import config
from ..base import Head


def prepare(head: Head) -> tuple[torch.dtype, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(compute dtype, hidden, weight, bias) with every operand in the compute dtype."""
    dtype = head.dtype
    bias = head.bias.to(dtype) if head.bias is not None else None
    return dtype, head.hidden.to(dtype), head.weight.to(dtype), bias


def itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def block_length(count: int, other: int, bytes_per_item: int) -> int:
    """How many rows (or columns) of a [count, other] block fit in ``CHUNK_BYTES``."""
    return max(1, min(count, config.CHUNK_BYTES // max(1, other * bytes_per_item)))


def sub_blocks(rows: int, cols: int, bytes_per_item: int, scale: int = 1) -> list[slice]:
    """Row slices of a [rows, cols] block, each ~``scale`` × SUB_BLOCK_BYTES (cache-resident work)."""
    step = max(1, scale * config.SUB_BLOCK_BYTES // max(1, cols * bytes_per_item))
    return [slice(s0, min(rows, s0 + step)) for s0 in range(0, rows, step)]


def view(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] block over a reused flat buffer."""
    return flat[: rows * cols].view(rows, cols)


def shift(rows: slice, offset: int) -> slice:
    return slice(rows.start + offset, rows.stop + offset)


def logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """a = hidden @ weightᵀ (+ bias) written into ``out``; ``to_logits_`` makes it z (sub-block by sub-block,
    in cache)."""
    if bias is None:
        return torch.mm(hidden, weight.T, out=out)
    return torch.addmm(bias, hidden, weight.T, out=out)


def to_logits_(a: torch.Tensor, head: Head, *, want_derivative: bool = False) -> torch.Tensor | None:
    """In place: a = hidden·weight + bias becomes z = cap_c(s·a)/τ (a cache-sized sub-block); the same z as
    ``ptd_kernels.rowmath.transform_logits``, the formula's one out-of-place definition.

    With a soft-cap and ``want_derivative``, returns the cap's derivative factor 1 − tanh²(s·a/c)
    (a new tensor; the rest of ∂z/∂a, s/τ, is applied to the gradients by ``scale_grads_``);
    else None.
    """
    s, tau, c = head.logit_scale, head.temperature, head.softcap
    if c is None:
        if s != 1.0:
            a.mul_(s / tau)
        elif tau != 1.0:
            a.div_(tau)
        return None
    t = a.mul_(s / c).tanh_()
    derivative = torch.addcmul(torch.ones_like(t), t, t, value=-1.0) if want_derivative else None
    t.mul_(c / tau)
    return derivative


def chain_scale_(t: torch.Tensor, head: Head) -> torch.Tensor:
    """t ← t·s/τ in place: the scalar part of ∂z/∂a (the cap's part, 1 − tanh², is elementwise)."""
    s, tau = head.logit_scale, head.temperature
    if s != 1.0:
        return t.mul_(s / tau)
    return t.div_(tau) if tau != 1.0 else t


def scale_grads_(head: Head, *grads: torch.Tensor | None) -> None:
    """Apply ``chain_scale_`` to gradients w.r.t. a = hidden·weight + bias (already × the cap's derivative)."""
    for g in grads:
        if g is not None:
            chain_scale_(g, head)


def two_sided_row_blocks(student: Head, teacher: Head, budget: int):
    """Yield (r0, r1, a, teacher_a): both sides' full rows of a = hidden·weight + bias (compute dtype;
    ``to_logits_`` makes them logits) for blocks of rows, in one reused buffer of ``budget`` bytes.

    With a shared output layer (``Head.shares_layer_with``), one GEMM over the stacked rows reads
    each weight block once for both sides. Blocks are of equal size (a thin last block is a slow GEMM).
    """
    shared = student.shares_layer_with(teacher)
    dtype, hidden, weight, bias = prepare(student)
    teacher_hidden = teacher.hidden.to(dtype)
    if not shared:
        teacher_weight = teacher.weight.to(dtype)
        teacher_bias = teacher.bias.to(dtype) if teacher.bias is not None else None
    n, vocab = hidden.shape[0], weight.shape[0]
    step = max(1, min(n, budget // (vocab * 2 * itemsize(dtype))))
    step = -(-n // -(-n // step)) if n else 1
    buffer = torch.empty(2 * step * vocab, dtype=dtype, device=hidden.device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        m = r1 - r0
        both = buffer[: 2 * m * vocab].view(2 * m, vocab)
        if shared:
            logits_into(both, torch.cat([hidden[r0:r1], teacher_hidden[r0:r1]]), weight, bias)
        else:
            logits_into(both[:m], hidden[r0:r1], weight, bias)
            logits_into(both[m:], teacher_hidden[r0:r1], teacher_weight, teacher_bias)
        yield r0, r1, both[:m], both[m:]
