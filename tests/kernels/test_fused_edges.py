"""Edge cases and docs/method.md §2 properties of every fused function on every backend (see test_fused.py
for the problems and tolerances): masked and single rows, extreme logits, ties, shared output layers,
non-finite inputs, lower bounds, non-negativity and the β endpoints."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _fused_cases import (
    ALL_FNS,
    BETAS,
    BF16,
    BOTH,
    EDGE_TRITON,
    F32,
    F64,
    GRAD_TOL,
    LINEAR,
    ROW_WEIGHTS,
    SUPPORTS,
    TAU,
    TH,
    TRITON,
    VALUE_TOL,
    Case,
    H,
    K,
    N,
    V,
    _error,
    _pid,
    as_list,
    assert_grads,
    assert_values,
    check,
    cotangents,
    evaluate,
    extreme_case,
    grad_tol,
    grid,
    jsd_fn,
    loss_fn,
    masked_case,
    ptd_terms_fn,
    topk_jsd_fn,
)

import ptd_kernels as ptd
from ptd_kernels import reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


# ----------------------------------------------------------------------------- 7. edge cases


@grid(("name",), [(n,) for n in ALL_FNS], [(n,) for n in EDGE_TRITON])
def test_all_rows_masked(backend, device, name):
    case = Case()
    case.targets[:] = -100
    case.mask = torch.zeros(case.n, dtype=torch.bool)
    case.jsd_mask = torch.zeros(case.n, dtype=torch.bool)
    outs, grads, _ = evaluate(ALL_FNS[name], ptd, case, F32, backend)
    for o in outs:
        assert bool((o == 0).all()), f"{name}: output {o} is not all zeros"
    for g, n in zip(grads, LINEAR):
        assert bool((g == 0).all()), f"{name}: grad {n} is not all zeros"


@grid(("name",), [(n,) for n in ALL_FNS], [(n,) for n in EDGE_TRITON])
def test_single_row(backend, device, name):
    case = Case(n=1)
    case.mask = torch.ones(1, dtype=torch.bool)
    case.jsd_mask = torch.ones(1, dtype=torch.bool)
    check(ALL_FNS[name], case, backend)




def _extreme_params():
    full = [(n, d, b) for n, d, b in itertools.product(ALL_FNS, (F32, F64), (True, False))]
    full += [("topk_jsd", BF16, True), ("logprobs", BF16, False)]
    subset = [("topk_jsd", F32, True), ("ptd_terms", F32, False), ("jsd", F32, True), ("logprobs", BF16, True),
              ("sparse_jsd", F32, True), ("topk_jsd_loss", F32, False)]
    for backend, params in (("torch", full), ("triton", subset)):
        for p in params:
            marks = [*TRITON.marks] if backend == "triton" else []
            yield pytest.param(backend, *p, id=_pid(backend, p), marks=marks)


@pytest.mark.parametrize("backend,name,dtype,bias", list(_extreme_params()))
def test_huge_logit_and_tied_rows(backend, device, name, dtype, bias):
    """Values per element, d hidden per row and d bias against the reference (d weight: next test).

    Logits of 1e4 make even the obvious implementation lose digits, so each tolerance is the larger of
    the usual one and 4× the error of the reference itself evaluated in ``dtype`` (float32 math)."""
    case = extreme_case(dtype, bias)
    fn = ALL_FNS[name]
    ours, ours_grads, _ = evaluate(fn, ptd, case, dtype, backend)
    plain, plain_grads, _ = evaluate(fn, ref, case, dtype, "torch")
    want, want_grads, _ = evaluate(fn, ref, case, F64, "torch")
    base_v = VALUE_TOL[dtype] if dtype != F64 else 1e-8  # float64: the teacher's 1e4 row costs ~1e-9 (tail atom)
    base_g = grad_tol(dtype, backend) if dtype != F64 else 1e-8
    for i, (o, p, w) in enumerate(zip(ours, plain, want)):
        assert bool(torch.isfinite(o).all()), f"output {i} not finite: {o}"
        assert_values(o, w, max(base_v, 4 * _error(p, w)), f"output {i}")
    floor = 1e-3 * float(want_grads[0].abs().max())  # a row whose gradient is ~0 (a one-hot p) is held to this
    for row in range(case.n):
        tol = max(base_g, 4 * _error(plain_grads[0][row], want_grads[0][row], False))
        assert_grads(ours_grads[0][row], want_grads[0][row], tol, f"grad hidden row {row}", floor)
    if bias:
        assert_grads(ours_grads[2], want_grads[2], max(base_g, 4 * _error(plain_grads[2], want_grads[2], False)),
                     "grad bias")


# Both backends add the sparse terms (target one-hot, support coefficients) into each dz tile before the
# GEMMs / dots, so that on a one-hot row they cancel in dz, not after multiplying by the 1e4 hidden row.
@pytest.mark.parametrize("backend,name", [
    pytest.param(be, n, marks=[*TRITON.marks] if be == "triton" else [], id=f"{be}-{n}")
    for be in [param.values[0] for param in BOTH] for n in ALL_FNS])
def test_huge_hidden_row_weight_gradient(backend, device, name):
    """d weight when one hidden row is scaled by 1e4: within 4× the plain float32 reference's error."""
    case = extreme_case(F32, True)
    fn = ALL_FNS[name]
    _, ours, _ = evaluate(fn, ptd, case, F32, backend)
    _, plain, _ = evaluate(fn, ref, case, F32, "torch")
    _, want, _ = evaluate(fn, ref, case, F64, "torch")
    assert_grads(ours[1], want[1], max(GRAD_TOL[F32], 4 * _error(plain[1], want[1], False)), "grad weight")


