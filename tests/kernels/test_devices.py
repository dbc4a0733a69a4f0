"""Tests run where the kernels run: the device of every kernel test comes from the backend registry, so that
on a CUDA host (interpreter off) no Triton or cuBLAS test makes CPU tensors, shown here without a GPU by
collecting the suite as a CUDA host would, and by the guard that fails a compiled launch on CPU tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from _devices import backend_device_params, backend_devices, backend_params, device_for, kernel_backends, tiles
from conftest import fail_on_cpu_launch, install_launch_guard

import ptd_kernels as ptd
from ptd_kernels.backends import registry

TESTS = Path(__file__).resolve().parent.parent


def _collect(tmp_path, pretend_cuda: bool) -> list[dict]:
    """``pytest --collect-only`` of the whole suite in a subprocess; each test's backend and device."""
    report = tmp_path / f"devices-{int(pretend_cuda)}.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PTD_TEST_PRETEND_CUDA")}
    env.update(PTD_TEST_DEVICE_REPORT=str(report), PTD_TEST_PRETEND_CUDA="1" if pretend_cuda else "0")
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(TESTS)], cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in report.read_text().splitlines()]


@pytest.mark.slow
def test_a_cuda_host_runs_every_kernel_test_on_cuda_tensors(tmp_path):
    """Collected as a CUDA host would (CUDA available, the interpreter off): every test of a backend without
    a native CPU path (Triton, cuBLAS) that makes tensors gets device "cuda", every registry-parametrized
    one makes them on the device fixture, and no kernel test is lost against this machine's collection."""
    kernels = set(kernel_backends())
    assert {"triton", "cublas"} <= kernels
    here = _collect(tmp_path, pretend_cuda=False)
    there = _collect(tmp_path, pretend_cuda=True)
    assert all(item["cuda_host"] and not item["interpreting"] for item in there)

    def kernel_items(items):
        return [item for item in items if item["backend"] in kernels]

    on_cuda_host = kernel_items(there)
    wrong = [f"{item['nodeid']} → {item['device']}" for item in on_cuda_host if item["device"] not in ("cuda", None)]
    assert not wrong, "kernel tests on a non-CUDA device on a CUDA host:\n" + "\n".join(wrong[:20])
    # a test parametrized with a kernel backend exercises it: it must take the device fixture
    unplaced = [item["nodeid"] for item in on_cuda_host if item["device"] is None and item["parametrized"]]
    assert not unplaced, "kernel-backend tests that ignore the device fixture:\n" + "\n".join(unplaced[:20])
    placed = [item for item in on_cuda_host if item["device"] == "cuda"]
    assert len(placed) >= 300, len(placed)  # the conformance suite, the kernel files, the public-function files
    for name in kernels:
        assert len([i for i in kernel_items(here) if i["backend"] == name]) == len(
            [i for i in on_cuda_host if i["backend"] == name]), f"{name}: tests lost on a CUDA host"
    assert all(item["device"] in ("cpu", None) for item in kernel_items(here)), "this host has no GPU"


def test_devices_follow_the_registry(monkeypatch):
    """On a CUDA host with the interpreter off: Triton and cuBLAS on CUDA only, the torch path on both (the
    CPU first for its own tests); without CUDA, the kernel backends on the CPU under the interpreter."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend_devices("triton") == ("cuda",) and device_for("triton") == "cuda"
    assert backend_devices("cublas") == ("cuda",) and device_for("cublas") == "cuda"
    assert backend_devices("torch") == ("cpu", "cuda") and device_for("torch") == "cpu"
    pairs = [tuple(param.values) for param in backend_device_params()]
    assert ("triton", "cuda") in pairs and ("torch", "cuda") in pairs and ("triton", "cpu") not in pairs
    assert tiles(block_n=4, block_v=32, block_h=8, num_segments=3) == dict(block_n=16, block_v=32, block_h=16,
                                                                           num_segments=3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert device_for("triton") == "cpu" and ("triton", "cpu") in [tuple(p.values) for p in backend_device_params()]
    assert tiles(block_n=4) == dict(block_n=4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert device_for("triton") is None and "triton" not in [p.values[0] for p in backend_params()]


def test_a_new_backend_is_parametrized_where_it_runs(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    ptd.register_backend("elsewhere", "ptd_kernels.backends.torch:TorchBackend", devices=("cuda",))
    assert "elsewhere" not in [p.values[0] for p in backend_device_params()]  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ("elsewhere", "cuda") in [tuple(p.values) for p in backend_device_params()]
    assert "elsewhere" in kernel_backends()


@triton.jit
def _copy_kernel(source, target, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(target + offsets, tl.load(source + offsets))


def test_the_guard_fails_a_compiled_launch_on_cpu_tensors(monkeypatch):
    """What conftest installs on a GPU host: a compiled (not interpreted) kernel launched with a CPU tensor
    fails the test, naming the kernel, before anything reaches the driver."""
    with pytest.raises(pytest.fail.Exception, match="_copy_kernel launched on CPU tensors"):
        fail_on_cpu_launch("_copy_kernel", (torch.zeros(4),), {})
    fail_on_cpu_launch("_copy_kernel", (torch.zeros(4, device="meta"), 3), {"BLOCK": 4})  # no CPU tensor
    install_launch_guard(monkeypatch)
    compiled = triton.runtime.jit.JITFunction(_copy_kernel.fn)  # the GPU host's kind of kernel object
    with pytest.raises(pytest.fail.Exception, match="launched on CPU tensors"):
        compiled[(1,)](torch.zeros(4), torch.empty(4), BLOCK=4)


@pytest.mark.cuda
def test_rows_marked_cuda_run_only_with_a_gpu():
    assert torch.cuda.is_available()
