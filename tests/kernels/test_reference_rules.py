"""The oracle's rules: masking, float64 finite differences (``gradcheck``), the authors'
stop-gradient surrogate as a negative control (docs/method.md §1: these checks must catch its zero gradient),
the loss level against the per-row functions, and bad input that names the argument."""

from __future__ import annotations

import itertools

import pytest
import torch
from _reference_cases import (
    BETAS,
    F64,
    SUPPORTS,
    _min_gap,
    _problem,
)

from ptd_kernels import reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


# ----------------------------------------------------------------------------- 6. masking


def _row_functions(hidden, weight, bias, th, tw, tb, targets, mask):
    """Every per-row student function of the reference, as name -> [N] outputs (masking applied)."""
    top = ref.linear_topk(th, tw, 3, bias=tb)
    targets_m = torch.where(mask, targets, torch.full_like(targets, -100))
    logp, ent = ref.linear_logprobs(hidden, weight, targets_m, bias=bias, with_entropy=True)
    out = {"logp": logp, "entropy": ent,
           "jsd": ref.linear_jsd(hidden, weight, th, tw, bias=bias, teacher_bias=tb, mask=mask),
           "sparse": ref.linear_sparse_jsd(hidden, weight, top.indices, top.logprobs, bias=bias, mask=mask)}
    for support in SUPPORTS:
        out[f"topk {support}"] = ref.linear_topk_jsd(hidden, weight, th, tw, 3, support=support, bias=bias,
                                                     teacher_bias=tb, mask=mask)
    terms = ref.linear_ptd_terms(hidden, weight, targets, th, tw, 3, bias=bias, teacher_bias=tb, mask=mask)
    for name in ("logp", "entropy", "jsd", "overlap"):
        out[f"terms.{name}"] = getattr(terms, name)
    out["terms.teacher_mass"] = terms.teacher_mass
    return out


def test_masked_rows_are_zero_and_get_no_gradient():
    n = 6
    hidden, weight, bias, th, tw, tb = _problem(n=n, v=9, seed=6)
    targets = torch.tensor([1, -100, 4, 8, 0, 2])
    mask = torch.tensor([True, True, False, True, True, False])
    dead = (targets == -100) | ~mask
    for name, value in _row_functions(hidden, weight, bias, th, tw, tb, targets, mask).items():
        if name in ("logp", "entropy") or name.startswith("terms."):
            expect_dead = dead
        else:
            expect_dead = ~mask
        assert bool((value[expect_dead] == 0).all()), name
        # live rows equal the same function run on the live rows alone
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        out = _row_functions(h, w, b, th, tw, tb, targets, mask)[name]
        if out.requires_grad:
            out.sum().backward()
            assert bool((h.grad[expect_dead] == 0).all()), name
            assert bool((h.grad[~expect_dead].abs().sum(-1) > 0).all()), name
        live = ~expect_dead
        sub = _row_functions(hidden[live], weight, bias, th[live], tw, tb, targets[live], mask[live])[name]
        torch.testing.assert_close(value[live], sub, rtol=1e-12, atol=1e-13, msg=name)


def test_nan_in_a_masked_row_does_not_leak():
    hidden, weight, bias, th, tw, tb = _problem(n=5, v=9, seed=7)
    hidden[2] = float("nan")
    th[2] = float("nan")
    targets = torch.tensor([1, 2, -100, 4, 5])
    mask = torch.tensor([True, True, False, True, True])
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    outs = _row_functions(h, w, bias, th, tw, tb, targets, mask)
    total = 0
    for name, value in outs.items():
        assert not bool(value.isnan().any()), name
        total = total + value.sum()
    total.backward()
    assert bool(torch.isfinite(w.grad).all()) and bool(torch.isfinite(h.grad[[0, 1, 3, 4]]).all())
    assert bool((h.grad[2] == 0).all())


