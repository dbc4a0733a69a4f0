"""Logit scale and soft-cap (docs/method.md §2: z = c·tanh(s·(W h + b)/c)/τ) on every fused function and
backend, against the reference (values and gradients, float32/bfloat16/float64), with a teacher of
another family (its own scale and cap, or none); the module wrappers; the Hugging Face config reader."""

from __future__ import annotations

import itertools

import pytest
import torch
from _checks import assert_close, tolerance
from _fused_cases import BF16, BOTH, F32, F64, TAU, Case, K, V, check, grid, masked_case, ptd_case

import ptd_kernels as ptd
from ptd_kernels.backends.base import Head, LogitSpec
from ptd_kernels.backends.torch._blocks import to_logits_
from ptd_kernels.rowmath import transform_logits

pytestmark = pytest.mark.usefixtures("one_thread")

# (student s, c; teacher s', c'): Gemma-like capped student and plain teacher, Cohere-like scaled
# student and capped teacher, both capped tightly (most logits in tanh's curved part).
TRANSFORMS = {
    "cap": dict(logit_scale=1.0, softcap=3.0, teacher_logit_scale=1.0, teacher_softcap=None),
    "scale": dict(logit_scale=0.0625 * 16, softcap=None, teacher_logit_scale=2.5, teacher_softcap=4.0),
    "both": dict(logit_scale=1.7, softcap=1.5, teacher_logit_scale=0.5, teacher_softcap=2.0),
}
STUDENT_ONLY = {name: {k: v for k, v in t.items() if not k.startswith("teacher")} for name, t in TRANSFORMS.items()}


def fns(kw):
    one = {k: v for k, v in kw.items() if not k.startswith("teacher")}
    common = dict(temperature=TAU, **kw)
    return {
        "logprobs": lambda m, x, be: m.linear_logprobs(x.hidden, x.weight, x.targets, bias=x.bias, temperature=TAU,
                                                       with_entropy=True, backend=be, **one),
        "topk_jsd": lambda m, x, be: m.linear_topk_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, K,
                                                       bias=x.bias, teacher_bias=x.teacher_bias, mask=x.mask,
                                                       backend=be, **common),
        "jsd": lambda m, x, be: m.linear_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, beta=0.3,
                                             bias=x.bias, teacher_bias=x.teacher_bias, mask=x.mask, backend=be,
                                             **common),
        "ptd_terms": lambda m, x, be: m.linear_ptd_terms(x.hidden, x.weight, x.targets, x.teacher_hidden,
                                                         x.teacher_weight, K, bias=x.bias, teacher_bias=x.teacher_bias,
                                                         mask=x.mask, jsd_mask=x.jsd_mask, backend=be, **common),
        "ptd_terms_full": lambda m, x, be: m.linear_ptd_terms(x.hidden, x.weight, x.targets, x.teacher_hidden,
                                                              x.teacher_weight, V, bias=x.bias,
                                                              teacher_bias=x.teacher_bias, backend=be, **common),
        "sparse_jsd": lambda m, x, be: m.linear_sparse_jsd(
            x.hidden, x.weight, torch.arange(4).repeat(x.hidden.shape[0], 1),
            torch.full((x.hidden.shape[0], 4), -3.0, dtype=F64 if x.dtype == F64 else F32), bias=x.bias,
            temperature=TAU, mask=x.mask, backend=be, **one),
        "jsd_loss": lambda m, x, be: m.linear_jsd_loss(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight,
                                                       bias=x.bias, teacher_bias=x.teacher_bias, mask=x.mask,
                                                       backend=be, **common),
        "topk_jsd_loss": lambda m, x, be: m.linear_topk_jsd_loss(x.hidden, x.weight, x.teacher_hidden,
                                                                 x.teacher_weight, K, support="teacher", tail=False,
                                                                 bias=x.bias, teacher_bias=x.teacher_bias,
                                                                 mask=x.mask, backend=be, **common),
    }


NAMES = list(fns({}))


