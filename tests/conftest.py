"""Test set-up: Triton kernels run under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before the tests import ptd_kernels.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the trainer's shared cache (warm starts) goes to a temporary folder, never the user's ~/.cache/ptd
os.environ["PTD_CACHE"] = tempfile.mkdtemp(prefix="ptd-test-cache-")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


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
