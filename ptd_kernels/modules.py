"""Thin ``nn.Module`` wrappers around the functional API (configuration held, no parameters).

They take the output-layer weight at call time, so they work with any model's ``lm_head``
(tied or not) without copying it, and they check their configuration when constructed::

    loss_fn = LinearTopKJSDLoss(k=100, beta=0.5)
    loss = loss_fn(student_hidden, model.lm_head.weight, teacher_hidden, ref_model.lm_head.weight)
"""

from __future__ import annotations

import warnings

import torch

from . import _validate as V
from . import functional as F

__all__ = ["LinearLogprobs", "LinearPTDTerms", "LinearJSDLoss", "LinearTopKJSDLoss", "PTDTopKJSDLoss"]


class _Wrapper(torch.nn.Module):
    """Holds a validated configuration and shows it in ``repr``."""

    _fields: tuple[str, ...] = ()

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)


def _check_common(temperature, backend) -> float:
    V.check_backend(backend)
    return V.check_temperature(temperature)


class LinearLogprobs(_Wrapper):
    """``linear_logprobs`` as a module: (hidden, weight, targets[, bias]) → logp (and entropy)."""

    _fields = ("temperature", "ignore_index", "with_entropy", "backend")

    def __init__(self, *, temperature=1.0, ignore_index=-100, with_entropy=False, backend="auto"):
        super().__init__()
        self.temperature = _check_common(temperature, backend)
        self.ignore_index = V.check_ignore_index(ignore_index)
        self.with_entropy, self.backend = bool(with_entropy), backend

    def forward(self, hidden, weight, targets, bias=None):
        return F.linear_logprobs(hidden, weight, targets, bias=bias, temperature=self.temperature,
                                 ignore_index=self.ignore_index, with_entropy=self.with_entropy,
                                 backend=self.backend)


class LinearPTDTerms(_Wrapper):
    """``linear_ptd_terms`` as a module: one sweep per side → PTDTerms(logp, entropy, jsd, overlap)."""

    _fields = ("k", "beta", "support", "tail", "temperature", "ignore_index", "backend")

    def __init__(self, k=100, *, beta=0.5, support="union", tail=True, temperature=1.0, ignore_index=-100,
                 backend="auto"):
        super().__init__()
        self.temperature = _check_common(temperature, backend)
        self.k, self.beta, self.support = V.check_k(k), V.check_beta(beta), V.check_support(support)
        self.tail, self.ignore_index, self.backend = bool(tail), V.check_ignore_index(ignore_index), backend

    def forward(self, hidden, weight, targets, teacher_hidden, teacher_weight, *, bias=None, teacher_bias=None,
                mask=None, jsd_mask=None):
        return F.linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, self.k, beta=self.beta,
                                  support=self.support, tail=self.tail, bias=bias, teacher_bias=teacher_bias,
                                  temperature=self.temperature, ignore_index=self.ignore_index, mask=mask,
                                  jsd_mask=jsd_mask, backend=self.backend)


class LinearJSDLoss(_Wrapper):
    """``linear_jsd_loss`` as a module: Σ weights·JSD_β (default: mean over unmasked rows)."""

    _fields = ("beta", "temperature", "backend")

    def __init__(self, *, beta=0.5, temperature=1.0, backend="auto"):
        super().__init__()
        self.temperature = _check_common(temperature, backend)
        self.beta, self.backend = V.check_beta(beta), backend

    def forward(self, hidden, weight, teacher_hidden, teacher_weight, *, bias=None, teacher_bias=None, mask=None,
                weights=None):
        return F.linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, beta=self.beta, bias=bias,
                                 teacher_bias=teacher_bias, temperature=self.temperature, mask=mask, weights=weights,
                                 backend=self.backend)


class LinearTopKJSDLoss(_Wrapper):
    """``linear_topk_jsd_loss`` as a module: PTD-PO's Top-K JSD with tail compensation, Σ weights·D_K."""

    _fields = ("k", "beta", "support", "tail", "temperature", "backend")

    def __init__(self, k=100, *, beta=0.5, support="union", tail=True, temperature=1.0, backend="auto"):
        super().__init__()
        self.temperature = _check_common(temperature, backend)
        self.k, self.beta, self.support = V.check_k(k), V.check_beta(beta), V.check_support(support)
        self.tail, self.backend = bool(tail), backend

    def forward(self, hidden, weight, teacher_hidden, teacher_weight, *, bias=None, teacher_bias=None, mask=None,
                weights=None):
        return F.linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, self.k, beta=self.beta,
                                      support=self.support, tail=self.tail, bias=bias, teacher_bias=teacher_bias,
                                      temperature=self.temperature, mask=mask, weights=weights,
                                      backend=self.backend)


class PTDTopKJSDLoss(LinearTopKJSDLoss):
    """Deprecated name of ``LinearTopKJSDLoss`` (all wrappers are named ``Linear*``)."""

    def __init__(self, *args, **kwargs):
        warnings.warn("PTDTopKJSDLoss is renamed LinearTopKJSDLoss", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
