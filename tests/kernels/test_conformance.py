"""The conformance suite: the primitives of ``Backend`` (backends/base.py) — row statistics, gathers at ids,
head backward with dense and sparse coefficients, the full-vocabulary JSD forward and backward — run by
EVERY registered backend on EVERY device it runs on in this process, values and gradients against float64
oracles on the same (rounded) inputs. A new backend is correct when it passes this file.

Shapes are small (Triton's interpreter runs the kernels on a CPU), with a vocabulary no tile size divides.
Tolerances are those of the dtype each result is computed in (tests/_checks.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from _checks import assert_close, assert_rel_close
from _devices import backend_device_params

from ptd_kernels import reference as ref
from ptd_kernels.backends import get_backend
from ptd_kernels.backends.base import ALL_GRADS, GradNeeds, Head, HeadGradCoefs, LogitSpec, SparseTerms

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
TAU = 0.7
N, H, TEACHER_H, V = 5, 24, 40, 203  # 203 is prime: no tile divides the vocabulary
CAPPED = LogitSpec(TAU, logit_scale=1.3, softcap=6.0)
PLAIN = LogitSpec(TAU)
REGISTER_TOP_K = 256  # the most keys per row the Triton and cuBLAS top-K kernels keep in registers

conformance = pytest.mark.parametrize(("backend", "device"), backend_device_params())


def make_head(dtype, device, *, n=N, h=H, v=V, bias=True, spec=PLAIN, seed=0, zero_rows=(),
              tied_bias=False) -> Head:
    """A head with logits of std ≈ 3; ``zero_rows``: all-zero hidden rows (logits = the bias); ``tied_bias``:
    bias values on a grid of quarters (exact in bf16, many exact ties)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    hidden[list(zero_rows)] = 0.0
    weight = torch.randn(v, h, generator=g, dtype=F64) * (2.0 / math.sqrt(h))
    b = torch.randn(v, generator=g, dtype=F64)
    b = torch.round(b * 2) / 4 if tied_bias else b * 0.5
    return Head(hidden.to(dtype).to(device), weight.to(dtype).to(device), b.to(dtype).to(device) if bias else None,
                spec)


def leaves(head: Head, grad=False):
    """The head's tensors as float64 CPU leaves (the oracle's inputs: the very values the backend sees)."""
    def leaf(t):
        return None if t is None else t.detach().cpu().to(F64).requires_grad_(grad)
    return leaf(head.hidden), leaf(head.weight), leaf(head.bias)


def oracle_logits(head: Head, hidden=None, weight=None, bias=None) -> torch.Tensor:
    """float64 z = cap_c(s·(h Wᵀ + b))/τ of the reference, on the head's values (or the given leaves)."""
    if hidden is None:
        hidden, weight, bias = leaves(head)
    spec = head.spec
    return ref._logits(hidden, weight, bias, spec.temperature, F64, spec.logit_scale, spec.softcap)


def random_like_rows(n, device, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=F64) * scale).to(dtype).to(device)


# ----------------------------------------------------------------------------- row statistics


def check_topk(stats, z, k, compute_dtype):
    """The ids are k distinct ids in [0, V) by descending logit, their logits the k largest (a near-tie may
    swap ids under rounding; exact ties are checked by the tie tests) and the returned logits theirs."""
    ids, logits = stats.topk_indices.cpu(), stats.topk_logits
    assert ids.shape == (z.shape[0], k) and ids.dtype == torch.int64
    assert logits.shape == (z.shape[0], k) and logits.dtype == compute_dtype
    assert ((ids >= 0) & (ids < z.shape[1])).all(), "top-k id outside [0, V)"
    assert (ids.sort(dim=1).values.diff(dim=1) != 0).all(), "duplicate ids in a row"
    at_ids = z.gather(1, ids)
    assert_close(at_ids, z.sort(dim=1, descending=True).values[:, :k], compute_dtype, "logits at the top-k ids")
    assert_close(logits, at_ids, compute_dtype, "top-k logits")


ROW_STATS = [(F32, 0, LogitSpec(TAU)), (F32, 1, LogitSpec(TAU)), (F32, 7, CAPPED), (BF16, 7, LogitSpec(TAU)),
             (F64, 7, LogitSpec(TAU)), (F64, 0, CAPPED), (F32, V, LogitSpec(TAU))]  # k = V: K ≥ V, every id


