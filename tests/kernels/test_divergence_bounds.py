"""Divergences never leave their range: every JSD_β and Top-K JSD, per row and in a loss, on every backend,
lies in [0, h(β)] (h the binary entropy, ln 2 at β = ½; no upper bound for β = 0 or 1, a KL divergence),
while its gradient stays the exact formula's (the value is clamped, not the gradient).

Property tests draw random, soft-capped, near-identical and identical student/teacher pairs; identical
pairs are where rounding used to give values down to −2e-7. The oracle (``ptd_kernels.reference``, run
in float64) follows the same contract; tolerances follow the dtype of the computation.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from _devices import backend_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptd_kernels as ptd
from ptd_kernels import reference
from ptd_kernels.rowmath import bound_divergence_, divergence_upper_bound

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = os.path.abspath(os.path.join(__file__, "..", ".."))  # tests/: the shared helpers
BACKENDS = backend_params()  # every registered backend that runs here; tensors on its `device` fixture
HIDDEN = 8
PROPERTY = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def binary_entropy(beta: float) -> float:
    return -beta * math.log(beta) - (1.0 - beta) * math.log(1.0 - beta)


def tolerances(dtype):
    """(rtol, atol) of a computation in ``dtype`` against the float64 oracle."""
    return (1e-9, 1e-11) if dtype == torch.float64 else (2e-4, 2e-5)


@st.composite
def pairs(draw):
    """A student/teacher pair: (student layers, teacher layers, keyword arguments, a label)."""
    kind = draw(st.sampled_from(["identical", "near_identical", "random"]))
    seed = draw(st.integers(0, 2**16))
    rows = draw(st.integers(1, 4))
    vocab = draw(st.sampled_from([2, 7, 37, 70]))  # not multiples of a tile
    softcap = draw(st.sampled_from([None, 5.0]))
    scale = draw(st.sampled_from([1.0, 4.0]))  # 4: logits far into the cap, near one-hot rows
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, HIDDEN, generator=gen, dtype=torch.float64) * scale
    weight = torch.randn(vocab, HIDDEN, generator=gen, dtype=torch.float64)
    if kind == "identical":
        teacher_hidden, teacher_weight = hidden.clone(), weight.clone()
    elif kind == "near_identical":
        teacher_hidden = hidden + 1e-4 * torch.randn(rows, HIDDEN, generator=gen, dtype=torch.float64)
        teacher_weight = weight.clone()
    else:
        teacher_hidden = torch.randn(rows, HIDDEN + 3, generator=gen, dtype=torch.float64) * scale
        teacher_weight = torch.randn(vocab, HIDDEN + 3, generator=gen, dtype=torch.float64)
    kwargs = dict(beta=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])), softcap=softcap, teacher_softcap=softcap,
                  temperature=draw(st.sampled_from([1.0, 0.7])))
    topk = dict(k=draw(st.sampled_from([1, 3, 100])), support=draw(st.sampled_from(["union", "teacher", "student"])),
                tail=draw(st.booleans()))
    cast = [t.to(dtype) for t in (hidden, weight, teacher_hidden, teacher_weight)]
    return cast, kwargs, topk, f"{kind}, {dtype}, V={vocab}, {kwargs}, {topk}"


def assert_in_range(value, beta, what):
    assert torch.isfinite(value).all(), f"{what}: {value}"
    assert (value >= 0).all(), f"{what}: negative divergence {value.min().item():.3e}"
    if 0.0 < beta < 1.0:
        bound = divergence_upper_bound(beta)
        assert bound == pytest.approx(binary_entropy(beta), rel=1e-15)
        assert (value <= bound).all(), f"{what}: {value.max().item()} above h(β) = {bound}"


def value_and_grads(fn, layers, cotangent):
    """fn's value and the gradients of Σ cotangent·value w.r.t. the student's hidden and weight."""
    hidden, weight = (t.clone().requires_grad_() for t in layers[:2])
    value = fn(hidden, weight)
    grads = torch.autograd.grad((value * cotangent.to(value.device, value.dtype)).sum(), (hidden, weight))
    return value.detach(), grads


def assert_matches_reference(fn, ref_fn, layers, beta, what):
    dtype = layers[0].dtype
    rtol, atol = tolerances(dtype)
    cotangent = torch.arange(1, layers[0].shape[0] + 1, dtype=torch.float64)
    value, grads = value_and_grads(fn, layers, cotangent)
    assert_in_range(value, beta, what)
    wide = [t.to(torch.float64) for t in layers]
    expected, expected_grads = value_and_grads(ref_fn, wide, cotangent)
    assert_in_range(expected, beta, f"{what} (reference)")
    torch.testing.assert_close(value.to(torch.float64), expected, rtol=rtol, atol=atol, msg=f"{what}: value")
    # a gradient sums terms of the size of the other layer's entries (they cancel on near-identical rows): the
    # absolute error of its computation scales with them, not with the result
    for name, g, e, other in zip(("hidden", "weight"), grads, expected_grads, (wide[1], wide[0])):
        scale = max(1.0, e.abs().max().item(), other.abs().max().item())
        torch.testing.assert_close(g.to(torch.float64), e, rtol=rtol, atol=atol * scale, msg=f"{what}: d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=pairs())
def test_per_row_divergences_lie_in_range_with_the_exact_gradient(backend, device, case):
    """linear_jsd, linear_topk_jsd (K ≥ V: the full JSD) and linear_ptd_terms' jsd, per row."""
    layers, kwargs, topk, label = case
    layers = [t.to(device) for t in layers]
    teacher = layers[2:]
    beta = kwargs["beta"]
    for name, fn, ref_fn in (
        ("linear_jsd", lambda h, w: ptd.linear_jsd(h, w, *teacher, backend=backend, **kwargs),
         lambda h, w: reference.linear_jsd(h, w, *[t.double() for t in teacher], **kwargs)),
        ("linear_topk_jsd", lambda h, w: ptd.linear_topk_jsd(h, w, *teacher, backend=backend, **kwargs, **topk),
         lambda h, w: reference.linear_topk_jsd(h, w, *[t.double() for t in teacher], **kwargs, **topk)),
    ):
        assert_matches_reference(fn, ref_fn, layers, beta, f"{backend} {name} ({label})")
    targets = torch.zeros(layers[0].shape[0], dtype=torch.long, device=device)
    terms = ptd.linear_ptd_terms(layers[0], layers[1], targets, *teacher, backend=backend, **kwargs, **topk)
    assert_in_range(terms.jsd, beta, f"{backend} linear_ptd_terms ({label})")


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=pairs())
def test_losses_are_means_of_rows_in_range(backend, device, case):
    """linear_jsd_loss / linear_topk_jsd_loss (the one-sweep path where the backend has one) and the D_K terms
    of linear_policy_loss: each row in range, the loss their weighted sum, the gradient the exact formula's."""
    layers, kwargs, topk, label = case
    layers = [t.to(device) for t in layers]
    teacher = layers[2:]
    beta = kwargs["beta"]
    for name, fn, ref_fn in (
        ("linear_jsd_loss", lambda h, w: ptd.linear_jsd_loss(h, w, *teacher, backend=backend, **kwargs),
         lambda h, w: reference.linear_jsd_loss(h, w, *[t.double() for t in teacher], **kwargs)),
        ("linear_topk_jsd_loss",
         lambda h, w: ptd.linear_topk_jsd_loss(h, w, *teacher, backend=backend, **kwargs, **topk),
         lambda h, w: reference.linear_topk_jsd_loss(h, w, *[t.double() for t in teacher], **kwargs, **topk)),
    ):
        assert_matches_reference(fn, ref_fn, layers, beta, f"{backend} {name} ({label})")
    targets = torch.zeros(layers[0].shape[0], dtype=torch.long, device=device)
    loss, terms = ptd.linear_policy_loss(layers[0], layers[1], targets, *teacher, topk["k"], backend=backend,
                                         support=topk["support"], tail=topk["tail"], return_terms=True,
                                         row_loss=lambda logp, entropy, jsd: jsd, **kwargs)
    assert_in_range(terms.jsd, beta, f"{backend} linear_policy_loss D_K ({label})")
    assert loss.item() >= 0.0
    torch.testing.assert_close(loss.detach(), terms.jsd.sum(), rtol=1e-6, atol=1e-12)


