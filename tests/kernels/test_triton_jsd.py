"""Full-vocabulary JSD kernels (Triton: compiled on a GPU, the interpreter on a CPU) against dense float64
torch: tile overrides, mixed and shared sides, extreme rows, strides, the launcher's checks. What every
backend must do (β = 0, 0.3, 0.5, 1 in each dtype) is tests/kernels/test_conformance.py.

The oracle here is the textbook formula (mixture M, two KLs), written independently of
``rowmath``; gradients come from torch.autograd of Σ_n grad[n]·JSD_n. V = 200, H = 40 and the
teacher's H' = 24 are not multiples of any tile used.
"""

from __future__ import annotations

import math

import pytest
import torch
from _checks import TOLERANCE, acc_dtype, assert_rel_close
from _devices import tiles as tile_sizes

from ptd_kernels import rowmath
from ptd_kernels.backends.base import GradNeeds, Head, JSDStats
from ptd_kernels.backends.triton.jsd_backward import jsd_backward
from ptd_kernels.backends.triton.jsd_forward import jsd_forward

N, V, H, TH = 7, 200, 40, 24
TAU = 0.7
SMALL_TILES = tile_sizes(block_n=16, block_v=64, block_h=16)  # several V and H steps per program
DEFAULT_TILES: dict = {}

# max |kernel − exact| / max |exact|, that of the computation's dtype. The forward accumulates in fp32 even
# for bf16 operands; the bf16 backward rounds dz to bf16 before the gradient dots.
VALUE_TOL = {**TOLERANCE, torch.bfloat16: TOLERANCE[torch.float32]}
GRAD_TOL = TOLERANCE

pytestmark = pytest.mark.backend("triton")


def dense_jsd(logp, logq, beta):
    """JSD_β rows by the definition (docs/method.md §2), float64."""
    p, q = logp.exp(), logq.exp()
    if beta == 0.0:
        return (q * (logq - logp)).sum(-1)
    if beta == 1.0:
        return (p * (logp - logq)).sum(-1)
    # log M in log space: M underflows where both P and Q do (one-hot rows), log M does not.
    logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
    kl_qm = (q * (logq - logm)).sum(-1)
    kl_pm = (p * (logp - logm)).sum(-1)
    return beta * kl_qm + (1 - beta) * kl_pm


def leaf(t):
    return None if t is None else t.detach().to(torch.float64).clone().requires_grad_()


def logits64(hidden, weight, bias, tau=TAU):
    z = hidden.to(torch.float64) @ weight.to(torch.float64).T
    if bias is not None:
        z = z + bias.to(torch.float64)
    return z / tau