@conformance
@pytest.mark.parametrize("dtype,k,spec", ROW_STATS,
                         ids=[f"{str(d)[6:]}-k{k}-{'cap' if s.softcap else 'plain'}" for d, k, s in ROW_STATS])
def test_row_stats(backend, device, dtype, k, spec):
    head = make_head(dtype, device, spec=spec)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1)).to(device)
    stats = get_backend(backend).row_stats(head, targets=targets, k=k)
    z = oracle_logits(head)
    compute = head.dtype
    for name, got, want in (("lse", stats.lse, torch.logsumexp(z, 1)),
                            ("mean logit", stats.mean_logit, (torch.softmax(z, 1) * z).sum(1)),
                            ("target logit", stats.target_logit, z.gather(1, targets.cpu()[:, None])[:, 0])):
        assert got.dtype == compute and got.shape == (N,) and got.device.type == device, name
        assert_close(got, want, compute, name)
    if k:
        check_topk(stats, z, k, compute)
    else:
        assert stats.topk_indices is None and stats.topk_logits is None


@conformance
def test_row_stats_lse_in_float64_from_float32_logits(backend, device):
    head = make_head(F32, device)
    stats = get_backend(backend).row_stats(head, k=3, with_mean_logit=False, lse_dtype=F64)
    assert stats.lse.dtype == F64 and stats.mean_logit is None and stats.target_logit is None
    assert_close(stats.lse, torch.logsumexp(oracle_logits(head), 1), F32, "lse")  # fp32 logits, float64 sum
    check_topk(stats, oracle_logits(head), 3, F32)


@conformance
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_top_k_exact_ties_go_to_the_smaller_id(backend, device, dtype):
    """Rows 0–2 have all-zero hidden rows: their logits are the bias, on a grid of quarters (exact ties)."""
    head = make_head(dtype, device, n=6, zero_rows=(0, 1, 2), tied_bias=True)
    k = 40
    stats = get_backend(backend).row_stats(head, k=k)
    z = oracle_logits(head)
    tied = slice(0, 3)
    stable_order = torch.sort(z[tied], dim=1, descending=True, stable=True).indices
    assert torch.equal(stats.topk_indices[tied].cpu(), stable_order[:, :k])
    check_topk(stats, z, k, head.dtype)


@conformance
def test_top_k_of_a_wholly_tied_row_is_the_first_ids(backend, device):
    head = make_head(F32, device, n=2, bias=False, zero_rows=(0, 1))
    stats = get_backend(backend).row_stats(head, k=5)
    assert torch.equal(stats.topk_indices.cpu(), torch.arange(5).repeat(2, 1))
    assert_close(stats.lse, torch.full((2,), math.log(V), dtype=F64), F32, "lse of a uniform row")


@conformance
def test_top_k_beyond_the_register_limit(backend, device):
    k, v = REGISTER_TOP_K + 1, 301
    head = make_head(F32, device, n=3, v=v)
    stats = get_backend(backend).row_stats(head, k=k, with_mean_logit=False)
    z = oracle_logits(head)
    assert_close(stats.lse, torch.logsumexp(z, 1), F32, "lse")
    check_topk(stats, z, k, F32)


@conformance
@pytest.mark.parametrize("n", [0, 1])
def test_row_stats_no_rows_and_one_row(backend, device, n):
    head = make_head(F32, device, n=n)
    targets = torch.zeros(n, dtype=torch.int64, device=device)
    stats = get_backend(backend).row_stats(head, targets=targets, k=4)
    z = oracle_logits(head)
    assert stats.lse.shape == (n,) and stats.topk_indices.shape == (n, 4)
    assert_close(stats.lse, torch.logsumexp(z, 1), F32, "lse")
    assert_close(stats.target_logit, z[:, 0], F32, "target logit")
    if n:
        check_topk(stats, z, 4, F32)


# ----------------------------------------------------------------------------- gathers at ids


@conformance
@pytest.mark.parametrize("dtype,spec", [(F32, LogitSpec(TAU)), (BF16, CAPPED), (F64, CAPPED)],
                         ids=["float32", "bfloat16-cap", "float64-cap"])
