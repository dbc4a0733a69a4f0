"""The cuBLAS backend (``backend="cublas"``): GEMMs at cuBLAS speed plus counted elementwise passes.

Every logits product is a cuBLAS GEMM (``torch.mm`` with bf16/fp16 operands, fp32 accumulation and fp32
output), written into a float32 block of the sweep; one or two fused Triton elementwise kernels per block
then do all of the block's per-logit work in place; the gradients are two more GEMMs per block on the
∂L/∂a the kernels wrote over the block. Time is therefore GEMMs whose speed is known plus memory passes
and launches that can be counted (``_work.counting``; ``statement.py`` prints the count at any shape).

Blocking (``_blocks``; the one knob: ``ptd_kernels.config.CUDA_BLOCK_BYTES``):

- forward statistics and recomputing backward sweeps go over VOCABULARY blocks with all rows: each
  weight slice is read once, d weight of a slice is written once, d hidden [N, H] fp32 (134 MB at
  N = 8192, H = 4096) is accumulated; at the default budget and N = 8192, V = 151936 that is 6 blocks
  of 8192 × 25328 (one side) or 11 of 8192 × 13824 (both sides of the JSD backward). The forward and the
  backward sweep of the same rows share this plan, so their GEMMs are the same calls and round every
  logit alike (p = e^{z − lse} of the backward is the forward's exactly);
- where a whole row must be in hand before its gradient is known (the one-sweep loss; the full JSD's
  forward, which needs both logsumexps before any term), ROW blocks of whole vocabulary rows: d hidden
  of a block is written once, d weight [V, H] fp32 (2.49 GB) is read and written once per row block, so
  the teacher's side of the Top-K loss is first reduced to its lse and top-k by its own forward sweep and
  only the student's block must fit (1,366 rows per block at the default: 6 blocks; the full JSD holds
  both sides: 745 rows, 11 blocks).

Counted work (``statement.py``: the code's own GEMMs and launches on meta tensors) at N = 8192, H = 4096,
V = 151936, K = 100, bf16, default budget — logits-GEMM equivalents (2·N·V·H FLOPs each, the same as the
chunked CPU path), kernel launches, elementwise bytes, working memory:

    log-prob + entropy, fwd+bwd          4   (24 GEMMs)   12 launches   12.5 GB   0.77 GiB
    teacher top-100                      1   ( 6 GEMMs)    6 launches    5.1 GB   0.84 GiB
    PTD terms / Top-K JSD, fwd+bwd       5   (30 GEMMs)   20 launches   31.3 GB   0.84 GiB   (13.6 GB: gathers)
    per-row full JSD, fwd+bwd            6   (66 GEMMs)   44 launches   32.4 GB   0.84 GiB
    one-sweep Top-K JSD loss             4   (24 GEMMs)   30 launches   24.4 GB   0.84 GiB
    one-sweep full JSD loss              4   (44 GEMMs)   44 launches   32.4 GB   0.84 GiB

plus small torch ops on O(rows·K) arrays (8 to 546 per op). The modelled times and what holds each ratio
back are in ``docs/cublas.md``.

Module map: ``_work`` (the one door of GEMMs, launches and work buffers), ``_blocks`` (plans, operands,
tiles), kernels with their launchers (``stats_kernel``, ``grad_kernel``, ``jsd_stats_kernel``,
``jsd_grad_kernel``, ``gather_kernel``, ``block_gather_kernel``; top-K keys in ``keys``), and the sweeps
that compose them (``row_stats``, ``head_backward``, ``jsd``, ``fused_loss``). Under TRITON_INTERPRET=1
on a CPU the kernels run in the interpreter and the GEMMs are torch CPU matmuls on upcast operands.
"""

from __future__ import annotations

from ..base import Backend


class CublasBackend(Backend):
    """Every primitive of ``Backend``, the one-sweep loss included, as cuBLAS GEMMs and Triton
    elementwise kernels. The modules are imported on first use (nothing compiles until a call)."""

    name = "cublas"

    def row_stats(self, head, *, targets=None, k=0, with_mean_logit=True, lse_dtype=None):
        from .row_stats import row_stats

        return row_stats(head, targets=targets, k=k, with_mean_logit=with_mean_logit, lse_dtype=lse_dtype)

    def gather_logits(self, head, ids, dtype):
        from ._blocks import tiles
        from .gather_kernel import gather_head_logits

        return gather_head_logits(head, ids, dtype, tiles=tiles("gather"))

    def head_backward(self, head, lse, coefs, needs):
        from .head_backward import head_backward

        return head_backward(head, lse, coefs, needs)

    def jsd_forward(self, student, teacher, beta, *, lse=None, teacher_lse=None):
        from .jsd import jsd_forward

        return jsd_forward(student, teacher, beta, lse=lse, teacher_lse=teacher_lse)

    def jsd_backward(self, student, teacher, beta, stats, grad, needs):
        from .jsd import jsd_backward

        return jsd_backward(student, teacher, beta, stats, grad, needs)

    def fused_loss_pays(self, student, teacher=None):
        from .fused_loss import fused_loss_pays

        return fused_loss_pays(student, teacher)

    def fused_loss(self, student, teacher, divergence, row_loss, needs, *, targets=None):
        from .fused_loss import fused_loss

        return fused_loss(student, teacher, divergence, row_loss, needs, targets=targets)
