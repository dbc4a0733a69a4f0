"""The one-sweep loss of the chunked PyTorch path: Σ_n weights_n·D_n and its gradients, formed
during the forward (four GEMMs per row block, no recomputation).

Per block of full rows: both sides' logits (one GEMM, or two), the divergence and
∂D/∂z (``rowmath.full_jsd_rows_`` or ``topk_jsd_rows_``), dz = weights_n/τ·∂D_n/∂z written over
the student logits sub-block by sub-block, then the two gradient GEMMs.
"""

from __future__ import annotations

import torch

from ... import config, rowmath
from ..base import DivergenceSpec, GradNeeds, Head, HeadGrads
from . import _blocks
from ._blocks import chain_scale_, itemsize, prepare, shift, sub_blocks, to_logits_


def fused_loss_pays(student: Head) -> bool:
    """Whether the one-sweep loss (full rows per block) beats the per-row path (vocabulary blocks).

    Its blocks hold whole rows, so at large V they hold few rows, and each block re-reads both
    output layers and rewrites all of d weight (measured with 26-row blocks at V = 32000: 24.8 s
    vs 12.2 s per row). With ≥ ``config.FUSED_LOSS_MIN_ROWS`` rows per block (V ≲ 90k in float32
    at the default budget) the GEMMs run near full speed and the sweep saves one GEMM in four.
    """
    return config.LOSS_BLOCK_BYTES // (student.vocab * 2 * 4) >= config.FUSED_LOSS_MIN_ROWS


def _loss_rows(z, teacher_z, divergence: DivergenceSpec):
    """Per-row values and ∂D/∂z of full rows of logits (one sub-block); ∂D/∂z is written over z."""
    if divergence.k is None:
        rows = rowmath.full_jsd_rows_(z, teacher_z, divergence.beta)
        return rows.value, rows.grad_logits
    rows = rowmath.topk_jsd_rows_(z, teacher_z, divergence.k, divergence.beta, divergence.support, divergence.tail)
    terms = rows.terms
    grad_logits = rowmath.topk_grad_logits_(rows.shifted_exp, terms.row_coef / rows.shifted_sum, rows.ids,
                                             terms.support_coef)
    return terms.value, grad_logits


def fused_loss(student: Head, teacher: Head, divergence: DivergenceSpec, row_weights: torch.Tensor,
               needs: GradNeeds) -> tuple[torch.Tensor, HeadGrads]:
    """Per-row divergences and the gradients of Σ_n row_weights_n·D_n (compute dtype) in one sweep.
    ``divergence.k`` is None (full JSD) or < V."""
    needs = needs.of(student)
    dtype, hidden, weight, _ = prepare(student)
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    # dz = weights_n · (s/τ) · (the cap's derivative) · ∂D_n/∂z: the chain rule of z = cap(s·a)/τ
    row_scale = chain_scale_(row_weights.to(dtype, copy=True), student)
    value = torch.empty(n, dtype=dtype, device=device)
    # d weight: written by the first block's GEMM, accumulated by the others (no zero fill of V×H)
    grads = HeadGrads(torch.empty((n, h), dtype=dtype, device=device) if needs.hidden else None,
                      torch.empty((vocab, h), dtype=dtype, device=device) if needs.weight else None,
                      torch.zeros(vocab, dtype=dtype, device=device) if needs.bias else None)
    if n == 0 and needs.weight:
        grads.weight.zero_()
    # Sub-blocks of 4× the elementwise budget for the Top-K rows: they run ~40 small per-row ops
    # per sub-block, so fewer, larger ones; the full JSD keeps them cache-sized.
    scale = 1 if divergence.k is None else 4
    with torch.no_grad():
        for r0, r1, z, teacher_z in _blocks.two_sided_row_blocks(student, teacher, config.LOSS_BLOCK_BYTES):
            for sub in sub_blocks(r1 - r0, vocab, itemsize(dtype), scale):
                z_sub, teacher_sub = z[sub], teacher_z[sub]
                derivative = to_logits_(z_sub, student, want_derivative=needs.any)
                to_logits_(teacher_sub, teacher)
                rows = shift(sub, r0)
                value[rows], grad_logits = _loss_rows(z_sub, teacher_sub, divergence)
                torch.mul(grad_logits, row_scale[rows, None], out=z_sub)  # dz, over the logits
                if derivative is not None:
                    z_sub.mul_(derivative)
            if needs.hidden:
                torch.mm(z, weight, out=grads.hidden[r0:r1])
            if needs.weight:
                if r0 == 0:
                    torch.mm(z.T, hidden[r0:r1], out=grads.weight)
                else:
                    grads.weight.addmm_(z.T, hidden[r0:r1])
            if needs.bias:
                grads.bias += z.sum(0)
    return value, grads