def test_gather_logits(backend, device, dtype, spec):
    head = make_head(dtype, device, spec=spec)
    ids = torch.randint(0, V, (N, 6), generator=torch.Generator().manual_seed(2))
    ids[:, 5] = ids[:, 0]  # a repeated id
    ids[0, 1] = V - 1
    got = get_backend(backend).gather_logits(head, ids.to(device), head.dtype)
    assert got.dtype == head.dtype and got.shape == ids.shape and got.device.type == device
    assert_close(got, oracle_logits(head).gather(1, ids), head.dtype, "gathered logits")


# ----------------------------------------------------------------------------- head backward


def make_coefs(head: Head, kind: str, seed=3):
    """Dense coefficients (row, logit with a shift, target one-hot) and/or sparse triples: two for row 0,
    repeated ids in a row and ids outside [0, V) (a vocabulary slice's neighbours: they match nothing)."""
    n, device, dtype = head.rows, head.hidden.device, head.dtype
    g = torch.Generator().manual_seed(seed)

    def rows(scale=1.0):
        return (torch.randn(n, generator=g, dtype=F64) * scale).to(dtype).to(device)

    zero = torch.zeros(n, dtype=dtype, device=device)
    dense = kind in ("dense", "both")
    coefs = dict(row_coef=rows() if dense else zero)
    if dense:
        targets = torch.randint(0, V, (n,), generator=g).to(device)
        coefs.update(logit_coef=rows(0.5), logit_shift=rows(2.0), targets=targets, target_coef=rows())
    if kind in ("sparse", "both"):
        row_index = torch.tensor([0, 0, 2, n - 1, 1])[: max(n, 1) + 1].clamp_max(n - 1)
        m = row_index.shape[0]
        ids = torch.randint(0, V, (m, 4), generator=g)
        ids[:, 3] = ids[:, 0]  # a repeated id: the terms add up
        ids[0, 1], ids[-1, 2] = -3, V + 5  # outside the vocabulary: no column matches
        coef = torch.randn(m, 4, generator=g, dtype=F64).to(dtype)
        coefs["sparse"] = (SparseTerms(row_index.to(device), ids.to(device), coef.to(device)),)
    return HeadGradCoefs(**coefs)


def oracle_dz(z: torch.Tensor, coefs: HeadGradCoefs) -> torch.Tensor:
    """∂L/∂z of the HeadGradCoefs formula, dense, in float64."""
    def f64(t):
        return None if t is None else t.detach().cpu().to(F64)

    p = torch.softmax(z, 1)
    inner = f64(coefs.row_coef)[:, None].expand_as(z).clone()
    if coefs.logit_coef is not None:
        shift = f64(coefs.logit_shift) if coefs.logit_shift is not None else torch.zeros(z.shape[0], dtype=F64)
        inner = inner + f64(coefs.logit_coef)[:, None] * (z - shift[:, None])
    dz = p * inner
    if coefs.targets is not None:
        dz[torch.arange(z.shape[0]), coefs.targets.cpu()] += f64(coefs.target_coef)
    for terms in coefs.sparse:
        rows, ids, coef = terms.row_index.cpu(), terms.ids.cpu(), f64(terms.coef)
        inside = (ids >= 0) & (ids < z.shape[1])
        dz.index_put_((rows[:, None].expand_as(ids)[inside], ids[inside]), coef[inside], accumulate=True)
    return dz


def oracle_head_grads(head: Head, dz: torch.Tensor):
    """Gradients of Σ dz·z w.r.t. the head's hidden, weight and bias, by float64 autograd."""
    hidden, weight, bias = leaves(head, grad=True)
    z = oracle_logits(head, hidden, weight, bias)
    wrt = [t for t in (hidden, weight, bias) if t is not None]
    return torch.autograd.grad((dz * z).sum(), wrt)


def check_grads(grads, want, head: Head, needs: GradNeeds, what):
    """Each gradient asked for (None otherwise) in the compute dtype or its input's own dtype (the
    interface allows a gradient rounded once from a wider accumulator), on the head's device, within the
    tolerance of its computation: bf16 operands make a bf16 computation."""
    computed_in = BF16 if head.hidden.dtype == BF16 else head.dtype
    inputs = (head.hidden, head.weight, head.bias)
    for name, got, expected, needed, given in zip(("hidden", "weight", "bias"), grads, (*want, None),
                                                  (needs.hidden, needs.weight, needs.bias and head.bias is not None),
                                                  inputs):
        if not needed:
            assert got is None, f"{what}: grad {name} formed though not needed"
            continue
        assert got.dtype in (head.dtype, given.dtype), f"{what}: grad {name} {got.dtype}"
        assert got.device == head.hidden.device, f"{what}: grad {name} on {got.device}"
        assert float(expected.abs().max()) > 0, f"{what}: the oracle's grad {name} is zero"
        assert_rel_close(got, expected, computed_in, f"{what}: grad {name}")