def test_all_rows_masked_gives_zeros_and_zero_grads():
    n = 4
    hidden, weight, bias, th, tw, tb = _problem(n=n, v=9, seed=8)
    targets = torch.full((n,), -100)
    mask = torch.zeros(n, dtype=torch.bool)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    outs = _row_functions(h, w, b, th, tw, tb, targets, mask)
    outs["jsd_loss"] = ref.linear_jsd_loss(h, w, th, tw, bias=b, teacher_bias=tb, mask=mask)[None]
    outs["topk_loss"] = ref.linear_topk_jsd_loss(h, w, th, tw, 3, bias=b, teacher_bias=tb, mask=mask)[None]
    total = 0
    for name, value in outs.items():
        assert bool((value == 0).all()), name
        total = total + value.sum()
    total.backward()
    for t in (h, w, b):
        grad = t.grad if t.grad is not None else torch.zeros_like(t)
        assert bool((grad == 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_hidden_row_is_nan_in_that_row_only(bad):
    hidden, weight, bias, th, tw, tb = _problem(n=5, v=9, seed=9)
    hidden[3, 1] = bad
    targets = torch.tensor([1, 2, 3, 4, 5])
    mask = torch.ones(5, dtype=torch.bool)
    for name, value in _row_functions(hidden, weight, bias, th, tw, tb, targets, mask).items():
        if name in ("terms.overlap", "terms.teacher_mass"):
            continue  # diagnostics of the selection, not divergence values
        assert bool(value[3].isnan()), name
        assert bool(torch.isfinite(value[[0, 1, 2, 4]]).all()), name


def test_nan_in_a_teacher_row_is_nan_in_that_row_only():
    hidden, weight, bias, th, tw, tb = _problem(n=5, v=9, seed=10)
    th[1, 0] = float("nan")
    for beta in BETAS:
        values = [ref.linear_jsd(hidden, weight, th, tw, beta=beta)]
        values += [ref.linear_topk_jsd(hidden, weight, th, tw, 3, beta=beta, support=s) for s in SUPPORTS]
        for v in values:
            assert bool(v[1].isnan()) and bool(torch.isfinite(v[[0, 2, 3, 4]]).all())


# ----------------------------------------------------------------------------- 7. finite differences


def _gradcheck(fn, *inputs):
    """Float64 central differences against autograd, full Jacobian w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
    # and the gradient is not trivially zero (a zero gradient would pass any FD check of a constant)
    out = fn(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(sum(o.sum() for o in out), leaves, allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 1e-6 for g in grads)


@pytest.fixture(scope="module")
def small():
    """N=3, H=4, V=7 float64 problem with well-separated logits (no top-K boundary near an FD step)."""
    hidden, weight, bias, th, tw, tb = _problem(n=3, h=4, v=7, th=5, seed=11, scale=2.0)
    assert _min_gap(hidden @ weight.T + bias) > 1e-2
    assert _min_gap(th @ tw.T + tb) > 1e-2
    return hidden, weight, bias, th, tw, tb


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_linear_logprobs(small, temperature):
    hidden, weight, bias, *_ = small
    targets = torch.tensor([2, -100, 6])

    def fn(h, w, b):
        return ref.linear_logprobs(h, w, targets, bias=b, temperature=temperature, with_entropy=True)

    _gradcheck(fn, hidden, weight, bias)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_gradcheck_linear_jsd(small, beta):
    hidden, weight, bias, th, tw, tb = small

    def fn(h, w, b):
        return ref.linear_jsd(h, w, th, tw, beta=beta, bias=b, teacher_bias=tb, temperature=0.8)

    _gradcheck(fn, hidden, weight, bias)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("support", SUPPORTS)
def test_gradcheck_linear_topk_jsd(small, support, tail, beta):
    hidden, weight, bias, th, tw, tb = small

    def fn(h, w, b):
        return ref.linear_topk_jsd(h, w, th, tw, 2, beta=beta, support=support, tail=tail, bias=b, teacher_bias=tb)

    _gradcheck(fn, hidden, weight, bias)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tail", [True, False])
def test_gradcheck_linear_sparse_jsd(small, tail, beta):
    hidden, weight, bias, th, tw, tb = small
    top = ref.linear_topk(th, tw, 3, bias=tb)

    def fn(h, w, b):
        return ref.linear_sparse_jsd(h, w, top.indices, top.logprobs, beta=beta, tail=tail, bias=b)

    _gradcheck(fn, hidden, weight, bias)


@pytest.mark.parametrize("tail", [True, False])
def test_gradcheck_linear_ptd_terms(small, tail):
    hidden, weight, bias, th, tw, tb = small
    targets = torch.tensor([0, 5, 3])

    def fn(h, w, b):
        t = ref.linear_ptd_terms(h, w, targets, th, tw, 2, beta=0.5, tail=tail, bias=b, teacher_bias=tb)
        return t.logp, t.entropy, t.jsd

    _gradcheck(fn, hidden, weight, bias)


def test_gradcheck_logits_level(small):
    hidden, weight, bias, th, tw, tb = small
    logits = hidden @ weight.T + bias
    t_logits = th @ tw.T + tb
    targets = torch.tensor([1, 4, -100])
    _gradcheck(lambda z: ref.logprobs(z, targets, temperature=0.9, with_entropy=True), logits)
    _gradcheck(lambda z: ref.jsd(z, t_logits, beta=0.3), logits)
    for support, tail in itertools.product(SUPPORTS, (True, False)):
        _gradcheck(lambda z, s=support, t=tail: ref.topk_jsd(z, t_logits, 2, support=s, tail=t), logits)


def test_teacher_gets_no_gradient(small):
    hidden, weight, bias, th, tw, tb = small
    h = hidden.clone().requires_grad_()
    t = [x.clone().requires_grad_() for x in (th, tw, tb)]
    top = ref.linear_topk(t[0], t[1], 3, bias=t[2])
    assert not top.logprobs.requires_grad and not top.lse.requires_grad
    outs = [ref.linear_jsd(h, weight, t[0], t[1], teacher_bias=t[2]),
            ref.linear_topk_jsd(h, weight, t[0], t[1], 2, teacher_bias=t[2]),
            ref.linear_ptd_terms(h, weight, torch.tensor([0, 1, 2]), t[0], t[1], 2, teacher_bias=t[2]).jsd,
            ref.jsd(h @ weight.T, t[0] @ t[1].T)]
    sum(o.sum() for o in outs).backward()
    assert h.grad is not None and float(h.grad.abs().max()) > 0
    for x in t:
        assert x.grad is None or bool((x.grad == 0).all())


# ----------------------------------------------------------------------------- 8. the known defect


def _authors_surrogate(hidden, weight, th, tw, beta):
    """The released code's JSD: student weight stop-gradded, mixture differentiated (docs/method.md §1)."""
    logp = torch.log_softmax(hidden @ weight.T, -1)
    logq = torch.log_softmax(th @ tw.T, -1)
    p, q = logp.exp(), logq.exp()
    m = beta * q + (1 - beta) * p
    return (beta * q * (logq - m.log())).sum(-1) + ((1 - beta) * p.detach() * (logp.detach() - m.log())).sum(-1)


@pytest.mark.parametrize("beta", [0.3, 0.5])
def test_authors_surrogate_has_zero_gradient_and_ours_does_not(beta):
    hidden, weight, _, th, tw, _ = _problem(n=4, h=4, v=7, th=5, seed=12, scale=2.0)
    h_s = hidden.clone().requires_grad_()
    surrogate = _authors_surrogate(h_s, weight, th, tw, beta)
    h_r = hidden.clone().requires_grad_()
    ours = ref.linear_jsd(h_r, weight, th, tw, beta=beta)
    # same forward value ...
    torch.testing.assert_close(surrogate, ours, rtol=1e-12, atol=1e-13)
    surrogate.sum().backward()
    ours.sum().backward()
    # ... but the surrogate's gradient cancels to rounding error, ours does not
    assert float(h_s.grad.abs().max()) < 1e-12
    assert float(h_r.grad.abs().max()) > 1e-2
    # central finite differences agree with ours and not with the surrogate
    eps = 1e-6
    fd = torch.zeros_like(hidden)
    for i, j in itertools.product(range(hidden.shape[0]), range(hidden.shape[1])):
        plus, minus = hidden.clone(), hidden.clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd[i, j] = (ref.linear_jsd(plus, weight, th, tw, beta=beta).sum()
                    - ref.linear_jsd(minus, weight, th, tw, beta=beta).sum()) / (2 * eps)
    torch.testing.assert_close(h_r.grad, fd, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(h_s.grad, fd, rtol=1e-3, atol=1e-4)
    # and gradcheck, the check used everywhere above, fails on the surrogate
    leaf = hidden.clone().requires_grad_()
    for fast in (False, True):
        assert not torch.autograd.gradcheck(lambda h: _authors_surrogate(h, weight, th, tw, beta), (leaf,),
                                            eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False, fast_mode=fast)


def test_authors_surrogate_on_topk_atoms_has_zero_gradient_too():
    # the same cancellation on the |S|+1 tail atoms: a negative control for the Top-K gradient checks
    hidden, weight, _, th, tw, _ = _problem(n=3, h=4, v=7, th=5, seed=13, scale=2.0)
    beta, k = 0.5, 2
    ids = ref.linear_topk(th, tw, k).indices
    h = hidden.clone().requires_grad_()
    logp = torch.log_softmax(h @ weight.T, -1)
    logq = torch.log_softmax(th @ tw.T, -1)
    p_s, q_s = logp.exp().gather(1, ids), logq.exp().gather(1, ids)
    p = torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], -1)
    q = torch.cat([q_s, 1 - q_s.sum(-1, keepdim=True)], -1)
    m = beta * q + (1 - beta) * p
    surrogate = (beta * q * (q.log() - m.log())).sum(-1)
    surrogate = surrogate + ((1 - beta) * p.detach() * (p.detach().log() - m.log())).sum(-1)
    ours = ref.linear_topk_jsd(hidden, weight, th, tw, k, beta=beta, support="teacher")
    torch.testing.assert_close(surrogate.detach(), ours, rtol=1e-12, atol=1e-13)
    surrogate.sum().backward()
    assert float(h.grad.abs().max()) < 1e-12
    leaf = hidden.clone().requires_grad_()
    ours_grad = torch.autograd.grad(
        ref.linear_topk_jsd(leaf, weight, th, tw, k, beta=beta, support="teacher").sum(), leaf)[0]
    assert float(ours_grad.abs().max()) > 1e-2


# ----------------------------------------------------------------------------- 9. loss level


def test_loss_level_matches_per_row():
    hidden, weight, bias, th, tw, tb = _problem(n=7, v=9, seed=14)
    mask = torch.tensor([True, False, True, True, False, True, True])
    weights = torch.rand(7, dtype=F64, generator=torch.Generator().manual_seed(3))
    cases = {
        "jsd": (ref.linear_jsd_loss, ref.linear_jsd, (), dict(beta=0.3)),
        "topk": (ref.linear_topk_jsd_loss, ref.linear_topk_jsd, (3,), dict(beta=0.5, support="union", tail=True)),
        "topk-teacher": (ref.linear_topk_jsd_loss, ref.linear_topk_jsd, (2,), dict(beta=1.0, support="teacher",
                                                                                     tail=False)),
    }
    for name, (loss_fn, row_fn, extra, kw) in cases.items():
        for m in (None, mask):
            for w_ in (None, weights):
                h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
                wt1, wt2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
                loss = loss_fn(h1, wt1, th, tw, *extra, bias=bias, teacher_bias=tb, mask=m, weights=w_, **kw)
                rows = row_fn(h2, wt2, th, tw, *extra, bias=bias, teacher_bias=tb, mask=m, **kw)
                live = torch.ones(7, dtype=torch.bool) if m is None else m
                if w_ is None:
                    want = rows[live].sum() / int(live.sum())
                else:
                    want = (rows * weights).sum()  # masked rows are 0 already
                assert loss.dim() == 0
                torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14, msg=name)
                loss.backward()
                want.backward()
                torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-12, atol=1e-14, msg=name)
                torch.testing.assert_close(wt1.grad, wt2.grad, rtol=1e-12, atol=1e-14, msg=name)


