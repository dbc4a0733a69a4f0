"""The true derivative (docs/method.md §1) (float64 autograd of the reference) with the authors' zero-gradient
surrogate as the negative control, and agreement with Liger-Kernel's JSD losses."""

from __future__ import annotations

import itertools

import pytest
import torch
from _fused_cases import (
    BETAS,
    F32,
    F64,
    LINEAR,
    SUPPORTS,
    TAU,
    TRITON,
    Case,
    V,
    assert_grads,
    masked_case,
)

import ptd_kernels as ptd

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


# --------------------------------------------------------------------------- 9. the true derivative (docs/method.md §1)


def _gradcheck_problem(seed=11):
    """Tiny float64 problem whose logits are well separated (a top-K set stable under eps = 1e-6)."""
    case = Case(n=3, h=4, th=5, v=13, dtype=F64, seed=seed)
    for teacher in (False, True):
        z = torch.sort(case.logits(teacher) / TAU, -1, descending=True).values
        assert float((z[:, :-1] - z[:, 1:]).min()) > 1e-3, "pick another seed: logits too close for gradcheck"
    return case


@pytest.mark.parametrize("support,tail,beta",
                         [(s, t, 0.5) for s, t in itertools.product(SUPPORTS, (True, False))]
                         + [("union", True, 0.0), ("union", True, 1.0), ("teacher", False, 0.0)])
def test_topk_jsd_gradient_is_the_true_derivative(support, tail, beta):
    case = _gradcheck_problem()
    x = case.inputs(F64)

    def f(hidden, weight, bias):
        return ptd.linear_topk_jsd(hidden, weight, x.teacher_hidden, x.teacher_weight, 3, beta=beta, support=support,
                                   tail=tail, bias=bias, teacher_bias=x.teacher_bias, temperature=TAU,
                                   backend="torch")

    assert torch.autograd.gradcheck(f, (x.hidden, x.weight, x.bias), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_full_jsd_and_ptd_terms_gradients_are_true_derivatives():
    case = _gradcheck_problem()
    x = case.inputs(F64)
    targets = torch.tensor([2, 0, 12])

    def f(hidden, weight, bias):
        jsd = ptd.linear_jsd(hidden, weight, x.teacher_hidden, x.teacher_weight, beta=0.3, bias=bias,
                             teacher_bias=x.teacher_bias, temperature=TAU, backend="torch")
        t = ptd.linear_ptd_terms(hidden, weight, targets, x.teacher_hidden, x.teacher_weight, 3, bias=bias,
                                 teacher_bias=x.teacher_bias, temperature=TAU, backend="torch")
        return jsd, t.logp, t.entropy, t.jsd

    assert torch.autograd.gradcheck(f, (x.hidden, x.weight, x.bias), eps=1e-6, atol=1e-8, rtol=1e-6)


def authors_surrogate(z, teacher_z, k, beta, support, tail):
    """The released code's Top-K JSD (docs/method.md §1): the student weight p inside the JSD is stop-grad'ed while
    the mixture m = βq + (1−β)p is differentiated. Same value as D_K; its gradient cancels to zero."""
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(teacher_z, -1)
    ids_p = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    ids_q = torch.sort(teacher_z, dim=-1, descending=True, stable=True).indices[:, :k]
    in_p = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids_p, True)
    in_q = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids_q, True)
    in_s = {"union": in_p | in_q, "teacher": in_q, "student": in_p}[support]
    p = torch.where(in_s, logp.exp(), 0.0)
    q = torch.where(in_s, logq.exp(), 0.0)
    if tail:
        p = torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp_min(1e-12)], -1)
        q = torch.cat([q, (1 - q.sum(-1, keepdim=True)).clamp_min(1e-12)], -1)
        in_s = torch.cat([in_s, torch.ones_like(in_s[:, :1])], -1)
    else:
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    m = beta * q + (1 - beta) * p
    p_sg = p.detach()
    safe = lambda t: torch.where(in_s, t, 1.0).log()  # noqa: E731
    terms = beta * q * (safe(q) - safe(m)) + (1 - beta) * p_sg * (safe(p_sg) - safe(m))
    return torch.where(in_s, terms, 0.0).sum(-1)


