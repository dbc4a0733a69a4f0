"""The cuBLAS backend's primitives against the chunked torch backend and dense float64 formulas, and its
counted work.

Blocks and tiles are shrunk so that the small problems take several vocabulary blocks, row blocks,
kernel programs and tiles, partial ones included, and the top-K scratch list overflows (its cut-back
path runs). Tolerances follow the dtype of the computation: float32 statistics at float32 tolerances
whatever the oracle's dtype; bf16 gradients at the rounding of ∂L/∂a to bf16 before the GEMMs. Tensors live
on the ``device`` fixture: CUDA on a GPU host, the CPU under the interpreter. What every backend must do
is tests/kernels/test_conformance.py; this file holds the block/tile overrides and the counted work.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from ptd_kernels import config
from ptd_kernels.backends import registry
from ptd_kernels.backends.base import (
    ALL_GRADS,
    DivergenceSpec,
    GradNeeds,
    Head,
    HeadGradCoefs,
    LogitSpec,
    SparseTerms,
)
from ptd_kernels.backends.cublas import CublasBackend, _blocks, _work, fused_loss, statement
from ptd_kernels.backends.cublas import row_stats as cublas_row_stats
from ptd_kernels.backends.torch import TorchBackend

# slow: block and tile overrides of the interpreted cuBLAS kernels (the conformance suite is the quick check)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.backend("cublas"), pytest.mark.slow]

CUBLAS, TORCH = CublasBackend(), TorchBackend()
BENCH = os.path.join(os.path.abspath(os.path.join(__file__, "..", "..", "..")), "bench")
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
GRAD_TOL = {F64: 1e-10, F32: 1e-5, BF16: 2e-2}  # of the largest gradient entry


@pytest.fixture
def small(monkeypatch):
    """Vocabulary blocks of 5 rows × 64 columns (one side, float32), 2-row programs, 32-column tiles."""
    monkeypatch.setattr(config, "CUDA_BLOCK_BYTES", 5 * 64 * 4)
    monkeypatch.setattr(_blocks, "MIN_BLOCK_COLS", 64)
    tiles = {kind: (2, 32, 1) for kind in _blocks.INTERPRETER_TILES}
    tiles["gather"] = (4, 16, 1)
    monkeypatch.setattr(_blocks, "INTERPRETER_TILES", tiles)


def head(n=9, h=24, v=150, dtype=F32, bias=True, softcap=None, scale=1.0, seed=0, temperature=0.7, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) * 0.6).to(device, dtype)
    b = torch.randn(v, generator=g).to(device, dtype) if bias else None
    return Head(hidden, weight, b, LogitSpec(temperature, scale, softcap))


def dense_logits(hd: Head) -> torch.Tensor:
    a = hd.hidden.double() @ hd.weight.double().T
    if hd.bias is not None:
        a = a + hd.bias.double()
    a = a * hd.logit_scale
    if hd.softcap is not None:
        a = hd.softcap * torch.tanh(a / hd.softcap)
    return a / hd.temperature


def close(actual, expected, tol, what):
    a, e = actual.double(), expected.double()
    err = float((a - e).abs().max()) if a.numel() else 0.0
    assert err <= tol * max(1.0, float(e.abs().max()) if e.numel() else 1.0), f"{what}: error {err:.3e}"


def grads_close(got, want, dtype, what=""):
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            scale = max(float(w.abs().max()), 1e-12)
            err = float((g.double() - w.double()).abs().max())
            assert err <= GRAD_TOL[dtype] * scale, f"{what} grad {name}: {err:.3e} vs scale {scale:.3e}"


# ----------------------------------------------------------------------------- row statistics


@pytest.mark.parametrize("dtype,k,softcap", [(F32, 7, None), (F32, 1, 2.5), (BF16, 64, None), (F64, 0, 3.0)])
def test_row_stats_against_dense(small, dtype, k, softcap, device):
    hd = head(dtype=dtype, softcap=softcap, scale=1.3, device=device)
    targets = torch.randint(0, hd.vocab, (hd.rows,), generator=torch.Generator().manual_seed(1)).to(device)
    r = CUBLAS.row_stats(hd, targets=targets, k=k, lse_dtype=F64)
    z = dense_logits(hd)
    tol = 1e-12 if dtype == F64 else 2e-6  # the logits themselves: float32 GEMMs
    close(r.lse, torch.logsumexp(z, 1), tol, "lse")
    close(r.mean_logit, (torch.softmax(z, 1) * z).sum(1), tol, "mean logit")
    close(r.target_logit, z.gather(1, targets[:, None])[:, 0], tol, "target logit")
    assert r.lse.dtype == F64 and r.target_logit.dtype == (F64 if dtype == F64 else F32)
    if k:
        want = TORCH.row_stats(hd, k=k, with_mean_logit=False)
        assert torch.equal(r.topk_indices, want.topk_indices)
        close(r.topk_logits, z.gather(1, r.topk_indices), 2e-6, "top-k logits")
        assert r.topk_logits.dtype == F32


def test_row_stats_nonfinite_row_stays_in_its_row(small, device):
    hd = head(device=device)
    hidden = hd.hidden.clone()
    hidden[2, 0] = math.nan
    hidden[5, 1] = math.inf
    r = CUBLAS.row_stats(Head(hidden, hd.weight, hd.bias, 0.7), k=5)
    clean = [i for i in range(hd.rows) if i not in (2, 5)]
    assert bool(r.lse[[2, 5]].isnan().all()) and bool(r.mean_logit[[2, 5]].isnan().all())
    want = TORCH.row_stats(Head(hidden[clean], hd.weight, hd.bias, 0.7), k=5)
    close(r.lse[clean], want.lse, 2e-6, "lse")
    assert torch.equal(r.topk_indices[clean], want.topk_indices)


def test_row_stats_wide_top_k_path(small, monkeypatch, device):
    """k above the in-kernel top set: the block's keys ranked by torch, the same ids and tie rule."""
    monkeypatch.setattr(cublas_row_stats, "MAX_K", 4)
    hd = head(device=device)
    hidden = hd.hidden.clone()
    hidden[3] = 0.0  # ties on the bias grid
    tied = Head(hidden, hd.weight, torch.round(hd.bias * 4) / 4, 0.7)
    r = CUBLAS.row_stats(tied, k=37)
    assert torch.equal(r.topk_indices, TORCH.row_stats(tied, k=37).topk_indices)