def test_ptd_terms_equal_the_separate_functions():
    hidden, weight, bias, th, tw, tb = _problem(n=6, v=11, seed=15)
    targets = torch.tensor([1, -100, 4, 10, 0, 2])
    jsd_mask = torch.tensor([True, True, False, True, True, True])
    k = 3
    for support, tail in itertools.product(SUPPORTS, (True, False)):
        t = ref.linear_ptd_terms(hidden, weight, targets, th, tw, k, beta=0.3, support=support, tail=tail,
                                 bias=bias, teacher_bias=tb, jsd_mask=jsd_mask)
        logp, ent = ref.linear_logprobs(hidden, weight, targets, bias=bias, with_entropy=True)
        torch.testing.assert_close(t.logp, logp, rtol=0, atol=1e-14)
        torch.testing.assert_close(t.entropy, ent, rtol=0, atol=1e-14)
        rows = (targets != -100) & jsd_mask
        d = ref.linear_topk_jsd(hidden, weight, th, tw, k, beta=0.3, support=support, tail=tail, bias=bias,
                                teacher_bias=tb, mask=rows)
        torch.testing.assert_close(t.jsd, d, rtol=0, atol=1e-14)
        ids_p = ref.linear_topk(hidden, weight, k, bias=bias).indices
        ids_q = ref.linear_topk(th, tw, k, bias=tb).indices
        overlap = torch.where(rows, ref.topk_overlap(ids_p, ids_q).to(F64), torch.zeros((), dtype=F64))
        torch.testing.assert_close(t.overlap.to(F64), overlap, rtol=0, atol=1e-7)
        # teacher mass Σ_S q, by hand from the dense teacher
        q = torch.softmax(th @ tw.T + tb, -1)
        in_s = torch.zeros_like(q, dtype=torch.bool)
        if support in ("union", "teacher"):
            in_s.scatter_(1, ids_q, True)
        if support in ("union", "student"):
            in_s.scatter_(1, ids_p, True)
        mass = torch.where(rows, (q * in_s).sum(-1), torch.zeros((), dtype=F64))
        torch.testing.assert_close(t.teacher_mass.to(F64), mass, rtol=1e-12, atol=1e-14)
    assert overlap[rows].lt(1).any() and overlap[rows].gt(0).any()  # the overlap check is not vacuous