HEAD_BACKWARD = [(F32, "dense", LogitSpec(TAU), True), (F32, "sparse", LogitSpec(TAU), False),
                 (F32, "both", CAPPED, True), (BF16, "both", LogitSpec(TAU), True), (F64, "both", CAPPED, True)]


@conformance
@pytest.mark.parametrize("dtype,kind,spec,bias", HEAD_BACKWARD,
                         ids=[f"{str(d)[6:]}-{k}-{'cap' if s.softcap else 'plain'}-{'bias' if b else 'nobias'}"
                              for d, k, s, b in HEAD_BACKWARD])
def test_head_backward(backend, device, dtype, kind, spec, bias):
    head = make_head(dtype, device, spec=spec, bias=bias)
    z = oracle_logits(head)
    coefs = make_coefs(head, kind)
    lse = torch.logsumexp(z, 1).to(head.dtype).to(device)
    grads = get_backend(backend).head_backward(head, lse, coefs, ALL_GRADS)
    want = oracle_head_grads(head, oracle_dz(z, coefs))
    check_grads(grads, want, head, ALL_GRADS, f"{kind} coefficients")


@conformance
@pytest.mark.parametrize("needs", [GradNeeds(hidden=True, weight=False, bias=False),
                                   GradNeeds(hidden=False, weight=True, bias=True)], ids=["hidden", "weight-bias"])
def test_head_backward_forms_only_what_is_needed(backend, device, needs):
    head = make_head(F32, device, n=1)
    z = oracle_logits(head)
    coefs = make_coefs(head, "both")
    lse = torch.logsumexp(z, 1).to(F32).to(device)
    grads = get_backend(backend).head_backward(head, lse, coefs, needs)
    check_grads(grads, oracle_head_grads(head, oracle_dz(z, coefs)), head, needs, "one row")


# ----------------------------------------------------------------------------- full-vocabulary JSD


JSD = [(F32, 0.0, True), (F32, 0.5, True), (F32, 1.0, True), (F32, 0.3, False), (BF16, 0.5, True),
       (F64, 0.3, True)]  # 0.3: β and 1 − β differ


@conformance
@pytest.mark.parametrize("dtype,beta,bias", JSD,
                         ids=[f"{str(d)[6:]}-beta{b}-{'bias' if c else 'nobias'}" for d, b, c in JSD])
def test_jsd_forward_and_backward(backend, device, dtype, beta, bias):
    student = make_head(dtype, device, seed=0, bias=bias)
    teacher = make_head(dtype, device, h=TEACHER_H, seed=1, spec=CAPPED, bias=bias)
    be = get_backend(backend)
    stats = be.jsd_forward(student, teacher, beta)
    hidden, weight, bias = leaves(student, grad=True)
    logp = torch.log_softmax(oracle_logits(student, hidden, weight, bias), 1)
    teacher_z = oracle_logits(teacher)
    want = ref._generalized_jsd(logp, torch.log_softmax(teacher_z, 1), beta)
    compute = student.dtype
    assert stats.value.dtype == compute and stats.value.device.type == device
    assert_close(stats.value, want, compute, "JSD")
    assert_close(stats.lse, torch.logsumexp(oracle_logits(student), 1), compute, "student lse")
    assert_close(stats.teacher_lse, torch.logsumexp(teacher_z, 1), compute, "teacher lse")

    grad = random_like_rows(N, device, compute, seed=4)
    grads = be.jsd_backward(student, teacher, beta, stats, grad, ALL_GRADS)
    wrt = [t for t in (hidden, weight, bias) if t is not None]
    wanted = torch.autograd.grad((want * grad.cpu().to(F64)).sum(), wrt)
    check_grads(grads, wanted, student, ALL_GRADS, f"JSD β={beta}")


@conformance
def test_jsd_of_identical_heads_is_zero(backend, device):
    head = make_head(F32, device, n=3)
    stats = get_backend(backend).jsd_forward(head, head, 0.5)
    assert_close(stats.value, torch.zeros(3, dtype=F64), F32, "JSD(P, P)")
