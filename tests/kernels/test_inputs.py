"""Right answer or a clear error for inputs an adversarial probe tried (N, H, V = 5, 16, 200): narrow
integer targets, mixed float64/float32 sides, second-order gradients, autocast, differentiable loss
weights, near-one-hot rows, and argument types."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _fused_cases import BOTH

import ptd_kernels as ptd
from ptd_kernels import reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")

N, H, V = 5, 16, 200
BACKENDS = BOTH  # the registered backends that run here (the registry decides)
LN2 = math.log(2.0)


def problem(dtype=torch.float32, seed=0, teacher_dtype=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    th, tw = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    teacher_dtype = teacher_dtype or dtype
    return (h.to(device, dtype).requires_grad_(), w.to(device, dtype).requires_grad_(), th.to(device, teacher_dtype),
            tw.to(device, teacher_dtype))


# ----------------------------------------------------------------------------- 1–2. narrow integer targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_target_156_is_a_token_not_padding(backend, device):
    """−100 wraps to 156 in uint8; a uint8 target can never be ignore_index."""
    h, w, _, _ = problem(device=device)
    targets = torch.tensor([156, 10, 199, 3, 50], dtype=torch.uint8, device=device)
    logp = ptd.linear_logprobs(h, w, targets, backend=backend)
    want = ref.linear_logprobs(h.double(), w.double(), targets.long())
    assert float(want[0]) < -1
    torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ptd.logprobs(h @ w.T, targets).double(), want, rtol=1e-5, atol=1e-5)
    top = ptd.linear_topk(h, w, 3, targets=targets, backend=backend)
    torch.testing.assert_close(top.target_logprobs.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_targets_in_range_are_accepted_and_out_of_range_rejected(backend, device):
    """V = 200 wraps to −56 in int8: the bound check must not compare in the targets' dtype."""
    h, w, th, tw = problem(device=device)
    targets = torch.tensor([100, 10, 127, -100, 50], dtype=torch.int8, device=device)
    logp = ptd.linear_logprobs(h, w, targets, backend=backend)
    want = ref.linear_logprobs(h.double(), w.double(), targets.long())
    torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=1e-5)
    assert float(logp[3]) == 0.0
    terms = ptd.linear_ptd_terms(h, w, targets, th, tw, 4, backend=backend)
    torch.testing.assert_close(terms.logp, logp)
    with pytest.raises(ValueError, match="targets"):
        ptd.linear_logprobs(h, w[:100], targets, backend=backend)  # 127 ≥ V = 100
    ids = torch.tensor([[120, 3], [5, 6], [7, 8], [9, 10], [11, 12]], dtype=torch.int8, device=device)
    value = ptd.linear_sparse_jsd(h, w, ids, torch.full((N, 2), -1.5, device=device), backend=backend)
    want = ref.linear_sparse_jsd(h.double(), w.double(), ids.long(),
                                 torch.full((N, 2), -1.5, dtype=torch.float64, device=device))
    torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 3. float64 student, float32 teacher


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["jsd", "jsd_loss", "topk_jsd_loss", "topk_k_ge_v", "ptd_terms"])
def test_float64_student_with_a_float32_teacher(backend, device, fn):
    """It crashed on the torch path (a float32 teacher block into a float64 buffer); the student's
    dtype sets the compute dtype, the teacher is cast to it."""
    h, w, th, tw = problem(torch.float64, teacher_dtype=torch.float32, device=device)
    rows = torch.arange(N, device=device)
    calls = {
        "jsd": lambda m, **kw: m.linear_jsd(h, w, th, tw, **kw).sum(),
        "jsd_loss": lambda m, **kw: m.linear_jsd_loss(h, w, th, tw, **kw),
        "topk_jsd_loss": lambda m, **kw: m.linear_topk_jsd_loss(h, w, th, tw, 8, **kw),
        "topk_k_ge_v": lambda m, **kw: m.linear_topk_jsd(h, w, th, tw, V + 5, **kw).sum(),
        "ptd_terms": lambda m, **kw: m.linear_ptd_terms(h, w, rows, th, tw, 8, **kw).jsd.sum(),
    }
    ours = calls[fn](ptd, backend=backend)
    grad = torch.autograd.grad(ours, (h, w))
    want = calls[fn](ref)
    want_grad = torch.autograd.grad(want, (h, w))
    assert ours.dtype == torch.float64
    # the teacher's logits carry its own float32 rounding; the reference computes them in float64
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-7)
    for g, gw in zip(grad, want_grad):
        torch.testing.assert_close(g, gw, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- 4. second-order gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["logprobs", "topk_jsd", "jsd", "jsd_loss", "topk_jsd_loss", "logits_jsd"])
