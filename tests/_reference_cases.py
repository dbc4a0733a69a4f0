"""Problems and hand formulas shared by the reference tests (test_reference*.py)."""

from __future__ import annotations

import math

import torch

from ptd_kernels import SUPPORTS as SUPPORTS  # re-exported for the reference tests

F64 = torch.float64
BETAS = (0.0, 0.5, 1.0)


def _problem(n=6, h=5, v=9, th=7, dtype=F64, seed=0, scale=1.0):
    """Random student (hidden, weight, bias) and teacher (hidden, weight, bias); teacher H' ≠ H."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) * scale
    bias = torch.randn(v, generator=g, dtype=F64) * 0.3
    t_hidden = torch.randn(n, th, generator=g, dtype=F64)
    t_weight = torch.randn(v, th, generator=g, dtype=F64) * scale
    t_bias = torch.randn(v, generator=g, dtype=F64) * 0.3
    return tuple(t.to(dtype) for t in (hidden, weight, bias, t_hidden, t_weight, t_bias))


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _gjsd(p, q, beta):
    """Generalized JSD of two explicit probability lists, in plain Python."""
    if beta == 0.0:
        return _kl(q, p)
    if beta == 1.0:
        return _kl(p, q)
    m = [beta * y + (1.0 - beta) * x for x, y in zip(p, q)]
    return beta * _kl(q, m) + (1.0 - beta) * _kl(p, m)


def _identity_inputs(p_rows, q_rows, temperature=1.0):
    """hidden = τ·log p with an identity weight, so the logits / τ are exactly log p."""
    hp = torch.tensor([[temperature * math.log(x) for x in row] for row in p_rows], dtype=F64)
    hq = torch.tensor([[temperature * math.log(x) for x in row] for row in q_rows], dtype=F64)
    eye = torch.eye(hp.shape[1], dtype=F64)
    return hp, eye, hq, eye.clone()


def _renorm(xs):
    s = sum(xs)
    return [x / s for x in xs]


def _with_tail(xs):
    return list(xs) + [1.0 - sum(xs)]


def _min_gap(z):
    s = torch.sort(z, dim=-1, descending=True).values
    return float((s[:, :-1] - s[:, 1:]).min())


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=2e-6)
