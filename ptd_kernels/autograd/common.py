"""What every autograd Function shares: the typed configs, masked-row stripping and the one gradient cast."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..backends.base import DivergenceSpec, GradNeeds, HeadGrads, LogitSpec

# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class PTDHeadConfig:
    """log-prob, entropy and (optionally) a divergence against a teacher, from one sweep per side."""

    student: LogitSpec
    teacher: LogitSpec = LogitSpec()
    divergence: DivergenceSpec | None = None  # None: log-probs and entropy only; k ≥ V: the full JSD
    want_overlap: bool = False


@dataclass(frozen=True)
class SparseJSDConfig:
    """Top-K JSD against a teacher given as ids and log-probs (the support is the ids)."""

    student: LogitSpec
    beta: float
    tail: bool


@dataclass(frozen=True)
class JSDConfig:
    """Full-vocabulary JSD_β between two output layers."""

    student: LogitSpec
    teacher: LogitSpec
    beta: float


@dataclass(frozen=True)
class LossConfig:
    """Σ_n weights_n·D_n with the gradients formed in the forward sweep."""

    student: LogitSpec
    teacher: LogitSpec
    divergence: DivergenceSpec  # k None: the full JSD (k ≥ V arrives as None)
    grad: bool  # whether the caller records a graph (the forward runs under no_grad inside apply)


@dataclass(frozen=True)
class LogitsDivergenceConfig:
    """A divergence on given logits: the full JSD (k None) or the Top-K JSD (k < V)."""

    temperature: float
    divergence: DivergenceSpec


# ----------------------------------------------------------------------------- rows and dtypes


def live_index(live: torch.Tensor) -> torch.Tensor | None:
    """None when every row is live (no copy needed), else the int64 indices of the live rows."""
    if bool(live.all()):
        return None
    return live.nonzero().squeeze(-1)


def take(x, index):
    return x if (x is None or index is None) else x.index_select(0, index)


def put(values, index, n):
    """Scatter per-live-row values [n_live, ...] back to [n, ...] with zeros elsewhere (differentiable)."""
    if index is None:
        return values
    out = values.new_zeros((n,) + tuple(values.shape[1:]))
    return out.index_copy(0, index, values)


def cast_grads(grads: HeadGrads, hidden, weight, bias):
    """The one cast of compute-dtype gradients to the input dtypes."""
    return (None if grads.hidden is None else grads.hidden.to(hidden.dtype),
            None if grads.weight is None else grads.weight.to(weight.dtype),
            None if grads.bias is None else grads.bias.to(bias.dtype))


def grad_needs(ctx, bias) -> GradNeeds:
    return GradNeeds(ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])


def detached(t):
    return None if t is None else t.detach()


_DOUBLE_BACKWARD = (
    b"ptd_kernels does not support second-order gradients: its backward forms the gradients in fused "
    b"sweeps that are not themselves differentiable. A gradient from torch.autograd.grad(..., "
    b"create_graph=True) that passed through a ptd_kernels function cannot be differentiated again "
    b"(for a gradient penalty, compute that part with ptd_kernels.reference)")


def once_differentiable(backward):
    """Wrap an autograd Function's ``backward``: it runs without a graph, and when the caller asked for
    one (``create_graph=True``) its gradients come back attached to a node that raises a clear error if
    they are differentiated again, instead of silently contributing nothing to a second derivative."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        slots = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor) and g.is_floating_point()]
        if not slots:
            return grads
        guarded = torch._C._functions.DelayedError(_DOUBLE_BACKWARD, len(slots))(
            *[grads[i].detach().requires_grad_() for i in slots])
        guarded = guarded if isinstance(guarded, tuple) else (guarded,)
        out = list(grads)
        for i, g in zip(slots, guarded):
            out[i] = g
        return tuple(out)

    return wrapper