@PROPERTY
@given(case=pairs())
def test_logits_level_divergences_lie_in_range(case):
    """ptd_kernels.jsd and topk_jsd on given logits (the same per-row math, no output layer)."""
    layers, kwargs, topk, label = case
    beta, temperature = kwargs["beta"], kwargs["temperature"]
    softcap = kwargs["softcap"]
    student_logits, teacher_logits = (
        h @ w.T if softcap is None else softcap * torch.tanh(h @ w.T / softcap) for h, w in (layers[:2], layers[2:]))
    for name, fn, ref_fn in (
        ("jsd", ptd.jsd, reference.jsd),
        ("topk_jsd", lambda *a, **kw: ptd.topk_jsd(*a, **kw, **topk),
         lambda *a, **kw: reference.topk_jsd(*a, **kw, **topk)),
    ):
        value = fn(student_logits, teacher_logits, beta=beta, temperature=temperature)
        assert_in_range(value, beta, f"{name} ({label})")
        expected = ref_fn(student_logits.double(), teacher_logits.double(), beta=beta, temperature=temperature)
        rtol, atol = tolerances(student_logits.dtype)
        torch.testing.assert_close(value.double(), expected, rtol=rtol, atol=atol, msg=f"{name} ({label})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_sides_give_zero_or_a_tiny_positive_value(backend, device, dtype):
    """The issue's case: one output layer on both sides, soft-capped, logits deep in the cap."""
    gen = torch.Generator().manual_seed(3)
    hidden = (torch.randn(32, 32, generator=gen) * 3).to(device, dtype)
    weight = torch.randn(150, 32, generator=gen).to(device, dtype)
    same = dict(softcap=5.0, teacher_softcap=5.0, backend=backend)
    teacher = (hidden.clone(), weight.clone())
    for name, value in (
        ("linear_jsd", ptd.linear_jsd(hidden, weight, *teacher, **same)),
        ("linear_topk_jsd", ptd.linear_topk_jsd(hidden, weight, *teacher, 8, **same)),
        ("linear_jsd_loss", ptd.linear_jsd_loss(hidden, weight, *teacher, **same)),
        ("linear_topk_jsd_loss", ptd.linear_topk_jsd_loss(hidden, weight, *teacher, 8, **same)),
        ("linear_jsd β=0", ptd.linear_jsd(hidden, weight, *teacher, beta=0.0, **same)),
        ("linear_jsd β=1", ptd.linear_jsd(hidden, weight, *teacher, beta=1.0, **same)),
    ):
        assert (value >= 0).all() and (value < 1e-7).all(), f"{backend} {dtype} {name}: {value.min()}, {value.max()}"


def _improper_sparse_teacher():
    """A student whose four first tokens hold all but about e^-20 of its mass, and a sparse teacher on them whose
    given probabilities sum to about 1.5: KL(P ‖ Q) over the atoms is then negative (about −ln 1.5), so the
    value is clamped to 0 while its gradient is not 0."""
    gen = torch.Generator().manual_seed(0)
    hidden = 0.3 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, -20.0], dtype=torch.float64)
    ids = torch.arange(4).repeat(3, 1)
    logp = torch.log_softmax(hidden @ weight.T + bias, -1)[:, :4]
    given = (logp + math.log(1.5) + 0.2 * torch.randn(3, 4, generator=gen, dtype=torch.float64)).clamp_max(-0.01)
    return hidden, weight, bias, ids, given


