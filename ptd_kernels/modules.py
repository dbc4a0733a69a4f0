"""Thin ``nn.Module`` wrappers around the functional API (configuration held, no parameters).

They take the output-layer weight at call time, so they work with any model's ``lm_head``
(tied or not) without copying it::

    loss_fn = PTDTopKJSDLoss(k=100, beta=0.5)
    loss = loss_fn(student_hidden, model.lm_head.weight, teacher_hidden, ref_model.lm_head.weight)
"""

from __future__ import annotations

import torch

from . import functional as F


class LinearLogprobs(torch.nn.Module):
    """``linear_logprobs`` as a module: (hidden, weight, targets[, bias]) → logp (and entropy)."""

    def __init__(self, *, temperature=1.0, ignore_index=-100, with_entropy=False, backend="auto"):
        super().__init__()
        self.temperature, self.ignore_index = temperature, ignore_index
        self.with_entropy, self.backend = with_entropy, backend

    def forward(self, hidden, weight, targets, bias=None):
        return F.linear_logprobs(hidden, weight, targets, bias=bias, temperature=self.temperature,
                                 ignore_index=self.ignore_index, with_entropy=self.with_entropy,
                                 backend=self.backend)


class LinearPTDTerms(torch.nn.Module):
    """``linear_ptd_terms`` as a module: one sweep per side → PTDTerms(logp, entropy, jsd, overlap)."""

    def __init__(self, k=100, *, beta=0.5, support="union", tail=True, temperature=1.0, ignore_index=-100,
                 backend="auto"):
        super().__init__()
        self.k, self.beta, self.support, self.tail = k, beta, support, tail
        self.temperature, self.ignore_index, self.backend = temperature, ignore_index, backend

    def forward(self, hidden, weight, targets, teacher_hidden, teacher_weight, *, bias=None, teacher_bias=None,
                mask=None, jsd_mask=None):
        return F.linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, self.k, beta=self.beta,
                                  support=self.support, tail=self.tail, bias=bias, teacher_bias=teacher_bias,
                                  temperature=self.temperature, ignore_index=self.ignore_index, mask=mask,
                                  jsd_mask=jsd_mask, backend=self.backend)


class LinearJSDLoss(torch.nn.Module):
    """``linear_jsd_loss`` as a module: Σ weights·JSD_β (default: mean over unmasked rows)."""

    def __init__(self, *, beta=0.5, temperature=1.0, backend="auto"):
        super().__init__()
        self.beta, self.temperature, self.backend = beta, temperature, backend

    def forward(self, hidden, weight, teacher_hidden, teacher_weight, *, bias=None, teacher_bias=None, mask=None,
                weights=None):
        return F.linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, beta=self.beta, bias=bias,
                                 teacher_bias=teacher_bias, temperature=self.temperature, mask=mask, weights=weights,
                                 backend=self.backend)


class PTDTopKJSDLoss(torch.nn.Module):
    """``linear_topk_jsd_loss`` as a module: PTD-PO's Top-K JSD with tail compensation, Σ weights·D_K."""

    def __init__(self, k=100, *, beta=0.5, support="union", tail=True, temperature=1.0, backend="auto"):
        super().__init__()
        self.k, self.beta, self.support, self.tail = k, beta, support, tail
        self.temperature, self.backend = temperature, backend

    def forward(self, hidden, weight, teacher_hidden, teacher_weight, *, bias=None, teacher_bias=None, mask=None,
                weights=None):
        return F.linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, self.k, beta=self.beta,
                                      support=self.support, tail=self.tail, bias=bias, teacher_bias=teacher_bias,
                                      temperature=self.temperature, mask=mask, weights=weights,
                                      backend=self.backend)
