"""The CUDA correctness tier: every public function of ptd_kernels, in bf16 and fp32, on every registered
backend that runs on the device, against ``ptd_kernels.reference`` on the same device — values and
gradients, awkward shapes included.

    python bench/cuda_tier.py --out tier.jsonl                 # on a GPU: 6 worker processes, ≤ 90 s
    python bench/cuda_tier.py --device cpu --workers 0         # the same code on a CPU, under Triton's
                                                               # interpreter, tiny shapes
    python bench/cuda_tier.py --list                           # the case ids, in priority order

What each case checks: the function runs on inputs rounded to the case's dtype; the reference runs on
the very same values in float64. Outputs must match within a tolerance set by the dtype of the
computation (fp32 arithmetic for fp32 and bf16 operands alike: the logits accumulate in fp32; bf16
operands only add the bf16 rounding of ∂L/∂z that the Triton and cuBLAS backwards make before their
dots), elementwise |ours − ref| ≤ tol·(1 + |ref|); gradients of Σ cotangent·outputs (a fixed random
cotangent, so no per-row error can cancel) w.r.t. hidden, weight and bias must match within tol·max|ref|.
Top-k ids are compared by the reference log-probabilities at them, so a near tie that fp32 and float64
order differently is no failure while a wrong id is. fp32 runs with TF32 off (torch's default).

Every finished case is one JSON line appended to ``--out`` and flushed at once (a ``start`` line
before it), so a crash or a hang loses only the case in flight. With ``--workers`` > 0 the cases run in
worker processes, one per (backend, dtype) group so that no two compile the same Triton kernels; the
parent watches the file, ends a worker whose case outlasts ``--case-timeout-s`` or whose CUDA context
broke (recording that case), restarts it on the rest of its group, and stops everything at
``--budget-s`` (cases not started are recorded "not run"). Exit status: 0 when every case that ran
passed, 1 otherwise.

tests/test_cuda_tier.py runs the same cases as ``cuda``-marked tests on a GPU, and a sample of them on
the CPU (the interpreter) in the default run.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from types import SimpleNamespace


def _setup_interpreter(device: str) -> None:
    """On a CPU the Triton kernels run under the interpreter; it must be on before Triton is imported."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from journal import Journal, broken_context, read_records  # noqa: E402

F64 = torch.float64
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TAU = 0.7
K = 5

# Shapes (N, H, teacher H, V): "main" has a vocabulary that is no multiple of any tile, a teacher wider
# than the student and H no power of two; "wide" spans many vocabulary tiles and blocks; "one_row" is N=1.
# On CUDA no size of "main" and "wide" is a multiple of 16 (Triton specializes integer arguments on that),
# so the wide cases reuse the main cases' compiled kernels and the tier's minutes go to checking.
SHAPES = {
    "cuda": {"main": (37, 72, 88, 1000), "wide": (67, 264, 328, 33001), "one_row": (1, 72, 88, 1000)},
    "cpu": {"main": (6, 20, 28, 130), "wide": (4, 16, 24, 515), "one_row": (1, 20, 28, 130)},
}

# Tolerances by the computation's dtype (see the module docstring). bf16 gradients: the Triton and
# cuBLAS backwards round ∂L/∂z to bf16 before their dots, as their tensor cores need.
VALUE_TOL = {"fp32": 5e-5, "bf16": 2e-4}
GRAD_TOL = {"fp32": 1e-4, "bf16": 1e-2}
BF16_DOT_GRAD_TOL = 5e-2
ROUNDED_DZ_BACKENDS = ("triton", "cublas")


def grad_tolerance(dtype: str, backend: str) -> float:
    return BF16_DOT_GRAD_TOL if dtype == "bf16" and backend in ROUNDED_DZ_BACKENDS else GRAD_TOL[dtype]


# ----------------------------------------------------------------------------- problems