class Case:
    """One student/teacher pair; ``check`` runs both sweeps and compares them with the oracle."""

    def __init__(self, dtype=torch.float32, with_bias=True, teacher_dtype=None, n=N, th=TH, shared=False,
                 device="cpu"):
        teacher_dtype = teacher_dtype or dtype
        self.hidden = torch.randn(n, H).to(device, dtype)
        self.weight = (0.3 * torch.randn(V, H)).to(device, dtype)
        self.bias = torch.randn(V).to(device, dtype) if with_bias else None
        self.teacher_hidden = torch.randn(n, H if shared else th).to(device, teacher_dtype)
        self.teacher_weight = self.weight if shared else (0.3 * torch.randn(V, th)).to(device, teacher_dtype)
        self.teacher_bias = torch.randn(V).to(device, teacher_dtype) if with_bias else None
        self.grad = torch.randn(n, dtype=torch.float64).to(device)

    def teacher(self):
        return self.teacher_hidden, self.teacher_weight, self.teacher_bias

    def heads(self, tau=TAU):
        return Head(self.hidden, self.weight, self.bias, tau), Head(*self.teacher(), tau)

    def check(self, beta, tiles=DEFAULT_TILES, value_tol=None, grad_tol=None, tau=TAU):
        dtype = self.hidden.dtype
        # The less precise side sets the tolerance (teacher logits are computed in its dtype).
        sides = (dtype, self.teacher_hidden.dtype)
        value_tol = max(VALUE_TOL[d] for d in sides) if value_tol is None else value_tol
        grad_tol = max(GRAD_TOL[d] for d in sides) if grad_tol is None else grad_tol
        x, w, b = leaf(self.hidden), leaf(self.weight), leaf(self.bias)
        z = logits64(x, w, b, tau)
        zt = logits64(*self.teacher(), tau)  # plain tensors: no gradient to the teacher
        logp, logq = z.log_softmax(-1), zt.log_softmax(-1)
        value = dense_jsd(logp, logq, beta)
        (self.grad * value).sum().backward()
        _, w_parts = rowmath.jsd_pointwise(logp.detach(), logq, beta)

        acc = acc_dtype(dtype)
        lse, t_lse = z.detach().logsumexp(-1).to(acc), zt.logsumexp(-1).to(acc)
        stats = jsd_forward(*self.heads(tau), beta, lse=lse, teacher_lse=t_lse, **tiles)
        k_value, w_sum = stats.value, stats.w_sum
        assert k_value.dtype == acc and w_sum.dtype == acc
        assert_rel_close(k_value, value.detach(), value_tol, "value")
        assert_rel_close(w_sum, w_parts.sum(-1), value_tol, "w_sum")
        gx, gw, gb = jsd_backward(*self.heads(tau), beta, stats, self.grad.to(acc), **tiles)
        assert gx.dtype == acc and gw.dtype == acc
        assert_rel_close(gx, x.grad, grad_tol, "grad_hidden")
        assert_rel_close(gw, w.grad, grad_tol, "grad_weight")
        if self.bias is None:
            assert gb is None
        else:
            assert gb.dtype == acc
            assert_rel_close(gb, b.grad, grad_tol, "grad_bias")
        return k_value, (gx, gw, gb)


@pytest.mark.parametrize("beta", [0.3, 0.5])
def test_default_tiles(beta, device):
    """H100 tiles: one masked H step (H < BLOCK_H), V split 128 + 72."""
    Case(torch.float32, with_bias=True, device=device).check(beta, DEFAULT_TILES)


