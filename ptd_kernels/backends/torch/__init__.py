"""The chunked PyTorch backend: bounded logits blocks, recomputed in backward (CPU, and the
fallback everywhere). Same memory rule as the Triton kernels: nothing grows with N·V."""

from __future__ import annotations

from ..base import Backend
from . import fused_loss, head_backward, jsd, row_stats


class TorchBackend(Backend):
    """Every primitive of ``Backend`` by chunked PyTorch, plus the one-sweep loss."""

    name = "torch"

    def row_stats(self, head, *, targets=None, k=0, with_mean_logit=True, lse_dtype=None):
        return row_stats.row_stats(head, targets=targets, k=k, with_mean_logit=with_mean_logit, lse_dtype=lse_dtype)

    def head_backward(self, head, lse, coefs, needs):
        return head_backward.head_backward(head, lse, coefs, needs)

    def jsd_forward(self, student, teacher, beta, *, lse=None, teacher_lse=None):
        return jsd.jsd_forward(student, teacher, beta, lse=lse, teacher_lse=teacher_lse)

    def jsd_backward(self, student, teacher, beta, stats, grad, needs):
        return jsd.jsd_backward(student, teacher, beta, stats, grad, needs)

    def fused_loss_pays(self, student, teacher=None):
        return fused_loss.fused_loss_pays(student, teacher)

    def fused_loss(self, student, teacher, divergence, row_loss, needs, *, targets=None):
        return fused_loss.fused_loss(student, teacher, divergence, row_loss, needs, targets=targets)