def problem(shape, dtype: torch.dtype, device: str, seed: int = 0, bias: bool = True) -> SimpleNamespace:
    """Student and teacher inputs in ``dtype`` on ``device``; ``problem(..., F64)`` gives the very same
    values (rounded to the case's dtype first) for the reference. The teacher's logits correlate with
    the student's, so the two top-K sets overlap in part and the union has duplicates."""
    n, h, th, v = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=F64)

    hidden = randn(n, h)
    weight = randn(v, h) * (2.0 / math.sqrt(h))  # logits of std ≈ 2 (≈ 2.9 after τ = 0.7)
    shared = min(h, th)
    teacher_hidden = torch.cat([hidden[:, :shared] + 0.6 * randn(n, shared), randn(n, th - shared)], 1)
    teacher_weight = torch.cat([weight[:, :shared], randn(v, th - shared) * (2.0 / math.sqrt(max(th - shared, 1)))],
                               1) * math.sqrt(h / th)
    student_bias, teacher_bias = randn(v) * 0.5, randn(v) * 0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    return SimpleNamespace(hidden=hidden, weight=weight, bias=student_bias if bias else None,
                           teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                           teacher_bias=teacher_bias if bias else None, targets=targets, n=n, v=v)


def leaves(raw: SimpleNamespace, case_dtype: torch.dtype, dtype: torch.dtype, device: str) -> SimpleNamespace:
    """Fresh leaves on ``device`` in ``dtype`` holding ``raw``'s values rounded to ``case_dtype`` (the
    student's requiring grad), and the logits both sides give (for the logits-level functions)."""

    def leaf(t, grad):
        if t is None:
            return None
        return t.to(case_dtype).to(dtype).to(device).requires_grad_(grad)

    def rounded(t):
        return None if t is None else t.to(case_dtype).to(F64)

    logits = rounded(raw.hidden) @ rounded(raw.weight).T + (0 if raw.bias is None else rounded(raw.bias))
    teacher_logits = (rounded(raw.teacher_hidden) @ rounded(raw.teacher_weight).T
                      + (0 if raw.teacher_bias is None else rounded(raw.teacher_bias)))
    return SimpleNamespace(
        hidden=leaf(raw.hidden, True), weight=leaf(raw.weight, True), bias=leaf(raw.bias, True),
        teacher_hidden=leaf(raw.teacher_hidden, False), teacher_weight=leaf(raw.teacher_weight, False),
        teacher_bias=leaf(raw.teacher_bias, False), logits=leaf(logits, True),
        teacher_logits=leaf(teacher_logits, False), targets=raw.targets.to(device), dtype=dtype, device=device,
        n=raw.n, v=raw.v)


# ----------------------------------------------------------------------------- the functions


def _mask(x, kind):
    """Row masks of a case: "some" masks row 1 (when there is one), "all" masks every row."""
    if kind is None:
        return None
    mask = torch.ones(x.n, dtype=torch.bool, device=x.device)
    if kind == "all":
        mask[:] = False
    elif x.n > 1:
        mask[1] = False
    return mask


def _targets(x, kind):
    targets = x.targets.clone()
    if kind == "all":
        targets[:] = -100
    elif kind == "some" and x.n > 2:
        targets[2] = -100
    return targets


def _transforms(p, teacher=True):
    out = {}
    if p.get("transform"):
        out.update(logit_scale=0.5, softcap=3.0)
        if teacher:
            out.update(teacher_logit_scale=1.5, teacher_softcap=5.0)
    return out


def _weights(x):
    """Row weights of the loss entry points: signed and unequal, so a per-row error cannot cancel."""
    w = torch.linspace(-1.0, 2.0, x.n, dtype=F64 if x.dtype == F64 else torch.float32)
    return w.to(x.device)


def _teacher_sparse(x, k):
    """The teacher's top-k ids and log-probs (float32), from the float64 logits: the same given input for
    ours and the reference."""
    logq = torch.log_softmax(x.teacher_logits.detach().to(F64) / TAU, -1)
    values, ids = torch.sort(logq, dim=-1, descending=True, stable=True)
    return ids[:, :k].contiguous(), values[:, :k].to(torch.float32).contiguous()


def _full_logprobs(x, teacher=False):
    """Float64 log-softmax of one side's logits / τ (to judge top-k ids by their log-probabilities)."""
    z = (x.teacher_logits if teacher else x.logits).detach().to(F64) / TAU
    return torch.log_softmax(z, -1)


