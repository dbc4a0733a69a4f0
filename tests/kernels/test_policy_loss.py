"""linear_policy_loss (the whole PTD-PO loss in one sweep), PolicyLoss and linear_logprobs_at.

Every value and gradient is compared with ``ptd_kernels.reference`` — the per-row terms of
``linear_ptd_terms`` (or ``linear_logprobs``) with the loss applied by autograd — in float64, float32 and
bfloat16 (tolerances of the computation's dtype), with and without a teacher, for the named losses and
for a callable. The one-sweep path (torch; cuBLAS under the interpreter, in blocks of a few rows so that a
block straddles the rows with and without a teacher) and the per-row path (Triton, or a block too thin
to pay) are also compared with each other.
"""

from __future__ import annotations

import pytest
import torch
from _fused_cases import (
    BF16,
    BOTH,
    F32,
    F64,
    TAU,
    VALUE_TOL,
    Case,
    assert_grads,
    assert_values,
    check,
    grad_tol,
    ptd_case,
)

import ptd_kernels as ptd
from ptd_kernels import PolicyLoss
from ptd_kernels import reference as ref
from ptd_kernels.policy_loss import clipped_objective, k3, normalization_weights

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5


def policy(case, *, kl_coef=0.1, ptd_coef=0.5, entropy_coef=0.0, old=True, weights=True, seed=7, kl_ratio=True,
           device="cpu", **extra):
    """A PolicyLoss on ``case``'s rows: old log-probs near the current ones (ratios ≈ 0.6 … 1.6, so that
    both clipping branches are active), reference log-probs near them too, some rows without the k3 term."""
    g = torch.Generator().manual_seed(seed)
    n = case.n
    live_targets = torch.where(case.targets >= 0, case.targets, 0)
    logp = ref.linear_logprobs(case.hidden, case.weight, live_targets, bias=case.bias, temperature=TAU)
    return PolicyLoss(
        advantages=torch.randn(n, generator=g, dtype=F64).to(device),
        weights=(torch.rand(n, generator=g, dtype=F64) + 0.1).to(device) if weights else None,
        old_logprobs=(logp + 0.25 * torch.randn(n, generator=g, dtype=F64)).to(device) if old else None,
        ref_logprobs=(logp + 0.2 * torch.randn(n, generator=g, dtype=F64)).to(device),
        kl_coef=kl_coef, kl_mask=(torch.arange(n) % 3 != 1).to(device), ptd_coef=ptd_coef, entropy_coef=entropy_coef,
        kl_ratio=kl_ratio, **extra)


def policy_fn(row_loss, *, teacher=True, k=K, beta=0.5, support="union", tail=True, **extra):
    def fn(m, x, be):
        pair = (x.teacher_hidden, x.teacher_weight, k) if teacher else ()
        with_teacher = dict(beta=beta, support=support, tail=tail, teacher_bias=x.teacher_bias,
                            jsd_mask=x.jsd_mask) if teacher else {}
        return m.linear_policy_loss(x.hidden, x.weight, x.targets, *pair, row_loss=row_loss, bias=x.bias,
                                    temperature=TAU, mask=x.mask, backend=be, **with_teacher, **extra)
    return fn


# ----------------------------------------------------------------------------- PolicyLoss itself


def _rows(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=g, dtype=F64) * 4
    return (logp, torch.rand(n, generator=g, dtype=F64) * 3, torch.rand(n, generator=g, dtype=F64) * 0.2,
            logp + 0.4 * torch.randn(n, generator=g, dtype=F64), logp + 0.3 * torch.randn(n, generator=g, dtype=F64),
            torch.randn(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64))


