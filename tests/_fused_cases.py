"""Problems, tolerances and checks shared by the fused-function test modules (test_fused*.py).

See test_fused.py for what the tolerances mean."""

from __future__ import annotations

import importlib
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
from _devices import backend_params, device_for

import ptd_kernels as ptd
from ptd_kernels import PTDTerms, TopK
from ptd_kernels import reference as ref

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
BETAS = (0.0, 0.5, 1.0)
SUPPORTS = ptd.SUPPORTS
TAU = 0.7
N, H, TH, V, K = 6, 20, 28, 130, 5

VALUE_TOL = {F64: 1e-10, F32: 3e-5, BF16: 1e-4}
GRAD_TOL = {F64: 1e-10, F32: 5e-5, BF16: 1e-2}
TRITON_BF16_GRAD_TOL = 5e-2  # the Triton and cuBLAS bf16 backwards round dz to bf16 before their dots (as on a GPU)


def grad_tol(dtype, backend):
    return TRITON_BF16_GRAD_TOL if (dtype == BF16 and backend in ("triton", "cublas")) else GRAD_TOL[dtype]


# ----------------------------------------------------------------------------- backends

TRITON_MODULES = ("ptd_kernels.backends.triton.row_stats", "ptd_kernels.backends.triton.head_backward",
                  "ptd_kernels.backends.triton.jsd")


def _triton_unavailable() -> str | None:
    """Why the Triton kernels cannot run yet (None when all three modules import)."""
    for name in TRITON_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return f"{name} does not exist yet"
            importlib.import_module(name)
        except Exception as exc:  # a module being written may fail to import in any way
            return f"{name} does not import yet ({type(exc).__name__}: {exc})"
    return None


_TRITON_MISSING = _triton_unavailable()
TRITON = pytest.param(
    "triton", id="triton",
    marks=pytest.mark.skipif(_TRITON_MISSING is not None,
                             reason=f"Triton kernels not importable: {_TRITON_MISSING}"))
#: Backends with a public-function suite of their own (with shrunk blocks), left out of BOTH.
OWN_SUITE = {"cublas": "tests/kernels/test_cublas_fused.py"}
#: Every other registered backend that runs in this process (the registry decides: Triton on CUDA tensors, or
#: on CPU ones under the interpreter); a test takes its tensors' device from the ``device`` fixture.
BOTH = [TRITON if param.values[0] == "triton" else param for param in backend_params(exclude=OWN_SUITE)]


_SHORT = {F64: "f64", F32: "f32", BF16: "bf16"}


def _pid(backend, params):
    return "-".join([backend, *(_SHORT.get(p, str(p)) for p in params)])


def grid(names, full, triton_subset=()):
    """Parametrize (backend, *params): the full grid on torch, a representative subset on Triton (when it
    runs in this process)."""
    params = [pytest.param("torch", *p, id=_pid("torch", p)) for p in full]
    if any(param.values[0] == "triton" for param in BOTH):
        params += [pytest.param("triton", *p, id=_pid("triton", p), marks=TRITON.marks) for p in triton_subset]
    return pytest.mark.parametrize(("backend", *names), params)




# ----------------------------------------------------------------------------- problems


class Case:
    """A student/teacher problem stored in float64 after rounding to ``dtype``.

    ``inputs(dtype)`` returns fresh leaves (student ones requiring grad) in ``dtype``; calling it
    with ``float64`` gives the reference the very same values. The teacher's logits correlate
    with the student's (partial top-K overlap, so the union support has duplicates) and the
    teacher's width H' differs from H.
    """

    def __init__(self, n=N, h=H, th=TH, v=V, dtype=F32, bias=True, seed=0, tie_bias=False):
        g = torch.Generator().manual_seed(seed)

        def r(*shape):
            return torch.randn(*shape, generator=g, dtype=F64)

        hidden = r(n, h)
        weight = r(v, h) * (2.0 / math.sqrt(h))  # logits of std ≈ 2 (≈ 2.9 after τ = 0.7)
        extra = max(th - h, 0)
        t_hidden = torch.cat([hidden[:, :th] + 0.6 * r(n, min(h, th)), r(n, extra)], 1)
        t_weight = torch.cat([weight[:, :th], r(v, extra) * (2.0 / math.sqrt(max(extra, 1)))], 1)
        if tie_bias:  # coarse grid: many exactly equal bias values (ties on an all-zero hidden row)
            b, tb = torch.round(r(v) * 2) / 4, torch.round(r(v) * 2) / 4
        else:
            b, tb = r(v) * 0.5, r(v) * 0.5
        self.dtype = dtype
        rnd = lambda t: None if t is None else t.to(dtype).to(F64)  # noqa: E731
        self.hidden, self.weight = rnd(hidden), rnd(weight)
        self.teacher_hidden, self.teacher_weight = rnd(t_hidden), rnd(t_weight)
        self.bias, self.teacher_bias = (rnd(b), rnd(tb)) if bias else (None, None)
        self.targets = torch.randint(0, v, (n,), generator=g)
        self.mask = None
        self.jsd_mask = None
        self.n, self.v = n, v

    def logits(self, teacher=False):
        if teacher:
            z = self.teacher_hidden @ self.teacher_weight.T
            return z if self.teacher_bias is None else z + self.teacher_bias
        z = self.hidden @ self.weight.T
        return z if self.bias is None else z + self.bias

    def rounded(self, t):
        """``t`` rounded to the case's dtype (so every dtype sees the same values), kept in float64."""
        return t.to(self.dtype).to(F64)

    def inputs(self, dtype, device="cpu"):
        """Fresh leaves in ``dtype`` on ``device`` (a test of a backend: its ``device`` fixture)."""
        def leaf(t, grad):  # rounded again: tests may have scaled the stored values after __init__
            return None if t is None else self.rounded(t).to(dtype).to(device).detach().requires_grad_(grad)

        def copy(t):
            return None if t is None else t.to(device, copy=True)

        return SimpleNamespace(
            hidden=leaf(self.hidden, True), weight=leaf(self.weight, True), bias=leaf(self.bias, True),
            teacher_hidden=leaf(self.teacher_hidden, False), teacher_weight=leaf(self.teacher_weight, False),
            teacher_bias=leaf(self.teacher_bias, False),
            logits=leaf(self.rounded(self.logits()), True),
            teacher_logits=leaf(self.rounded(self.logits(True)), False),
            targets=copy(self.targets), mask=copy(self.mask), jsd_mask=copy(self.jsd_mask), dtype=dtype)