def call_function(name: str, m, x, backend: str, p: dict):
    """Run public function ``name`` of module ``m`` (ptd_kernels or its reference) on ``x``; returns the
    outputs to compare, as a list."""
    k = p.get("k", K)
    kw = dict(backend=backend)
    if name == "linear_logprobs":
        out = m.linear_logprobs(x.hidden, x.weight, _targets(x, p.get("rows")), bias=x.bias,
                                temperature=p.get("tau", TAU), with_entropy=True, **_transforms(p, False), **kw)
        return list(out)
    if name == "linear_topk":
        out = m.linear_topk(x.teacher_hidden, x.teacher_weight, k, bias=x.teacher_bias, temperature=TAU,
                            targets=_targets(x, p.get("rows")), **kw)
        full = _full_logprobs(x, teacher=True)
        # ids judged by the reference log-probs at them: a near tie may swap order, a wrong id may not
        return [full.gather(1, out.indices).float(), out.logprobs, out.lse, out.target_logprobs]
    common = dict(bias=x.bias, teacher_bias=x.teacher_bias, temperature=p.get("tau", TAU), **_transforms(p), **kw)
    teacher = (x.hidden, x.weight, x.teacher_hidden, x.teacher_weight)
    if name == "linear_topk_jsd":
        return [m.linear_topk_jsd(*teacher, k, beta=p.get("beta", 0.5), support=p.get("support", "union"),
                                  tail=p.get("tail", True), mask=_mask(x, p.get("rows")), **common)]
    if name == "linear_jsd":
        return [m.linear_jsd(*teacher, beta=p.get("beta", 0.5), mask=_mask(x, p.get("rows")), **common)]
    if name == "linear_ptd_terms":
        terms = m.linear_ptd_terms(x.hidden, x.weight, _targets(x, p.get("rows")), x.teacher_hidden, x.teacher_weight,
                                   k, beta=p.get("beta", 0.5), mask=_mask(x, p.get("rows")),
                                   jsd_mask=_mask(x, "some") if x.n > 1 else None, **common)
        return [terms.logp, terms.entropy, terms.jsd, terms.overlap, terms.teacher_mass]
    if name == "linear_sparse_jsd":
        ids, logprobs = _teacher_sparse(x, k)
        return [m.linear_sparse_jsd(x.hidden, x.weight, ids, logprobs.to(torch.float64 if x.dtype == F64 else
                                                                          torch.float32),
                                    beta=p.get("beta", 0.5), tail=p.get("tail", True), bias=x.bias, temperature=TAU,
                                    mask=_mask(x, p.get("rows")), **kw)]
    if name == "linear_jsd_loss":
        return [m.linear_jsd_loss(*teacher, beta=p.get("beta", 0.5), mask=_mask(x, p.get("rows")),
                                  weights=None if p.get("rows") == "all" else _weights(x), **common)]
    if name == "linear_topk_jsd_loss":
        return [m.linear_topk_jsd_loss(*teacher, k, beta=p.get("beta", 0.5), mask=_mask(x, p.get("rows")), **common)]
    if name == "logprobs":
        return list(m.logprobs(x.logits, _targets(x, p.get("rows")), temperature=TAU, with_entropy=True, **kw))
    if name == "jsd":
        return [m.jsd(x.logits, x.teacher_logits, beta=p.get("beta", 0.5), temperature=TAU,
                      mask=_mask(x, p.get("rows")), **kw)]
    if name == "topk_jsd":
        return [m.topk_jsd(x.logits, x.teacher_logits, k, beta=p.get("beta", 0.5), temperature=TAU,
                           mask=_mask(x, p.get("rows")), **kw)]
    if name == "topk_overlap":
        student_ids = torch.sort(x.logits.detach().to(F64), dim=-1, descending=True, stable=True).indices[:, :k]
        teacher_ids = _teacher_sparse(x, k)[0]
        return [m.topk_overlap(student_ids.contiguous(), teacher_ids, **kw)]
    if name == "linear_logprobs_at":
        gen = torch.Generator().manual_seed(7)
        ids = torch.randint(0, x.v, (x.n, 4), generator=gen)
        ids[:, 3] = ids[:, 0]  # a row may repeat an id
        return list(m.linear_logprobs_at(x.hidden, x.weight, ids.to(x.device), bias=x.bias, temperature=TAU,
                                         mask=_mask(x, p.get("rows")), with_entropy=True, **_transforms(p, False),
                                         **kw))
    if name == "linear_policy_loss":
        return [policy_loss(m, x, backend, p)]
    raise ValueError(f"no such function in the tier: {name}")