@pytest.mark.parametrize("student, teacher", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float64, torch.float32)])
def test_teacher_dtype_differs(student, teacher, device):
    Case(student, with_bias=True, teacher_dtype=teacher, device=device).check(0.5, SMALL_TILES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_shared_weight(dtype, beta, device):
    """teacher_weight is weight: the fast path must agree with the oracle and with a copy."""
    case = Case(dtype, with_bias=True, shared=True, device=device)
    value, grads = case.check(beta, SMALL_TILES)
    copy = Case.__new__(Case)
    copy.__dict__.update(case.__dict__, teacher_weight=case.weight.clone())
    copy_value, copy_grads = copy.check(beta, SMALL_TILES)
    torch.testing.assert_close(value, copy_value, rtol=1e-6, atol=1e-7)
    for g, c in zip(grads, copy_grads):
        torch.testing.assert_close(g.double(), c.double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_extreme_rows(dtype, beta, device):
    """Row 0: logits at the 1e4 scale on both sides (one-hot P and Q); row 1: equal student logits."""
    case = Case(torch.float64, with_bias=True, device=device)
    case.hidden[0] *= 1000.0
    case.teacher_hidden[0] *= 1000.0
    case.hidden[1] = 0.0
    # Constant biases keep row 1 equal; at 80/τ, exp(z) of a padding row would overflow fp32.
    case.bias.fill_(80.0)
    case.teacher_bias.fill_(80.0)
    for name in ("hidden", "weight", "bias", "teacher_hidden", "teacher_weight", "teacher_bias"):
        setattr(case, name, getattr(case, name).to(dtype))
    z = logits64(case.hidden, case.weight, case.bias)
    assert (z[0] - z[0].median()).abs().max() > 5e3 and torch.all(z[1] == z[1, 0])
    # Row 0's exact gradient is ~0 (P is one-hot), but it is computed as (1 − p_top)·(terms up to
    # |log p/q| ~ 3e3), scaled by |hidden[0]| ~ 1e3 in grad_weight, where 1 − p_top is the rounding
    # of z_top − lse: ~1e-12 in float64 (the ulp of z at 6e3; hence 1e-4 relative to the other
    # rows' gradients ~0.1), ~5e-4 in float32. For float32 the value is checked to that ulp and
    # row 0 is removed from the gradient (it must still not poison the other rows, whose logits
    # sit at 80/τ, where the float32 ulp is 8e-6: hence 1e-4).
    if dtype == torch.float64:
        value, _ = case.check(beta, SMALL_TILES, value_tol=1e-10, grad_tol=1e-4)
    else:
        case.grad[0] = 0.0
        value, (gx, _, _) = case.check(beta, SMALL_TILES, value_tol=3e-3, grad_tol=1e-4)
        assert torch.all(gx[0] == 0)
    assert torch.isfinite(value).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_single_row_and_strided_teacher(beta, device):
    case = Case(torch.float32, with_bias=True, n=1, device=device)
    case.teacher_hidden = torch.randn(1, 2 * TH, device=device)[:, ::2]
    case.teacher_weight = (0.3 * torch.randn(TH, V, device=device)).T
    case.check(beta, SMALL_TILES)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_identical_distributions_give_zero(beta, device):
    """P = Q: JSD_β is 0 and so is its gradient (w − p·Σw vanishes entry by entry)."""
    case = Case(torch.float64, with_bias=True, device=device)
    case.teacher_hidden, case.teacher_weight, case.teacher_bias = case.hidden, case.weight, case.bias
    value, (gx, gw, gb) = case.check(beta, SMALL_TILES, value_tol=math.inf, grad_tol=math.inf)
    assert value.abs().max() < 1e-12
    for g in (gx, gw, gb):
        assert g.abs().max() < 1e-12


def test_zero_grad_rows_and_need_flags(device):
    case = Case(torch.float32, with_bias=True, device=device)
    case.grad[2] = 0.0  # a masked row
    _, (gx, gw, gb) = case.check(0.5, SMALL_TILES)
    assert torch.all(gx[2] == 0)
    z = logits64(case.hidden, case.weight, case.bias)
    zt = logits64(*case.teacher())
    stats = jsd_forward(*case.heads(), 0.5, lse=z.logsumexp(-1).float(), teacher_lse=zt.logsumexp(-1).float(),
                        **SMALL_TILES)
    only_x = jsd_backward(*case.heads(), 0.5, stats, case.grad.float(), GradNeeds(weight=False, bias=False),
                          **SMALL_TILES)
    assert only_x.weight is None and only_x.bias is None
    torch.testing.assert_close(only_x.hidden, gx, rtol=0, atol=1e-6)
    no_x = jsd_backward(*case.heads(), 0.5, stats, case.grad.float(), GradNeeds(hidden=False), **SMALL_TILES)
    assert no_x.hidden is None
    torch.testing.assert_close(no_x.weight, gw, rtol=0, atol=1e-6)
    torch.testing.assert_close(no_x.bias, gb, rtol=0, atol=1e-6)


def test_bad_inputs_are_rejected(device):
    case = Case(torch.float32, with_bias=True, device=device)
    lse = torch.zeros(N, device=device)
    student, teacher = case.heads()
    with pytest.raises(ValueError, match="beta"):
        jsd_forward(student, teacher, 1.5, lse=lse, teacher_lse=lse)
    with pytest.raises(ValueError, match="vocabulary"):
        jsd_forward(student, Head(case.teacher_hidden, case.teacher_weight[:-1], None, TAU), 0.5, lse=lse,
                    teacher_lse=lse)
    with pytest.raises(ValueError, match="teacher_hidden"):
        jsd_forward(student, Head(case.teacher_hidden[:-1], case.teacher_weight, None, TAU), 0.5, lse=lse,
                    teacher_lse=lse)
    with pytest.raises(ValueError, match="teacher_lse"):
        jsd_forward(student, teacher, 0.5, lse=lse, teacher_lse=lse[:-1])
    with pytest.raises(ValueError, match="grad"):
        jsd_backward(student, teacher, 0.5, JSDStats(lse, lse, lse, lse), lse[:-1])


@pytest.mark.slow
def test_many_row_tiles(device):
    """N = 150 rows in 16-row tiles: 10 row blocks looped over by the interpreter's 4 programs; the
    backward's sweeps cross chunk boundaries both ways."""
    Case(torch.float32, with_bias=True, n=150, device=device).check(0.5, tile_sizes(block_n=16, block_v=64, block_h=64))
