"""head_backward (Triton, interpreter on CPU) against dense float64 torch on small shapes.

Shapes are chosen so that no tile divides them: V = 200 against BLOCK_V ∈ {64, 128}, H = 40
against BLOCK_H ∈ {16, 64}, N = 7 against BLOCK_N ∈ {16, 64}.
"""

from __future__ import annotations

import pytest
import torch

from ptd_kernels.triton.head_backward import head_backward

N, V, H = 7, 200, 40
TAU = 0.7
SMALL_TILES = dict(block_n=16, block_v=64, block_h=16)  # several V and H steps per program
DEFAULT_TILES: dict = {}

# max |kernel − exact| / max |exact| allowed per input dtype. bf16/fp16 round dz to the operand
# dtype before the gradient dots (as torch's own bf16 backward does).
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_rel_close(actual, expected, tol, what):
    actual = actual.to(torch.float64)
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max() / scale
    assert err <= tol, f"{what}: relative error {err.item():.3e} > {tol:.1e}"


def make_inputs(dtype, with_bias, n=N, v=V, h=H):
    hidden = torch.randn(n, h).to(dtype)
    weight = (0.3 * torch.randn(v, h)).to(dtype)
    bias = torch.randn(v).to(dtype) if with_bias else None
    return hidden, weight, bias


def dense_logits(hidden, weight, bias, tau=TAU):
    """float64 logits of the (already rounded) inputs, as detached leaves that require grad."""
    x = hidden.detach().to(torch.float64).clone().requires_grad_()
    w = weight.detach().to(torch.float64).clone().requires_grad_()
    b = None if bias is None else bias.detach().to(torch.float64).clone().requires_grad_()
    z = x @ w.T
    if b is not None:
        z = z + b
    return x, w, b, z / tau


def dense_dz(z, lse, row_coef, logit_coef, targets, target_coef):
    p = (z - lse[:, None]).exp()
    coef = row_coef[:, None] if logit_coef is None else row_coef[:, None] + logit_coef[:, None] * z
    dz = p * coef
    if targets is not None:
        dz[torch.arange(z.shape[0]), targets] += target_coef
    return dz


def run_and_compare(hidden, weight, bias, coefs, tiles, tol, tau=TAU):
    row_coef, logit_coef, targets, target_coef = coefs
    x, w, b, z = dense_logits(hidden, weight, bias, tau)
    z = z.detach()
    lse = z.logsumexp(-1)
    dz = dense_dz(z, lse, row_coef, logit_coef, targets, target_coef)
    acc = acc_dtype(hidden.dtype)

    def cast(t):
        return None if t is None else t.to(acc)

    gx, gw, gb = head_backward(hidden, weight, bias, tau, cast(lse), cast(row_coef), cast(logit_coef),
                               targets, cast(target_coef), **tiles)
    assert gx.dtype == hidden.dtype and gw.dtype == weight.dtype
    assert_rel_close(gx, dz @ w.detach() / tau, tol, "grad_hidden")
    assert_rel_close(gw, dz.T @ x.detach() / tau, tol, "grad_weight")
    if bias is None:
        assert gb is None
    else:
        assert gb.dtype == bias.dtype
        assert_rel_close(gb, dz.sum(0) / tau, tol, "grad_bias")
    return gx, gw, gb


def random_coefs(n=N, v=V, logit=True, target=True):
    row_coef = torch.randn(n, dtype=torch.float64)
    logit_coef = torch.randn(n, dtype=torch.float64) if logit else None
    targets = torch.randint(0, v, (n,)) if target else None
    target_coef = torch.randn(n, dtype=torch.float64) if target else None
    return row_coef, logit_coef, targets, target_coef


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("tiles", [SMALL_TILES, DEFAULT_TILES], ids=["small_tiles", "default_tiles"])
def test_matches_dense_formula(dtype, with_bias, tiles):
    hidden, weight, bias = make_inputs(dtype, with_bias)
    run_and_compare(hidden, weight, bias, random_coefs(), tiles, GRAD_TOL[dtype])