def policy_loss(m, x, backend, p):
    """``linear_policy_loss`` with PTD-PO's named token losses (``ptd_kernels.PolicyLoss``: clipped ratio,
    k3 KL, λ·D_K, an entropy bonus), or with ``params["form"] == "callable"`` the same kind of loss as a
    callable of (logp, entropy, jsd); with the teacher (the PTD-PO loss) or without (the policy loss alone)."""
    import ptd_kernels

    old = (torch.linspace(-3.0, -1.0, x.n, dtype=F64)).to(x.device)
    advantages = torch.linspace(-1.0, 1.0, x.n, dtype=F64).to(x.device)
    targets = _targets(x, p.get("rows"))
    teacher = dict(teacher_hidden=x.teacher_hidden, teacher_weight=x.teacher_weight, k=K,
                   teacher_bias=x.teacher_bias) if p.get("teacher", True) else {}
    if p.get("form") != "callable" and hasattr(ptd_kernels, "PolicyLoss"):
        f32 = dict(dtype=torch.float32, device=x.device)
        named = ptd_kernels.PolicyLoss(advantages.to(**f32), old_logprobs=old.to(**f32),
                                       ref_logprobs=(old + 0.1 * advantages).to(**f32), kl_coef=0.01,
                                       ptd_coef=0.05 if teacher else 0.0, entropy_coef=0.001)
        return m.linear_policy_loss(x.hidden, x.weight, targets, row_loss=named, bias=x.bias, temperature=TAU,
                                    jsd_mask=_mask(x, "some") if teacher and x.n > 1 else None, backend=backend,
                                    **teacher)

    def row_loss(logp, entropy, jsd):
        ratio = torch.exp(logp - old.to(logp.dtype))
        adv = advantages.to(logp.dtype)
        clipped = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.3) * adv)
        return clipped - 0.01 * entropy + 0.05 * jsd

    return m.linear_policy_loss(x.hidden, x.weight, targets, row_loss=row_loss, bias=x.bias, temperature=TAU,
                                backend=backend, **teacher)


# Which inputs each function differentiates (None: no gradient).
WRT = {"linear_topk": None, "topk_overlap": None, "logprobs": ("logits",), "jsd": ("logits",),
       "topk_jsd": ("logits",)}
LINEAR_WRT = ("hidden", "weight", "bias")

FUSED = ("linear_logprobs", "linear_topk", "linear_topk_jsd", "linear_sparse_jsd", "linear_jsd", "linear_ptd_terms",
         "linear_jsd_loss", "linear_topk_jsd_loss")
LOGITS_LEVEL = ("logprobs", "jsd", "topk_jsd", "topk_overlap")


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    function: str
    backend: str
    dtype: str
    shape: str = "main"
    params: tuple = ()  # (name, value) pairs
    variant: str = ""
    priority: int = 0

    @property
    def id(self) -> str:
        return "-".join(x for x in (self.function, self.backend, self.dtype, self.shape, self.variant) if x)

    @property
    def group(self) -> str:
        return f"{self.backend}-{self.dtype}"

    def param_dict(self) -> dict:
        return dict(self.params)