@pytest.mark.parametrize("backend", BOTH)
def test_huge_teacher_logit_row_alone(backend, device):
    """One row whose teacher logits are ×1e4 (q one-hot: the teacher tail sits on its 1e-12 floor)."""
    for seed in (3, 4, 5):
        case = Case(n=1, seed=seed)
        case.teacher_hidden[0] *= 1e4
        for name in ("topk_jsd", "ptd_terms"):
            ours, _, _ = evaluate(ALL_FNS[name], ptd, case, F32, backend, grad=False)
            plain, _, _ = evaluate(ALL_FNS[name], ref, case, F32, "torch", grad=False)
            want, _, _ = evaluate(ALL_FNS[name], ref, case, F64, "torch", grad=False)
            for i, (o, p, w) in enumerate(zip(ours, plain, want)):
                assert_values(o, w, max(VALUE_TOL[F32], 4 * _error(p, w)), f"seed {seed} {name} output {i}")


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("support", SUPPORTS)
def test_tie_rule_in_the_support(backend, device, support):
    """All logits tied on both sides: S = ids 0..K−1; D_K equals the reference exactly enough."""
    case = Case(n=3, bias=False)
    case.hidden[1] = 0.0
    case.teacher_hidden[1] = 0.0
    x = case.inputs(F32, device)
    top = ptd.linear_topk(x.hidden, x.weight, K, backend=backend)
    assert top.indices[1].tolist() == list(range(K))
    check(topk_jsd_fn(K, 0.5, support, True), case, backend)


@pytest.mark.parametrize("backend", BOTH)
def test_shared_output_layer(backend, device):
    """``teacher_weight is weight``: the teacher side stays detached (d weight = student side only)."""
    case = masked_case(th=H)
    case.teacher_weight = case.weight
    case.teacher_bias = case.bias

    def shared(f):
        def fn(m, x, be):
            x.teacher_weight, x.teacher_bias = x.weight, x.bias
            return f(m, x, be)
        return fn

    for f in (topk_jsd_fn(K, 0.5, "union", True), jsd_fn(0.0), ptd_terms_fn(K, 1.0, "teacher", False),
              loss_fn("topk", ROW_WEIGHTS), loss_fn("jsd", None)):
        check(shared(f), case, backend)


@pytest.mark.parametrize("beta", [1e-6, 1e-3, 1.0 - 1e-6])
@pytest.mark.parametrize("name", ["jsd", "jsd_loss"])
def test_extreme_beta_as_precise_as_float32(name, beta):
    """β near 0 or 1 (one side's weight tiny): values and gradients within 4× the error of the
    obvious float32 computation (the reference run in float32), against float64."""
    def fn(m, x, be):
        d = m.linear_jsd if name == "jsd" else m.linear_jsd_loss
        return d(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, beta=beta, bias=x.bias,
                 teacher_bias=x.teacher_bias, temperature=TAU, mask=x.mask, backend=be)

    case = Case(n=16, v=4000, seed=2)
    ours, ours_grads, _ = evaluate(fn, ptd, case, F32, "torch")
    plain, plain_grads, _ = evaluate(fn, ref, case, F32, "torch")
    want, want_grads, _ = evaluate(fn, ref, case, F64, "torch")
    for o, p, w in zip(ours, plain, want):
        assert_values(o, w, max(VALUE_TOL[F32], 4 * _error(p, w)), "value")
    for g, p, w, what in zip(ours_grads, plain_grads, want_grads, LINEAR):
        assert_grads(g, w, max(GRAD_TOL[F32], 4 * _error(p, w, False)), f"grad {what}")


