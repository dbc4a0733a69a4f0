"""The core's contracts that no single-function test sees: one precision rule across the Triton
kernels, one JSD spelling for fused and logits-level functions, one gradient cast, the backend
interface, and module wrappers that check their configuration."""

from __future__ import annotations

import pytest
import torch
from _devices import backend_params

import ptd_kernels as ptd
from ptd_kernels.backends import Backend, registry, select_backend
from ptd_kernels.backends.base import DivergenceSpec, GradNeeds, Head, HeadGradCoefs
from ptd_kernels.backends.torch import TorchBackend
from ptd_kernels.backends.triton import TritonBackend, _launch
from ptd_kernels.backends.triton import head_backward as triton_head_backward
from ptd_kernels.backends.triton import jsd_backward as triton_jsd_backward
from ptd_kernels.backends.triton import jsd_forward as triton_jsd_forward
from ptd_kernels.backends.triton import row_stats as triton_row_stats

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- one precision rule


class _Stop(Exception):
    pass


class _LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: records the constexprs of a launch, runs nothing."""

    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.seen.append((self.name, meta["PRECISION"], meta.get("T_PRECISION", meta["PRECISION"])))
            raise _Stop

        return launch


@pytest.mark.backend("triton")
@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                        (torch.float64, False)])
def test_every_triton_kernel_gets_the_same_dot_precision(monkeypatch, dtype, tf32, device):
    """row_stats, head_backward and both JSD sweeps pass one ``input_precision`` for one operand dtype
    (a forward lse and a backward p = exp(z − lse) must come from the same logits)."""
    seen = []
    for module, name in ((triton_row_stats, "_row_stats_kernel"), (triton_head_backward, "_head_backward_kernel"),
                         (triton_jsd_forward, "_jsd_forward_kernel"), (triton_jsd_backward, "_jsd_backward_kernel")):
        monkeypatch.setattr(module, name, _LaunchRecorder(name, seen))
    n, h, v = 4, 16, 40
    head = Head(torch.randn(n, h).to(device, dtype), torch.randn(v, h).to(device, dtype), None, 0.7)
    lse = torch.zeros(n, dtype=torch.float64, device=device)
    ones = torch.ones(n, device=device)
    stats = ptd.backends.base.JSDStats(lse, lse, lse, lse)
    calls = (lambda: triton_row_stats.row_stats(head, k=3),
             lambda: triton_head_backward.head_backward(head, lse, HeadGradCoefs(ones)),
             lambda: triton_jsd_forward.jsd_forward(head, head, 0.5, lse=lse, teacher_lse=lse),
             lambda: triton_jsd_backward.jsd_backward(head, head, 0.5, stats, ones))
    saved = torch.backends.cuda.matmul.allow_tf32  # a property module: monkeypatch cannot restore it
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for call in calls:
            with pytest.raises(_Stop):
                call()
        assert _launch.dot_precision(dtype) == ("tf32" if (tf32 and dtype == torch.float32) or
                                                dtype == torch.bfloat16 else "ieee")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert [name for name, *_ in seen] == ["_row_stats_kernel", "_head_backward_kernel", "_jsd_forward_kernel",
                                           "_jsd_backward_kernel"]
    want = "tf32" if (tf32 and dtype == torch.float32) or dtype == torch.bfloat16 else "ieee"
    assert {p for _, *ps in seen for p in ps} == {want}, seen


# ----------------------------------------------------------------------------- one JSD spelling


def _exact_logits(n, h, v, seed):
    """Inputs on a 1/16 grid whose products and sums are exact in float32: any GEMM order gives
    the same logits, so two functions on them differ only by their JSD arithmetic."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-8, 9, (n, h), generator=g).float() / 4
    weight = torch.randint(-8, 9, (v, h), generator=g).float() / 4
    return hidden, weight