# Edge variants: (function, variant name, params, shape, dtypes).
EDGES = [
    ("linear_logprobs", "N=1", {}, "one_row", ("fp32", "bf16")),
    ("linear_topk_jsd", "N=1", {}, "one_row", ("fp32",)),
    ("linear_ptd_terms", "N=1", {}, "one_row", ("fp32",)),
    ("linear_topk_jsd", "K>=V", {"k": "V+3"}, "main", ("fp32", "bf16")),
    ("linear_topk", "K=1", {"k": 1}, "main", ("fp32",)),
    ("linear_logprobs", "all-rows-masked", {"rows": "all"}, "main", ("fp32",)),
    ("linear_topk_jsd", "all-rows-masked", {"rows": "all"}, "main", ("fp32",)),
    ("linear_jsd", "all-rows-masked", {"rows": "all"}, "main", ("fp32",)),
    ("linear_topk_jsd_loss", "all-rows-masked", {"rows": "all"}, "main", ("fp32",)),
    ("linear_ptd_terms", "some-rows-masked", {"rows": "some"}, "main", ("fp32", "bf16")),
    ("linear_jsd", "beta=0", {"beta": 0.0}, "main", ("fp32",)),
    ("linear_jsd", "beta=1", {"beta": 1.0}, "main", ("fp32",)),
    ("linear_topk_jsd", "beta=0", {"beta": 0.0}, "main", ("fp32",)),
    ("linear_topk_jsd", "beta=1", {"beta": 1.0}, "main", ("fp32",)),
    ("linear_topk_jsd", "support=teacher", {"support": "teacher"}, "main", ("fp32",)),
    ("linear_topk_jsd", "support=student-no-tail", {"support": "student", "tail": False}, "main", ("fp32",)),
    ("linear_sparse_jsd", "no-tail", {"tail": False}, "main", ("fp32",)),
    ("linear_logprobs", "tau=1", {"tau": 1.0}, "main", ("fp32",)),
    ("linear_logprobs", "softcap+scale", {"transform": True}, "main", ("fp32", "bf16")),
    ("linear_topk_jsd", "softcap+scale", {"transform": True}, "main", ("fp32", "bf16")),
    ("linear_jsd_loss", "softcap+scale", {"transform": True}, "main", ("fp32",)),
    ("linear_logprobs", "no-bias", {"bias": False}, "main", ("fp32",)),
    ("linear_topk_jsd", "no-bias", {"bias": False}, "main", ("bf16",)),
    ("logprobs", "some-rows-masked", {"rows": "some"}, "main", ("fp32",)),
    ("topk_jsd", "beta=1", {"beta": 1.0}, "main", ("fp32",)),
]
WIDE = ("linear_logprobs", "linear_topk", "linear_topk_jsd", "linear_jsd_loss", "linear_ptd_terms",
        "linear_topk_jsd_loss")


def functions() -> tuple[str, ...]:
    """The public functions the tier checks: every fused and logits-level one, and the one-sweep policy
    loss where this checkout has it."""
    import ptd_kernels

    extra = ("linear_logprobs_at",) if hasattr(ptd_kernels, "linear_logprobs_at") else ()
    return FUSED + LOGITS_LEVEL + extra + (("linear_policy_loss",) if policy_loss_takes_row_loss() else ())


def policy_loss_takes_row_loss() -> bool:
    """Whether this checkout has ``linear_policy_loss`` taking a per-row loss as ``row_loss=`` (the form
    the tier calls)."""
    import inspect

    import ptd_kernels

    function = getattr(ptd_kernels, "linear_policy_loss", None)
    return function is not None and "row_loss" in inspect.signature(function).parameters


def cases(device: str) -> list[Case]:
    """Every case for ``device``, in priority order: (0) each function × dtype × backend at the main
    shape; (1) the wide shape; (2) the edges; (3) the edges of the functions this checkout may lack
    (``linear_policy_loss`` without a teacher and as a callable, ``linear_logprobs_at`` with masked rows)."""
    import ptd_kernels

    backends = ptd_kernels.backends_for(device)
    out = []
    for dtype in DTYPES:
        for function in functions():
            for backend in backends:
                out.append(Case(function, backend, dtype))
    for function in WIDE:
        for backend in backends:
            out.append(Case(function, backend, "bf16", "wide", priority=1))
    for function, variant, params, shape, dtypes in EDGES:
        for dtype in dtypes:
            for backend in backends:
                out.append(Case(function, backend, dtype, shape, tuple(sorted(params.items())), variant, priority=2))
    if "linear_policy_loss" in functions():
        for backend in backends:
            out.append(Case("linear_policy_loss", backend, "fp32", params=(("teacher", False),), variant="no-teacher",
                            priority=3))
            out.append(Case("linear_policy_loss", backend, "fp32", params=(("form", "callable"),), variant="callable",
                            priority=3))
            out.append(Case("linear_policy_loss", backend, "bf16", "wide", priority=3))
    if "linear_logprobs_at" in functions():
        for backend in backends:
            out.append(Case("linear_logprobs_at", backend, "fp32", params=(("rows", "some"),),
                            variant="some-rows-masked", priority=3))
    return sorted(out, key=lambda c: c.priority)


# ----------------------------------------------------------------------------- one case