def test_row_stats_float64_top_k_falls_back_exactly(small, device):
    hd = head(dtype=F64, device=device)
    assert torch.equal(CUBLAS.row_stats(hd, k=9).topk_indices, TORCH.row_stats(hd, k=9).topk_indices)


# ----------------------------------------------------------------------------- backward sweeps


def coefs_for(hd, seed=2, sparse=True):
    g = torch.Generator().manual_seed(seed)
    n, v, device = hd.rows, hd.vocab, hd.hidden.device
    stats = TORCH.row_stats(hd)
    terms = ()
    if sparse:  # two triples, a repeated id within a row, rows with no term, ids in any order
        ids = torch.randint(0, v, (n, 4), generator=g)
        ids[:, 1] = ids[:, 0]
        rows = torch.arange(0, n, 2)
        terms = (SparseTerms.every_row(ids.to(device), torch.randn(n, 4, generator=g).to(device)),
                 SparseTerms(rows.to(device), torch.randint(0, v, (rows.numel(), 3), generator=g).to(device),
                             torch.randn(rows.numel(), 3, generator=g).to(device)))
    coefs = HeadGradCoefs(torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device),
                          stats.mean_logit, torch.randint(0, v, (n,), generator=g).to(device),
                          torch.randn(n, generator=g).to(device), terms)
    return stats.lse, coefs


@pytest.mark.parametrize("dtype,softcap,bias", [(F32, None, True), (F32, 2.0, False), (BF16, None, True),
                                                (F64, 1.5, True)])
def test_head_backward_against_torch(small, dtype, softcap, bias, device):
    hd = head(dtype=dtype, softcap=softcap, bias=bias, scale=0.8, device=device)
    lse, coefs = coefs_for(hd)
    grads_close(CUBLAS.head_backward(hd, lse, coefs, ALL_GRADS), TORCH.head_backward(hd, lse, coefs, ALL_GRADS),
                dtype)


def test_head_backward_row_and_vocabulary_blocks(small, monkeypatch, device):
    """More rows than a block holds: row blocks × vocabulary blocks, d weight accumulated over row blocks."""
    monkeypatch.setattr(_blocks, "MIN_BLOCK_COLS", 150)
    hd = head(n=13, device=device)
    plan = _blocks.vocab_plan(13, 150, 4)
    assert plan.rows < 13 and plan.cols == 150
    lse, coefs = coefs_for(hd)
    grads_close(CUBLAS.head_backward(hd, lse, coefs, ALL_GRADS), TORCH.head_backward(hd, lse, coefs, ALL_GRADS), F32)