def test_loss_under_no_grad_forms_no_gradients(monkeypatch):
    """A loss evaluated for logging (``torch.no_grad``) skips the gradient GEMMs of the one-sweep path."""
    from ptd_kernels.backends.torch import fused_loss

    seen = []
    real = fused_loss.fused_loss
    monkeypatch.setattr(fused_loss, "fused_loss", lambda *a, **kw: seen.append(a[4]) or real(*a, **kw))
    x = masked_case().inputs(F32)
    with torch.no_grad():
        with_no_grad = ptd.linear_jsd_loss(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, backend="torch")
    loss = ptd.linear_jsd_loss(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, backend="torch")
    assert [needs.weight for needs in seen] == [False, True]
    assert_values(with_no_grad, loss.detach(), 1e-6, "value under no_grad")


def test_shared_output_layer_is_one_gemm_on_the_torch_path(monkeypatch):
    """The two-sided torch sweeps see a shared output layer (through ``detach()``) and stack both
    sides' rows into one GEMM; separate layers keep two."""
    from ptd_kernels.backends.torch import _blocks

    seen = []
    real = _blocks.two_sided_row_blocks
    monkeypatch.setattr(_blocks, "two_sided_row_blocks",
                        lambda *a: seen.append(a[0].shares_layer_with(a[1])) or real(*a))
    case = masked_case(th=H)
    x = case.inputs(F32)
    for teacher_weight in (x.weight, x.teacher_weight):
        ptd.linear_jsd_loss(x.hidden, x.weight, x.teacher_hidden, teacher_weight, backend="torch").backward()
        ptd.linear_jsd(x.hidden, x.weight, x.teacher_hidden, teacher_weight, backend="torch").sum().backward()
    assert seen == [True, True, False, False]


@pytest.mark.parametrize("backend", BOTH)
def test_teacher_gets_no_gradient(backend, device):
    case = masked_case()
    x = case.inputs(F32, device)
    teacher = [x.teacher_hidden.requires_grad_(), x.teacher_weight.requires_grad_(), x.teacher_bias.requires_grad_()]
    for name in ("topk_jsd", "jsd", "ptd_terms", "topk_jsd_loss", "jsd_loss"):
        outs = as_list(ALL_FNS[name](ptd, x, backend))
        loss = sum((o * c.float()).sum() for o, c in zip(outs, cotangents(outs)) if o.requires_grad)
        grads = torch.autograd.grad(loss, [x.hidden, *teacher], allow_unused=True)
        assert grads[0] is not None and float(grads[0].abs().max()) > 0, name
        assert all(g is None or bool((g == 0).all()) for g in grads[1:]), f"{name}: gradient reached the teacher"


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_row_is_nan_in_that_row_only(backend, device, bad):
    """Student row 1 and teacher row 4 hold a NaN/inf: those rows give NaN, every other row the reference value."""
    case = Case()
    case.mask = torch.ones(case.n, dtype=torch.bool)
    case.jsd_mask = torch.ones(case.n, dtype=torch.bool)
    case.hidden[1, 3] = bad
    case.teacher_hidden[4, 0] = bad
    for name in ("logprobs", "topk_jsd", "jsd", "ptd_terms", "sparse_jsd"):
        with torch.no_grad():
            outs = as_list(ALL_FNS[name](ptd, case.inputs(F32, device), backend))
            want = as_list(ALL_FNS[name](ref, case.inputs(F64, device), "torch"))
        for i, (o, w) in enumerate(zip(outs, want)):
            student_only = name in ("logprobs", "sparse_jsd") or (name == "ptd_terms" and i < 2)
            bad_rows = [1] if student_only else [1, 4]
            clean = [r for r in range(case.n) if r not in bad_rows]
            if not (name == "ptd_terms" and i >= 3):  # overlap and teacher mass of a NaN row: unspecified
                assert bool(o[bad_rows].isnan().all()), f"{name} output {i}: rows {bad_rows} gave {o[bad_rows]}"
            assert_values(o[clean], w[clean], VALUE_TOL[F32], f"{name} output {i} rows {clean}")


@pytest.mark.parametrize("backend", BOTH)
def test_nan_in_a_masked_row_does_not_leak(backend, device):
    case = masked_case()
    case.hidden[2] = math.nan  # row 2 is masked
    case.teacher_hidden[2] = math.nan
    for name in ("topk_jsd", "jsd", "topk_jsd_loss"):
        outs, grads, _ = evaluate(ALL_FNS[name], ptd, case, F32, backend)
        assert all(bool(torch.isfinite(o).all()) for o in outs), name
        assert all(bool(torch.isfinite(g).all()) for g in grads), f"{name}: NaN leaked into a gradient"


# ----------------------------------------------------------------------------- 8. properties