def _as_list(outs):
    return [o for o in outs if o is not None]


def _value_error(actual, expected):
    """max over elements of |a − e| / (1 + |e|) (0 for an empty tensor); inf when the patterns of
    non-finite values differ."""
    a, e = actual.detach().to(F64), expected.detach().to(F64)
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(e.shape)}")
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), finite):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    return float(((a - e).abs() / (1 + e.abs()))[finite].max())


def _grad_error(actual, expected, floor=1e-6):
    """max |a − e| / max(max |e|, floor)."""
    a, e = actual.detach().to(F64), expected.detach().to(F64)
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - e).abs().max()) / max(float(e.abs().max()), floor) if a.numel() else 0.0


def _cotangents(outs, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=F64).to(o.device) for o in outs]


def _evaluate(function, module, x, backend, params):
    """(outputs, gradients of Σ cotangent·outputs, the names of the inputs differentiated)."""
    outs = _as_list(call_function(function, module, x, backend, params))
    wrt = WRT.get(function, LINEAR_WRT)
    if wrt is None:
        return outs, [], []
    diff = [(o, c) for o, c in zip(outs, _cotangents(outs)) if o.requires_grad]
    if not diff:
        raise AssertionError("no differentiable output")
    names = [name for name in wrt if getattr(x, name) is not None]
    inputs = [getattr(x, name) for name in names]
    loss = sum((o.to(F64) * c).sum() for o, c in diff)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return outs, [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)], names


def run_case(case: Case, device: str) -> dict:
    """Run one case; returns its record (status "ok" or "fail", the worst error over tolerance of values
    and gradients, the seconds it took). Exceptions propagate (the caller records them)."""
    import ptd_kernels
    from ptd_kernels import reference

    start = time.perf_counter()
    params = case.param_dict()
    n, h, th, v = SHAPES[device][case.shape]
    if params.get("k") == "V+3":
        params["k"] = v + 3
    dtype = DTYPES[case.dtype]
    raw = problem((n, h, th, v), dtype, device, bias=params.get("bias", True))
    ours, ours_grads, wrt = _evaluate(case.function, ptd_kernels, leaves(raw, dtype, dtype, device), case.backend,
                                      params)
    want, want_grads, _ = _evaluate(case.function, reference, leaves(raw, dtype, F64, device), "torch", params)
    if device == "cuda":
        torch.cuda.synchronize()
    vtol, gtol = VALUE_TOL[case.dtype], grad_tolerance(case.dtype, case.backend)
    problems, value_worst, grad_worst = [], 0.0, 0.0
    if len(ours) != len(want):
        problems.append(f"{len(ours)} outputs, the reference gives {len(want)}")
    for i, (o, w) in enumerate(zip(ours, want)):
        if o.dtype.is_floating_point:
            expected_dtype = torch.float32
            if o.dtype != expected_dtype:
                problems.append(f"output {i}: dtype {o.dtype}, want {expected_dtype}")
            err = _value_error(o, w)
        else:
            err = 0.0 if torch.equal(o, w.to(o.dtype)) else math.inf
        value_worst = max(value_worst, err / vtol)
        if err > vtol:
            problems.append(f"output {i}: error {err:.2e} > tol {vtol:.0e}")
    for name, g, w in zip(wrt, ours_grads, want_grads):
        if g.dtype != dtype:
            problems.append(f"∂{name}: dtype {g.dtype}, want {dtype}")
        err = _grad_error(g, w)
        grad_worst = max(grad_worst, err / gtol)
        if err > gtol:
            problems.append(f"∂{name}: error {err:.2e} of max |ref| {float(w.abs().max()):.2e} > tol {gtol:.0e}")
    return dict(case=case.id, function=case.function, backend=case.backend, dtype=case.dtype, shape=case.shape,
                variant=case.variant, priority=case.priority, nhv=[n, h, th, v],
                status="ok" if not problems else "fail", value_err_over_tol=round(value_worst, 4),
                grad_err_over_tol=round(grad_worst, 4), value_tol=vtol, grad_tol=gtol,
                seconds=round(time.perf_counter() - start, 3), message="; ".join(problems))


# ----------------------------------------------------------------------------- records


def _fault_text() -> str:
    return os.environ.get("PTD_TIER_FAULT", "").partition(":")[2]


