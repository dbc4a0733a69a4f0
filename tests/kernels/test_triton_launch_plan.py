"""Every launch of the Triton kernels held to an H100's limits (and a B200's), without either GPU.

The interpreter runs the kernels' Python semantics, not the compiler: a kernel that needs more shared
memory than the GPU has, spills registers or falls off the tensor cores passes every CPU test and
shows up on the first GPU. Triton compiles for a named target without a device, so this module runs
the real launchers (``launch_plan``: a stand-in driver that reports the GPU, meta tensors, launches
recorded instead of run) at the target shapes of ``bench/kernel_plan.py`` — N = 8192, H = 4096,
V ∈ {128256, 151936}, bf16 / fp16 / fp32 with TF32 on and off, soft-cap and bias on and off,
K ∈ {1, 8, 20, 64, 100, 128, 256}, β ∈ {0, 0.5, 1} — and checks what ptxas made of every kernel
they launch: shared memory within the GPU's per-block limit, no register spill for bf16/fp16 at
K ≤ 128 (on the H100; reported only on the B200), every bf16/fp16 dot on the asynchronous
tensor-core MMA (``launch_plan.check``).

Compiling all of it takes about 20 minutes on 2 cores, so the compile figures come from the plan
cache that ``bench/kernel_plan.py`` commits beside its table, keyed by Triton's own compile hash
(kernel source and every jit function it calls, constexprs, options, Triton build, ptxas): with the
Triton the table was made with, a current table answers every kernel in seconds. A covering set of
configurations (every launcher × dtype, the extremes of K, soft-cap/bias on and off) is compiled here
when its kernels are not in the cache; the other configurations are only checked from the cache, and
``test_*_table_is_current`` fails when one of them launches a kernel the table does not have (a
kernel or launcher changed: re-run ``python bench/kernel_plan.py``). The workers run with the
interpreter off. Skipped where Triton's NVIDIA backend or its knobs (Triton ≥ 3.4) are missing.
"""

from __future__ import annotations

import json
import os

import pytest

from ptd_kernels.backends.triton import launch_plan

pytestmark = pytest.mark.slow  # compiles every kernel for sm_90a and sm_100a

ROOT = os.path.abspath(os.path.join(__file__, "..", "..", ".."))
C = launch_plan.Configuration


def covering_configurations():
    """Every launcher and dtype, K at its extremes and where the tiles change, soft-cap/bias both ways,
    each β branch and the shared output layer once: the set compiled when the cache does not have it."""
    yield from (C("logprobs", d, cap, cap) for d in launch_plan.DTYPES for cap in (True, False))
    yield from (C("student_topk", "bf16", True, True, k=k) for k in (1, 20, 64, 100, 256))
    yield from (C("student_topk", "fp16", False, False, k=128), C("student_topk", "fp32-tf32", True, True, k=100),
                C("student_topk", "fp32", True, False, k=256), C("teacher_topk", "bf16", False, True, k=8))
    yield from (C("head_backward", d, True, True) for d in launch_plan.DTYPES)
    yield from (C("head_backward_sparse", "bf16", True, True, k=100),
                C("head_backward_sparse", "fp32-tf32", False, False, k=20))
    yield from (C("jsd_forward", "bf16", True, True, beta=0.5),
                C("jsd_forward", "fp32", False, False, beta=0.0, shared_layer=True))
    yield from (C("jsd_backward", "bf16", True, True, beta=0.5),
                C("jsd_backward", "fp16", False, True, beta=1.0, shared_layer=True),
                C("jsd_backward", "fp32-tf32", True, False, beta=0.0))


def _why_not() -> str | None:
    try:
        import triton
        from triton.backends import backends
    except ImportError as exc:
        return f"Triton is not importable ({exc})"
    if "nvidia" not in backends:
        return "Triton's NVIDIA backend is not installed"
    if not hasattr(triton, "knobs"):
        return f"the stand-in driver needs triton.knobs (Triton ≥ 3.4), this is Triton {triton.__version__}"
    return None


def _plan(gpu: str):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    import triton

    path = os.path.join(ROOT, "bench", "results", f"kernel_plan_{gpu}.json")
    table = None
    if os.path.exists(path):
        with open(path) as file:
            table = json.load(file)
    same_triton = table is not None and table["triton"] == triton.__version__
    cache = launch_plan.plan_cache(table) if same_triton else {}
    jobs = min(2, os.cpu_count() or 1)
    covering = list(covering_configurations())
    rows, _, _ = launch_plan.run_plan(covering, gpu, cache, jobs)
    missing = []
    if same_triton:
        labels = {c.label for c in covering}
        rest = [c for c in launch_plan.configurations() if c.label not in labels]
        rest_rows, _, missing = launch_plan.run_plan(rest, gpu, cache, jobs, compile_missing=False)
        rows += rest_rows
    return {"rows": rows, "missing": missing, "table": table, "same_triton": same_triton}