@pytest.mark.parametrize("beta", [0.0, 1e-4, 0.002, 0.3, 0.5, 0.999, 1.0])
def test_logits_level_jsd_equals_linear_jsd_on_the_same_logits(beta):
    """``jsd(logits)`` and ``linear_jsd`` (torch path) share ``rowmath``'s spelling: on the same
    logits the values are equal bit for bit (a log-add-exp spelling differs in the last bits at
    0 < β < 1), and the gradients agree to the rounding of their GEMMs; peaked rows (|z| ~ 60) included."""
    hidden, weight = _exact_logits(9, 16, 70, 1)
    teacher_hidden, teacher_weight = _exact_logits(9, 16, 70, 2)
    hidden[0] *= 4  # a near-one-hot student row
    teacher_hidden[1] *= 4
    hidden.requires_grad_()
    logits = (hidden @ weight.T).detach().requires_grad_()
    teacher_logits = teacher_hidden @ teacher_weight.T
    assert torch.equal(logits, hidden.detach().double().matmul(weight.double().T).float())
    fused = ptd.linear_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=beta, temperature=0.8,
                           backend="torch")
    given = ptd.jsd(logits, teacher_logits, beta=beta, temperature=0.8)
    assert torch.equal(given, fused), (given - fused).abs().max()
    grad = torch.randn(9)
    (fused * grad).sum().backward()
    (given * grad).sum().backward()
    # d hidden = d logits @ weight, exactly representable weights: compare through the same GEMM
    torch.testing.assert_close(logits.grad @ weight, hidden.grad, rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------- one gradient cast


@pytest.mark.parametrize("backend", backend_params())
def test_bf16_gradients_are_the_fp32_sum_rounded_once(monkeypatch, backend, device):
    """PTD terms with K ≥ V have two gradient parts (log-prob/entropy sweep and full-JSD sweep):
    the backends return d hidden unrounded (float32) and d weight unrounded or rounded once from its
    own wider accumulator (the cuBLAS backend writes it in bf16), and the bf16 gradient is the float32
    sum of the parts rounded to bf16 once."""
    backend_cls = type(registry.get_backend(backend))
    parts = []  # copies: the autograd layer accumulates into the first part in place

    def recording(real):
        def method(self, *args):
            grads = real(self, *args)
            parts.append(type(grads)(*(None if g is None else g.clone() for g in grads)))
            return grads
        return method

    for name in ("head_backward", "jsd_backward"):
        monkeypatch.setattr(backend_cls, name, recording(getattr(backend_cls, name)))
    n, h, v = 5, 16, 48
    hidden = torch.randn(n, h).to(device, torch.bfloat16).requires_grad_()
    weight = (0.5 * torch.randn(v, h)).to(device, torch.bfloat16).requires_grad_()
    teacher_hidden = torch.randn(n, h).to(device, torch.bfloat16)
    teacher_weight = torch.randn(v, h).to(device, torch.bfloat16)
    targets = torch.randint(0, v, (n,)).to(device)
    terms = ptd.linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, v, backend=backend)
    (terms.logp.sum() + terms.entropy.sum() + terms.jsd.sum()).backward()
    assert len(parts) == 2
    assert all(p.hidden.dtype == torch.float32 for p in parts)
    assert all(p.weight.dtype in (torch.float32, torch.bfloat16) for p in parts)
    float32_parts = [p.weight for p in parts if p.weight.dtype == torch.float32]
    assert all(not torch.equal(w.bfloat16().float(), w) for w in float32_parts)  # not pre-rounded
    assert torch.equal(weight.grad, (parts[0].weight.float() + parts[1].weight.float()).bfloat16())
    assert torch.equal(hidden.grad, (parts[0].hidden + parts[1].hidden).bfloat16())


@pytest.mark.parametrize("kind", ["jsd", "topk"])
def test_bf16_one_sweep_loss_gradients_are_scaled_before_their_one_rounding(monkeypatch, kind):
    """λ·loss (λ = 0.05, PTD-PO's coefficient): the incoming gradient scales the one-sweep loss's
    float32 gradients before their cast to bf16, so they equal the float32 computation rounded once."""
    monkeypatch.setattr(ptd.config, "FUSED_LOSS_MIN_ROWS", 1)
    g = torch.Generator().manual_seed(3)
    n, h, v = 24, 16, 400
    tensors = [torch.randn(n, h, generator=g), torch.randn(v, h, generator=g), torch.randn(n, h, generator=g),
               torch.randn(v, h, generator=g)]
    grads = {}
    for dtype in (torch.bfloat16, torch.float32):
        hidden, weight, teacher_hidden, teacher_weight = (t.bfloat16().to(dtype) for t in tensors)
        hidden.requires_grad_(), weight.requires_grad_()
        if kind == "jsd":
            loss = ptd.linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, backend="torch")
        else:
            loss = ptd.linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, 8, backend="torch")
        (0.05 * loss).backward()
        grads[dtype] = (hidden.grad, weight.grad)
    for bf16, fp32 in zip(grads[torch.bfloat16], grads[torch.float32]):
        assert bf16.dtype == torch.bfloat16
        assert torch.equal(bf16, fp32.bfloat16())