def _rehearse_fault(case_id: str) -> None:
    """PTD_TIER_FAULT="hang:TEXT" or "exit:TEXT": the first case whose id contains TEXT hangs, or kills its
    process — how a dry rehearsal (and the tests) prove that the watchdog records it and goes on. The
    record says so (``rehearsed``), and such a case does not fail the tier."""
    kind, _, text = os.environ.get("PTD_TIER_FAULT", "").partition(":")
    if not text or text not in case_id:
        return
    marker = os.path.join(tempfile.gettempdir(), f"ptd_tier_fault_{os.getppid()}_{text}")
    if os.path.exists(marker):  # once per run: the restarted worker goes on
        return
    open(marker, "w").close()
    if kind == "hang":
        time.sleep(3600)
    elif kind == "exit":
        os._exit(9)


def run_cases(selected: list[Case], device: str, journal: Journal, deadline: float | None = None) -> int:
    """Run cases in this process, recording each; returns the number that did not pass. Stops (exit
    code 3) after a case that broke the CUDA context, so that a fresh process takes the rest."""
    import ptd_kernels.reference  # noqa: F401 - imported before the first case's clock starts

    failed = 0
    for case in selected:
        if deadline is not None and time.time() > deadline:
            journal.write(dict(case=case.id, function=case.function, backend=case.backend, dtype=case.dtype,
                               shape=case.shape, variant=case.variant, priority=case.priority, status="not run",
                               message="tier budget spent"))
            continue
        journal.write(dict(event="start", case=case.id, pid=os.getpid(), t=time.time()))
        _rehearse_fault(case.id)
        try:
            record = run_case(case, device)
        except Exception as exc:  # noqa: BLE001 - every error is a recorded result
            record = dict(case=case.id, function=case.function, backend=case.backend, dtype=case.dtype,
                          shape=case.shape, variant=case.variant, priority=case.priority, status="error",
                          message=f"{type(exc).__name__}: {str(exc)[:400]}",
                          where=traceback.format_exc(limit=-3)[-800:])
            if broken_context(exc):
                journal.write(record)
                sys.exit(3)
        failed += record["status"] != "ok"
        journal.write(record)
    return failed


# ----------------------------------------------------------------------------- workers


@dataclass
class Worker:
    """One (backend, dtype) group of cases and the process running what is left of it."""

    group: str
    todo: list  # case ids not yet finished
    proc: subprocess.Popen | None = None
    log: str = ""
    restarts: int = 0
    done: bool = False


