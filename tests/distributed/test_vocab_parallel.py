"""Vocabulary-parallel output layers (``process_group=``, docs/distributed.md): 2 and 3 gloo processes on CPU, each
holding an uneven slice of V = 37, against the single-process results — values on every rank,
the full d hidden on every rank, d weight / d bias of each rank's slice — for every fused function,
all three supports, tail on and off, β ∈ {0, 0.5, 1}, K ≥ V, a sparse teacher, the loss functions,
soft-capping, masked rows, a tie straddling a slice boundary, and the DTensor form; on the torch
backend and (world 2) the Triton kernels under the interpreter. Also: clear errors on every rank for
rows that differ by rank (an FSDP2 shard passed as a slice), communication that does not grow with V,
and per-rank memory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from _devices import backend_devices
from _vocab_parallel_worker import SPLITS, K, V, cases, problem, run_case

pytestmark = pytest.mark.slow  # 2 and 3 gloo processes per case

HERE = os.path.abspath(os.path.join(__file__, "..", ".."))  # tests/: the shared helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The gloo workers hold CPU tensors: the Triton backend joins them only where it runs on the CPU (under the
# interpreter), never with CPU tensors on a CUDA host.
WORLD2_BACKENDS = ("torch",) + tuple(name for name in ("triton",) if "cpu" in backend_devices(name))


def _launch(world: int, out_dir, backends: str) -> list[dict]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_vocab_parallel_worker.py"), str(rank),
                               str(world), str(port), str(out_dir), backends], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode:
            errors.append(err[-3000:])
    assert not errors, "\n".join(errors)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world_results(request, tmp_path_factory):
    world = request.param
    backends = ",".join(WORLD2_BACKENDS if world == 2 else ("torch",))
    return world, _launch(world, tmp_path_factory.mktemp(f"vp{world}"), backends)


def _single_process(backend):
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, mask = problem()
    layers = dict(hidden=hidden, weight=weight, bias=bias, teacher_hidden=teacher_hidden,
                  teacher_weight=teacher_weight, teacher_bias=teacher_bias, targets=targets, mask=mask)
    return {name: run_case(fn, layers, None) for name, fn in cases(backend).items()}


def _close(actual, expected, what):
    if expected is None:
        assert actual is None, what
        return
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=what)


def test_every_function_equals_the_single_process_result(world_results):
    world, ranks = world_results
    sizes = SPLITS[world]
    for backend in WORLD2_BACKENDS if world == 2 else ("torch",):
        single = _single_process(backend)
        for name, (outs, grads) in single.items():
            for rank, results in enumerate(ranks):
                what = f"world {world}, {backend}, {name}, rank {rank}"
                got_outs, got_grads = results[(backend, name)]
                assert len(got_outs) == len(outs), what
                for i, (o, e) in enumerate(zip(got_outs, outs)):
                    _close(o, e, f"{what}: output {i}")
                _close(got_grads[0], grads[0], f"{what}: d hidden")
            for i, which in ((1, "d weight"), (2, "d bias")):
                if grads[i] is None:
                    assert all(r[(backend, name)][1][i] is None for r in ranks)
                    continue
                slices = [r[(backend, name)][1][i] for r in ranks]
                assert [s.shape[0] for s in slices] == list(sizes)
                _close(torch.cat(slices), grads[i], f"world {world}, {backend}, {name}: {which} slices")


def test_the_tie_across_the_slice_boundary_goes_to_the_smaller_id(world_results):
    world, ranks = world_results
    boundary = SPLITS[world][0]
    assert boundary in (10, 15)  # ids 9 | 10 and 14 | 15 straddle it
    for rank, results in enumerate(ranks):
        indices = results[("torch", "topk")][0][0]
        assert indices[:, :4].tolist() == [[9, 10, 14, 15]] * indices.shape[0], (rank, indices)


def test_dtensor_weight_gives_dtensor_gradients(world_results):
    world, ranks = world_results
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, _ = problem()
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    import ptd_kernels as ptd

    terms = ptd.linear_ptd_terms(h, w, targets, teacher_hidden, teacher_weight, K, bias=b, teacher_bias=teacher_bias,
                                 temperature=0.8, backend="torch")
    (terms.logp.sum() + terms.jsd.sum() + 0.5 * terms.entropy.sum()).backward()
    for results in ranks:
        got = results["dtensor"]
        assert got["weight_grad_placements"] == "(Shard(dim=0),)"
        for key, want in (("logp", terms.logp), ("jsd", terms.jsd), ("entropy", terms.entropy),
                          ("hidden_grad", h.grad), ("weight_grad", w.grad), ("bias_grad", b.grad)):
            _close(got[key], want.detach(), f"world {world} DTensor {key}")


def test_rows_that_differ_by_rank_are_a_clear_error_on_every_rank(world_results):
    world, ranks = world_results
    for results in ranks:
        messages = results["errors"]
        assert "hidden differs across the ranks" in messages["hidden"]
        assert "targets differs across the ranks" in messages["targets"]
        assert "FSDP2" in messages["fsdp"] and "forward of the module that owns the weight" in messages["fsdp"]


def test_communication_does_not_grow_with_the_vocabulary(world_results):
    world, ranks = world_results
    for results in ranks:
        sent = results["bytes"]
        for name in ("logprobs", "jsd_beta0", "topk_jsd_union_True_0.5", "topk", "sparse_jsd"):
            assert sent[(name, V)] == sent[(name, 2 * V)] > 0, (name, sent)


def test_memory_per_rank_is_the_single_process_bound_for_the_slice(world_results):
    """Per rank: at most the single-process peak for a V/world output layer plus O(N·K·world) (the
    gathered top-K candidates: ids and logits, a few copies)."""
    world, ranks = world_results
    for results in ranks:
        m = results["memory"]
        allowance = 4 * m["rows"] * m["k"] * world * 16 + (64 << 10)
        assert m["vocab_parallel"] <= m["one_process"] + allowance, m


# What each agreement case must name: the argument (or what failed), on every rank.
AGREEMENT = {
    "beta": "beta", "temperature": "temperature", "softcap": "softcap", "logit_scale": "logit_scale",
    "teacher_logit_scale": "teacher_logit_scale", "teacher_softcap": "teacher_softcap", "support": "support",
    "k": "k differs", "k_topk": "k differs", "tail": "tail", "ignore_index": "ignore_index",
    "with_entropy": "with_entropy", "backend": "backend", "mask_presence": "mask", "mask_values": "mask differs",
    "jsd_mask": "jsd_mask", "weights": "weights differs", "targets": "targets differs",
    "teacher_hidden": "teacher_hidden differs", "teacher_indices": "teacher_indices differs",
    "teacher_logprobs": "teacher_logprobs differs", "hidden_dtype": "dtype of hidden",
    "function": "different functions", "module_k": "k differs", "module_beta": "beta",
}
LOCAL_FAILURES = {"local_dtype": ("TypeError", "hidden"), "local_temperature": ("ValueError", "temperature"),
                  "local_bias": ("ValueError", "bias")}


def test_ranks_that_disagree_all_raise_an_error_naming_the_argument(world_results):
    """The last rank passes one argument unlike the others: every rank raises (no hang, no abort in the
    collective library, no silently wrong value), naming the argument and the ranks on each side."""
    world, ranks = world_results
    last = world - 1
    for name, needle in AGREEMENT.items():
        for rank, results in enumerate(ranks):
            kind, message = results["agreement"][name]
            assert kind == "ValueError" and needle in message, (world, rank, name, kind, message)
            if name != "function":
                assert "differs across the ranks" in message, (name, message)
                others = "rank 0" if world == 2 else "ranks 0, 1"
                assert f"rank {last}" in message and others in message, (world, rank, name, message)
    # numbers are shown by value: "ranks 0, 1: 0.5; rank 2: 0.1"
    beta = ranks[0]["agreement"]["beta"][1]
    assert f"{'rank 0' if world == 2 else 'ranks 0, 1'}: 0.5; rank {last}: 0.1" in beta, beta


def test_a_rank_whose_own_checks_fail_takes_every_rank_with_it(world_results):
    """A rank whose own arguments are wrong raises its own error; every other rank raises the same type,
    naming that rank and quoting its message."""
    world, ranks = world_results
    last = world - 1
    for name, (kind, needle) in LOCAL_FAILURES.items():
        for rank, results in enumerate(ranks):
            got_kind, message = results["agreement"][name]
            assert got_kind == kind and needle in message, (world, rank, name, got_kind, message)
            if rank != last:
                assert f"rank {last} of the process group failed" in message, (name, message)


def test_an_agreed_mistake_is_the_same_error_everywhere_and_the_group_still_works(world_results):
    world, ranks = world_results
    hidden, weight, bias, *_, targets, _ = problem()
    import ptd_kernels as ptd

    want = ptd.linear_logprobs(hidden, weight, targets, bias=bias, backend="torch")
    for results in ranks:
        kind, message = results["agreement"]["targets_out_of_range"]
        assert kind == "ValueError" and f"targets must lie in [0, {V})" in message, message
        _close(results["after_errors"], want, "a call after the errors")


def test_the_fingerprint_tells_apart_what_ranks_get_wrong_without_copying_the_hidden_states():
    """Equal tensors give equal fingerprints; rows of another batch, another order, shifted or scaled rows
    and another dtype do not; a [N, H] fingerprint allocates O(N), not a copy of the tensor."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from ptd_kernels.backends.vocab_parallel_setup import fingerprint

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(512, 256, generator=g).to(dtype)
        same = fingerprint(x.clone())
        assert torch.equal(fingerprint(x), same), dtype
        row = torch.arange(512)[:, None]
        changed = {"another batch": torch.randn(512, 256, generator=g), "rows swapped": x[[1, 0, *range(2, 512)]],
                   "a row shifted": x + (row == 7), "a row scaled": x * (1 + (row == 9)),
                   "a column shifted": x + (torch.arange(256) == 5)}
        for what, other in changed.items():
            assert not torch.equal(fingerprint(other.to(dtype)), same), (dtype, what)
    x = torch.randn(4096, 512, generator=g)
    tracker = MemTracker()
    tracker.track_external(x)
    with tracker:
        fingerprint(x)
    peak = sum(stats.get("Total", 0) for stats in tracker.get_tracker_snapshot("peak").values()) - x.numel() * 4
    assert peak < x.numel() * 4 // 32, peak  # a float64 copy would be 2× the tensor