# ----------------------------------------------------------------------------- the backend interface


def test_backends_implement_the_interface():
    for backend in (select_backend("torch"), TritonBackend(), *(e.instance() for e in ptd.registered_backends()
                                                                 if e.available())):
        assert isinstance(backend, Backend) and not getattr(type(backend), "__abstractmethods__", None)
    assert select_backend("torch").fused_loss_pays(Head(torch.zeros(1, 4), torch.zeros(1000, 4), None))
    assert not TritonBackend().fused_loss_pays(Head(torch.zeros(1, 4), torch.zeros(1000, 4), None))
    with pytest.raises(NotImplementedError, match="triton"):
        TritonBackend().fused_loss(None, None, DivergenceSpec(0.5), None, GradNeeds())


def test_public_block_budgets_take_effect(monkeypatch):
    """``ptd_kernels.config`` is read at call time: a smaller loss block splits the one-sweep loss
    into more row blocks (same value)."""
    from ptd_kernels.backends.torch import _blocks

    blocks = []
    real = _blocks.two_sided_row_blocks
    monkeypatch.setattr(_blocks, "two_sided_row_blocks", lambda *a: (blocks.append(a[2]), real(*a))[1])
    h, w, th, tw = torch.randn(8, 6), torch.randn(50, 6), torch.randn(8, 6), torch.randn(50, 6)
    monkeypatch.setattr(ptd.config, "FUSED_LOSS_MIN_ROWS", 1)
    first = ptd.linear_jsd_loss(h, w, th, tw, backend="torch")
    monkeypatch.setattr(ptd.config, "LOSS_BLOCK_BYTES", 2 * 50 * 2 * 4)
    second = ptd.linear_jsd_loss(h, w, th, tw, backend="torch")
    assert blocks == [88 << 20, 800]
    torch.testing.assert_close(first, second)


# ----------------------------------------------------------------------------- module wrappers


@pytest.mark.parametrize("make,match", [
    (lambda: ptd.LinearTopKJSDLoss(k=0), "k"),
    (lambda: ptd.LinearTopKJSDLoss(k=4, beta=2.0), "beta"),
    (lambda: ptd.LinearTopKJSDLoss(k=4, support="both"), "support"),
    (lambda: ptd.LinearJSDLoss(backend="cuda"), "backend"),
    (lambda: ptd.LinearJSDLoss(temperature=0.0), "temperature"),
    (lambda: ptd.LinearPTDTerms(k=2.5), "k"),
    (lambda: ptd.LinearLogprobs(ignore_index=1.5), "ignore_index"),
])
def test_modules_check_their_configuration_when_built(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_module_repr_shows_the_configuration():
    text = repr(ptd.LinearTopKJSDLoss(k=64, beta=0.3, support="teacher", tail=False))
    assert text == ("LinearTopKJSDLoss(k=64, beta=0.3, support='teacher', tail=False, temperature=1.0, "
                    "logit_scale=1.0, softcap=None, teacher_logit_scale=1.0, teacher_softcap=None, backend='auto')")
    assert "with_entropy=True" in repr(ptd.LinearLogprobs(with_entropy=True))


# ----------------------------------------------------------------------------- the registry


def test_the_registry_names_the_backends_and_where_they_run(monkeypatch):
    entries = {e.name: e for e in ptd.registered_backends()}
    assert list(entries)[:2] == ["triton", "torch"]  # auto's order of preference
    assert ptd.backend_names()[0] == "auto" and set(ptd.backend_names()[1:]) == set(entries)
    assert entries["torch"].devices == {"cpu", "cuda"}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert entries["triton"].devices == {"cpu", "cuda"} and "triton" in ptd.backends_for("cpu")
    assert select_backend("auto", torch.zeros(1)).name == "triton"  # auto under the interpreter: Triton
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert entries["triton"].devices == {"cuda"} and ptd.backends_for(torch.zeros(1)) == ("torch",)
    assert select_backend("auto", torch.zeros(1)).name == "torch"
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1"):
        select_backend("triton", torch.zeros(1))
    with pytest.raises(ValueError, match="backend must be one of"):
        ptd.linear_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), backend="cuda")


