"""What every autograd Function shares: the sweep config, the prepared call and its rows, masked-row
handling and the one gradient cast."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..backends.base import Backend, DivergenceSpec, GradNeeds, Head, HeadGrads, LogitSpec

# ----------------------------------------------------------------------------- what a call computes


@dataclass(frozen=True)
class SweepConfig:
    """What one call computes from its sweeps over the vocabulary.

    ``student`` (and ``teacher``): how each side's logits come from its output layer (or, for the
    logits-level functions, from the given logits: only the temperature). ``divergence``: the
    divergence between them (None: none; ``k`` None: the full JSD — a K ≥ V arrives here as None).
    ``logprobs``: return the targets' log-probs and the entropy; ``overlap``: return the top-K overlap
    and the teacher mass the support covers.
    """

    student: LogitSpec
    teacher: LogitSpec | None = None
    divergence: DivergenceSpec | None = None
    logprobs: bool = False
    overlap: bool = False


@dataclass(frozen=True)
class Rows:
    """Which rows of a call produce output, and how the sweeps leave the others out.

    ``live`` (bool [N], None: every row): the rows that produce output (target ≠ ignore_index, mask
    True). On the default path the live rows are stripped before any sweep (``index``: their int64
    ids; None when all rows are live), so masked rows cost nothing and a NaN in one cannot reach a
    gradient. On the sync-free path (``ptd_kernels.config.SYNC_FREE``) ``index`` is None although
    some rows may be masked: every row goes in with the hidden state of masked rows replaced by
    zeros, and their outputs are zeroed after.

    ``jsd_live`` (bool [N], None: the live rows): the rows that also get a divergence
    (``linear_ptd_terms``' jsd_mask); ``jsd_rows``: those rows as int64 positions among the rows that
    go in (None: all of them).
    """

    count: int
    live: torch.Tensor | None = None
    index: torch.Tensor | None = None
    jsd_live: torch.Tensor | None = None
    jsd_rows: torch.Tensor | None = None

    def take(self, x: torch.Tensor | None, *, live: torch.Tensor | None = None) -> torch.Tensor | None:
        """The rows of ``x`` [N, ...] that go in: the live ones, or every row with the masked ones zeroed
        (``live``: the mask to zero by; default the call's)."""
        if x is None:
            return None
        if self.index is not None:
            return x.index_select(0, self.index)
        live = self.live if live is None else live
        if live is None:
            return x
        return torch.where(live.reshape(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype,
                                                                                      device=x.device))

    def put(self, values: torch.Tensor, *, live: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row values of the rows that went in, as [N, ...] with zeros at masked rows (differentiable)."""
        if self.index is not None:
            return values.new_zeros((self.count, *values.shape[1:])).index_copy(0, self.index, values)
        live = self.live if live is None else live
        if live is None:
            return values
        return torch.where(live.reshape(-1, *([1] * (values.dim() - 1))), values,
                           torch.zeros((), dtype=values.dtype, device=values.device))


@dataclass(frozen=True)
class Call:
    """One public call once prepared (``ptd_kernels._prepare``): every argument checked, the backend
    selected (and wrapped for a vocabulary-parallel output layer), both sides' output layers as heads."""

    backend: Backend | None
    config: SweepConfig
    rows: Rows
    vocab: int  # the full vocabulary size V (a vocabulary-parallel rank holds a slice of it)
    student: Head | None = None
    teacher: Head | None = None
    targets: torch.Tensor | None = None  # int64 [N]; masked rows hold 0 (a valid id)
    k: int | None = None  # linear_topk's k
    teacher_indices: torch.Tensor | None = None  # int64 [N, K] (linear_sparse_jsd)
    teacher_logprobs: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # the loss functions' row weights
    logits: torch.Tensor | None = None  # the logits-level functions'
    teacher_logits: torch.Tensor | None = None
    with_entropy: bool = False
    row_loss: object = None  # linear_policy_loss's PolicyLoss or callable


# ----------------------------------------------------------------------------- rows and dtypes


def cast_grads(grads: HeadGrads, hidden, weight, bias):
    """The one cast of a backend's gradients (each in the compute dtype or already in its input's dtype:
    ``backends.base``) to the input dtypes; a no-op for those already there."""
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