def _kl_of_atoms(hidden, weight, bias, ids, given):
    """The unclamped KL(P ‖ Q) over the support's atoms and the tail atoms, written out (float64 autograd)."""
    logp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(1, ids)
    p_tail = -torch.expm1(torch.logsumexp(logp, -1))
    q_tail = (-torch.expm1(torch.logsumexp(given, -1))).clamp_min(1e-12)
    return (logp.exp() * (logp - given)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_clamped_value_keeps_the_gradient_of_the_formula(backend, device):
    hidden, weight, bias, ids, given = (t.to(device) for t in _improper_sparse_teacher())
    exact_hidden = hidden.clone().requires_grad_()
    exact = _kl_of_atoms(exact_hidden, weight, bias, ids, given)
    assert (exact < -0.1).all()  # the case does clamp
    (exact_grad,) = torch.autograd.grad(exact.sum(), exact_hidden)
    assert exact_grad.abs().max() > 1e-3
    for name, module in (("ptd", ptd), ("reference", reference)):
        h = hidden.clone().requires_grad_()
        value = module.linear_sparse_jsd(h, weight, ids, given, beta=1.0, bias=bias,
                                         **({"backend": backend} if module is ptd else {}))
        assert torch.equal(value, torch.zeros_like(value)), name
        (grad,) = torch.autograd.grad(value.sum(), h)
        torch.testing.assert_close(grad, exact_grad, rtol=1e-9, atol=1e-12, msg=f"{backend} {name}")


def test_bound_keeps_nan_and_clamps_in_place():
    value = torch.tensor([-1e-7, 0.3, 0.9, math.nan, math.inf])
    bounded = bound_divergence_(value, 0.5)
    assert bounded is value
    assert bounded[:3].tolist() == pytest.approx([0.0, 0.3, math.log(2.0)])
    assert math.isnan(bounded[3].item()) and bounded[4].item() == pytest.approx(math.log(2.0))
    kl = bound_divergence_(torch.tensor([-1e-7, 50.0]), 0.0)
    assert kl.tolist() == [0.0, 50.0]
    assert divergence_upper_bound(0.0) == divergence_upper_bound(1.0) == math.inf


# ----------------------------------------------------------------------------- vocabulary-parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = r"""
import datetime, os, sys
import torch, torch.distributed as dist
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
import ptd_kernels as ptd
gen = torch.Generator().manual_seed(3)
hidden = torch.randn(16, 8, generator=gen) * 3
weight = torch.randn(37, 8, generator=gen)
sizes = [18, 19]
lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
results = {}
for beta in (0.0, 0.5, 1.0):
    kw = dict(beta=beta, softcap=5.0, teacher_softcap=5.0)
    for name, fn in (("jsd", lambda pg, w: ptd.linear_jsd(hidden, w, hidden.clone(), w.clone(), process_group=pg,
                                                          **kw)),
                     ("topk", lambda pg, w: ptd.linear_topk_jsd(hidden, w, hidden.clone(), w.clone(), 3,
                                                               process_group=pg, **kw)),
                     ("loss", lambda pg, w: ptd.linear_jsd_loss(hidden, w, hidden.clone(), w.clone(),
                                                               process_group=pg, **kw))):
        results[(name, beta)] = (fn(dist.group.WORLD, weight[lo:hi]), fn(None, weight))
torch.save(results, os.path.join(out, f"rank{rank}.pt"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_vocabulary_parallel_divergences_lie_in_range(tmp_path):
    """At world 2 the value is bounded after the ranks' partial sums are added (a KL's partial sum over a
    slice may be negative): identical soft-capped sides give ≥ 0 on every rank, equal to one process."""
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(rank), "2", port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    errors = [proc.communicate(timeout=300)[1][-3000:] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(errors)
    for rank in range(2):
        for (name, beta), (parallel, single) in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert_in_range(parallel, beta, f"rank {rank} {name} β={beta}")
            torch.testing.assert_close(parallel, single, rtol=1e-5, atol=1e-7)