@pytest.fixture(scope="module")
def sm90():
    return _plan("sm90")


@pytest.fixture(scope="module")
def sm100():
    return _plan("sm100")


def _assert_within_limits(plan, gpu, spills=True):
    assert plan["rows"], "no launch was recorded"
    problems = launch_plan.check(plan["rows"], gpu, spills)
    assert not problems, f"{len(problems)} launches over {gpu.name}'s limits:\n" + "\n".join(problems[:40])


def _assert_table_is_current(plan, gpu_name):
    if not plan["same_triton"]:
        pytest.skip("the committed plan was made with another Triton; its cache does not apply")
    assert not plan["missing"], (
        f"{len(plan['missing'])} configurations launch kernels that bench/results/kernel_plan_{gpu_name}.json "
        f"does not have (a kernel or its launcher changed): run python bench/kernel_plan.py --gpu {gpu_name}; "
        f"first: {plan['missing'][:5]}")
    committed = {(r["config"], r["launch"]): r for r in launch_plan.unpack(plan["table"])}
    for row in plan["rows"]:
        old = committed.get((row["config"], row["launch"]))
        assert old is not None, f"{row['config']} launch {row['launch']} is not in the committed table"
        for key in ("kernel", "grid", "tiles", "num_warps", "num_stages", "compile_hash"):
            assert old[key] == row[key], f"{row['config']} launch {row['launch']}: {key} {old[key]} → {row[key]}"


def test_every_launch_fits_an_h100(sm90):
    _assert_within_limits(sm90, launch_plan.H100)


def test_sm90_table_is_current(sm90):
    _assert_table_is_current(sm90, "sm90")


def test_every_launch_fits_a_b200(sm100):
    """sm_100a: shared memory and tcgen05 are checked; spills are reported in the table, not checked
    (``launch_plan.CHECK_SPILLS``: the tiles are chosen on sm_90a)."""
    _assert_within_limits(sm100, launch_plan.B200, spills=launch_plan.CHECK_SPILLS["sm100"])


def test_sm100_table_is_current(sm100):
    _assert_table_is_current(sm100, "sm100")


def test_covering_set_spans_every_launcher_and_dtype():
    configs = list(covering_configurations())
    assert {c.op for c in configs} == set(launch_plan.OPS)
    for op in ("logprobs", "head_backward"):
        assert {c.dtype for c in configs if c.op == op} == set(launch_plan.DTYPES)
    assert {c.k for c in configs if c.op == "student_topk" and c.dtype == "bf16"} >= {1, 100, 256}
    assert {c.beta for c in configs if c.op.startswith("jsd")} == {0.0, 0.5, 1.0}


def test_check_names_each_limit():
    """``check`` on made-up rows: one over the shared memory, one spilling, one off the async MMA; a
    spill at K = 256 and an fp32 FMA kernel are allowed."""
    base = dict(launch=0, kernel="k", dtype="bf16", k=0, registers=255, spill_bytes=0, shared_bytes=1024, dots=1,
                wgmma_dots=1, tcgen05_dots=0, mma_sync=0)
    rows = [
        {**base, "config": "shared", "shared_bytes": launch_plan.H100.max_shared_mem + 1},
        {**base, "config": "spill", "k": 128, "spill_bytes": 8},
        {**base, "config": "mma", "wgmma_dots": 0, "mma_sync": 4},
        {**base, "config": "spill-k256", "k": 256, "spill_bytes": 8},
        {**base, "config": "fp32-fma", "dtype": "fp32", "wgmma_dots": 0, "spill_bytes": 8},
    ]
    problems = launch_plan.check(rows, launch_plan.H100)
    assert [p.split(" ")[0] for p in problems] == ["shared", "spill", "mma"]


def test_a_kernel_missing_from_the_cache_is_reported_not_compiled():
    if _why_not():
        pytest.skip(_why_not())
    config = C("logprobs", "bf16", False, False)
    rows, compiled, missing = launch_plan.run_plan([config], "sm90", {}, compile_missing=False)
    assert (rows, compiled, missing) == ([], {}, [config.label])
