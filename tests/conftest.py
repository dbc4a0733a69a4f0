"""Test set-up: kernels run where they run — compiled on CUDA tensors on a GPU host, under Triton's
interpreter on CPU tensors only where CUDA is absent.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before the
tests import ptd_kernels.

- ``device`` (fixture): the device of a test's tensors, from the backend registry (tests/_devices.py): the
  test's ``backend`` parameter or ``@pytest.mark.backend(name)`` names the backend; a test parametrized
  with ``device`` itself gets that value. Without a backend: the CPU.
- Markers: ``cuda`` (GPU-only rows, skipped without CUDA; every row parametrized with device "cuda" gets
  it), ``slow`` (what a quick local loop may skip: ``pytest -m "not slow"``), ``backend(name)``.
- A guard: with the interpreter off, a compiled Triton kernel launched on CPU tensors fails the test,
  naming the kernel (a test that made its tensors on the CPU instead of on ``device``).
- ``PTD_TEST_PRETEND_CUDA=1`` (with ``--collect-only`` only): collect as a CUDA host would — CUDA reported
  available, the interpreter off — and, with ``PTD_TEST_DEVICE_REPORT=path``, write each collected test's
  backend and device there (JSON lines). tests/kernels/test_devices.py reads it.
"""

import json
import os
import tempfile

import torch

PRETEND_CUDA = os.environ.get("PTD_TEST_PRETEND_CUDA", "0") not in ("", "0")
if PRETEND_CUDA:  # a CUDA host's view, for collection only (nothing can run: there is no GPU)
    torch.cuda.is_available = lambda: True
    os.environ.pop("TRITON_INTERPRET", None)
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the trainer's shared cache (warm starts) goes to a temporary folder, never the user's ~/.cache/ptd
os.environ["PTD_CACHE"] = tempfile.mkdtemp(prefix="ptd-test-cache-")

import pytest  # noqa: E402
from _devices import device_for  # noqa: E402

from ptd_kernels.backends.registry import interpreting  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_configure(config):
    if PRETEND_CUDA and not config.option.collectonly:
        raise pytest.UsageError("PTD_TEST_PRETEND_CUDA=1 pretends a GPU for collection only: add --collect-only")


def backend_of(item) -> str | None:
    """The backend a test exercises: its ``backend`` parameter, else its ``backend(name)`` marker."""
    params = getattr(item, "callspec", None)
    params = params.params if params is not None else {}
    if isinstance(params.get("backend"), str):
        return params["backend"]
    marker = item.get_closest_marker("backend")
    return marker.args[0] if marker is not None else None


def device_of(item) -> str | None:
    """The device a test's tensors are made on: its ``device`` parameter, else the registry's device for its
    backend (None: a test that does not take the ``device`` fixture)."""
    params = getattr(item, "callspec", None)
    if params is not None and isinstance(params.params.get("device"), str):
        return params.params["device"]
    if "device" not in getattr(item, "fixturenames", ()):
        return None
    backend = backend_of(item)
    return "cpu" if backend is None else device_for(backend)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if device_of(item) == "cuda":
            item.add_marker(pytest.mark.cuda)
        if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
    report = os.environ.get("PTD_TEST_DEVICE_REPORT")
    if report:
        with open(report, "w") as out:
            for item in items:
                params = item.callspec.params if hasattr(item, "callspec") else {}
                out.write(json.dumps({"nodeid": item.nodeid, "backend": backend_of(item), "device": device_of(item),
                                      "parametrized": isinstance(params.get("backend"), str),
                                      "cuda_host": HAS_CUDA, "interpreting": interpreting()}) + "\n")


@pytest.fixture
def device(request):
    """The device type of this test's tensors (see the module docstring)."""
    found = device_of(request.node)
    if found is None:
        pytest.skip(f"backend {backend_of(request.node)!r} runs on no device of this process")
    return found


def fail_on_cpu_launch(kernel_name: str, args, kwargs) -> None:
    """Fail the running test when a compiled kernel (interpreter off) gets a CPU tensor."""
    values = (*args, *kwargs.values())
    on_cpu = [i for i, a in enumerate(values) if isinstance(a, torch.Tensor) and a.device.type == "cpu"]
    if on_cpu:
        pytest.fail(f"Triton kernel {kernel_name} launched on CPU tensors (arguments {on_cpu}) with the interpreter "
                    "off: make the test's tensors on the `device` fixture (tests/_devices.py)", pytrace=False)


def install_launch_guard(monkeypatch) -> None:
    """Check every launch of a compiled Triton kernel (``JITFunction.run``) for CPU tensors, for the
    duration of ``monkeypatch``."""
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def checked_run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            fail_on_cpu_launch(getattr(self.fn, "__name__", "?"), args,
                               {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        return run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", checked_run)


@pytest.fixture(autouse=True)
def _kernels_launch_on_their_device(monkeypatch):
    """The guard of the module docstring: on a GPU host every compiled launch is checked."""
    if HAS_CUDA and not interpreting() and not PRETEND_CUDA:
        install_launch_guard(monkeypatch)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (milliseconds per op on a busy 2-core CPU).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3 checkpoint saved for the module (``_tiny_hf.save_tiny_qwen3``'s defaults): the student
    of the Hugging Face, TRL and trainer-on-TRL tests."""
    from _tiny_hf import save_tiny_qwen3

    return save_tiny_qwen3(tmp_path_factory.mktemp("qwen3"))