@pytest.mark.parametrize("old", [True, False])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.03])
@pytest.mark.parametrize("kl_ratio", [False, True])
def test_closed_form_derivatives_are_autograds(old, entropy_coef, kl_ratio):
    """row_gradients (the one sweep's closed form) = autograd of row_losses (the one formula), both clipping
    branches, dropped k3 rows and the ratio-weighted k3 included."""
    logp, entropy, jsd, old_logp, ref_logp, adv, weights = _rows()
    loss = PolicyLoss(adv, weights, old_logp if old else None, 0.2, 0.3, ref_logp, 0.05,
                      torch.arange(40) % 4 != 0, 0.7, torch.tensor(13.0, dtype=F64), entropy_coef, weights * 2,
                      kl_ratio)
    ratio = torch.exp(logp - old_logp)
    if old:
        assert bool((ratio < 0.8).any()) and bool((ratio > 1.3).any())  # both clips are active somewhere
    inputs = [t.clone().requires_grad_() for t in (logp, entropy, jsd)]
    values = loss.row_losses(*inputs)
    want = torch.autograd.grad(values.sum(), inputs, allow_unused=True)
    got_values, *got = loss.row_gradients(logp, entropy, jsd)
    torch.testing.assert_close(got_values, values.detach(), rtol=1e-14, atol=1e-14)
    for g, w, name in zip(got, want, ("logp", "entropy", "jsd")):
        w = torch.zeros_like(logp) if w is None else w
        g = torch.zeros_like(logp) if g is None else g
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-14, msg=name)


def test_formulas_by_hand():
    logp, old, adv = torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-1.5, -0.5, -1.0]), torch.tensor([1.0, -2.0, 0.5])
    loss, clipped = clipped_objective(logp, old, adv, 0.2, 0.3)
    # ratios e^{0.5} = 1.65 (clipped to 1.3: the clipped branch is the smaller), e^{-0.5} = 0.61 (A < 0: the
    # clipped 0.8 gives the smaller −0.8·A... of the two negated products), 1 (no clipping)
    torch.testing.assert_close(loss, torch.tensor([-1.3, 2.0 * 0.8, -0.5]))
    assert clipped.tolist() == [True, True, False]
    d = torch.tensor([0.3, -0.2])
    torch.testing.assert_close(k3(torch.zeros(2), d), torch.exp(d) - d - 1)


def test_normalization_weights():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert normalization_weights(mask, "dapo").tolist() == pytest.approx([0.25] * 3 + [0, 0.25, 0, 0, 0])
    assert normalization_weights(mask, "grpo").tolist() == pytest.approx([1 / 6] * 3 + [0, 0.5, 0, 0, 0])
    assert normalization_weights(mask, "dr_grpo", max_length=5).tolist() == pytest.approx(
        [0.1] * 3 + [0, 0.1, 0, 0, 0])
    assert normalization_weights(mask, "dapo", token_count=torch.tensor(8.0)).tolist() == pytest.approx(
        [0.125] * 3 + [0, 0.125, 0, 0, 0])
    with pytest.raises(ValueError, match="normalization must be one of"):
        normalization_weights(mask, "sapo")


# ----------------------------------------------------------------------------- against the reference

GRID = [(dtype, teacher, entropy_coef) for dtype in (F64, F32, BF16) for teacher in (True, False)
        for entropy_coef in (0.0, 0.02)]


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize(("dtype", "teacher", "entropy_coef"), GRID,
                         ids=[f"{d}-{'teacher' if t else 'policy'}-{e}" for d, t, e in GRID])
def test_matches_the_reference(backend, device, dtype, teacher, entropy_coef):
    """Masked rows (ignore_index, mask False), a row without a divergence, τ ≠ 1, biases, V = 130."""
    case = ptd_case(dtype=dtype)
    check(policy_fn(policy(case, device=device, entropy_coef=entropy_coef), teacher=teacher), case, backend)


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize(("beta", "support", "tail"), [(0.0, "union", True), (1.0, "teacher", True),
                                                       (0.5, "student", False), (0.5, "teacher", False)])
