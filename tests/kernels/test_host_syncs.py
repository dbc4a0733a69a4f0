"""Host synchronizations per call (``bench/host_syncs.py``): the counter sees what it claims to, and every
public function makes at most one on the default path, none on the sync-free path
(``ptd_kernels.config.SYNC_FREE``) and one on the vocabulary-parallel path, forward and backward together,
on every backend; none of them inside a kernel launcher (``backends/triton/``, ``backends/cublas/``)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import ptd_kernels as ptd

# slow: counts the syncs of every public function on every backend
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

_PATH = os.path.join(os.path.abspath(os.path.join(__file__, "..", "..", "..")), "bench", "host_syncs.py")
_spec = importlib.util.spec_from_file_location("host_syncs", _PATH)
host_syncs = importlib.util.module_from_spec(_spec)
sys.modules["host_syncs"] = host_syncs  # its dataclasses look their module up
_spec.loader.exec_module(host_syncs)


class _Reads(torch.autograd.Function):
    """Forward and backward each make every kind of sync the counter claims to see."""

    @staticmethod
    def forward(ctx, x):
        _every_kind_of_sync(x)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        _every_kind_of_sync(grad)
        return grad * 2


def _every_kind_of_sync(x):
    bool(x.sum() > 0)
    x.nonzero()
    x[x > 0]
    x.tolist()
    torch.tensor([1.0, 2.0], device=x.device)


def test_the_counter_sees_every_kind_it_claims_forward_and_backward():
    counter = host_syncs.HostSyncCounter()
    x = torch.randn(5, requires_grad=True)
    with counter.active():
        with counter.phase("forward"):
            y = _Reads.apply(x).sum()
            torch.full((3,), 1.0).mul_(2).argsort()  # no sync: factories, math and sorts
        with counter.phase("backward"):
            y.backward()
    for phase in ("forward", "backward"):
        kinds = sorted(s.what for s in counter.phases[phase].syncs)
        assert kinds == ["Tensor.tolist", "aten._local_scalar_dense", "aten.index (boolean mask)", "aten.nonzero",
                         "torch.tensor(host data, device=...)"], (phase, kinds)
        assert all(s.where == "outside ptd_kernels" for s in counter.phases[phase].syncs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_launch_scalars_reach_the_device_without_a_copy_and_unrounded(dtype):
    """The Triton launchers' per-call numbers (β, log β, the logit transform's s/τ, s/c, c/τ) are filled on
    the device, not copied from host memory: no sync, and each value as ``torch.tensor`` would round it
    (exactly, in float64)."""
    from ptd_kernels.backends.triton import _launch

    values = [0.5, -0.6931471805599453, 1.0 / 3.0, 0.7 / 30.0, 30.0 / 0.7, 1e-300 if dtype == torch.float64 else 0.1]
    counter = host_syncs.HostSyncCounter()
    with counter.active(), counter.phase("forward"):
        got = _launch.device_scalars(values, dtype, "cpu")
    assert not len(counter.phases["forward"]), counter.phases["forward"].summary()
    assert got.dtype == dtype and torch.equal(got, torch.tensor(values, dtype=dtype))


@pytest.fixture(scope="module")
def rows():
    return host_syncs.measure(ptd.backends_for("cpu"))  # every registered backend that runs here


def test_at_most_one_sync_per_call_and_none_on_the_sync_free_path(rows):
    assert {r["backend"] for r in rows} >= {"torch"}
    assert len({r["function"] for r in rows}) == 14  # every public function (10 fused, 4 on logits)
    budget = {"default": 1, "sync-free": 0, "vocabulary-parallel": 1}
    for row in rows:
        own = sum(len(row[phase]) - host_syncs.in_launchers(row[phase]) for phase in ("forward", "backward"))
        assert own <= budget[row["path"]], (row["function"], row["backend"], row["path"],
                                            row["forward"].summary(), row["backward"].summary())
        assert not len(row["backward"]) - host_syncs.in_launchers(row["backward"]), row["backward"].summary()
        # no kernel launcher reads the device or copies host data to it (Triton and cuBLAS alike)
        assert not host_syncs.in_launchers(row["forward"]) + host_syncs.in_launchers(row["backward"]), (
            row["function"], row["backend"], row["path"], row["forward"].summary(), row["backward"].summary())
    # the default path does read, once, where the call has ids or masks (every call of the problem has)
    assert all(len(r["forward"]) - host_syncs.in_launchers(r["forward"]) == 1 for r in rows
               if r["path"] != "sync-free")


# the fused functions with a mask (on given logits, the caller's own matmul would carry a NaN row into d weight)
_MASKED = ("linear_topk_jsd", "linear_sparse_jsd", "linear_jsd", "linear_ptd_terms", "linear_jsd_loss",
           "linear_topk_jsd_loss", "linear_policy_loss", "linear_logprobs_at")


def _run_all(p, sync_free):
    saved = ptd.config.SYNC_FREE
    ptd.config.SYNC_FREE = sync_free
    try:
        out = {}
        for name, fn in host_syncs.calls(p, "torch").items():
            hidden, weight = p.hidden.clone().requires_grad_(), p.weight.clone().requires_grad_()
            loss, outs = fn(hidden, weight)
            if loss is not None:
                loss.backward()
            out[name] = (list(outs), hidden.grad, weight.grad)
        return out
    finally:
        ptd.config.SYNC_FREE = saved


def test_the_sync_free_path_gives_the_default_results():
    """Same values and gradients with masked rows stripped (default) and computed then zeroed (sync-free);
    a NaN in a masked row's hidden state reaches no output and no gradient on either path."""
    finite = host_syncs.problem()
    poisoned = host_syncs.problem()
    poisoned.hidden[3] = float("nan")  # row 3: mask False
    for p, names in ((finite, None), (poisoned, _MASKED)):
        default, free = _run_all(p, False), _run_all(p, True)
        for name, (outs, hidden_grad, weight_grad) in default.items():
            if names is not None and name not in names:
                continue
            got_outs, got_hidden, got_weight = free[name]
            for want, got in zip(outs, got_outs):
                if isinstance(want, torch.Tensor) and want.is_floating_point():
                    assert bool(torch.isfinite(want).all()), name
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
                elif isinstance(want, torch.Tensor):
                    assert torch.equal(got, want), name
            for want, got in ((hidden_grad, got_hidden), (weight_grad, got_weight)):
                if want is not None:
                    assert bool(torch.isfinite(want).all()) and bool(torch.isfinite(got).all()), name
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