def test_second_order_gradients_raise_a_clear_error(backend, device, fn):
    """create_graph=True returns first-order gradients as usual; differentiating them again raises
    (instead of silently dropping a gradient penalty's term)."""
    h, w, th, tw = problem(device=device)
    calls = {
        "logprobs": lambda: ptd.linear_logprobs(h, w, torch.arange(N, device=device), backend=backend).sum(),
        "topk_jsd": lambda: ptd.linear_topk_jsd(h, w, th, tw, 4, backend=backend).sum(),
        "jsd": lambda: ptd.linear_jsd(h, w, th, tw, backend=backend).sum(),
        "jsd_loss": lambda: ptd.linear_jsd_loss(h, w, th, tw, backend=backend),
        "topk_jsd_loss": lambda: ptd.linear_topk_jsd_loss(h, w, th, tw, 4, backend=backend),
        "logits_jsd": lambda: ptd.jsd(h @ w.T, th @ tw.T).sum(),
    }
    first = torch.autograd.grad(calls[fn](), h)[0]
    (g,) = torch.autograd.grad(calls[fn](), h, create_graph=True)
    torch.testing.assert_close(g, first)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="second-order"):
        g.square().sum().backward()


# ----------------------------------------------------------------------------- 5. autocast


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_the_operands_once_and_keeps_the_math_in_float32(backend, device):
    """Under CPU autocast (bf16) with fp32 inputs: the same values as the function on bf16-cast operands
    outside autocast, float32 outputs, a β = 0.5 JSD ≤ ln 2, and fp32 gradients for fp32 parameters."""
    h, w, th, tw = problem(device=device)
    w.data *= 3  # peaked rows: values near ln 2, where rounding to bf16 steps shows
    th.mul_(3)
    with torch.autocast(device, dtype=torch.bfloat16):
        value = ptd.linear_jsd(h, w, th, tw, backend=backend)
        loss = ptd.linear_topk_jsd_loss(h, w, th, tw, 8, backend=backend)
    assert value.dtype == torch.float32 and bool((value <= LN2 + 1e-6).all())
    want = ptd.linear_jsd(h.bfloat16(), w.bfloat16(), th.bfloat16(), tw.bfloat16(), backend=backend)
    torch.testing.assert_close(value, want, rtol=0, atol=0)
    loss.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    ptd.linear_topk_jsd_loss(hb, wb, th.bfloat16(), tw.bfloat16(), 8, backend=backend).backward()
    torch.testing.assert_close(w.grad, wb.grad.float(), rtol=0.02, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_accepts_bf16_activations_with_an_fp32_output_layer(backend, device):
    h, w, th, tw = problem(device=device)
    hb = h.detach().bfloat16().requires_grad_()
    with pytest.raises(TypeError, match="autocast"):
        ptd.linear_logprobs(hb, w, torch.arange(N, device=device), backend=backend)
    with torch.autocast(device, dtype=torch.bfloat16):
        logp, entropy = ptd.linear_logprobs(hb, w, torch.arange(N, device=device), with_entropy=True, backend=backend)
        terms = ptd.linear_ptd_terms(hb, w, torch.arange(N, device=device), th, tw, 4, backend=backend)
    (logp.sum() + entropy.sum() + terms.jsd.sum()).backward()
    assert logp.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    want = ptd.linear_logprobs(hb.detach(), w.detach().bfloat16(), torch.arange(N, device=device), backend=backend)
    torch.testing.assert_close(logp.detach(), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- 6. differentiable loss weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["jsd", "topk"])
@pytest.mark.parametrize("one_sweep", [True, False])
def test_loss_weights_that_require_grad_get_their_gradient(monkeypatch, backend, device, kind, one_sweep):
    """d loss / d weights_n = D_n (masked rows: 0), on the one-sweep and the per-row path."""
    monkeypatch.setattr(ptd.config, "FUSED_LOSS_MIN_ROWS", 1 if one_sweep else 10**9)
    h, w, th, tw = problem(device=device)
    weights = torch.rand(N, device=device, requires_grad=True)
    mask = torch.tensor([True, True, False, True, True], device=device)
    if kind == "jsd":
        loss = ptd.linear_jsd_loss(h, w, th, tw, weights=weights, mask=mask, backend=backend)
        per_row = ptd.linear_jsd(h, w, th, tw, mask=mask, backend=backend)
    else:
        loss = ptd.linear_topk_jsd_loss(h, w, th, tw, 6, weights=weights, mask=mask, backend=backend)
        per_row = ptd.linear_topk_jsd(h, w, th, tw, 6, mask=mask, backend=backend)
    (-2.0 * loss).backward()
    torch.testing.assert_close(weights.grad, -2.0 * per_row.detach(), rtol=1e-5, atol=1e-7)
    assert float(weights.grad[2]) == 0.0 and w.grad is not None


# ----------------------------------------------------------------------------- 7. near-one-hot rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,scale", [(1e-4, 1.0), (1e-2, 1.0), (1.0, 100.0)])
def test_coarse_graining_never_increases_the_divergence(backend, device, temperature, scale):
    """Near-one-hot rows: Top-K JSD (tail on) ≤ the full JSD ≤ ln 2 to float32 rounding, and the full JSD
    is exact on both backends (each side's log-probs from its own sweep's rounding)."""
    h, w, th, tw = problem(device=device)
    h, th = h.detach() * scale, th * scale
    full = ptd.linear_jsd(h, w, th, tw, temperature=temperature, backend=backend)
    want = ref.linear_jsd(h.double(), w.double(), th.double(), tw.double(), temperature=temperature)
    assert float((full.double() - want).abs().max()) < 1e-5
    for support in ("union", "teacher", "student"):
        for k in (1, 8):
            topk = ptd.linear_topk_jsd(h, w, th, tw, k, support=support, temperature=temperature, backend=backend)
            assert bool((topk <= full + 1e-6).all()), (support, k, topk, full)
            assert bool((topk <= LN2 + 1e-6).all()) and bool((topk >= -1e-6).all())
    terms = ptd.linear_ptd_terms(h, w, torch.arange(N, device=device), th, tw, 8, temperature=temperature,
                                 backend=backend)
    assert bool((terms.jsd <= full + 1e-6).all())
    # the one-sweep loss (a row at a time through the weights) and the function on given logits
    for row in range(N):
        weights = torch.zeros(N, device=device)
        weights[row] = 1.0
        loss = ptd.linear_topk_jsd_loss(h, w, th, tw, 5, temperature=temperature, weights=weights, backend=backend)
        assert float(loss) <= float(full[row]) + 1e-6 and float(loss) <= LN2 + 1e-6
    given = ptd.topk_jsd(h @ w.T, th @ tw.T, 5, temperature=temperature)
    assert bool((given <= ptd.jsd(h @ w.T, th @ tw.T, temperature=temperature) + 1e-6).all())
    assert bool((given <= LN2 + 1e-6).all())


# ----------------------------------------------------------------------------- 8. argument types


def test_argument_types():
    h, w, th, tw = problem()
    with pytest.raises(TypeError, match="tail"):
        ptd.linear_topk_jsd(h, w, th, tw, 4, tail="no")
    with pytest.raises(TypeError, match="tail"):
        ptd.topk_jsd(h @ w.T, th @ tw.T, 4, tail="no")
    with pytest.raises(TypeError, match="ignore_index"):
        ptd.linear_logprobs(h, w, torch.arange(N), ignore_index=-100.0)
    with pytest.raises(TypeError, match="ignore_index"):
        ptd.logprobs(h @ w.T, torch.arange(N), ignore_index="-100")
    with pytest.raises(TypeError, match="with_entropy"):
        ptd.linear_logprobs(h, w, torch.arange(N), with_entropy="yes")
    with pytest.raises(ValueError, match="repeats"):
        ptd.topk_overlap(torch.tensor([[1, 1, 2, 3]]), torch.tensor([[1, 2, 3, 4]]))
    assert float(ptd.topk_overlap(torch.tensor([[1, 5, 2, 3]]), torch.tensor([[1, 2, 3, 4]]))[0]) == 0.75
    # NumPy scalars are numbers (np.float32 included), as are NumPy integers for k and bools for tail
    base = ptd.linear_topk_jsd(h, w, th, tw, 4, beta=0.25, temperature=0.5)
    same = ptd.linear_topk_jsd(h, w, th, tw, np.int64(4), beta=np.float32(0.25), temperature=np.float32(0.5),
                               tail=np.bool_(True))
    torch.testing.assert_close(same, base)
    with pytest.raises(TypeError, match="temperature"):
        ptd.linear_jsd(h, w, th, tw, temperature="1.0")