@grid(("name", "transform", "dtype"),
      list(itertools.product(NAMES, TRANSFORMS, (F32, F64))) + [(n, "both", BF16) for n in NAMES],
      [(n, "both", F32) for n in NAMES] + [("ptd_terms", "cap", BF16), ("jsd", "scale", F64),
                                           ("logprobs", "cap", F64)])
def test_transformed_logits_match_the_reference(backend, device, name, transform, dtype):
    case = ptd_case(dtype=dtype) if name == "ptd_terms" else masked_case(dtype=dtype)
    check(fns(TRANSFORMS[transform])[name], case, backend)


@pytest.mark.parametrize("backend", BOTH)
def test_linear_topk_with_a_cap(backend, device):
    case = Case()
    x = case.inputs(F32, device)
    kw = STUDENT_ONLY["both"]
    ours = ptd.linear_topk(x.hidden, x.weight, 7, bias=x.bias, temperature=TAU, targets=x.targets, backend=backend,
                           **kw)
    y = case.inputs(F64, device)
    want = ptd.reference.linear_topk(y.hidden, y.weight, 7, bias=y.bias, temperature=TAU, targets=y.targets, **kw)
    assert torch.equal(ours.indices, want.indices)
    torch.testing.assert_close(ours.logprobs, want.logprobs.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.target_logprobs, want.target_logprobs.float(), rtol=1e-5, atol=1e-5)


def test_a_cap_changes_the_distribution_and_defaults_change_nothing():
    """Not a no-op: a cap and a scale change the values; the defaults give the plain function bit for bit."""
    x = Case().inputs(F32)
    plain = ptd.linear_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, backend="torch")
    defaults = ptd.linear_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, logit_scale=1.0, softcap=None,
                              teacher_logit_scale=1, teacher_softcap=None, backend="torch")
    assert torch.equal(plain, defaults)
    for kw in TRANSFORMS.values():
        other = ptd.linear_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, backend="torch", **kw)
        assert float((other - plain).abs().max()) > 1e-3


@pytest.mark.parametrize("backend", BOTH)
def test_capped_logits_saturate_without_nan(backend, device):
    """|s·a| ≫ c: tanh saturates, values stay finite and the gradient of saturated logits vanishes."""
    case = Case()
    case.hidden *= 1e3
    x = case.inputs(F32, device)
    logp, entropy = ptd.linear_logprobs(x.hidden, x.weight, x.targets, softcap=5.0, with_entropy=True,
                                        backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(logp).all() and torch.isfinite(x.hidden.grad).all()
    y = case.inputs(F64, device)
    want = ptd.reference.linear_logprobs(y.hidden, y.weight, y.targets, softcap=5.0)
    torch.testing.assert_close(logp.double(), want, **tolerance(F32))


@pytest.mark.parametrize("bad,kw", [
    ("logit_scale", dict(logit_scale=0.0)), ("logit_scale", dict(logit_scale=float("inf"))),
    ("softcap", dict(softcap=-1.0)), ("softcap", dict(softcap=0)),
    ("teacher_softcap", dict(teacher_softcap=float("nan"))), ("teacher_logit_scale", dict(teacher_logit_scale=-2)),
])
def test_bad_transforms_name_the_argument(bad, kw):
    x = Case().inputs(F32)
    with pytest.raises(ValueError, match=bad):
        ptd.linear_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, backend="torch", **kw)
    with pytest.raises(TypeError, match="softcap"):
        ptd.linear_logprobs(x.hidden, x.weight, x.targets, softcap="30")


def test_modules_take_the_transforms():
    case = Case()
    x, y = case.inputs(F64), case.inputs(F64)
    kw = TRANSFORMS["both"]
    loss = ptd.LinearTopKJSDLoss(k=K, temperature=TAU, backend="torch", **kw)
    assert "softcap=1.5" in repr(loss) and "teacher_softcap=2.0" in repr(loss)
    torch.testing.assert_close(
        loss(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight),
        ptd.reference.linear_topk_jsd_loss(y.hidden, y.weight, y.teacher_hidden, y.teacher_weight, K, temperature=TAU,
                                           **kw))
    logp = ptd.LinearLogprobs(temperature=TAU, softcap=2.0, logit_scale=3.0)(x.hidden, x.weight, x.targets)
    torch.testing.assert_close(logp, ptd.reference.linear_logprobs(y.hidden, y.weight, y.targets, temperature=TAU,
                                                                   softcap=2.0, logit_scale=3.0))
    with pytest.raises(ValueError, match="softcap"):
        ptd.LinearJSDLoss(softcap=-3.0)