@pytest.mark.parametrize("needs", [GradNeeds(True, False, False), GradNeeds(False, True, True),
                                   GradNeeds(False, False, False)])
def test_head_backward_forms_only_what_is_needed(small, needs, device):
    hd = head(device=device)
    lse, coefs = coefs_for(hd, sparse=False)
    with _work.counting() as log:
        got = CUBLAS.head_backward(hd, lse, coefs, needs)
    want = TORCH.head_backward(hd, lse, coefs, needs)
    grads_close(got, want, F32)
    want_gemms = ({"logits"} if needs.any else set()) | ({"grad_hidden"} if needs.hidden else set()) | (
        {"grad_weight"} if needs.weight else set())
    assert {g.name for g in log.gemms} == want_gemms


@pytest.mark.parametrize("row_blocks", [1, "several"])
def test_weight_gradient_comes_in_the_weights_dtype(monkeypatch, row_blocks, device):
    """A bf16 head: d weight and d bias come back in bf16, d hidden in float32 (the autograd layer's cast is
    then a no-op for the first two). With every row in one block, a vocabulary slice's d weight is one
    GEMM straight into the bf16 gradient (no float32 V×H buffer, no slice buffer); with several row blocks
    it is summed over them in a float32 slice that shares the budget with the blocks, and cast once."""
    n, v, h = 9, 150, 24
    monkeypatch.setattr(_blocks, "MIN_BLOCK_COLS", 64)
    monkeypatch.setattr(config, "CUDA_BLOCK_BYTES", (n if row_blocks == 1 else n - 1) * 64 * 4)
    hd = head(n=n, v=v, h=h, dtype=BF16, softcap=2.0, device=device)
    lse, coefs = coefs_for(hd)
    with _work.counting() as log:
        got = CUBLAS.head_backward(hd, lse, coefs, ALL_GRADS)
    assert (got.hidden.dtype, got.weight.dtype, got.bias.dtype) == (F32, BF16, BF16)
    grads_close(got, TORCH.head_backward(hd, lse, coefs, ALL_GRADS), BF16)
    plan = _blocks.vocab_plan(n, v, 4, _blocks.slice_bytes(hd))
    assert (plan.rows == n) == (row_blocks == 1) and plan.cols < v
    weight_gemms = [g for g in log.gemms if g.name == "grad_weight"]
    buffers = [size for _, sizes in log.sweeps for size in sizes]
    if row_blocks == 1:
        assert {(g.out_bytes, g.accumulate) for g in weight_gemms} == {(2, False)}
        assert plan.cols * h * 4 not in buffers  # no slice buffer
    else:
        assert {g.out_bytes for g in weight_gemms} == {4} and any(g.accumulate for g in weight_gemms)
        assert plan.cols * h * 4 in buffers
        assert plan.rows * plan.cols * 4 + plan.cols * h * 4 <= config.CUDA_BLOCK_BYTES
    assert v * h * 4 not in buffers
    student, teacher = hd, head(n=n, v=v, h=31, seed=5, dtype=BF16)
    stats = TORCH.jsd_forward(student, teacher, 0.5)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(3))
    got = CUBLAS.jsd_backward(student, teacher, 0.5, stats, grad, ALL_GRADS)
    assert (got.hidden.dtype, got.weight.dtype, got.bias.dtype) == (F32, BF16, BF16)
    grads_close(got, TORCH.jsd_backward(student, teacher, 0.5, stats, grad, ALL_GRADS), BF16)


@pytest.mark.parametrize("n,v,bytes_per_logit", [(8192, 151936, 4), (40000, 151936, 4), (20000, 128256, 8),
                                                 (3, 1000, 4)])
def test_vocab_plan_keeps_the_slice_buffer_within_the_budget(n, v, bytes_per_logit):
    """A 16-bit weight's d weight slice (H float32 per column) is only needed with several row blocks; then
    the block and the slice together stay within CUDA_BLOCK_BYTES (up to the 16-column alignment)."""
    per_col = 4096 * 4
    plan = _blocks.vocab_plan(n, v, bytes_per_logit, per_col)
    assert plan == _blocks.vocab_plan(n, v, bytes_per_logit) or plan.rows < n
    used = plan.rows * plan.cols * bytes_per_logit + (plan.cols * per_col if plan.rows < n else 0)
    assert used <= config.CUDA_BLOCK_BYTES + 16 * (plan.rows * bytes_per_logit + per_col)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_against_torch(small, beta, device):
    student = head(softcap=3.0, scale=1.2, device=device)
    teacher = head(h=31, seed=5, bias=False, scale=0.7, device=device)
    got, want = CUBLAS.jsd_forward(student, teacher, beta), TORCH.jsd_forward(student, teacher, beta)
    close(got.value, want.value, 2e-6, "value")
    close(got.w_sum, want.w_sum, 2e-6, "w_sum")
    grad = torch.randn(student.rows, generator=torch.Generator().manual_seed(3)).to(device)
    grads_close(CUBLAS.jsd_backward(student, teacher, beta, got, grad, ALL_GRADS),
                TORCH.jsd_backward(student, teacher, beta, want, grad, ALL_GRADS), F32, f"β={beta}")