# ----------------------------------------------------------------------------- 10. bad input


def _err(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert match in str(info.value), (match, str(info.value))


def test_bad_input_names_the_argument():
    hidden, weight, bias, th, tw, tb = _problem(n=4, h=5, v=9, th=7, seed=16)
    targets = torch.tensor([0, 1, 2, 3])
    logits = hidden @ weight.T
    t_logits = th @ tw.T
    top = ref.linear_topk(th, tw, 3)

    # shape mismatches
    _err(ValueError, "hidden", ref.linear_logprobs, hidden[:, :4], weight, targets)
    _err(ValueError, "bias", ref.linear_logprobs, hidden, weight, targets, bias=bias[:5])
    _err(ValueError, "targets", ref.linear_logprobs, hidden, weight, targets[:3])
    _err(ValueError, "teacher_hidden", ref.linear_jsd, hidden, weight, th[:3], tw)
    _err(ValueError, "teacher_hidden", ref.linear_topk_jsd, hidden, weight, th[:, :6], tw, 3)
    _err(ValueError, "mask", ref.linear_jsd, hidden, weight, th, tw, mask=torch.ones(3, dtype=torch.bool))
    _err(ValueError, "teacher_logits", ref.jsd, logits, t_logits[:3])
    _err(ValueError, "teacher_logprobs", ref.linear_sparse_jsd, hidden, weight, top.indices, top.logprobs[:, :2])
    _err(ValueError, "weights", ref.linear_jsd_loss, hidden, weight, th, tw, weights=torch.ones(3, dtype=F64))
    # k < 1
    _err(ValueError, "k", ref.linear_topk_jsd, hidden, weight, th, tw, 0)
    _err(ValueError, "k", ref.topk_jsd, logits, t_logits, 0)
    _err(ValueError, "k", ref.linear_topk, hidden, weight, 0)
    _err(ValueError, "k", ref.linear_ptd_terms, hidden, weight, targets, th, tw, -1)
    _err(TypeError, "k", ref.linear_topk_jsd, hidden, weight, th, tw, 2.0)
    # β outside [0, 1]
    for beta in (-0.1, 1.5):
        _err(ValueError, "beta", ref.linear_jsd, hidden, weight, th, tw, beta=beta)
        _err(ValueError, "beta", ref.linear_topk_jsd, hidden, weight, th, tw, 3, beta=beta)
        _err(ValueError, "beta", ref.linear_sparse_jsd, hidden, weight, top.indices, top.logprobs, beta=beta)
        _err(ValueError, "beta", ref.jsd, logits, t_logits, beta=beta)
    _err(ValueError, "beta", ref.linear_jsd, hidden, weight, th, tw, beta=float("nan"))
    # τ ≤ 0
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        _err(ValueError, "temperature", ref.linear_logprobs, hidden, weight, targets, temperature=temperature)
        _err(ValueError, "temperature", ref.linear_jsd, hidden, weight, th, tw, temperature=temperature)
        _err(ValueError, "temperature", ref.logprobs, logits, targets, temperature=temperature)
        _err(ValueError, "temperature", ref.topk_jsd, logits, t_logits, 2, temperature=temperature)
    # target outside [0, V) other than ignore_index
    for bad in (9, -1, -101):
        bad_targets = torch.tensor([0, bad, 2, 3])
        _err(ValueError, "targets", ref.linear_logprobs, hidden, weight, bad_targets)
        _err(ValueError, "targets", ref.logprobs, logits, bad_targets)
        _err(ValueError, "targets", ref.linear_ptd_terms, hidden, weight, bad_targets, th, tw, 3)
        _err(ValueError, "targets", ref.linear_topk, hidden, weight, 3, targets=bad_targets)
    # ... but -1 is fine when it is the ignore_index
    out = ref.linear_logprobs(hidden, weight, torch.tensor([0, -1, 2, 3]), ignore_index=-1)
    assert out[1] == 0
    # teacher vocab ≠ student vocab
    _err(ValueError, "teacher_weight", ref.linear_jsd, hidden, weight, th, tw[:8])
    _err(ValueError, "teacher_weight", ref.linear_topk_jsd, hidden, weight, th, tw[:8], 3)
    _err(ValueError, "teacher_weight", ref.linear_ptd_terms, hidden, weight, targets, th, tw[:8], 3)
    _err(ValueError, "teacher_logits", ref.jsd, logits, t_logits[:, :8])
    _err(ValueError, "teacher_logits", ref.topk_jsd, logits, t_logits[:, :8], 2)
    _err(ValueError, "teacher_indices", ref.linear_sparse_jsd, hidden, weight, top.indices + 9, top.logprobs)
    # float targets
    _err(TypeError, "targets", ref.linear_logprobs, hidden, weight, targets.to(F64))
    _err(TypeError, "targets", ref.logprobs, logits, targets.float())
    _err(TypeError, "targets", ref.linear_ptd_terms, hidden, weight, targets.float(), th, tw, 3)
    _err(TypeError, "teacher_indices", ref.linear_sparse_jsd, hidden, weight, top.indices.double(), top.logprobs)
    # bad support string
    _err(ValueError, "support", ref.linear_topk_jsd, hidden, weight, th, tw, 3, support="both")
    _err(ValueError, "support", ref.topk_jsd, logits, t_logits, 3, support="Union")
    _err(ValueError, "support", ref.linear_ptd_terms, hidden, weight, targets, th, tw, 3, support=None)
    # bad backend string
    _err(ValueError, "backend", ref.linear_logprobs, hidden, weight, targets, backend="cuda")
    _err(ValueError, "backend", ref.linear_jsd, hidden, weight, th, tw, backend="Triton")
    _err(ValueError, "backend", ref.linear_topk_jsd, hidden, weight, th, tw, 3, backend="")
    _err(ValueError, "backend", ref.linear_topk, hidden, weight, 3, backend="numpy")
    _err(ValueError, "backend", ref.jsd, logits, t_logits, backend="pytorch")
    # other types: bool mask required, floats for hidden
    _err(TypeError, "mask", ref.linear_jsd, hidden, weight, th, tw, mask=torch.ones(4))
    _err(TypeError, "hidden", ref.linear_logprobs, hidden.long(), weight.long(), targets)
    _err(TypeError, "hidden", ref.linear_logprobs, hidden.float(), weight, targets)


def test_wrong_device_mix_names_the_argument():
    hidden, weight, _, th, tw, _ = _problem(n=4, h=5, v=9, th=7, seed=17)
    meta = torch.device("meta")
    _err(ValueError, "teacher_hidden", ref.linear_jsd, hidden, weight, th.to(meta), tw.to(meta))
    _err(ValueError, "weight", ref.linear_jsd, hidden, weight.to(meta), th, tw)
    _err(ValueError, "targets", ref.linear_logprobs, hidden, weight, torch.zeros(4, dtype=torch.long, device=meta))
    _err(ValueError, "mask", ref.linear_jsd, hidden, weight, th, tw,
         mask=torch.ones(4, dtype=torch.bool, device=meta))
