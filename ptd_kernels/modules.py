"""Thin ``nn.Module`` wrappers around the functional API (configuration held, no parameters).

They take the output-layer weight at call time, so they work with any model's ``lm_head``
(tied or not) without copying it, and they check their configuration when constructed::

    loss_fn = LinearTopKJSDLoss(k=100, beta=0.5, softcap=30.0)   # a Gemma-2 student
    loss = loss_fn(student_hidden, model.lm_head.weight, teacher_hidden, ref_model.lm_head.weight)
"""

from __future__ import annotations

import torch

from . import _validate as validate
from . import functional

__all__ = ["LinearLogprobs", "LinearPTDTerms", "LinearJSDLoss", "LinearTopKJSDLoss"]


class _Wrapper(torch.nn.Module):
    """Holds a validated configuration and shows it in ``repr``."""

    _fields: tuple[str, ...] = ()

    def _configure(self, *, temperature, backend, logit_scale, softcap, process_group, teacher=None, **fields):
        """Check and store the configuration; ``teacher`` = (teacher_logit_scale, teacher_softcap) or None."""
        validate.check_backend(backend)
        self.temperature, self.backend = validate.check_temperature(temperature), backend
        self.process_group = process_group  # a vocabulary-parallel output layer (weight: this rank's slice)
        self.logit_scale = validate.check_logit_scale("logit_scale", logit_scale)
        self.softcap = validate.check_softcap("softcap", softcap)
        transforms = ("logit_scale", "softcap")
        if teacher is not None:
            self.teacher_logit_scale = validate.check_logit_scale("teacher_logit_scale", teacher[0])
            self.teacher_softcap = validate.check_softcap("teacher_softcap", teacher[1])
            transforms += ("teacher_logit_scale", "teacher_softcap")
        for name, value in fields.items():
            setattr(self, name, value)
        self._fields = (*fields, "temperature", *transforms, "backend") + (
            ("process_group",) if process_group is not None else ())
        self._configured = True

    def __setattr__(self, name, value):
        if name in self._fields and getattr(self, "_configured", False):
            raise AttributeError(f"{type(self).__name__}.{name} is fixed when the module is built (it was checked "
                                 "then): build a new module")
        super().__setattr__(name, value)

    def _kwargs(self, *names) -> dict:
        return {name: getattr(self, name) for name in names}

    def _transforms(self) -> dict:
        """The logit transforms and the process group, as keyword arguments of the functions."""
        names = [name for name in self._fields if "logit_scale" in name or "softcap" in name]
        return {**{name: getattr(self, name) for name in names}, "process_group": self.process_group}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)


class LinearLogprobs(_Wrapper):
    """``linear_logprobs`` as a module: (hidden, weight, targets[, bias]) → logp (and entropy)."""

    def __init__(self, *, temperature=1.0, ignore_index=-100, with_entropy=False, logit_scale=1.0, softcap=None,
                 process_group=None, backend="auto"):
        super().__init__()
        self._configure(temperature=temperature, backend=backend, logit_scale=logit_scale, softcap=softcap,
                        process_group=process_group,
                        ignore_index=validate.check_ignore_index(ignore_index),
                        with_entropy=validate.check_bool("with_entropy", with_entropy))

    def forward(self, hidden, weight, targets, bias=None):
        return functional.linear_logprobs(hidden, weight, targets, bias=bias, **self._transforms(),
                                          **self._kwargs("temperature", "ignore_index", "with_entropy", "backend"))


class LinearPTDTerms(_Wrapper):
    """``linear_ptd_terms`` as a module: one sweep per side → PTDTerms(logp, entropy, jsd, overlap)."""

    def __init__(self, k=100, *, beta=0.5, support="union", tail=True, temperature=1.0, ignore_index=-100,
                 logit_scale=1.0, softcap=None, teacher_logit_scale=1.0, teacher_softcap=None, process_group=None,
                 backend="auto"):
        super().__init__()
        self._configure(temperature=temperature, backend=backend, logit_scale=logit_scale, softcap=softcap,
                        process_group=process_group, teacher=(teacher_logit_scale, teacher_softcap),
                        k=validate.check_k(k), beta=validate.check_beta(beta),
                        support=validate.check_support(support), tail=validate.check_bool("tail", tail),
                        ignore_index=validate.check_ignore_index(ignore_index))

    def forward(self, hidden, weight, targets, teacher_hidden, teacher_weight, *, bias=None, teacher_bias=None,
                mask=None, jsd_mask=None):
        return functional.linear_ptd_terms(
            hidden, weight, targets, teacher_hidden, teacher_weight, self.k, bias=bias, teacher_bias=teacher_bias,
            mask=mask, jsd_mask=jsd_mask, **self._transforms(),
            **self._kwargs("beta", "support", "tail", "temperature", "ignore_index", "backend"))


class LinearJSDLoss(_Wrapper):
    """``linear_jsd_loss`` as a module: Σ weights·JSD_β (default: mean over unmasked rows)."""

    def __init__(self, *, beta=0.5, temperature=1.0, logit_scale=1.0, softcap=None, teacher_logit_scale=1.0,
                 teacher_softcap=None, process_group=None, backend="auto"):
        super().__init__()
        self._configure(temperature=temperature, backend=backend, logit_scale=logit_scale, softcap=softcap,
                        process_group=process_group, teacher=(teacher_logit_scale, teacher_softcap),
                        beta=validate.check_beta(beta))

    def forward(self, hidden, weight, teacher_hidden, teacher_weight, *, bias=None, teacher_bias=None, mask=None,
                weights=None):
        return functional.linear_jsd_loss(
            hidden, weight, teacher_hidden, teacher_weight, bias=bias, teacher_bias=teacher_bias, mask=mask,
            weights=weights, **self._transforms(), **self._kwargs("beta", "temperature", "backend"))


class LinearTopKJSDLoss(_Wrapper):
    """``linear_topk_jsd_loss`` as a module: PTD-PO's Top-K JSD with tail compensation, Σ weights·D_K."""

    def __init__(self, k=100, *, beta=0.5, support="union", tail=True, temperature=1.0, logit_scale=1.0, softcap=None,
                 teacher_logit_scale=1.0, teacher_softcap=None, process_group=None, backend="auto"):
        super().__init__()
        self._configure(temperature=temperature, backend=backend, logit_scale=logit_scale, softcap=softcap,
                        process_group=process_group, teacher=(teacher_logit_scale, teacher_softcap),
                        k=validate.check_k(k), beta=validate.check_beta(beta),
                        support=validate.check_support(support), tail=validate.check_bool("tail", tail))

    def forward(self, hidden, weight, teacher_hidden, teacher_weight, *, bias=None, teacher_bias=None, mask=None,
                weights=None):
        return functional.linear_topk_jsd_loss(
            hidden, weight, teacher_hidden, teacher_weight, self.k, bias=bias, teacher_bias=teacher_bias, mask=mask,
            weights=weights, **self._transforms(), **self._kwargs("beta", "support", "tail", "temperature", "backend"))