def masked_case(**kw):
    """Rows: 1 has target ignore_index, 2 has mask False (targets-free functions ignore row 1)."""
    case = Case(**kw)
    case.targets[1] = -100
    case.mask = torch.ones(case.n, dtype=torch.bool)
    case.mask[2] = False
    return case


LINEAR = ("hidden", "weight", "bias")
LOGITS = ("logits",)


def as_list(out):
    if isinstance(out, PTDTerms):
        return [out.logp, out.entropy, out.jsd, out.overlap, out.teacher_mass]
    if isinstance(out, TopK):
        return [t for t in out if t is not None]
    if isinstance(out, (tuple, list)):
        return list(out)
    return [out]


def cotangents(outs, seed=1234):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=F64).to(o.device) for o in outs]


def evaluate(fn, module, case, dtype, backend, wrt=LINEAR, grad=True, device=None):
    """Run ``fn(module, x, backend)`` on ``device`` (default: the backend's test device; the CPU for the
    reference); return (outputs, grads of Σ cotangent·outputs w.r.t. ``wrt``)."""
    if device is None:
        device = device_for(backend) if module is ptd else "cpu"
    x = case.inputs(dtype, device)
    outs = as_list(fn(module, x, backend))
    if not grad:
        return outs, None, x
    diff = [(o, c) for o, c in zip(outs, cotangents(outs)) if o.requires_grad]
    assert diff, "no differentiable output"
    leaves = [getattr(x, name) for name in wrt if getattr(x, name) is not None]
    loss = sum((o.to(F64) * c).sum() for o, c in diff)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return outs, grads, x


def assert_values(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not actual.dtype.is_floating_point:
        actual, expected = actual.cpu(), expected.cpu()
        assert torch.equal(actual, expected.to(actual.dtype)), f"{what}: {actual} != {expected}"
        return
    a, e = actual.detach().cpu().to(F64), expected.detach().cpu().to(F64)
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite), f"{what}: non-finite pattern differs ({a} vs {e})"
    err = ((a - e).abs() - tol * (1 + e.abs()))[finite]
    assert err.numel() == 0 or float(err.max()) <= 0, (
        f"{what}: max abs error {float((a - e)[finite].abs().max()):.3e} beyond tol {tol:.0e}")


def assert_grads(actual, expected, tol, what, floor=1e-6):
    """max |actual − expected| ≤ tol · max(max |expected|, floor)."""
    assert actual.shape == expected.shape, what
    a, e = actual.detach().cpu().to(F64), expected.detach().cpu().to(F64)
    assert bool(torch.isfinite(a).all()), f"{what}: non-finite gradient"
    scale = float(e.abs().max())
    err = float((a - e).abs().max())
    assert err <= tol * max(scale, floor), f"{what}: max error {err:.3e} vs scale {scale:.3e} (tol {tol:.0e})"