@pytest.mark.parametrize("backend", BOTH)
def test_saturated_float64_caps_keep_the_exact_top_k(backend, device):
    """A tight cap with a large scale saturates many logits within a float32 ulp of c: in float64 they are
    still distinct, and the top-K (and with it the support) must be the float64 one."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(7, 16, generator=g, dtype=F64), torch.randn(200, 16, generator=g, dtype=F64)
    th, tw = torch.randn(7, 24, generator=g, dtype=F64), torch.randn(200, 24, generator=g, dtype=F64)
    h, w, th, tw = (t.to(device) for t in (h, w, th, tw))
    kw = dict(softcap=2.0, logit_scale=2.0)
    ours = ptd.linear_topk(h, w, 5, backend=backend, **kw)
    assert torch.equal(ours.indices, ptd.reference.linear_topk(h, w, 5, **kw).indices)
    value = ptd.linear_topk_jsd(h, w, th, tw, 5, backend=backend, **kw)
    torch.testing.assert_close(value, ptd.reference.linear_topk_jsd(h, w, th, tw, 5, **kw), rtol=1e-10, atol=1e-12)


def test_scalars_that_require_grad_are_refused():
    x = Case().inputs(F32)
    for name in ("logit_scale", "softcap", "temperature"):
        with pytest.raises(TypeError, match=name):
            ptd.linear_logprobs(x.hidden, x.weight, x.targets, **{name: torch.tensor(0.5, requires_grad=True)})
    torch.testing.assert_close(ptd.linear_logprobs(x.hidden, x.weight, x.targets, softcap=torch.tensor(3.0)),
                               ptd.linear_logprobs(x.hidden, x.weight, x.targets, softcap=3.0))


def test_module_configuration_is_fixed_once_built():
    loss = ptd.LinearTopKJSDLoss(k=4)
    with pytest.raises(AttributeError, match="fixed"):
        loss.beta = 5.0
    loss.train(False)  # module state other than the configuration is untouched


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("name", ["plain", *STUDENT_ONLY])
def test_one_definition_of_the_transform(name, dtype):
    """``rowmath.transform_logits`` is z = c·tanh(s·a/c)/τ, out of place, with ∂z/∂a = (1 − tanh²(s·a/c))·s/τ
    (both against float64 by hand); the PyTorch backend's in-place ``to_logits_`` gives the same z and the
    same cap derivative."""
    kw = STUDENT_ONLY.get(name, {})
    s, c = kw.get("logit_scale", 1.0), kw.get("softcap")
    a = (torch.randn(5, 37, generator=torch.Generator().manual_seed(0), dtype=F64) * 4).to(dtype)
    exact = a.to(F64)
    cap_derivative = 1 - torch.tanh(s * exact / c) ** 2 if c is not None else torch.ones_like(exact)
    want = (c * torch.tanh(s * exact / c) if c is not None else s * exact) / TAU

    leaf = a.clone().requires_grad_()
    z = transform_logits(leaf, temperature=TAU, **kw)
    assert z.dtype == dtype and torch.equal(leaf.detach(), a)  # out of place
    assert_close(z, want, dtype, "z")
    (grad,) = torch.autograd.grad(z.sum(), leaf)
    assert_close(grad, cap_derivative * s / TAU, dtype, "dz/da")

    in_place = a.clone()
    derivative = to_logits_(in_place, Head(None, None, None, LogitSpec(TAU, s, c)), want_derivative=True)
    assert_close(in_place, want, dtype, "to_logits_")
    if c is not None:
        assert_close(derivative, cap_derivative, dtype, "to_logits_'s 1 − tanh²")
    assert transform_logits(a) is a  # the identity transform forms nothing
