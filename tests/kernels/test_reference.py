"""The oracle (``ptd_kernels.reference``) checked against computations that do not share its code.

Every backend is tested against the reference, so the reference itself is tested here against
independent derivations: ``torch.distributions.Categorical``, hand-written Python ``math`` on
explicit 3- and 4-token distributions, float64 finite differences (``gradcheck``), and the
structural properties of docs/method.md §2 (K ≥ V equals the full JSD, coarse-graining lowers the JSD,
tie rule, sparse teacher = dense teacher's top-K, masking). Masking, finite differences, the
negative control of the authors' stop-gradient surrogate (docs/method.md §1), the loss level and bad input
are in ``test_reference_rules.py``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _reference_cases import (
    BETAS,
    F64,
    SUPPORTS,
    _gjsd,
    _identity_inputs,
    _kl,
    _problem,
    _renorm,
    _tol,
    _with_tail,
)
from torch.distributions import Categorical

from ptd_kernels import reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


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

    # entropy by the formula of docs/method.md, H = lse − Σ p z, in float64
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
    # docs/method.md's convention: β=0 is KL(Q‖P) exactly, although the mixture formula tends to 0 as β → 0
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