@pytest.mark.parametrize("support,tail", list(itertools.product(SUPPORTS, (True, False))))
def test_authors_surrogate_is_caught(support, tail):
    """Negative control: the surrogate has our value but ~zero gradient, fails the finite-difference check,
    and is far from our gradient."""
    case = _gradcheck_problem()
    x = case.inputs(F64)

    def ours(hidden, weight, bias):
        return ptd.linear_topk_jsd(hidden, weight, x.teacher_hidden, x.teacher_weight, 3, support=support,
                                   tail=tail, bias=bias, teacher_bias=x.teacher_bias, temperature=TAU,
                                   backend="torch")

    def surrogate(hidden, weight, bias):
        z = (hidden @ weight.T + bias) / TAU
        teacher_z = (x.teacher_hidden @ x.teacher_weight.T + x.teacher_bias) / TAU
        return authors_surrogate(z, teacher_z, 3, 0.5, support, tail)

    args = (x.hidden, x.weight, x.bias)
    d_ours, d_sur = ours(*args), surrogate(*args)
    torch.testing.assert_close(d_sur, d_ours, rtol=1e-10, atol=1e-12)  # same functional value
    g_ours = torch.cat([g.flatten() for g in torch.autograd.grad(d_ours.sum(), args)])
    g_sur = torch.cat([g.flatten() for g in torch.autograd.grad(d_sur.sum(), args)])
    assert float(g_ours.norm()) > 1e-2
    assert float(g_sur.norm()) < 1e-10 * float(g_ours.norm()) + 1e-12, "the surrogate's gradient should vanish"
    assert float((g_ours - g_sur).norm()) > 0.99 * float(g_ours.norm())
    assert not torch.autograd.gradcheck(surrogate, args, eps=1e-6, atol=1e-8, rtol=1e-6, raise_exception=False)


# ----------------------------------------------------------------------------- 10. peers: Liger-Kernel


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # −inf − (−inf) in Liger's masked lanes (interpreter)
def test_jsd_matches_liger_jsd(beta):
    """``LigerJSD(beta)(log_q=student log-probs, log_p=teacher log-probs, shift_labels)`` is the mean over
    non-ignored rows of β·KL(teacher‖M) + (1−β)·KL(student‖M), M = β·teacher + (1−β)·student: docs/method.md's
    β convention (β=0 forward KL, β=1 reverse), despite its docstring's notation. No temperature: it takes
    log-probs, so we give it log_softmax(logits / τ)."""
    from liger_kernel.transformers import LigerJSD

    case = masked_case(v=V)
    labels = torch.where(case.mask, case.targets.clamp_min(0), -100)
    x = case.inputs(F32)
    liger_logits = x.logits.detach().clone().requires_grad_()
    liger = LigerJSD(beta=beta)(torch.log_softmax(liger_logits / TAU, -1),
                                torch.log_softmax(x.teacher_logits / TAU, -1), labels)
    ours = ptd.jsd(x.logits, x.teacher_logits, beta=beta, temperature=TAU, mask=x.mask).sum() / int(x.mask.sum())
    assert abs(float(ours) - float(liger)) <= 1e-5 * (1 + abs(float(liger))), (float(ours), float(liger))
    assert float(liger) > 1e-2
    assert_grads(torch.autograd.grad(ours, x.logits)[0], torch.autograd.grad(liger, liger_logits)[0], 1e-5,
                 "grad logits vs Liger")


@pytest.mark.parametrize("backend,beta", [("torch", 0.0), ("torch", 0.5), ("torch", 1.0),
                                          pytest.param("triton", 0.5, marks=TRITON.marks)])
@pytest.mark.parametrize("with_ignored", [False, True])
def test_linear_jsd_matches_liger_fused_linear_jsd(backend, device, beta, with_ignored):
    """``LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, beta, temperature)(student_input,
    student_weight [V,H], teacher_input, teacher_weight [V,H'], true_labels, student_bias, teacher_bias)``
    divides both sides' logits by the temperature and averages the per-row JSD_β (same β convention) over
    the rows whose label is not ignore_index: ``linear_jsd(...).mean()`` without ignored rows."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    case = masked_case()
    labels = case.targets.clamp_min(0)
    if with_ignored:
        labels = torch.where(case.mask, labels, -100)
    x = case.inputs(F32, device)
    lx = case.inputs(F32, device)
    labels = labels.to(device)
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=TAU,
                                    compiled=False)(lx.hidden, lx.weight, lx.teacher_hidden, lx.teacher_weight,
                                                    labels, lx.bias, lx.teacher_bias)
    per_row = ptd.linear_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, beta=beta, bias=x.bias,
                             teacher_bias=x.teacher_bias, temperature=TAU, mask=x.mask if with_ignored else None,
                             backend=backend)
    ours = per_row.sum() / int(x.mask.sum()) if with_ignored else per_row.mean()
    assert abs(float(ours) - float(liger)) <= 1e-5 * (1 + abs(float(liger))), (float(ours), float(liger))
    assert float(liger) > 1e-2
    ours_grads = torch.autograd.grad(ours, [x.hidden, x.weight, x.bias])
    liger_grads = torch.autograd.grad(liger, [lx.hidden, lx.weight, lx.bias])
    for a, b, name in zip(ours_grads, liger_grads, LINEAR):
        assert_grads(a, b, 1e-5, f"grad {name} vs Liger")
    if with_ignored:  # and the loss-level entry point with its default weights is the same number
        loss = ptd.linear_jsd_loss(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, beta=beta, bias=x.bias,
                                   teacher_bias=x.teacher_bias, temperature=TAU, mask=x.mask, backend=backend)
        assert abs(float(loss) - float(liger)) <= 1e-5 * (1 + abs(float(liger)))
