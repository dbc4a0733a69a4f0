"""The oracle (``ptd_kernels.reference``) checked against computations that do not share its code.

Every backend is tested against the reference, so the reference itself is tested here against
independent derivations: ``torch.distributions.Categorical``, hand-written Python ``math`` on
explicit 3- and 4-token distributions, float64 finite differences (``gradcheck``), and the
structural properties of SPEC §2 (K ≥ V equals the full JSD, coarse-graining lowers the JSD,
tie rule, sparse teacher = dense teacher's top-K, masking). A negative control rebuilds the
authors' stop-gradient surrogate (SPEC §1) and shows that these checks would catch it.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import Categorical

from ptd_kernels import reference as ref

F64 = torch.float64
BETAS = (0.0, 0.5, 1.0)
SUPPORTS = ("union", "teacher", "student")


# ----------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


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


# ----------------------------------------------------------------------------- 1. log-prob and entropy


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_categorical(dtype, temperature):
    hidden, weight, bias, *_ = _problem(n=8, h=6, v=11, dtype=dtype, seed=1, scale=2.0)
    targets = torch.tensor([3, 0, -100, 10, 5, -100, 7, 1])
    live = targets != -100
    logits = (hidden @ weight.T + bias) / temperature
    dist = Categorical(logits=logits.to(F64))
    want_logp = torch.where(live, dist.log_prob(targets.clamp(min=0)), torch.zeros(()))
    want_ent = torch.where(live, dist.entropy(), torch.zeros(()))
    tol = _tol(dtype)

    logp, ent = ref.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, with_entropy=True)
    assert logp.dtype == dtype and ent.dtype == dtype
    torch.testing.assert_close(logp.to(F64), want_logp, **tol)
    torch.testing.assert_close(ent.to(F64), want_ent, **tol)
    assert bool((logp[~live] == 0).all()) and bool((ent[~live] == 0).all())
    only = ref.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature)
    torch.testing.assert_close(only, logp, rtol=0, atol=0)

    # logits level: temperature applied inside
    logp2, ent2 = ref.logprobs(logits * temperature, targets, temperature=temperature, with_entropy=True)
    torch.testing.assert_close(logp2.to(F64), want_logp, **tol)
    torch.testing.assert_close(ent2.to(F64), want_ent, **tol)
    assert bool((logp2[~live] == 0).all()) and bool((ent2[~live] == 0).all())

    # entropy by the SPEC formula H = lse − Σ p z, in float64
    z64 = logits.to(F64)
    lse = torch.logsumexp(z64, -1)
    h_spec = lse - (torch.softmax(z64, -1) * z64).sum(-1)
    torch.testing.assert_close(ent.to(F64)[live], h_spec[live], **tol)


def test_custom_ignore_index_and_low_precision_computes_in_float32():
    hidden, weight, bias, *_ = _problem(n=4, h=6, v=11, dtype=torch.bfloat16, seed=2)
    targets = torch.tensor([3, 7, 0, 1])
    logp, ent = ref.linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=7, with_entropy=True)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32  # float32 math for bf16 inputs
    dist = Categorical(logits=hidden.double() @ weight.double().T + bias.double())
    torch.testing.assert_close(logp[[0, 2, 3]].double(), dist.log_prob(targets)[[0, 2, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[[0, 2, 3]].double(), dist.entropy()[[0, 2, 3]], rtol=1e-5, atol=1e-5)
    assert logp[1] == 0 and ent[1] == 0


# ----------------------------------------------------------------------------- 2. hand-computed JSD

P3 = [0.7, 0.2, 0.1]
Q3 = [0.1, 0.3, 0.6]


def test_hand_formulas_are_the_textbook_ones():
    # guards the Python helper itself: β=0.5 is the symmetric JSD, β=0/1 the two KLs
    m = [(a + b) / 2 for a, b in zip(P3, Q3)]
    assert _gjsd(P3, Q3, 0.5) == pytest.approx(0.5 * _kl(P3, m) + 0.5 * _kl(Q3, m), rel=1e-15)
    assert _gjsd(P3, Q3, 0.5) == pytest.approx(_gjsd(Q3, P3, 0.5), rel=1e-14)
    assert _gjsd(P3, Q3, 0.0) == pytest.approx(
        0.1 * math.log(0.1 / 0.7) + 0.3 * math.log(0.3 / 0.2) + 0.6 * math.log(0.6 / 0.1), rel=1e-15
    )
    assert _gjsd(P3, Q3, 1.0) == pytest.approx(
        0.7 * math.log(0.7 / 0.1) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.6), rel=1e-15
    )


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_hand_computed_three_tokens(beta, temperature):
    want = _gjsd(P3, Q3, beta)
    hp, w, hq, tw = _identity_inputs([P3], [Q3], temperature)
    got = {
        "jsd": ref.jsd(hp, hq, beta=beta, temperature=temperature),
        "linear_jsd": ref.linear_jsd(hp, w, hq, tw, beta=beta, temperature=temperature),
    }
    for support, tail in itertools.product(SUPPORTS, (True, False)):
        got[f"topk_jsd {support} {tail}"] = ref.topk_jsd(hp, hq, 3, beta=beta, support=support, tail=tail,
                                                         temperature=temperature)
        got[f"linear_topk_jsd {support} {tail}"] = ref.linear_topk_jsd(hp, w, hq, tw, 5, beta=beta, support=support,
                                                                       tail=tail, temperature=temperature)
    for name, value in got.items():
        assert value.dtype == F64, name
        assert abs(float(value[0]) - want) < 1e-12, (name, float(value[0]), want)


def test_jsd_beta_endpoints_are_the_kls_not_the_limit():
    # SPEC convention: β=0 is KL(Q‖P) exactly, although the mixture formula tends to 0 as β → 0
    hp, w, hq, tw = _identity_inputs([P3], [Q3])
    assert float(ref.linear_jsd(hp, w, hq, tw, beta=0.0)[0]) == pytest.approx(_kl(Q3, P3), abs=1e-12)
    assert float(ref.linear_jsd(hp, w, hq, tw, beta=1e-9)[0]) < 1e-6
    assert float(ref.linear_jsd(hp, w, hq, tw, beta=1.0)[0]) == pytest.approx(_kl(P3, Q3), abs=1e-12)


# ----------------------------------------------------------------------------- 3. Top-K JSD


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_topk_with_k_at_least_vocab_equals_full_jsd(dtype):
    hidden, weight, bias, th, tw, tb = _problem(n=6, v=9, dtype=dtype, seed=3, scale=1.5)
    logits = hidden @ weight.T + bias
    t_logits = th @ tw.T + tb
    tol = _tol(dtype)
    for beta in BETAS:
        full = ref.linear_jsd(hidden, weight, th, tw, beta=beta, bias=bias, teacher_bias=tb)
        full_logits = ref.jsd(logits, t_logits, beta=beta)
        torch.testing.assert_close(full_logits, full, **tol)
        assert bool((full > 1e-3).all())
        for support, tail, k in itertools.product(SUPPORTS, (True, False), (9, 20)):
            d = ref.linear_topk_jsd(hidden, weight, th, tw, k, beta=beta, support=support, tail=tail, bias=bias,
                                    teacher_bias=tb)
            torch.testing.assert_close(d, full, **tol, msg=f"{beta} {support} {tail} {k}")
            d2 = ref.topk_jsd(logits, t_logits, k, beta=beta, support=support, tail=tail)
            torch.testing.assert_close(d2, full, **tol, msg=f"logits {beta} {support} {tail} {k}")


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_topk_tail_is_a_lower_bound_and_nonnegative(scale):
    hidden, weight, bias, th, tw, tb = _problem(n=16, h=6, v=13, th=8, seed=4, scale=scale)
    for beta in (0.0, 0.3, 0.5, 1.0):
        full = ref.linear_jsd(hidden, weight, th, tw, beta=beta, bias=bias, teacher_bias=tb)
        for support, k in itertools.product(SUPPORTS, (1, 2, 5)):
            d = ref.linear_topk_jsd(hidden, weight, th, tw, k, beta=beta, support=support, tail=True, bias=bias,
                                    teacher_bias=tb)
            assert bool((d <= full + 1e-12).all()), (beta, support, k)
            assert bool((d >= -1e-12).all()), (beta, support, k)
            assert bool((d < full).any())  # a true coarse-graining loses something
            d_nt = ref.linear_topk_jsd(hidden, weight, th, tw, k, beta=beta, support=support, tail=False, bias=bias,
                                       teacher_bias=tb)
            assert bool((d_nt >= -1e-12).all()), (beta, support, k)
            if k == 1 and support != "union":  # one renormalized atom on both sides: nothing to compare
                assert bool((d_nt.abs() < 1e-12).all())


# V = 4 explicit distributions; argmax p = 0, argmax q = 3
P4 = [0.5, 0.25, 0.15, 0.10]
Q4 = [0.05, 0.15, 0.2, 0.6]


def _hand_cases():
    """(support, k, tail) -> the atoms (p, q) written out by hand."""
    return {
        ("teacher", 1, True): ([0.10, 0.90], [0.60, 0.40]),
        ("student", 1, True): ([0.50, 0.50], [0.05, 0.95]),
        ("union", 1, True): ([0.50, 0.10, 0.40], [0.05, 0.60, 0.35]),
        ("teacher", 2, True): ([0.15, 0.10, 0.75], [0.20, 0.60, 0.20]),
        ("teacher", 2, False): (_renorm([0.15, 0.10]), _renorm([0.20, 0.60])),
        ("student", 2, False): (_renorm([0.50, 0.25]), _renorm([0.05, 0.15])),
        ("union", 1, False): (_renorm([0.50, 0.10]), _renorm([0.05, 0.60])),
    }


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_topk_hand_computed_tail_construction(beta):
    hp, w, hq, tw = _identity_inputs([P4], [Q4])
    values = {}
    for (support, k, tail), (pa, qa) in _hand_cases().items():
        want = _gjsd(pa, qa, beta)
        got = ref.linear_topk_jsd(hp, w, hq, tw, k, beta=beta, support=support, tail=tail)
        assert abs(float(got[0]) - want) < 1e-12, (support, k, tail, float(got[0]), want)
        got_l = ref.topk_jsd(hp, hq, k, beta=beta, support=support, tail=tail)
        assert abs(float(got_l[0]) - want) < 1e-12, (support, k, tail)
        values[(support, k, tail)] = want
    # the supports really differ here, so the checks above tell them apart
    assert abs(values[("teacher", 1, True)] - values[("union", 1, True)]) > 1e-3
    assert abs(values[("student", 1, True)] - values[("union", 1, True)]) > 1e-3

    # the sparse teacher's tail comes from the given log-probs: q_S = 0.6 at id 3 → q_tail = 0.4
    ids = torch.tensor([[3]])
    got_sparse = ref.linear_sparse_jsd(hp, w, ids, torch.tensor([[math.log(0.6)]], dtype=F64), beta=beta)
    assert abs(float(got_sparse[0]) - values[("teacher", 1, True)]) < 1e-12
    ids2 = torch.tensor([[3, 2]])
    lp2 = torch.tensor([[math.log(0.6), math.log(0.2)]], dtype=F64)
    for tail in (True, False):
        got_sparse = ref.linear_sparse_jsd(hp, w, ids2, lp2, beta=beta, tail=tail)
        assert abs(float(got_sparse[0]) - values[("teacher", 2, tail)]) < 1e-12, tail


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_union_support_is_deduplicated(beta):
    # top-2 of p = {0, 1}, top-2 of q = {2, 1}: S = {0, 1, 2}, id 1 counted once
    p = [0.4, 0.3, 0.15, 0.1, 0.05]
    q = [0.05, 0.35, 0.4, 0.1, 0.1]
    hp, w, hq, tw = _identity_inputs([p], [q])
    want_tail = _gjsd(_with_tail([0.4, 0.3, 0.15]), _with_tail([0.05, 0.35, 0.4]), beta)
    want_renorm = _gjsd(_renorm([0.4, 0.3, 0.15]), _renorm([0.05, 0.35, 0.4]), beta)
    double_counted = _gjsd(_renorm([0.4, 0.3, 0.3, 0.15]), _renorm([0.05, 0.35, 0.35, 0.4]), beta)
    got = ref.linear_topk_jsd(hp, w, hq, tw, 2, beta=beta, support="union", tail=True)
    assert abs(float(got[0]) - want_tail) < 1e-12
    got = ref.linear_topk_jsd(hp, w, hq, tw, 2, beta=beta, support="union", tail=False)
    assert abs(float(got[0]) - want_renorm) < 1e-12
    assert abs(want_renorm - double_counted) > 1e-3
    # teacher support {1, 2} differs from the union
    want_teacher = _gjsd(_with_tail([0.3, 0.15]), _with_tail([0.35, 0.4]), beta)
    got = ref.linear_topk_jsd(hp, w, hq, tw, 2, beta=beta, support="teacher", tail=True)
    assert abs(float(got[0]) - want_teacher) < 1e-12
    assert abs(want_teacher - want_tail) > 1e-3


def test_tail_floor_when_support_holds_all_mass():
    # q puts (numerically) all mass on id 0; its tail is floored at 1e-12 instead of log(0) = -inf
    p = [0.5, 0.3, 0.2]
    hp = torch.tensor([[math.log(x) for x in p]], dtype=F64)
    hq = torch.tensor([[0.0, -60.0, -60.0]], dtype=F64)
    eye = torch.eye(3, dtype=F64)
    q0 = 1.0 / (1.0 + 2.0 * math.exp(-60.0))
    for beta in BETAS:
        got = ref.linear_topk_jsd(hp, eye, hq, eye, 1, beta=beta, support="teacher")
        want = _gjsd([0.5, 0.5], [q0, 1e-12], beta)
        assert math.isfinite(float(got[0]))
        assert abs(float(got[0]) - want) < 1e-9 * max(1.0, abs(want)), (beta, float(got[0]), want)


# ----------------------------------------------------------------------------- 4. tie rule

TIE_ROWS = [
    ([0.0, 0.0, 0.0, 0.0, 0.0], [0, 1, 2]),
    ([1.0, 3.0, 2.0, 2.0, 0.0], [1, 2, 3]),
    ([3.0, 1.0, 2.0, 2.0, 2.0], [0, 2, 3]),  # tie across the k-th place: ids 2, 3 in, 4 out
    ([0.0, 5.0, 0.0, 5.0, 0.0], [1, 3, 0]),
    ([2.0, 1.0, 1.0, 1.0, 2.0], [0, 4, 1]),
]


def test_linear_topk_ties_go_to_the_smaller_id():
    rows = torch.tensor([r for r, _ in TIE_ROWS], dtype=F64)
    eye = torch.eye(5, dtype=F64)
    targets = torch.tensor([4, 0, -100, 2, 1])
    out = ref.linear_topk(rows, eye, 3, targets=targets)
    assert out.indices.dtype == torch.int64
    assert out.indices.tolist() == [ids for _, ids in TIE_ROWS]
    for i, (r, ids) in enumerate(TIE_ROWS):
        lse = math.log(sum(math.exp(x) for x in r))
        assert float(out.lse[i]) == pytest.approx(lse, abs=1e-12)
        assert out.logprobs[i].tolist() == pytest.approx([r[j] - lse for j in ids], abs=1e-12)
        t = int(targets[i])
        assert float(out.target_logprobs[i]) == pytest.approx(0.0 if t == -100 else r[t] - lse, abs=1e-12)
    assert ref.linear_topk(rows, eye, 3).target_logprobs is None
    # k = 1 on an all-equal row
    assert ref.linear_topk(rows[:1], eye, 1).indices.tolist() == [[0]]
    # a temperature: logits 2·z at τ = 2 are z at τ = 1 (log-probs and lse of softmax(z / τ))
    base = ref.linear_topk(rows, eye, 3, targets=targets)
    out = ref.linear_topk(rows * 2, eye, 3, temperature=2.0, targets=targets)
    assert out.indices.tolist() == base.indices.tolist()
    torch.testing.assert_close(out.logprobs, base.logprobs, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.lse, base.lse, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.target_logprobs, base.target_logprobs, rtol=0, atol=1e-12)


def test_topk_jsd_support_uses_the_tie_rule():
    # teacher logits tie between ids 1 and 2 for the top-1 place: S must be {1}
    p = [0.4, 0.1, 0.3, 0.2]
    q_logits = [0.0, 1.0, 1.0, -1.0]
    zq = [math.exp(x) for x in q_logits]
    q = [x / sum(zq) for x in zq]
    hp = torch.tensor([[math.log(x) for x in p]], dtype=F64)
    hq = torch.tensor([q_logits], dtype=F64)
    eye = torch.eye(4, dtype=F64)
    for beta in BETAS:
        want = _gjsd([p[1], 1 - p[1]], [q[1], 1 - q[1]], beta)
        wrong = _gjsd([p[2], 1 - p[2]], [q[2], 1 - q[2]], beta)
        got = float(ref.linear_topk_jsd(hp, eye, hq, eye, 1, beta=beta, support="teacher")[0])
        assert abs(got - want) < 1e-12 and abs(want - wrong) > 1e-3


def test_topk_overlap():
    a = torch.tensor([[0, 1, 2], [5, 6, 7], [3, 1, 2]])
    b = torch.tensor([[2, 1, 0], [0, 1, 2], [2, 9, 8]])
    assert ref.topk_overlap(a, b).tolist() == pytest.approx([1.0, 0.0, 1 / 3])


# ----------------------------------------------------------------------------- 5. sparse teacher


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_sparse_teacher_equals_dense_teacher_support(tail, k):
    hidden, weight, bias, th, tw, tb = _problem(n=7, v=10, seed=5, scale=1.5)
    top = ref.linear_topk(th, tw, k, bias=tb)
    perm = torch.argsort(torch.rand(7, k, generator=torch.Generator().manual_seed(9)), dim=-1)
    shuffled_ids, shuffled_lp = top.indices.gather(1, perm), top.logprobs.gather(1, perm)
    for beta in (0.0, 0.3, 0.5, 1.0):
        h1 = hidden.clone().requires_grad_()
        dense = ref.linear_topk_jsd(h1, weight, th, tw, k, beta=beta, support="teacher", tail=tail, bias=bias,
                                    teacher_bias=tb)
        h2 = hidden.clone().requires_grad_()
        sparse = ref.linear_sparse_jsd(h2, weight, top.indices, top.logprobs, beta=beta, tail=tail, bias=bias)
        torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-13)
        assert bool((dense.abs() > 1e-6).any()) or (k == 1 and not tail)
        g = torch.randn(7, dtype=F64, generator=torch.Generator().manual_seed(1))
        (dense * g).sum().backward()
        (sparse * g).sum().backward()
        torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-10, atol=1e-12)
        # the order of the given ids does not matter
        again = ref.linear_sparse_jsd(hidden, weight, shuffled_ids, shuffled_lp, beta=beta, tail=tail, bias=bias)
        torch.testing.assert_close(again, dense, rtol=1e-12, atol=1e-13)


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
    """The released code's JSD: student weight stop-gradded, mixture differentiated (SPEC §1)."""
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