def test_every_divergence_form(backend, device, beta, support, tail):
    case = ptd_case(dtype=F32)
    check(policy_fn(policy(case, device=device), beta=beta, support=support, tail=tail), case, backend)


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("k", [1, 130, 200], ids=["K=1", "K=V", "K>V"])
def test_k_one_and_k_at_least_v(backend, device, k):
    """K ≥ V is the full-vocabulary JSD (composed from the per-row path)."""
    case = ptd_case(dtype=F32)
    check(policy_fn(policy(case, device=device), k=k), case, backend)


@pytest.mark.parametrize("backend", BOTH)
def test_softcap_logit_scale_and_defaults(backend, device):
    """A soft-capped, scaled student and teacher; default weights (the token mean) and ptd_tokens (the live
    rows with a divergence); no old log-probs (ρ = 1)."""
    case = ptd_case(dtype=F32)
    loss = policy(case, device=device, old=False, weights=False, entropy_coef=0.01)
    check(policy_fn(loss, softcap=2.5, logit_scale=1.3, teacher_softcap=4.0, teacher_logit_scale=0.8), case, backend)


@pytest.mark.parametrize("backend", BOTH)
def test_one_row_and_all_rows_masked(backend, device):
    one = Case(n=1, dtype=F32)
    check(policy_fn(policy(one)), one, backend)
    case = ptd_case(dtype=F32)
    case.mask = torch.zeros(case.n, dtype=torch.bool)
    x = case.inputs(F32, device)
    loss = policy_fn(policy(case, device=device))(ptd, x, backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((x.hidden.grad == 0).all()) and bool((x.weight.grad == 0).all())


@pytest.mark.parametrize("backend", BOTH)
def test_a_callable_equals_the_named_loss_and_the_reference(backend, device):
    case = ptd_case(dtype=F32)
    named = policy(case, device=device, entropy_coef=0.02)
    tokens = float((case.mask & case.jsd_mask & (case.targets != -100)).sum())
    resolved = named.resolved(named.weights, torch.tensor(tokens, dtype=F64, device=device))
    check(policy_fn(lambda logp, entropy, jsd: resolved(logp, entropy, jsd)), case, backend)
    advantages = named.advantages

    def own(logp, entropy, jsd):  # a row-separable loss of its own: REINFORCE with a JSD pull and a bonus
        return -advantages.to(logp.dtype) * logp + 0.3 * jsd - 0.01 * entropy * logp.exp()

    check(policy_fn(own), case, backend)


def test_the_terms_it_returns():
    case = ptd_case(dtype=F32)
    x = case.inputs(F32)
    loss, terms = policy_fn(policy(case), return_terms=True)(ptd, x, "torch")
    want = ref.linear_ptd_terms(*(getattr(case, n) for n in ("hidden", "weight", "targets", "teacher_hidden",
                                                            "teacher_weight")), K, bias=case.bias,
                                teacher_bias=case.teacher_bias, temperature=TAU, mask=case.mask, jsd_mask=case.jsd_mask)
    for got, expected, name in zip((*terms, terms.teacher_mass), (*want, want.teacher_mass),
                                   ("logp", "entropy", "jsd", "overlap", "teacher_mass")):
        assert not got.requires_grad, name
        assert_values(got, expected, VALUE_TOL[F32], name)


# ----------------------------------------------------------------------------- one sweep against the per-row path


def _both_paths(monkeypatch, fn, case, dtype):
    """(loss, gradients) on the torch backend's one-sweep path, then on its per-row path."""
    from ptd_kernels.backends.torch import TorchBackend

    results = []
    for pays in (True, False):
        monkeypatch.setattr(TorchBackend, "fused_loss_pays", lambda self, student, teacher=None, pays=pays: pays)
        x = case.inputs(dtype)
        loss = fn(ptd, x, "torch")
        results.append((loss, torch.autograd.grad(loss, [x.hidden, x.weight, x.bias])))
    monkeypatch.undo()
    return results


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("teacher", [True, False])
def test_one_sweep_equals_the_per_row_path(monkeypatch, dtype, teacher):
    case = ptd_case(dtype=dtype)
    (loss, grads), (want, want_grads) = _both_paths(monkeypatch, policy_fn(policy(case, entropy_coef=0.02),
                                                                           teacher=teacher), case, dtype)
    assert_values(loss, want, VALUE_TOL[dtype], "loss")
    for g, w, name in zip(grads, want_grads, ("hidden", "weight", "bias")):
        assert_grads(g, w, grad_tol(dtype, "torch"), name)


def test_one_sweep_runs_where_it_pays(monkeypatch):
    """The torch backend takes its one-sweep loss (fused_loss) at these shapes, and the per-row sweep
    (row_stats + head_backward) when the blocks would be too thin."""
    from ptd_kernels.backends import torch as torch_backend

    calls = []
    for name in ("fused_loss", "head_backward"):
        real = getattr(torch_backend.TorchBackend, name)
        monkeypatch.setattr(torch_backend.TorchBackend, name,
                            lambda self, *a, real=real, name=name, **kw: calls.append(name) or real(self, *a, **kw))
    case = ptd_case(dtype=F32)
    x = case.inputs(F32)
    policy_fn(policy(case))(ptd, x, "torch").backward()
    assert calls == ["fused_loss"]
    monkeypatch.setattr(ptd.config, "LOSS_BLOCK_BYTES", 1 << 10)
    calls.clear()
    policy_fn(policy(case))(ptd, case.inputs(F32), "torch").backward()
    assert calls == ["head_backward"]


def test_sync_free_path_gives_the_default_result(monkeypatch):
    case = ptd_case(dtype=F32)
    fn = policy_fn(policy(case, entropy_coef=0.02))
    out = []
    for sync_free in (False, True):
        monkeypatch.setattr(ptd.config, "SYNC_FREE", sync_free)
        x = case.inputs(F32)
        loss = fn(ptd, x, "torch")
        out.append((loss, torch.autograd.grad(loss, [x.hidden, x.weight])))
    (loss, grads), (free, free_grads) = out
    torch.testing.assert_close(free, loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(free_grads, grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_second_backward_raises_and_no_grad_skips_the_gradients():
    case = ptd_case(dtype=F32)
    x = case.inputs(F32)
    loss = policy_fn(policy(case))(ptd, x, "torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    with torch.no_grad():
        again = policy_fn(policy(case))(ptd, case.inputs(F32), "torch")
    assert_values(again, loss.detach(), 1e-6, "value under no_grad")


# ----------------------------------------------------------------------------- a callable that is not row-separable


def test_a_loss_mixing_rows_is_refused():
    """On a CPU the loss of a block's rows may not have a gradient w.r.t. other rows' terms (a mean)."""
    case = ptd_case(dtype=F32)
    with pytest.raises(ValueError, match="not row-separable"):
        policy_fn(lambda logp, entropy, jsd: logp - logp.mean())(ptd, case.inputs(F32), "torch")


def test_the_debug_probe_finds_mixing_inside_a_block(monkeypatch):
    """Every row live and in one block: no other block's rows to look at, only the Jacobian probe of
    ``config.CHECK_ROW_LOSS`` sees that row n's loss reads row n−1's terms."""
    case = Case(dtype=F32)

    def mixing(logp, entropy, jsd):
        return logp * logp.roll(1)

    policy_fn(mixing)(ptd, case.inputs(F32), "torch")  # not caught: one block, rows mixed inside it
    monkeypatch.setattr(ptd.config, "CHECK_ROW_LOSS", True)
    with pytest.raises(ValueError, match="not row-separable"):
        policy_fn(mixing)(ptd, case.inputs(F32), "torch")


# ----------------------------------------------------------------------------- mistakes


def test_mistakes_are_named():
    case = ptd_case(dtype=F32)
    x = case.inputs(F32)
    h, w, t = x.hidden, x.weight, x.targets
    good = policy(case)
    cases = [
        (dict(row_loss="grpo"), TypeError, "row_loss must be a ptd_kernels.PolicyLoss or a callable"),
        (dict(row_loss=PolicyLoss(torch.zeros(3))), ValueError, r"PolicyLoss.advantages must have shape \(6,\)"),
        (dict(row_loss=PolicyLoss(torch.zeros(6), kl_coef=0.1)), ValueError, "kl_coef=0.1 needs ref_logprobs"),
        (dict(row_loss=PolicyLoss(torch.zeros(6), kl_mask=torch.ones(6))), TypeError, "kl_mask must be a bool"),
        (dict(row_loss=PolicyLoss(torch.zeros(6), epsilon_low=-0.1)), ValueError, "epsilon_low must be a finite"),
        (dict(row_loss=good, jsd_mask=torch.ones(6, dtype=torch.bool)), ValueError, "jsd_mask is given but"),
        (dict(row_loss=good, teacher_bias=x.teacher_bias), ValueError, "teacher_bias is given but"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            ptd.linear_policy_loss(h, w, t, backend="torch", **kwargs)
    with pytest.raises(ValueError, match="k is None"):
        ptd.linear_policy_loss(h, w, t, x.teacher_hidden, x.teacher_weight, row_loss=good)
    with pytest.raises(ValueError, match="teacher_weight is None"):
        ptd.linear_policy_loss(h, w, t, x.teacher_hidden, row_loss=good)
    with pytest.raises(ValueError, match="must return a float tensor"):
        ptd.linear_policy_loss(h, w, t, row_loss=lambda logp, entropy, jsd: logp.sum())


# ----------------------------------------------------------------------------- linear_logprobs_at


def logprobs_at_fn(ids, with_entropy=True, **extra):
    return lambda m, x, be: m.linear_logprobs_at(x.hidden, x.weight, ids.to(x.hidden.device), bias=x.bias,
                                                 temperature=TAU, mask=x.mask, with_entropy=with_entropy, backend=be,
                                                 **extra)


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("dtype", [F64, F32, BF16])
def test_logprobs_at_matches_the_reference(backend, device, dtype):
    """A repeated id in a row, a masked row, ids at both ends of the vocabulary."""
    case = ptd_case(dtype=dtype)
    ids = torch.randint(0, case.v, (case.n, 4), generator=torch.Generator().manual_seed(3))
    ids[:, 1] = ids[:, 0]
    ids[0, 2], ids[0, 3] = 0, case.v - 1
    check(logprobs_at_fn(ids), case, backend)
    check(logprobs_at_fn(ids[:, :1], with_entropy=False, softcap=2.0), case, backend)


def test_logprobs_at_forms_one_weight_gradient(monkeypatch):
    """One backward sweep (head_backward) whatever the number of ids: a single V×H gradient."""
    from ptd_kernels.backends import torch as torch_backend

    calls = []
    real = torch_backend.TorchBackend.head_backward
    monkeypatch.setattr(torch_backend.TorchBackend, "head_backward",
                        lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    case = ptd_case(dtype=F32)
    x = case.inputs(F32)
    ids = torch.randint(0, case.v, (case.n, 9), generator=torch.Generator().manual_seed(1))
    logp, entropy = logprobs_at_fn(ids)(ptd, x, "torch")
    (logp.sum() + entropy.sum()).backward()
    assert calls == [1]


def test_logprobs_at_mistakes():
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        ptd.linear_logprobs_at(h, w, torch.tensor([[1], [10], [2]]))
    with pytest.raises(ValueError, match=r"ids must be an \[N=3, M\] tensor"):
        ptd.linear_logprobs_at(h, w, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        ptd.linear_logprobs_at(h, w, torch.zeros(3, 2))
    # an id out of range in a masked row is not read
    out = ptd.linear_logprobs_at(h, w, torch.tensor([[1], [10], [2]]), mask=torch.tensor([True, False, True]))
    assert out.shape == (3, 1) and float(out[1, 0]) == 0.0


# ----------------------------------------------------------------------------- cuBLAS (interpreter)


@pytest.fixture
def cublas_blocks(monkeypatch, device):
    """The cuBLAS one-sweep loss on, in blocks of 2 rows (a block straddles the rows with a teacher); on the
    ``device`` fixture's device (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    from ptd_kernels.backends.cublas import fused_loss

    monkeypatch.setattr(fused_loss, "FUSED_MIN_ROWS", 1)
    monkeypatch.setattr(ptd.config, "CUDA_BLOCK_BYTES", 2 * 130 * 4 + 1024)


@pytest.mark.backend("cublas")
@pytest.mark.parametrize(("dtype", "teacher", "support"), [(F64, True, "union"), (F32, True, "teacher"),
                                                          (F32, False, "union"), (BF16, True, "student")])
def test_cublas_one_sweep_matches_the_reference(cublas_blocks, device, dtype, teacher, support):
    case = ptd_case(dtype=dtype)
    check(policy_fn(policy(case, device=device, entropy_coef=0.02), teacher=teacher, support=support, softcap=3.0),
          case, "cublas")


@pytest.mark.backend("cublas")
def test_cublas_logprobs_at(cublas_blocks, device):
    case = ptd_case(dtype=F32)
    ids = torch.randint(0, case.v, (case.n, 3), generator=torch.Generator().manual_seed(5))
    check(logprobs_at_fn(ids), case, "cublas")


@pytest.mark.parametrize("entropy_coef,softcap,support", [(0.0, None, "union"), (0.03, 5.0, "union"),
                                                          (0.03, None, "teacher"), (0.0, 5.0, "student")])
def test_one_sweep_in_many_small_blocks_and_sub_blocks_equals_the_per_row_path(monkeypatch, entropy_coef, softcap,
                                                                               support):
    """Budgets of a few rows: several blocks of each kind, and blocks of several cache sub-blocks (a block's
    per-row state is then written and read by slices; the default budgets' single-sub-block blocks, which hand
    their tensors over, are the other tests' case), with
    and without the ratio (old log-probs), the entropy bonus and a soft-cap. float64: the two paths agree to
    rounding."""
    from ptd_kernels import config

    n, hidden_size, vocab = 37, 16, 53
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, hidden_size, generator=g, dtype=F64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=F64) * 0.3
    teacher_hidden = torch.randn(n, hidden_size, generator=g, dtype=F64)
    teacher_weight = torch.randn(vocab, hidden_size, generator=g, dtype=F64) * 0.3
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::5] = -100
    jsd_mask = torch.rand(n, generator=g) < 0.6
    row_loss = PolicyLoss(torch.randn(n, generator=g, dtype=F64),
                          old_logprobs=-torch.rand(n, generator=g, dtype=F64) * 3 if entropy_coef else None,
                          ref_logprobs=-torch.rand(n, generator=g, dtype=F64) * 3, kl_coef=0.1, kl_mask=~jsd_mask,
                          ptd_coef=0.7, entropy_coef=entropy_coef)
    monkeypatch.setattr(config, "LOSS_BLOCK_BYTES", 3 * 2 * vocab * 8)  # 3 rows of both sides, 6 of one
    monkeypatch.setattr(config, "SUB_BLOCK_BYTES", vocab * 4)  # sub-blocks of 2 rows (Top-K), 1 row (one side)
    out = []
    for min_rows in (1, 10**9):  # the one sweep, then the per-row path
        monkeypatch.setattr(config, "FUSED_LOSS_MIN_ROWS", min_rows)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, terms = ptd.linear_policy_loss(h, w, targets, teacher_hidden, teacher_weight, K, row_loss=row_loss,
                                             jsd_mask=jsd_mask, softcap=softcap, support=support, return_terms=True,
                                             backend="torch")
        out.append((loss, *torch.autograd.grad(loss, [h, w]), terms.logp, terms.entropy, terms.jsd, terms.overlap,
                    terms.teacher_mass))
    for one_sweep, per_row in zip(*out):
        torch.testing.assert_close(one_sweep, per_row, rtol=1e-12, atol=1e-12)
