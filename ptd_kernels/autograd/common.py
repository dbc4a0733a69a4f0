"""What every autograd Function shares: the typed configs, masked-row stripping and the one gradient cast."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.base import DivergenceSpec, GradNeeds, HeadGrads

# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class PTDHeadConfig:
    """log-prob, entropy and (optionally) a divergence against a teacher, from one sweep per side."""

    temperature: float
    divergence: DivergenceSpec | None = None  # None: log-probs and entropy only; k ≥ V: the full JSD
    want_overlap: bool = False


@dataclass(frozen=True)
class SparseJSDConfig:
    """Top-K JSD against a teacher given as ids and log-probs (the support is the ids)."""

    temperature: float
    beta: float
    tail: bool


@dataclass(frozen=True)
class JSDConfig:
    """Full-vocabulary JSD_β between two output layers (or two given logits)."""

    temperature: float
    beta: float


@dataclass(frozen=True)
class LossConfig:
    """Σ_n weights_n·D_n with the gradients formed in the forward sweep."""

    temperature: float
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