def test_a_backend_plugs_in_with_one_registration(monkeypatch):
    """A new backend is one register_backend call: backend= accepts its name, its factory runs on first use
    only, auto passes it over unless registered with auto=True, and the functions run on it."""
    made = []

    class Recording(TorchBackend):
        name = "recording"

        def __init__(self):
            made.append(self)

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    ptd.register_backend("recording", Recording, devices=("cpu",), auto=False)
    assert "recording" in ptd.backend_names() and "recording" in ptd.backends_for("cpu") and not made
    hidden, weight, targets = torch.randn(3, 5), torch.randn(7, 5), torch.tensor([1, 2, 3])
    assert select_backend("auto", hidden).name != "recording" and not made
    got = ptd.linear_logprobs(hidden, weight, targets, backend="recording")
    assert len(made) == 1
    torch.testing.assert_close(got, ptd.linear_logprobs(hidden, weight, targets, backend="torch"))
    ptd.linear_logprobs(hidden, weight, targets, backend="recording")
    assert len(made) == 1  # made once
    with pytest.raises(ValueError, match="already registered"):
        ptd.register_backend("recording", Recording, devices=("cpu",))
    ptd.register_backend("not-a-backend", lambda: object(), devices=("cpu",), auto=False)
    with pytest.raises(TypeError, match="not a Backend"):
        ptd.linear_logprobs(hidden, weight, targets, backend="not-a-backend")
    ptd.register_backend("missing", "ptd_kernels.backends.torch:TorchBackend", devices=("cpu",), auto=False,
                         requires=("a_module_that_does_not_exist",))
    assert "missing" not in ptd.backends_for("cpu")
    with pytest.raises(RuntimeError, match="a_module_that_does_not_exist"):
        ptd.linear_logprobs(hidden, weight, targets, backend="missing")


def test_importing_and_running_on_the_cpu_never_imports_triton():
    """The registry's factories are lazy: without the interpreter, a CPU call imports no Triton."""
    import subprocess
    import sys

    code = ("import sys, torch, ptd_kernels as ptd; assert 'triton' not in sys.modules; "
            "ptd.linear_ptd_terms(torch.randn(3, 4), torch.randn(9, 4), torch.tensor([1, 2, 3]), torch.randn(3, 4), "
            "torch.randn(9, 4), 2).jsd.sum(); assert 'triton' not in sys.modules, 'triton imported'")
    env = {**__import__("os").environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("k", [1, 3, 7, 8, 12])
def test_topk_ids_follow_the_tie_rule_with_and_without_ties(k):
    """rowmath.topk_ids on a CPU: a block whose k + 1 largest values are distinct takes torch's order as it is,
    a block with a tie, a NaN or ±0 anywhere goes the exact way; both equal a full sort of the packed keys
    (value descending, then id ascending), rows of both kinds mixed in one block; k > V gives all V ids."""
    from ptd_kernels import rowmath

    generator = torch.Generator().manual_seed(k)
    distinct = torch.randn(6, 8, generator=generator)
    tied = torch.randint(-2, 3, (6, 8), generator=generator).float()
    special = distinct.clone()
    special[0, 3], special[1, 5], special[2, 0], special[2, 1] = float("nan"), float("inf"), -0.0, 0.0
    for logits in (distinct, tied, special, torch.cat([distinct, tied])):
        expected = rowmath._ids_from_keys(torch.sort(rowmath.pack_topk_keys(logits), dim=-1, descending=True).values)
        assert torch.equal(rowmath.topk_ids(logits, k), expected[:, :k])


@pytest.mark.parametrize("k", [1, 3, 7, 8, 12])
def test_topk_ids_on_a_device_path_equals_the_cpu_path(monkeypatch, k):
    """rowmath.topk_ids: the device branch (one top-k of packed keys) gives the CPU branch's ids, in the
    same order, on rows with ties straddling the k-th place, ties among the selected, NaN and ±inf."""
    from ptd_kernels import _host_reads, rowmath

    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, -1.0, 2.0],
                           [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
                           [float("nan"), 1.0, float("inf"), -float("inf"), 2.0, 2.0, 0.0, 1.0],
                           [-0.0, 0.0, 4.0, -2.0, 4.0, 1.0, 1.0, 1.0]])
    on_cpu = rowmath.topk_ids(logits, k)
    monkeypatch.setattr(_host_reads, "AS_ON_A_DEVICE", True)
    assert torch.equal(rowmath.topk_ids(logits, k), on_cpu)
    assert on_cpu[1].tolist() == list(range(min(k, 8)))  # all tied: the smaller ids, in order
    assert torch.equal(rowmath.topk_ids(logits.double(), k), on_cpu)  # the float64 branch