def test_jsd_mixed_dtypes_and_given_lse(small, device):
    student, teacher = head(dtype=BF16, device=device), head(h=31, seed=5, dtype=F32, device=device)
    lse = TORCH.row_stats(student, lse_dtype=F64).lse
    got = CUBLAS.jsd_forward(student, teacher, 0.3, lse=lse)
    want = TORCH.jsd_forward(student, teacher, 0.3, lse=lse)
    close(got.value, want.value, 2e-6, "value")
    assert got.lse is lse


# ----------------------------------------------------------------------------- one-sweep loss and gathers


@pytest.fixture
def three_rows(small, monkeypatch):
    """Blocks of whole rows: 3 rows (9 rows: 3 blocks) with one side and its top-K scratch, or both sides."""
    monkeypatch.setattr(config, "CUDA_BLOCK_BYTES", 3 * 150 * 8)


@pytest.mark.parametrize("divergence", [DivergenceSpec(0.5), DivergenceSpec(0.0, 6, "union", True),
                                        DivergenceSpec(1.0, 6, "teacher", False),
                                        DivergenceSpec(0.5, 6, "student", True)],
                         ids=["full", "union", "teacher", "student"])
def test_fused_loss_against_torch(three_rows, divergence, device):
    student, teacher = head(softcap=2.0, device=device), head(h=31, seed=5, device=device)
    weights = torch.randn(student.rows, generator=torch.Generator().manual_seed(8)).to(device)
    value, grads = CUBLAS.fused_loss(student, teacher, divergence, weights, ALL_GRADS)
    want_value, want_grads = TORCH.fused_loss(student, teacher, divergence, weights, ALL_GRADS)
    close(value, want_value, 2e-6, "value")
    grads_close(grads, want_grads, F32)


@pytest.mark.parametrize("dtype,k", [(F64, 6), (F32, 9)])
def test_fused_loss_top_k_ranked_by_torch(three_rows, monkeypatch, dtype, k, device):
    """float64 logits, or k above the kernel's top set: the student's top-k of a block ranked by torch."""
    from ptd_kernels.backends.cublas import fused_loss as module

    monkeypatch.setattr(module, "MAX_K", 8)
    student, teacher = head(dtype=dtype, device=device), head(h=31, seed=5, dtype=dtype, device=device)
    weights = torch.ones(student.rows, dtype=dtype, device=device)
    divergence = DivergenceSpec(0.5, k, "union", True)
    value, grads = CUBLAS.fused_loss(student, teacher, divergence, weights, ALL_GRADS)
    want_value, want_grads = TORCH.fused_loss(student, teacher, divergence, weights, ALL_GRADS)
    close(value, want_value, 1e-12 if dtype == F64 else 2e-6, "value")
    grads_close(grads, want_grads, dtype)


def test_fused_loss_without_gradients_launches_no_gradient_work(three_rows, device):
    student, teacher = head(device=device), head(h=31, seed=5, device=device)
    with _work.counting() as log:
        value, grads = CUBLAS.fused_loss(student, teacher, DivergenceSpec(0.5, 6), torch.ones(9, device=device),
                                         GradNeeds(False, False, False))
    assert {g.name for g in log.gemms} == {"logits"} and not any(r.name == "head_grad" for r in log.launches)
    close(value, TORCH.fused_loss(student, teacher, DivergenceSpec(0.5, 6), torch.ones(9, device=device),
                                  GradNeeds(False, False, False))[0], 2e-6, "value")


def test_gather_logits(small, device):
    hd = head(softcap=2.0, dtype=BF16, device=device)
    ids = torch.randint(0, hd.vocab, (hd.rows, 11), generator=torch.Generator().manual_seed(6)).to(device)
    for dtype in (F32, F64):
        close(CUBLAS.gather_logits(hd, ids, dtype), dense_logits(hd).gather(1, ids), 2e-6, f"gather {dtype}")


