"""The GPU work model (bench/gpu_model.py): its counter counts what it should, on known cases.

The counter runs code on meta tensors that report a CUDA device; these tests check it against
counts that follow from the shapes alone: GEMM FLOPs and bytes of ``mm`` in its plain, ``out=``
and in-place forms, a Triton launch's grid and bytes, live-byte tracking, the GEMM count of ptd's
chunked path per form (issue 21: log-prob + entropy 4, teacher top-K 1, Top-K JSD and PTD terms 5,
full JSD 6, the loss functions 4), and the whole model end to end at a tiny shape.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.abspath(os.path.join(__file__, "..", "..", "..")), "bench"))

import gpu_cases  # noqa: E402
import gpu_count  # noqa: E402
import gpu_kernels  # noqa: E402
import gpu_model  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = torch.bfloat16


def _works(trace, kind=None):
    return [w for w in trace.works if isinstance(w, gpu_count.Work) and (kind is None or w.kind == kind)]


def test_tensors_report_cuda_and_carry_no_data():
    with gpu_count.counting():
        x = gpu_count.cuda_tensor((1 << 20, 1 << 20), BF16)  # 2 TiB if it were real
        assert x.is_cuda and x.device.type == "cuda"
        y = x[:4].float()
        assert y.is_cuda and y.shape == (4, 1 << 20) and y.dtype == torch.float32


def test_plain_mm_counts_flops_bytes_and_one_launch():
    m, k, n = 96, 80, 112
    with gpu_count.counting() as trace:
        a = gpu_count.cuda_tensor((m, k), BF16)
        b = gpu_count.cuda_tensor((k, n), BF16)
        trace.mark_baseline()
        out = torch.mm(a, b.T.contiguous().T)  # the transposes are views; .contiguous() is one copy
    gemms = _works(trace, "gemm")
    assert len(gemms) == 1
    gemm = gemms[0]
    assert gemm.gemm_flops == 2 * m * k * n and gemm.gemm_dtype == "bf16"
    assert gemm.hbm_read == 2 * (m * k + k * n) and gemm.hbm_write == 2 * m * n
    assert len(trace.launches()) == 2  # the copy and the GEMM; views launch nothing
    assert out.shape == (m, n)


def test_out_and_in_place_gemms_are_counted():
    """``mm(out=)`` and ``addmm_`` (FlopCounterMode misses both): FLOPs; out= does not read its output,
    addmm_ reads the matrix it accumulates into."""
    m, k, n = 64, 48, 32
    with gpu_count.counting() as trace:
        a = gpu_count.cuda_tensor((m, k), torch.float32)
        b = gpu_count.cuda_tensor((k, n), torch.float32)
        c = gpu_count.cuda_tensor((m, n), torch.float32)
        trace.mark_baseline()
        result = torch.mm(a, b, out=c)
        c.addmm_(a, b)
        torch.addmm(c, a, b, out=c)
    assert result is c
    mm_out, addmm_inplace, addmm_out = _works(trace, "gemm")
    flops = 2 * m * k * n
    assert [w.gemm_flops for w in (mm_out, addmm_inplace, addmm_out)] == [flops] * 3
    operands = 4 * (m * k + k * n)
    assert mm_out.hbm_read == operands and mm_out.hbm_write == 4 * m * n
    assert addmm_inplace.hbm_read == operands + 4 * m * n and addmm_inplace.hbm_write == 4 * m * n
    assert addmm_out.hbm_read == operands + 4 * m * n
    assert {w.gemm_dtype for w in (mm_out, addmm_inplace)} == {"fp32"}
    assert trace.peak_extra_bytes == 0  # all three wrote into c


def test_live_bytes_and_peak():
    with gpu_count.counting() as trace:
        x = gpu_count.cuda_tensor((256, 256), torch.float32)
        trace.mark_baseline()
        y = x * 2  # 256 KiB
        z = y + 1  # 256 KiB more
        del y
        w = z.sum()
    assert trace.peak_extra_bytes == 2 * 256 * 256 * 4
    assert trace.live_bytes - trace.baseline_bytes == 256 * 256 * 4 + w.element_size()


def test_read_back_without_rule_raises_and_constants_are_known():
    with gpu_count.counting() as trace:
        x = gpu_count.cuda_tensor((8,), torch.float32)
        with pytest.raises(gpu_count.UnmodelledScalar, match="no rule"):
            bool((x > 0).any())
        zeros = torch.zeros(8, dtype=torch.bool, device=x.device)
        assert not bool(zeros.any())
        assert zeros.nonzero().shape == (0, 1)
    assert trace.syncs == 3


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)


def test_triton_launch_is_recorded_not_run():
    n, block = 10_000, 512
    with gpu_count.counting() as trace:
        x = gpu_count.cuda_tensor((n,), torch.float32)
        y = gpu_count.cuda_tensor((n,), torch.float32)
        _copy_kernel[(triton.cdiv(n, block),)](x, y, n, BLOCK=block)
    (launch,) = [w for w in trace.works if isinstance(w, gpu_count.TritonLaunch)]
    assert launch.kernel == "_copy_kernel" and launch.grid == (triton.cdiv(n, block), 1, 1)
    assert launch.args["BLOCK"] == block and launch.args["x_ptr"].shape == (n,)
    work = gpu_kernels.launch_work(launch)
    assert work.kind == "stream" and work.hbm_read == 4 * n and work.hbm_write == 4 * n


@triton.jit
def _store_at_data_kernel(x_ptr, ids_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(y_ptr.dtype.element_ty)
    slot = tl.cumsum((x > 0).to(tl.int32), axis=0) + tl.load(ids_ptr + offsets, mask=mask, other=0)
    tl.store(y_ptr + slot, x, mask=mask)


def test_an_address_computed_from_loaded_data_accesses_only_its_own_pointer():
    """A store at slots computed from loaded values (and in a pointer's element type) writes its own
    pointer's tensor, not the tensors the values came from (the top-K scratch list of a statistics kernel)."""
    accesses = gpu_kernels.pointer_accesses(_store_at_data_kernel, {"BLOCK": 16})
    assert accesses["x_ptr"] == {"load": 1} and accesses["ids_ptr"] == {"load": 1}
    assert accesses["y_ptr"] == {"store": 1}


def test_fused_kernel_plan_gives_dot_flops_and_no_atomics():
    """ptd's head backward at a small shape: one kernel launched as two sweeps — programs owning rows of
    ∂hidden, then rows of ∂weight — each recomputing every logits tile once and adding buffer @ operand
    into the rows it owns (no atomics)."""
    import ptd_kernels

    n, h, v = 100, 64, 300
    with gpu_count.counting() as trace:
        hidden = gpu_count.cuda_tensor((n, h), BF16, requires_grad=True)
        weight = gpu_count.cuda_tensor((v, h), BF16, requires_grad=True)
        targets = gpu_count.cuda_tensor((n,), torch.int64)
        trace.phase = "forward"
        logp = ptd_kernels.linear_logprobs(hidden, weight, targets, backend="triton")
        trace.phase = "backward"
        logp.sum().backward()
    launches = [w for w in trace.works if isinstance(w, gpu_count.TritonLaunch)]
    backward = [w for w in launches if w.kernel == "_head_backward_kernel"]
    assert [bool(w.args["OWN_ROWS"]) for w in backward] == [True, False]
    for launch in backward:
        bn, bv, bh, bk = (launch.args[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "BLOCK_K"))
        own, swept = ((n, bn), (v, bv)) if launch.args["OWN_ROWS"] else ((v, bv), (n, bn))
        work = gpu_kernels.launch_work(launch)
        recompute = 2 * triton.cdiv(n, bn) * triton.cdiv(v, bv) * bn * bv * gpu_kernels.pad(h, bh)
        gradient = 2 * gpu_kernels.pad(*own) * gpu_kernels.pad(*swept) * gpu_kernels.pad(h, bk)
        assert work.gemm_flops == recompute + gradient
        assert work.atomics == 0
    forward = next(w for w in launches if w.kernel == "_row_stats_kernel")
    stats_n, stats_v, stats_h = (forward.args[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
    stats = gpu_kernels.launch_work(forward)
    assert stats.gemm_flops == (2 * triton.cdiv(n, stats_n) * triton.cdiv(v, stats_v) * stats_n * stats_v
                                * gpu_kernels.pad(h, stats_h))


def test_l2_simulation_reuses_what_fits():
    cache = gpu_kernels.L2(capacity=100)
    for _ in range(3):
        cache.touch("a", 40)
        cache.touch("b", 40)
    assert cache.read == 80  # both fit: read once
    small = gpu_kernels.L2(capacity=60)
    for _ in range(3):
        small.touch("a", 40)
        small.touch("b", 40, dirty=True)
    small.flush()
    assert small.read == 240 and small.written == 120  # a cyclic sweep larger than the cache misses every time


# issue 21: the GEMM work per form of the chunked PyTorch path, in logits-GEMM equivalents
EXPECTED_GEMMS = {"linear_logprobs": 4, "linear_topk": 1, "linear_topk_jsd": 5, "linear_sparse_jsd": 4,
                  "linear_jsd": 6, "linear_ptd_terms": 5, "linear_jsd_loss": 4, "linear_topk_jsd_loss": 4,
                  "linear_policy_loss": 4, "linear_policy_loss (no teacher)": 3,
                  "linear_policy_loss (one sweep, accumulator beyond the budget)": 4, "linear_logprobs_at": 4}


@pytest.mark.parametrize("op", gpu_cases.PTD_OPS, ids=lambda op: op.name)
def test_torch_path_gemm_count_matches_issue_21(op):
    shape = gpu_cases.Shape(n=48, h=32, v=2048, k=4)
    with gpu_count.counting() as trace:
        gpu_cases.run_case(lambda x: op.call(x, "torch"), shape, trace)
    logits_gemms = sum(w.gemm_flops for w in _works(trace, "gemm") if w.name in ("aten.mm", "aten.addmm",
                                                                                   "aten.addmm_"))
    assert logits_gemms / shape.logits_gemm_flops == EXPECTED_GEMMS[op.name]
    assert op.floor == EXPECTED_GEMMS[op.name]


@pytest.mark.parametrize("path", ["torch", "cublas"])
@pytest.mark.parametrize(("op_name", "gemms"), [("linear_policy_loss", 4), ("linear_policy_loss (no teacher)", 3)])
def test_one_sweep_policy_loss_is_4_gemms_with_a_teacher_and_3_without(path, op_name, gemms):
    """Issue 21.2: the whole PTD-PO loss costs the student's and the teacher's forward GEMMs and the two
    gradient GEMMs; the policy loss alone, 3 — counted from execution on the torch and cuBLAS paths (at a
    shape where the one sweep pays on both), with no recomputing sweep."""
    if path not in gpu_cases.available_paths():
        pytest.skip(f"{path} is not a backend here")
    shape = gpu_cases.Shape(n=48, h=32, v=2048, k=4)
    op = next(op for op in gpu_cases.PTD_OPS if op.name == op_name)
    with gpu_count.counting() as trace:
        gpu_cases.run_case(lambda x: op.call(x, path), shape, trace)
    gemm_flops = sum(w.gemm_flops for w in _works(trace, "gemm"))
    assert gemm_flops / shape.logits_gemm_flops == pytest.approx(gemms, rel=0.02)  # + the support's gathers
    assert sum(w.gemm_flops for w in _works(trace, "gemm") if w.phase == "backward") == 0


@pytest.mark.slow
def test_model_end_to_end_at_a_tiny_shape(monkeypatch):
    import ptd_kernels

    monkeypatch.setattr(gpu_model, "shapes", lambda quick: [gpu_cases.Shape(n=32, h=32, v=1024, k=4)])
    # blocks of a few rows or columns, as at the target shape: every block loop and accumulation runs
    monkeypatch.setattr(ptd_kernels.config, "CUDA_BLOCK_BYTES", 16 << 10)
    # backend="auto"'s table at the same tiny size: a row on each side of the rule's row threshold
    monkeypatch.setattr(gpu_model, "auto_grid", lambda quick: ((1, 64), (1024,), 32))
    result = gpu_model.run(quick=True, log=lambda line: None)
    names = {(r["op"], r["path"]) for r in result["rows"]}
    for op in gpu_cases.PTD_OPS:
        for path in gpu_cases.available_paths():
            assert (op.name, path) in names
    assert {peer.name for peer in gpu_cases.available_peers()} <= {r["op"] for r in result["rows"]}
    for row in result["rows"]:
        for device in gpu_model.DEVICES:
            predicted = row["devices"][device.name]
            assert predicted["predicted_ms"] > 0 and predicted["x_floor"] > 0
            assert sum(predicted["terms_ms"].values()) == pytest.approx(predicted["predicted_ms"], rel=1e-6)
    json.dumps(result, default=str)
    import gpu_scalars

    installed = {"ptd_kernels"} | {peer.module.split(".")[0] for peer in gpu_cases.available_peers()}
    unused = [rule for rule in gpu_scalars.SCALAR_RULES
              if rule.library in installed and not gpu_scalars.RULE_USES[rule]]
    assert not unused, f"rules no case needs any more (remove them): {unused}"
    from gpu_report import markdown

    text = markdown(result)
    assert "a model, not a measurement" in text and "## Measured on a GPU" in text
    # backend="auto": both CUDA kernel paths priced at each shape of the grid, and the rule's pick beside them
    auto_rows = result["auto_rule"]["rows"]
    assert {r["op"] for r in auto_rows} == set(gpu_model.AUTO_OPS)
    assert all(r["triton"] > 0 and r["cublas"] > 0 and r["rule"] in ("triton", "cublas") for r in auto_rows)
    assert '## backend="auto" on CUDA' in text and "PROVISIONAL" in text


def test_full_size_triton_sweep_counts_quickly():
    """The target shape on meta tensors: no memory, seconds; the launch plan's counts follow the shape."""
    shape = gpu_cases.Shape()
    op = next(op for op in gpu_cases.PTD_OPS if op.name == "linear_logprobs")
    with gpu_count.counting() as trace:
        gpu_cases.run_case(lambda x: op.call(x, "triton"), shape, trace)
    works = [gpu_kernels.launch_work(w) if isinstance(w, gpu_count.TritonLaunch) else w for w in trace.works]
    # forward 1; backward: two sweeps, each a recomputation and a gradient GEMM
    assert sum(w.gemm_flops for w in works) == 5 * shape.logits_gemm_flops
    assert all(w.atomics == 0 for w in works if w.name == "_head_backward_kernel")
    assert trace.peak_extra_bytes > shape.v * shape.h * 4  # the fp32 ∂weight accumulator, counted, not allocated
