"""The GPU check (bench/gpu_check.sh) rehearsed without a GPU, so that the first lent GPU's one call works:
the CUDA correctness tier's code on the CPU (Triton's interpreter) and as ``cuda`` tests on a GPU, the
tier's and the benchmarks' journals surviving a hang and a broken CUDA context, the report written from a
journal with and without matplotlib and with the work model beside a CUDA run, the check of the carried
wheels, and the script's own dry rehearsal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.abspath(os.path.join(__file__, "..", "..", ".."))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import cuda_tier  # noqa: E402
import gpu_env  # noqa: E402
from journal import read_records  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PTD_BENCH_", "PTD_GPU_", "PTD_TIER_"))}
    env.update(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    return env


# ----------------------------------------------------------------------------- the tier


def _sample(device="cpu"):
    """Each function once at the main shape (the backends and dtypes in turn), and each edge once."""
    cases = cuda_tier.cases(device)
    backends = sorted({c.backend for c in cases})
    picked, seen = [], set()
    for function_index, function in enumerate(cuda_tier.functions()):
        backend = backends[function_index % len(backends)]
        dtype = ("fp32", "bf16")[function_index // len(backends) % 2]
        picked += [c for c in cases if c.priority == 0 and (c.function, c.backend, c.dtype) == (function, backend,
                                                                                                 dtype)]
    for case in cases:
        if case.priority > 0 and (case.function, case.variant or case.shape) not in seen:
            seen.add((case.function, case.variant or case.shape))
            picked.append(case)
    return picked


@pytest.mark.slow
def test_tier_sample_passes_on_the_cpu():
    cases = _sample()
    assert {c.function for c in cases} == set(cuda_tier.functions())
    assert {c.backend for c in cases} == {c.backend for c in cuda_tier.cases("cpu")} == {"torch", "triton", "cublas"}
    failures = []
    for case in cases:
        record = cuda_tier.run_case(case, "cpu")
        if record["status"] != "ok":
            failures.append(f"{case.id}: {record['message']}")
    assert not failures, "\n".join(failures)


def test_tier_covers_every_public_function_backend_and_dtype():
    import ptd_kernels

    cases = cuda_tier.cases("cuda")
    public = {name for name in ptd_kernels.__all__ if callable(getattr(ptd_kernels, name))
              and (name.startswith("linear_") or name in cuda_tier.LOGITS_LEVEL)}
    assert public <= {c.function for c in cases}
    grid = {(c.function, c.backend, c.dtype) for c in cases if c.priority == 0}
    for function in public:
        for backend in ptd_kernels.backends_for("cuda"):
            for dtype in ("bf16", "fp32"):
                assert (function, backend, dtype) in grid
    assert [c.priority for c in cases] == sorted(c.priority for c in cases)


def _perturbed(monkeypatch, what):
    """linear_jsd with its value (or only its gradient) off by a relative 1e-3."""
    import ptd_kernels

    original = ptd_kernels.linear_jsd

    def wrong(hidden, *args, **kwargs):
        out = original(hidden, *args, **kwargs)
        if what == "value":
            return out + 1e-3 * (1 + out.detach().abs())
        return out + 1e-2 * (hidden - hidden.detach()).sum(1) * out.detach().abs().max()

    monkeypatch.setattr(ptd_kernels, "linear_jsd", wrong)


@pytest.mark.parametrize("what", ["value", "gradient"])
def test_tier_fails_a_wrong_function(monkeypatch, what):
    _perturbed(monkeypatch, what)
    case = cuda_tier.Case("linear_jsd", "torch", "fp32")
    record = cuda_tier.run_case(case, "cpu")
    assert record["status"] == "fail"
    assert ("output 0" if what == "value" else "∂hidden") in record["message"]


CUDA_CASES = cuda_tier.cases("cuda") if HAS_CUDA else []


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES or [pytest.param(None, marks=pytest.mark.skip(reason="needs a CUDA "
                                                                                             "device"))],
                         ids=[c.id for c in CUDA_CASES] or ["no-cuda"])
def test_tier_on_cuda(case):
    record = cuda_tier.run_case(case, "cuda")
    assert record["status"] == "ok", record["message"]


@pytest.mark.slow
def test_tier_workers_record_a_hang_and_a_crash_and_go_on(tmp_path):
    cases = [c.id for c in cuda_tier.cases("cpu") if c.priority == 0 and c.function in ("linear_logprobs", "jsd")
             and c.dtype == "fp32" and c.backend in ("torch", "triton")]
    assert len(cases) == 4
    hang, crash = "linear_logprobs-torch-fp32-main", "linear_logprobs-triton-fp32-main"
    for fault, bad, status in (("hang", hang, "timeout"), ("exit", crash, "crashed")):
        out = tmp_path / f"tier-{fault}.jsonl"
        run = subprocess.run([sys.executable, os.path.join(BENCH, "cuda_tier.py"), "--device", "cpu", "--workers", "2",
                              "--case-timeout-s", "10", "--budget-s", "120", "--out", str(out), "--only",
                              ",".join(cases)], env=_env(PTD_TIER_FAULT=f"{fault}:{bad}", TRITON_INTERPRET="1"),
                             capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stdout + run.stderr  # a rehearsed fault fails nothing...
        records = [r for r in read_records(str(out)) if "status" in r]
        by_case = {r["case"]: r["status"] for r in records}
        assert by_case == {c: (status if c == bad else "ok") for c in cases}  # ...but is recorded as it was
        assert [r["case"] for r in records if r.get("rehearsed")] == [bad]
        assert len(records) == len(cases)


# ----------------------------------------------------------------------------- the benchmark journal


@pytest.mark.slow
def test_bench_journal_survives_a_hang_a_broken_context_and_a_kill(tmp_path):
    """Four sessions on one journal: a row hangs (the watchdog records it, exit 75), a row breaks its CUDA
    context (recorded, exit 76), a row is running when ``timeout`` ends the session (recorded "stopped"),
    then the last row is timed; every session resumes after the rows already in the journal."""
    journal = tmp_path / "rows.jsonl"
    env = _env(PTD_BENCH_SHAPES="64,16,256", PTD_BENCH_SCALING="0", PTD_BENCH_JOURNAL=str(journal),
               PTD_BENCH_RESUME="1", PTD_BENCH_LABEL="cpu-test", PTD_BENCH_BUDGET_S="0")
    command = [sys.executable, "-m", "pytest", "bench/test_floor.py", "bench/test_topk.py::test_torch_topk",
               "--benchmark-only", "-q", "-p", "no:cacheprovider"]
    codes = []
    runs = (("hang:1gemm", []), ("cuda_error:3gemms", []), ("hang:4gemms", ["timeout", "20"]), ("", []))
    for fault, limit in runs:
        row_timeout = "8" if not limit else "60"  # the third session ends by `timeout`, before its watchdog
        run = subprocess.run(limit + command, cwd=ROOT, capture_output=True, text=True, timeout=180,
                             env=dict(env, PTD_BENCH_FAULT=fault, PTD_BENCH_ROW_TIMEOUT_S=row_timeout))
        codes.append(run.returncode)
        logs = run.stdout[-1500:] + run.stderr[-1500:]
    assert codes == [75, 76, 124, 0], logs
    records = read_records(str(journal))
    rows = {r["test"].split("[")[-1].rstrip("]"): r for r in records if r.get("record") == "row"}
    assert len([r for r in records if r.get("record") == "row"]) == len(rows) == 4  # every row once
    assert [r.get("record") for r in records].count("meta") == 4
    assert rows["N64-H16-V256-1gemm"]["status"] == "timeout"
    assert rows["N64-H16-V256-3gemms"]["status"] == "error"
    assert rows["N64-H16-V256-4gemms"]["status"] == "stopped"
    assert rows["N64-H16-V256"]["status"] == "ok" and rows["N64-H16-V256"]["median"] > 0  # torch.topk, timed

    import report_data

    assert report_data.journal_data(str(journal))["ptd"]["sessions_in_journal"] == 4
    rows, meta = report_data.load([str(journal)])
    assert {r["method"]: r["status"] for r in rows} == {"torch.topk on materialized logits": "ok"}
    assert sorted(s["reason"].split(":")[0] for s in meta["skipped"]) == ["error", "stopped", "timeout"]


# ----------------------------------------------------------------------------- the report


def _cuda_journal(path, model_shape=(8192, 4096, 151936)):
    """A journal as a CUDA run writes it (rows made up): two ptd backends, a peer, the floor."""
    n, h, v = model_shape
    shape = f"N={n},H={h},V={v}"
    meta = {"record": "meta", "label": "nvidia-h100-80gb-hbm3", "kind": "cuda", "device": "NVIDIA H100 80GB HBM3",
            "dtype": "bfloat16", "threads": 16, "cpus": 16, "backends": ["triton", "cublas"], "load_start": [0, 0, 0],
            "versions": {"torch": "2.11.0"}, "datetime": "2026-12-01T00:00:00",
            "ceilings": {"bf16_gemm_tflops": 780.0, "gemm": "8192³", "copy_gb_s": 3000.0, "copy": "1 GiB"}}
    common = dict(shape=shape, n=n, h=h, v=v, dtype="bfloat16", device="nvidia-h100-80gb-hbm3", suite="main",
                  status="ok")
    rows = [
        dict(op="floor", method="3 GEMMs (logits, d hidden, d weight)", ours=False, median=0.042, **common),
        dict(op="logprobs+entropy", method="ptd linear_logprobs (triton)", ours=True, floor="3 GEMMs (logits, d "
             "hidden, d weight)", median=0.200, peak_bytes=5 << 30, grad_bytes=3 << 30, model_op="linear_logprobs",
             model_path="triton", auto_backend="triton", entry_point="ptd linear_logprobs", **common),
        dict(op="logprobs+entropy", method="ptd linear_logprobs (cublas)", ours=True, floor="3 GEMMs (logits, d "
             "hidden, d weight)", median=0.060, peak_bytes=(3 << 30) + (1 << 29), grad_bytes=3 << 30,
             model_op="linear_logprobs", model_path="cublas", auto_backend="triton",
             entry_point="ptd linear_logprobs", **common),
        dict(op="logprobs+entropy", method="TRL ChunkedLogProbFunction (entropy)", ours=False, median=0.07,
             floor="3 GEMMs (logits, d hidden, d weight)", peak_bytes=5 << 30, grad_bytes=3 << 30,
             model_op="trl_chunked_logprob", model_path=None, **common),
    ]
    with open(path, "w") as f:
        f.write(json.dumps(meta) + "\n")
        for i, r in enumerate(rows):
            f.write(json.dumps({"record": "row", "test": f"bench/test_x.py::test_{i}", **r}) + "\n")
        f.write(json.dumps({"record": "end", "load_end": [0, 0, 0], "wall_s": 12.0}) + "\n")


def test_report_of_a_cuda_journal_puts_the_model_beside_the_measurement(tmp_path):
    import report

    journal = tmp_path / "nvidia-h100-80gb-hbm3.jsonl"
    _cuda_journal(journal)
    (tmp_path / "nvidia-h100-80gb-hbm3-tier.jsonl").write_text(json.dumps(dict(
        case="jsd-cublas-bf16-main", backend="cublas", status="fail", message="output 0: error 1e-3 > tol")) + "\n")
    report.main([str(journal), "--out-dir", str(tmp_path), "--json-out", str(tmp_path / "out.json"), "--no-plots",
                 "--model", os.path.join(BENCH, "results", "gpu_model.json")])
    text = (tmp_path / "nvidia-h100-80gb-hbm3.md").read_text()
    assert "| measured: median |" in text and "| model: predicted |" in text
    assert "ceilings, measured at the start of this run: bf16 GEMM 780.0 TFLOP/s" in text
    assert "ceilings the model assumes (H100 SXM)" in text
    # auto picked triton, cublas measured faster: said so
    auto = next(line for line in text.splitlines() if line.startswith("| logprobs+entropy | ptd linear_logprobs |"))
    assert "| triton |" in auto and "cublas (3.33× faster)" in auto and "slower: 3.33× of the faster" in auto
    assert "working memory ≤ 1 GiB (measured, every plain ptd row): 1 of 2 rows within" in text
    assert "| 56.0 ms (the 3 GEMMs floor row ÷ 3 × 4) | 1.07× | met |" in text  # cublas: 60 ms vs 4 × 14 ms
    assert "`jsd-cublas-bf16-main`: fail" in text
    data = json.loads((tmp_path / "out.json").read_text())
    assert len(data["benchmarks"]) == 4 and data["ptd"]["label"] == "nvidia-h100-80gb-hbm3"


def test_report_writes_its_markdown_without_matplotlib(tmp_path, monkeypatch):
    import report

    journal = tmp_path / "nvidia-h100-80gb-hbm3.jsonl"
    _cuda_journal(journal)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    report.main([str(journal), "--out-dir", str(tmp_path)])
    assert (tmp_path / "nvidia-h100-80gb-hbm3.md").exists()
    assert not list(tmp_path.glob("*.png"))


# ----------------------------------------------------------------------------- wheels


def _fake_wheel(folder, name, version, requires):
    stem = name.replace("-", "_")
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{stem}-{version}.dist-info/METADATA", "Metadata-Version: 2.1\nName: " + name + "\n"
                         + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return path


def test_wheel_check_names_what_is_missing_and_what_does_not_fit(tmp_path):
    lines, problems = gpu_env.check_wheels(str(tmp_path), "image")
    assert len(problems) == len(gpu_env.WHEELS) and "trl==1.16.0: no wheel" in " ".join(problems)
    for name, version in gpu_env.WHEELS:
        _fake_wheel(tmp_path, name, version, ["dill>=0.3", "transformers>=9.0", "numpy>=1.0",
                                              'colorama; platform_system == "Windows"', "nowhere-package"])
    lines, problems = gpu_env.check_wheels(str(tmp_path), "image")
    text = "\n".join(problems)
    assert "transformers>=9.0: 5.17.0 on the image" in text  # the image's version does not fit
    assert "nowhere-package: neither carried nor on the image" in text
    assert not any(f"needs {n}" in text for n in ("dill", "numpy", "colorama"))  # carried; fits; not Linux
    assert "pip download" in gpu_env.download_command() and "trl==1.16.0" in gpu_env.download_command()


# ----------------------------------------------------------------------------- the script's rehearsal


@pytest.mark.slow
def test_gpu_check_dry_rehearsal(tmp_path):
    """The script end to end on a CPU, its fast parts: the environment, a few tier cases, one training
    step, the floor rows of the benchmarks (one of which hangs: the watchdog records it and a fresh process
    resumes), the report; at most 8 files."""
    env = _env(OUT=str(tmp_path), PTD_GPU_PHASES="env tier train bench report", PTD_GPU_TIER_ARGS="--match linear_jsd-",
               PTD_GPU_BENCH_ARGS="bench/test_floor.py", PTD_BENCH_SHAPES="64,16,256", PTD_BENCH_FAULT="hang:3gemms",
               PTD_GPU_ROW_TIMEOUT_S="8", PTD_TIER_FAULT="", PYTHON=sys.executable)
    run = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files
    assert {"cpu-dry-check.log", "cpu-dry-env.json", "cpu-dry-tier.jsonl", "cpu-dry-train.jsonl", "cpu-dry.jsonl",
            "cpu-dry.json", "cpu-dry.md"} <= set(files), files
    assert "a row hung: recorded as a timeout" in log and "resuming in a fresh process" in log
    statuses = {r["status"] for r in read_records(str(tmp_path / "cpu-dry-tier.jsonl")) if "status" in r}
    assert statuses == {"ok"}
    env_data = json.loads((tmp_path / "cpu-dry-env.json").read_text())
    assert env_data["ceilings"]["bf16_gemm_tflops"] > 0