@pytest.mark.parametrize("logit, target", [(False, False), (True, False), (False, True)])
def test_optional_coefficients(logit, target):
    hidden, weight, bias = make_inputs(torch.float32, True)
    run_and_compare(hidden, weight, bias, random_coefs(logit=logit, target=target), SMALL_TILES,
                    GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_logprob_and_entropy_gradients_match_autograd(dtype, with_bias):
    """The documented coefficients of log-prob and entropy give torch.autograd's gradients."""
    hidden, weight, bias = make_inputs(dtype, with_bias)
    targets = torch.randint(0, V, (N,))
    g_logp = torch.randn(N, dtype=torch.float64)
    g_ent = torch.randn(N, dtype=torch.float64)
    x, w, b, z = dense_logits(hidden, weight, bias)
    logp = z.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    loss = (g_logp * logp[torch.arange(N), targets]).sum() + (g_ent * entropy).sum()
    loss.backward()

    zd = z.detach()
    lse = zd.logsumexp(-1)
    sum_pz = ((zd - lse[:, None]).exp() * zd).sum(-1)
    acc = acc_dtype(dtype)
    row_coef = -g_logp + g_ent * sum_pz
    gx, gw, gb = head_backward(hidden, weight, bias, TAU, lse.to(acc), row_coef.to(acc), (-g_ent).to(acc),
                               targets, g_logp.to(acc), **SMALL_TILES)
    tol = GRAD_TOL[dtype]
    assert_rel_close(gx, x.grad, tol, "grad_hidden")
    assert_rel_close(gw, w.grad, tol, "grad_weight")
    if with_bias:
        assert_rel_close(gb, b.grad, tol, "grad_bias")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_extreme_rows(dtype, with_bias):
    """A row with logits at the 1e4 scale (p is one-hot) and a row of equal logits (p uniform)."""
    hidden, weight, bias = make_inputs(torch.float64, with_bias)
    hidden[0] *= 1000.0  # |z| ~ 1e4
    hidden[1] = 0.0
    if with_bias:
        # A constant bias keeps row 1 a row of equal logits; at 80/τ, exp(z) of a padding row
        # overflows fp32, which the kernel must mask out rather than multiply by 0.
        bias.fill_(80.0)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    _, _, _, z = dense_logits(hidden, weight, bias)
    assert z[0].abs().max() > 5e3
    assert torch.all(z[1] == z[1, 0])
    # fp32 logits at 1e4 carry ~1e-4 absolute error, i.e. p of the top token carries ~1e-4.
    tol = 1e-11 if dtype == torch.float64 else 2e-3
    gx, _, _ = run_and_compare(hidden, weight, bias, random_coefs(), SMALL_TILES, tol)
    assert torch.isfinite(gx).all()


def test_single_row_and_strided_inputs():
    hidden = torch.randn(1, 2 * H)[:, ::2]  # N = 1, row stride 2H, column stride 2
    weight = (0.3 * torch.randn(H, V)).T  # [V, H] view with strides (1, V)
    bias = torch.randn(V)
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    run_and_compare(hidden, weight, bias, random_coefs(n=1), SMALL_TILES, GRAD_TOL[torch.float32])


def test_need_flags_skip_gradients():
    hidden, weight, bias = make_inputs(torch.float32, True)
    row_coef, logit_coef, targets, target_coef = random_coefs()
    _, _, _, z = dense_logits(hidden, weight, bias)
    lse = z.detach().logsumexp(-1).float()
    args = (hidden, weight, bias, TAU, lse, row_coef.float(), logit_coef.float(), targets, target_coef.float())
    full = head_backward(*args, **SMALL_TILES)
    gx, gw, gb = head_backward(*args, need_weight_grad=False, need_bias_grad=False, **SMALL_TILES)
    assert gw is None and gb is None
    torch.testing.assert_close(gx, full[0], rtol=0, atol=1e-6)
    gx, gw, gb = head_backward(*args, need_hidden_grad=False, **SMALL_TILES)
    assert gx is None
    torch.testing.assert_close(gw, full[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(gb, full[2], rtol=0, atol=1e-6)


def test_zero_coefficient_rows_get_zero_gradient():
    hidden, weight, bias = make_inputs(torch.float32, True)
    row_coef, logit_coef, targets, target_coef = random_coefs()
    for coef in (row_coef, logit_coef, target_coef):
        coef[3] = 0.0
    gx, _, _ = run_and_compare(hidden, weight, bias, (row_coef, logit_coef, targets, target_coef),
                               SMALL_TILES, GRAD_TOL[torch.float32])
    assert torch.all(gx[3] == 0)


def test_bad_inputs_are_rejected():
    hidden, weight, bias = make_inputs(torch.float32, True)
    lse = torch.zeros(N)
    coef = torch.zeros(N)
    with pytest.raises(TypeError, match="hidden"):
        head_backward(hidden.double(), weight, bias, TAU, lse, coef)
    with pytest.raises(ValueError, match="temperature"):
        head_backward(hidden, weight, bias, 0.0, lse, coef)
    with pytest.raises(ValueError, match="lse"):
        head_backward(hidden, weight, bias, TAU, lse[:-1], coef)
    with pytest.raises(ValueError, match="bias"):
        head_backward(hidden, weight, bias[:-1], TAU, lse, coef)
    with pytest.raises(ValueError, match="block_v"):
        head_backward(hidden, weight, bias, TAU, lse, coef, block_v=48)
    with pytest.raises(ValueError, match="targets"):
        head_backward(hidden, weight, bias, TAU, lse, coef, targets=torch.zeros(N, dtype=torch.int64))


def test_many_row_tiles():
    """N = 150 rows in 16-row tiles: 10 row tiles, i.e. more than one group of GROUP_N = 8."""
    hidden, weight, bias = make_inputs(torch.float32, True, n=150)
    run_and_compare(hidden, weight, bias, random_coefs(n=150), dict(block_n=16, block_v=128, block_h=64),
                    GRAD_TOL[torch.float32])