def check(fn, case, backend, dtype=None, wrt=LINEAR, grad=True, vtol=None, gtol=None, out_tol=None):
    """ptd (``backend``, inputs in ``dtype``) against the float64 reference on the same values.

    ``out_tol`` maps an output index to its own value tolerance."""
    dtype = dtype or case.dtype
    vtol, gtol = vtol or VALUE_TOL[dtype], gtol or grad_tol(dtype, backend)
    out_tol = out_tol or {}
    device = device_for(backend)  # the reference runs there too: a loss object may hold tensors on it
    ours, ours_grads, x = evaluate(fn, ptd, case, dtype, backend, wrt, grad, device)
    want, want_grads, _ = evaluate(fn, ref, case, F64, "torch", wrt, grad, device)
    assert len(ours) == len(want)
    out_dtype = F64 if dtype == F64 else F32
    for i, (o, w) in enumerate(zip(ours, want)):
        if o.dtype.is_floating_point:
            assert o.dtype == out_dtype, f"output {i}: dtype {o.dtype}, want {out_dtype}"
        assert_values(o, w, out_tol.get(i, vtol), f"output {i}")
    if grad:
        for name, g, w in zip([n for n in wrt if getattr(x, n) is not None], ours_grads, want_grads):
            assert g.dtype == dtype, f"grad {name}: dtype {g.dtype}, want {dtype}"
            assert_grads(g, w, gtol, f"grad {name}")
            assert float(w.abs().max()) > 0 or name == "bias", f"grad {name}: the reference gradient is zero"
    return ours, want


def topk_jsd_fn(k, beta, support, tail):
    return lambda m, x, be: m.linear_topk_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, k, beta=beta,
                                              support=support, tail=tail, bias=x.bias, teacher_bias=x.teacher_bias,
                                              temperature=TAU, mask=x.mask, backend=be)


def jsd_fn(beta):
    return lambda m, x, be: m.linear_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, beta=beta,
                                         bias=x.bias, teacher_bias=x.teacher_bias, temperature=TAU, mask=x.mask,
                                         backend=be)


def ptd_terms_fn(k, beta, support, tail):
    return lambda m, x, be: m.linear_ptd_terms(x.hidden, x.weight, x.targets, x.teacher_hidden, x.teacher_weight, k,
                                               beta=beta, support=support, tail=tail, bias=x.bias,
                                               teacher_bias=x.teacher_bias, temperature=TAU, mask=x.mask,
                                               jsd_mask=x.jsd_mask, backend=be)


def ptd_case(**kw):
    """Row 1: target ignore_index; row 3: mask False; row 4: jsd_mask False (logp/entropy only)."""
    case = Case(**kw)
    case.targets[1] = -100
    case.mask = torch.ones(case.n, dtype=torch.bool)
    case.mask[3] = False
    case.jsd_mask = torch.ones(case.n, dtype=torch.bool)
    case.jsd_mask[4] = False
    return case


def loss_fn(kind, weights, beta=0.5, support="union", tail=True, k=K):
    def fn(m, x, be):
        n = x.hidden.shape[0]
        w = None if weights is None else weights[:n].to(F64 if x.dtype == F64 else F32).to(x.hidden.device)
        common = dict(beta=beta, bias=x.bias, teacher_bias=x.teacher_bias, temperature=TAU, mask=x.mask, weights=w,
                      backend=be)
        if kind == "jsd":
            return m.linear_jsd_loss(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, **common)
        return m.linear_topk_jsd_loss(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, k, support=support,
                                      tail=tail, **common)
    return fn


ROW_WEIGHTS = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, 0.75])


ALL_FNS = {
    "logprobs": lambda m, x, be: m.linear_logprobs(x.hidden, x.weight, x.targets, bias=x.bias, temperature=TAU,
                                                   with_entropy=True, backend=be),
    "topk_jsd": lambda m, x, be: m.linear_topk_jsd(x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, K,
                                                   bias=x.bias, teacher_bias=x.teacher_bias, temperature=TAU,
                                                   mask=x.mask, backend=be),
    "jsd": jsd_fn(0.5),
    "ptd_terms": ptd_terms_fn(K, 0.5, "union", True),
    "sparse_jsd": lambda m, x, be: m.linear_sparse_jsd(
        x.hidden, x.weight, torch.arange(4, device=x.hidden.device).repeat(x.hidden.shape[0], 1),
        torch.full((x.hidden.shape[0], 4), -3.0, dtype=F64 if x.dtype == F64 else F32, device=x.hidden.device),
        bias=x.bias,
        temperature=TAU, mask=x.mask, backend=be),
    "topk_jsd_loss": loss_fn("topk", None),
    "jsd_loss": loss_fn("jsd", ROW_WEIGHTS),
}
# Triton runs: the kernels each function reaches (row stats + head backward; JSD kernels).
EDGE_TRITON = ("topk_jsd", "jsd", "ptd_terms")


def extreme_case(dtype=F32, bias=True):
    """Row 1: hidden × 1e4 (a huge logit); row 2: all-zero hidden (logits = the bias, with many exact
    ties; all logits tied without bias) on both sides; rows 0 and 3 ordinary."""
    case = Case(n=4, dtype=dtype, bias=bias, tie_bias=True, seed=3)
    case.hidden[1] *= 1e4
    case.hidden[2] = 0.0
    case.teacher_hidden[2] = 0.0
    case.teacher_hidden[3] *= 1e4
    return case


def _error(actual, expected, per_element=True):
    a, e = actual.cpu().to(F64), expected.cpu().to(F64)
    if per_element:
        return float(((a - e).abs() / (1 + e.abs())).max()) if a.numel() else 0.0
    return float((a - e).abs().max()) / max(float(e.abs().max()), 1e-30)