@grid(("beta",), [(b,) for b in BETAS], [(0.5,)])
def test_tail_is_a_lower_bound_and_values_are_nonnegative(backend, device, beta):
    case = Case(n=8)
    x = case.inputs(F32, device)
    with torch.no_grad():
        full = ptd.linear_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, beta=beta, bias=x.bias,
                              teacher_bias=x.teacher_bias, temperature=TAU, backend=backend)
        assert bool((full >= -1e-6).all()) and bool((full > 1e-3).all())
        for support, tail, k in itertools.product(SUPPORTS, (True, False), (1, K, 40)):
            if backend == "triton" and (support, k) != ("union", K):
                continue
            d = ptd.linear_topk_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, k, beta=beta,
                                    support=support, tail=tail, bias=x.bias, teacher_bias=x.teacher_bias,
                                    temperature=TAU, backend=backend)
            assert bool((d >= -1e-6).all()), (support, tail, k, d)
            if tail:
                assert bool((d <= full + 1e-6).all()), (support, k, d, full)


def near_equal_case(scale, gap):
    """Teacher logits = student logits (same hidden and weight) up to a bias perturbation of size ``gap``."""
    case = Case()
    case.teacher_hidden = torch.cat([case.hidden, torch.zeros(N, TH - H, dtype=F64)], 1)
    case.weight *= scale
    case.teacher_weight *= scale
    g = torch.Generator().manual_seed(9)
    case.teacher_bias = case.bias + gap * torch.randn(V, generator=g, dtype=F64)
    return case


def near_equal_values(case, backend):
    x = case.inputs(F32)
    with torch.no_grad():
        for beta in BETAS:
            yield beta, "linear_jsd", ptd.linear_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, beta=beta,
                                                     bias=x.bias, teacher_bias=x.teacher_bias, backend=backend)
            yield beta, "jsd", ptd.jsd(x.logits, x.teacher_logits, beta=beta, backend=backend)
            for s, t in (("union", True), ("teacher", False)):
                yield beta, f"linear_topk_jsd {s} {t}", ptd.linear_topk_jsd(
                    x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, K, beta=beta, support=s, tail=t,
                    bias=x.bias, teacher_bias=x.teacher_bias, backend=backend)


@grid(("scale", "gap"), list(itertools.product((0.05, 1.0), (0.0, 1e-3))), [(1.0, 1e-3)])
def test_values_never_negative_for_equal_or_near_equal_distributions(backend, device, scale, gap):
    """Teacher = student (gap 0) or nearly so: the divergences sit at 0, where cancellation could go negative."""
    for beta, name, v in near_equal_values(near_equal_case(scale, gap), backend):
        assert bool((v >= -1e-6).all()), (beta, name, v)
        assert bool((v <= 1e-3).all()), (beta, name, v)  # and they are ~0: the inputs really are near-equal


@pytest.mark.parametrize("backend", BOTH)
def test_values_never_negative_at_llm_scale_logits(backend, device):
    """Logits up to ~80 (as a confident LLM's) and a near-equal teacher: no value below −1e-6."""
    bad = [(beta, name, float(v.min())) for beta, name, v in near_equal_values(near_equal_case(10.0, 1e-3), backend)
           if float(v.min()) < -1e-6]
    assert not bad, bad


@grid(("beta",), [(0.0,), (1.0,)], [(0.0,), (1.0,)])
def test_beta_endpoints_are_the_kls(backend, device, beta):
    """β = 0: KL(Q‖P) (forward); β = 1: KL(P‖Q) (reverse), from torch.log_softmax by hand."""
    case = Case()
    x = case.inputs(F32, device)
    logp = torch.log_softmax(case.logits() / TAU, -1)
    logq = torch.log_softmax(case.logits(teacher=True) / TAU, -1)
    want = (logq.exp() * (logq - logp)).sum(-1) if beta == 0.0 else (logp.exp() * (logp - logq)).sum(-1)
    assert bool((want > 0.1).all())
    with torch.no_grad():
        got = {
            "linear_jsd": ptd.linear_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, beta=beta,
                                         bias=x.bias, teacher_bias=x.teacher_bias, temperature=TAU, backend=backend),
            "linear_topk_jsd K=V": ptd.linear_topk_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, V,
                                                       beta=beta, bias=x.bias, teacher_bias=x.teacher_bias,
                                                       temperature=TAU, backend=backend),
            "jsd": ptd.jsd(x.logits, x.teacher_logits, beta=beta, temperature=TAU, backend=backend),
        }
    for name, value in got.items():
        assert_values(value, want, 1e-5, name)
    # and not the other direction
    other = (logp.exp() * (logp - logq)).sum(-1) if beta == 0.0 else (logq.exp() * (logq - logp)).sum(-1)
    assert float((got["linear_jsd"].double() - other).abs().max()) > 1e-2