# ----------------------------------------------------------------------------- work and memory


@pytest.mark.slow
def test_gemm_work_per_form_is_the_floor_and_memory_the_budget(monkeypatch):
    """Counted at the target shape on meta tensors (N = 8192, H = 4096, V = 151936, K = 100, bf16): logits-GEMM
    equivalents per op — log-prob + entropy 4, teacher top-K 1, Top-K JSD / PTD terms 5, per-row full JSD 6,
    the loss functions 4 — and the per-row ops' working memory within 1 GiB at the default budget: the blocks,
    their row state and the float32 d hidden that is cast to bf16 (d weight is formed in bf16, no float32 V×H
    buffer). At half the budget the blocks take half (d hidden, N×H, does not shrink with it)."""
    works = statement.count()
    assert [round(w.gemm_equivalents, 6) for w in works] == [4, 1, 5, 6, 4, 4]
    per_row = works[:4]
    assert all(w.working_gib <= 1.0 for w in per_row), [(w.op, w.working_gib) for w in per_row]
    hidden_gib = 8192 * 4096 * 4 / 2**30
    monkeypatch.setattr(config, "CUDA_BLOCK_BYTES", config.CUDA_BLOCK_BYTES // 2)
    for full, half in zip(works, statement.count()):
        fixed = hidden_gib if full in per_row and full.op != works[1].op else 0.0
        assert half.working_gib - fixed <= 0.55 * (full.working_gib - fixed) + 0.05, (full.op, half.working_gib,
                                                                                      full.working_gib)


def test_fused_loss_pays_only_with_enough_rows_per_block(monkeypatch):
    hd = head(v=151936, n=1, h=8)
    assert fused_loss.fused_loss_pays(hd)
    monkeypatch.setattr(config, "CUDA_BLOCK_BYTES", 64 << 20)
    assert not fused_loss.fused_loss_pays(hd)


# ----------------------------------------------------------------------------- backend="auto" on CUDA


@pytest.mark.parametrize("call,takes", [
    (dict(rows=8192, needs_grad=True, function="linear_logprobs"), True),
    (dict(rows=1, needs_grad=True, function="linear_ptd_terms"), True),  # gradients: cuBLAS at any row count
    (dict(rows=8192, function="linear_topk"), True),
    (dict(rows=33, function="linear_topk"), True),
    (dict(rows=32, function="linear_topk"), False),  # decode-like forward calls: one fused Triton kernel
    (dict(rows=1, function="linear_logprobs"), False),
    (dict(rows=1, function="linear_jsd"), True),  # the full JSD: cuBLAS at any row count
    (dict(rows=None), True),  # rows not known: taken as many
])
def test_auto_rule_on_cuda(call, takes):
    assert registry.cublas_takes(registry.CallShape("cuda", **call)) is takes
    assert not registry.cublas_takes(registry.CallShape("cpu", **call))  # on a CPU (the interpreter): never


def _auto_name(n: int, requires_grad: bool, function=None) -> str:
    """``auto``'s choice for tensors that say "cuda" (the GPU work model's meta tensors, as its tests use)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import gpu_count

    with gpu_count.counting():
        hidden = gpu_count.cuda_tensor((n, 64), BF16, requires_grad=requires_grad)
        weight = gpu_count.cuda_tensor((1000, 64), BF16, requires_grad=requires_grad)
        return registry.select_backend("auto", hidden, weight, None, function=function).name


def test_auto_on_cuda_reads_the_call(monkeypatch):
    """On a faked CUDA host (meta tensors that report cuda): cuBLAS for calls that form gradients and for
    forward-only calls of many rows, Triton for a decode-like forward call; Triton whenever this torch or
    Triton lacks what the cuBLAS backend uses."""
    assert _auto_name(4096, True) == "cublas"
    assert _auto_name(4, True, "linear_logprobs") == "cublas"
    with torch.no_grad():
        assert _auto_name(4, True, "linear_logprobs") == "triton"
    assert _auto_name(4, False, "linear_sparse_jsd") == "triton"
    assert _auto_name(4, True, "linear_topk") == "triton"  # linear_topk forms no gradient
    assert _auto_name(4096, False, "linear_topk") == "cublas"
    monkeypatch.setattr(registry, "_cublas_can_run", lambda: False)
    assert _auto_name(4096, True) == "triton"


def test_cublas_needs_cuda_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='cublas' needs CUDA tensors"):
        registry.select_backend("cublas", torch.zeros(2, 3))