def _spawn(worker: Worker, args, deadline: float) -> None:
    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--out", args.out, "--workers", "0",
           "--deadline", str(deadline), "--only", ",".join(worker.todo)]
    worker.log = os.path.join(tempfile.gettempdir(), f"ptd_tier_{os.getpid()}_{worker.group}.log")
    with open(worker.log, "w") as log:  # a file, not a pipe: a chatty worker can never block on it
        worker.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _tail(path: str, chars: int = 600) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def orchestrate(selected: list[Case], args) -> int:
    """Run ``selected`` in one worker process per (backend, dtype) group, at most ``args.workers`` at a
    time, watching the journal (see the module docstring). Returns the number of cases that did not pass
    or did not finish."""
    deadline = time.time() + args.budget_s
    groups: dict[str, list[str]] = {}
    for case in selected:
        groups.setdefault(case.group, []).append(case.id)
    pending = [Worker(group, ids) for group, ids in groups.items()]
    running: list[Worker] = []
    journal = Journal(args.out)
    by_id = {c.id: c for c in selected}

    def record(case_id, status, message, **more):
        case = by_id[case_id]
        journal.write(dict(case=case.id, function=case.function, backend=case.backend, dtype=case.dtype,
                           shape=case.shape, variant=case.variant, priority=case.priority, status=status,
                           message=message, **more))

    while pending or running:
        while pending and len(running) < max(args.workers, 1):
            worker = pending.pop(0)
            if time.time() >= deadline - 2:
                for cid in worker.todo:
                    record(cid, "not run", "tier budget spent")
                continue
            _spawn(worker, args, deadline)
            running.append(worker)
        time.sleep(0.25)
        for worker in list(running):
            code = worker.proc.poll()
            records = read_records(args.out)  # read after the poll: a worker's last lines are in
            finished = {r["case"] for r in records if "status" in r}
            worker.todo = [cid for cid in worker.todo if cid not in finished]
            starts = {r["case"]: r["t"] for r in records if r.get("event") == "start"}
            flight = [cid for cid in worker.todo if cid in starts]
            now = time.time()
            overdue = bool(flight) and now - starts[flight[0]] > args.case_timeout_s
            if code is None and not overdue and now < deadline + 5:
                continue
            if code is None:
                worker.proc.kill()
                worker.proc.wait()
            if overdue:
                status, reason = "timeout", f"the case ran past {args.case_timeout_s:.0f} s (a hang?)"
            elif code is None:
                status, reason = "timeout", "the tier budget ran out during the case"
            else:
                status, reason = "crashed", f"the worker exited with code {code} during the case"
            for cid in flight:
                rehearsed = _fault_text() and _fault_text() in cid
                record(cid, status, ("a rehearsed fault (PTD_TIER_FAULT): " if rehearsed else "") + reason,
                       output=_tail(worker.log), **({"rehearsed": True} if rehearsed else {}))
                worker.todo.remove(cid)
            running.remove(worker)
            if not worker.todo:
                continue
            if time.time() < deadline - 2 and worker.restarts < 5:
                worker.restarts += 1
                pending.insert(0, worker)
            else:
                for cid in worker.todo:
                    record(cid, "not run", "tier budget spent" if time.time() >= deadline - 2 else
                           "its worker failed too often")
    for marker in glob.glob(os.path.join(tempfile.gettempdir(), f"ptd_tier_fault_{os.getpid()}_*")):
        os.remove(marker)
    records = [r for r in read_records(args.out) if "status" in r and r["case"] in by_id]
    return sum(r["status"] != "ok" and not r.get("rehearsed") for r in records)


def summary(path: str) -> str:
    """One line per status and the failures, from a journal."""
    records = [r for r in read_records(path) if "status" in r]
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = ["tier: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    for r in records:
        if r["status"] not in ("ok", "not run"):
            lines.append(f"  {r['status']}: {r['case']}: {r.get('message', '')[:300]}")
    if any(r.get("rehearsed") for r in records):
        lines.append("  (a rehearsed fault is no failure: its recording is what the rehearsal checks)")
    worst = max((r for r in records if r["status"] == "ok"), default=None,
                key=lambda r: max(r.get("value_err_over_tol", 0), r.get("grad_err_over_tol", 0)))
    if worst:
        lines.append(f"  closest pass: {worst['case']} (error/tol: values {worst['value_err_over_tol']}, "
                     f"gradients {worst['grad_err_over_tol']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, choices=("cuda", "cpu"),
                        help="default: cuda when available, else cpu (under Triton's interpreter)")
    parser.add_argument("--out", default=None, help="the JSON-lines journal (appended to)")
    parser.add_argument("--workers", type=int, default=6,
                        help="worker processes (one per backend × dtype group, at most); 0: run in this process")
    parser.add_argument("--budget-s", type=float, default=90.0, help="wall-clock budget of the tier")
    parser.add_argument("--case-timeout-s", type=float, default=60.0, help="a case running longer is a hang")
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--only", default=None, help="comma-separated case ids to run (default: every case)")
    parser.add_argument("--match", default=None, help="run the cases whose id contains this text")
    parser.add_argument("--max-priority", type=int, default=9, help="run cases of this priority or lower only")
    parser.add_argument("--list", action="store_true", help="print the case ids and exit")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _setup_interpreter(args.device)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 cases compute in fp32 (torch's default)
    selected = [c for c in cases(args.device) if c.priority <= args.max_priority]
    if args.only:
        wanted = set(args.only.split(","))
        selected = [c for c in selected if c.id in wanted]
    if args.match:
        selected = [c for c in selected if args.match in c.id]
    if args.list:
        print("\n".join(c.id for c in selected))
        return 0
    if args.workers > 0 and args.out:
        failed = orchestrate(selected, args)
        print(summary(args.out))
        return int(failed > 0)
    deadline = args.deadline or (time.time() + args.budget_s)
    failed = run_cases(selected, args.device, Journal(args.out), deadline)
    if args.out and args.deadline is None:
        print(summary(args.out))
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
