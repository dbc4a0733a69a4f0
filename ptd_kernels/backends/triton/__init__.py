"""The Triton backend: the vocabulary sweeps as GPU kernels (or under ``TRITON_INTERPRET=1`` on a CPU).

One kernel per file with its launcher beside it (``row_stats``, ``head_backward``, ``jsd_forward``,
``jsd_backward``; what the two JSD sweeps share in ``jsd``), shared ``@triton.jit`` helpers in
``tiles``, per-element math in ``rowmath`` (the Triton twin of ``ptd_kernels.rowmath``), launch
facts in ``_launch``, the compile-only launch plan for a GPU that is not here in ``launch_plan``. The kernel modules are imported on first use, so
that selecting a backend never compiles or imports Triton code it does not run.
"""

from __future__ import annotations

import torch

from ..base import Backend


class TritonBackend(Backend):
    """Every primitive of ``Backend`` by Triton kernels; gathers at a few ids per row stay in PyTorch.
    No one-sweep loss: the loss functions take the per-row path."""

    name = "triton"

    def row_stats(self, head, *, targets=None, k=0, with_mean_logit=True, lse_dtype=None):
        from . import row_stats

        # Beyond the register top-k, and for float64 logits (the kernel ranks float32 keys, which would
        # tie logits closer than a float32 ulp, e.g. saturated soft-capped ones), the chunked path does
        # the same sweep.
        if k > row_stats.MAX_K or (k and head.dtype == torch.float64):
            from ..torch.row_stats import row_stats as torch_row_stats

            return torch_row_stats(head, targets=targets, k=k, with_mean_logit=with_mean_logit, lse_dtype=lse_dtype)
        return row_stats.row_stats(head, targets=targets, k=k, with_mean_logit=with_mean_logit, lse_dtype=lse_dtype)

    def head_backward(self, head, lse, coefs, needs):
        from . import head_backward

        return head_backward.head_backward(head, lse, coefs, needs)

    def jsd_forward(self, student, teacher, beta, *, lse=None, teacher_lse=None):
        from .jsd_forward import jsd_forward

        return jsd_forward(student, teacher, beta, lse=lse, teacher_lse=teacher_lse)

    def jsd_backward(self, student, teacher, beta, stats, grad, needs):
        from .jsd_backward import jsd_backward

        return jsd_backward(student, teacher, beta, stats, grad, needs)
