"""The memory rule (docs/api.md), measured: no N×V tensor, nothing that grows with N·V.

``MemTracker`` (torch.distributed._tools, works on CPU) records the live tensor bytes of one
forward + backward call of the torch backend at N = 4096, H = 64, V = 32768, float32. The peak
counted here is what the call adds beyond its inputs (activations, temporaries and the input
gradients); the inputs themselves (hidden, weight, teacher_hidden, teacher_weight: 18 MiB) are
tracked as external and subtracted. The bound is N·V·4/8 = 64 MiB, an eighth of one float32
logits tensor; the reference, which materializes logits, must exceed a whole one (N·V·4 = 512 MiB)
so that the measurement is known to see such tensors.
"""

from __future__ import annotations

import pytest
import torch

import ptd_kernels as ptd
from ptd_kernels import reference as ref

N, H, V = 4096, 64, 32768

pytestmark = pytest.mark.slow  # peak-memory measurements of every function (minutes on a busy 2-core CPU)

LOGITS_BYTES = N * V * 4  # one float32 N×V tensor: 512 MiB
LIMIT = LOGITS_BYTES // 8  # 64 MiB
MiB = 1 << 20


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, H, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H**-0.5).requires_grad_()
    teacher_hidden = torch.randn(N, H, generator=g) * 0.5
    teacher_weight = torch.randn(V, H, generator=g) * H**-0.5
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, teacher_hidden, teacher_weight, targets


def peak_extra_bytes(fn, *inputs) -> tuple[int, int]:
    """(peak live bytes beyond ``inputs``, peak total) of ``fn()`` (forward and backward)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*inputs)
    with tracker:
        fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    total = sum(stats.get("Total", 0) for stats in snapshot.values())
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    return total - input_bytes, total


def fwd_bwd(loss_of):
    def run():
        out = loss_of()
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in outs).backward()
    return run


def measure(record_property, name, run, hidden, weight, *rest):
    extra, total = peak_extra_bytes(run, hidden, weight, *rest)
    record_property("peak_extra_bytes", extra)
    record_property("peak_total_bytes", total)
    print(f"\n{name}: peak beyond inputs {extra / MiB:.1f} MiB, total {total / MiB:.1f} MiB "
          f"(limit {LIMIT / MiB:.0f} MiB)")
    # the call really ran forward and backward: finite, non-zero gradients of both student inputs
    for t in (hidden, weight):
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()) and float(t.grad.abs().max()) > 0
    return extra


def test_linear_logprobs_with_entropy(inputs, record_property):
    hidden, weight, teacher_hidden, teacher_weight, targets = inputs
    run = fwd_bwd(lambda: ptd.linear_logprobs(hidden, weight, targets, with_entropy=True, backend="torch"))
    extra = measure(record_property, "linear_logprobs(with_entropy)", run, hidden, weight, targets)
    assert extra < LIMIT, f"{extra / MiB:.1f} MiB ≥ {LIMIT / MiB:.0f} MiB"


def test_linear_topk_jsd_union_tail(inputs, record_property):
    hidden, weight, teacher_hidden, teacher_weight, _ = inputs
    run = fwd_bwd(lambda: ptd.linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, 64, support="union",
                                              tail=True, backend="torch"))
    extra = measure(record_property, "linear_topk_jsd(K=64, union, tail)", run, hidden, weight, teacher_hidden,
                    teacher_weight)
    assert extra < LIMIT, f"{extra / MiB:.1f} MiB ≥ {LIMIT / MiB:.0f} MiB"


def test_linear_jsd(inputs, record_property):
    hidden, weight, teacher_hidden, teacher_weight, _ = inputs
    run = fwd_bwd(lambda: ptd.linear_jsd(hidden, weight, teacher_hidden, teacher_weight, backend="torch"))
    extra = measure(record_property, "linear_jsd", run, hidden, weight, teacher_hidden, teacher_weight)
    assert extra < LIMIT, f"{extra / MiB:.1f} MiB ≥ {LIMIT / MiB:.0f} MiB"


@pytest.mark.parametrize("k", [None, 64])
def test_linear_jsd_loss(inputs, record_property, k):
    """The one-sweep loss trades a larger constant block (``LOSS_BLOCK_BYTES``, both sides' full rows: its
    GEMMs need ~300 rows per block to run at full speed) for a GEMM fewer; it must stay within that block,
    the input gradients and a little slack, far below one N×V tensor, and must not grow with N (bench
    scaling sweep)."""
    from ptd_kernels import config

    hidden, weight, teacher_hidden, teacher_weight, _ = inputs
    if k is None:
        run = fwd_bwd(lambda: ptd.linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, backend="torch"))
    else:
        run = fwd_bwd(lambda: ptd.linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, k,
                                                       backend="torch"))
    extra = measure(record_property, f"linear_{'' if k is None else 'topk_'}jsd_loss", run, hidden, weight,
                    teacher_hidden, teacher_weight)
    grads = (N + V) * H * 4
    limit = config.LOSS_BLOCK_BYTES + grads + 8 * MiB
    assert extra < min(limit, LOGITS_BYTES // 4), f"{extra / MiB:.1f} MiB ≥ {limit / MiB:.0f} MiB"


def test_reference_materializes_logits(inputs, record_property):
    """Contrast: the oracle's fwd+bwd holds at least one float32 N×V tensor, and MemTracker sees it."""
    hidden, weight, _, _, targets = inputs
    run = fwd_bwd(lambda: ref.linear_logprobs(hidden, weight, targets, with_entropy=True))
    extra = measure(record_property, "reference linear_logprobs(with_entropy)", run, hidden, weight, targets)
    assert extra > LOGITS_BYTES, f"{extra / MiB:.1f} MiB ≤ {LOGITS_BYTES / MiB:.0f} MiB"


@pytest.mark.parametrize("name", ["logprobs", "jsd", "topk_jsd"])
def test_logits_level_with_masked_rows_allocates_only_the_gradient(name, record_property):
    """On given logits the only N×V allocation is the gradient, even with masked rows (which must not be
    copied out: no index_select of the logits, no second N×V buffer in backward). Bounded row blocks
    (``ptd_kernels.config.CHUNK_BYTES`` of temporaries) come on top of the gradient."""
    n, v = 4096, 8192
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=g).requires_grad_()
    teacher_logits = torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = -100
    mask = targets != -100
    calls = {
        "logprobs": lambda: ptd.logprobs(logits, targets, with_entropy=True),
        "jsd": lambda: ptd.jsd(logits, teacher_logits, mask=mask),
        "topk_jsd": lambda: ptd.topk_jsd(logits, teacher_logits, 16, mask=mask),
    }
    extra, _ = peak_extra_bytes(fwd_bwd(calls[name]), logits, teacher_logits)
    record_property("peak_extra_MiB", round(extra / MiB, 1))
    gradient = n * v * 4
    assert extra < gradient + gradient // 2, f"{extra / MiB:.1f} MiB vs a {gradient / MiB:.0f} MiB gradient"
