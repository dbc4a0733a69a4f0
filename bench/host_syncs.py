"""Host synchronizations of every public ptd_kernels function, counted on a CPU.

On a GPU, an op that reads device values on the host (``t.item()``, ``bool(t)``, ``t.tolist()``,
``nonzero``, a boolean-mask index, a copy from pageable host memory) waits for every kernel queued
before it. ``HostSyncCounter`` counts, per call, the ops that would do so if the tensors lived on a GPU:

- at the ATen level (a ``TorchDispatchMode``): ``_local_scalar_dense`` (``item``, ``bool``, ``int``,
  ``float`` of a tensor), ``nonzero``, ``masked_select``, ``unique*``, ``bincount``, ``equal``,
  ``allclose``, ``index``/``index_put`` with a boolean mask, ``repeat_interleave`` without an output size;
- at the Python level (patched while counting; on a CPU these make no ATen call): ``Tensor.tolist``,
  ``Tensor.cpu``, ``Tensor.numpy``, and ``torch.tensor``/``torch.as_tensor`` of host data with a
  ``device=`` (a copy from pageable memory, which synchronizes the stream).

It makes ptd take the branches a GPU takes (``ptd_kernels._host_reads.AS_ON_A_DEVICE``), and it does not
count inside Triton's interpreter (a kernel launch does not wait on a GPU). Each count keeps where it
happened (the innermost ptd_kernels frame). What it cannot see: a copy between two devices made by
``Tensor.to(device)`` (on a CPU every tensor is on one device); ptd makes none on its call paths.

``python bench/host_syncs.py`` writes ``docs/host_syncs.md``: every public function × (default path,
sync-free path, vocabulary-parallel path on one rank) × (forward, backward), on both backends.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import types
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ATEN_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "unique_dim_consecutive", "bincount", "equal", "allclose"}
_PYTHON_READS = {"tolist", "cpu", "numpy"}
_FACTORIES = {"tensor", "as_tensor"}


@dataclass
class Sync:
    what: str  # the op
    where: str  # the innermost ptd_kernels frame, "file.py:line"


@dataclass
class Counts:
    """The syncs of one phase of one call."""

    syncs: list[Sync] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.syncs)

    def summary(self) -> str:
        counts = Counter(f"{s.what} at {s.where}" for s in self.syncs)
        return "; ".join(f"{n}× {key}" if n > 1 else key for key, n in counts.items())


def _where() -> str:
    import ptd_kernels

    package = os.path.dirname(ptd_kernels.__file__)
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(package + os.sep):
            return f"{os.path.relpath(frame.filename, os.path.dirname(package))}:{frame.lineno}"
    return "outside ptd_kernels"


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _ATEN_SYNCS:
            self.counter.add(f"aten.{name}")
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and _bool_index(args[1]):
            self.counter.add(f"aten.{name} (boolean mask)")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) \
                and len(args) < 3 and "repeats" not in kwargs and args[0].dtype == torch.int64:
            self.counter.add("aten.repeat_interleave (no output_size)")
        return func(*args, **kwargs)


def _counting(counter, name: str, real, host_data: bool = False):
    """``real`` (a Tensor method or a factory) counting its calls (factories: of host data with a device)."""

    def wrapper(*args, **kwargs):
        if not host_data:
            counter.add(f"Tensor.{name}")
        elif kwargs.get("device") is not None and args and not isinstance(args[0], torch.Tensor):
            counter.add(f"torch.{name}(host data, device=...)")
        return real(*args, **kwargs)

    return wrapper


class HostSyncCounter:
    """Counts host syncs (see the module docstring) while active; ``phase(name)`` opens a new count."""

    def __init__(self):
        self.phases: dict[str, Counts] = {}
        self.current: Counts | None = None
        self.paused = 0
        self.launches = 0

    def add(self, what: str) -> None:
        if self.current is not None and not self.paused:
            self.current.syncs.append(Sync(what, _where()))

    @contextlib.contextmanager
    def phase(self, name: str):
        self.current = self.phases.setdefault(name, Counts())
        try:
            yield self.current
        finally:
            self.current = None

    @contextlib.contextmanager
    def active(self):
        try:
            from ptd_kernels import _host_reads
        except ImportError:  # a ptd_kernels from before the switch (counting an older tree)
            _host_reads = types.SimpleNamespace(AS_ON_A_DEVICE=False)
        patches = []
        try:
            from triton.runtime import interpreter

            run_kernel = interpreter.GridExecutor.__call__
            counter = self

            def launch(executor, *args, **kwargs):  # a kernel launch: its host side is not the library's
                counter.launches += 1
                counter.paused += 1
                try:
                    return run_kernel(executor, *args, **kwargs)
                finally:
                    counter.paused -= 1

            interpreter.GridExecutor.__call__ = launch
            patches.append((interpreter.GridExecutor, "__call__", run_kernel))
        except ImportError:  # no Triton: nothing to pause
            pass
        # Python-level reads make no ATen call on a CPU; patched rather than seen by a TorchFunctionMode,
        # which autograd does not carry into backward.
        for owner, names in ((torch.Tensor, _PYTHON_READS), (torch, _FACTORIES)):
            for name in names:
                original = getattr(owner, name)
                setattr(owner, name, _counting(self, name, original, host_data=owner is torch))
                patches.append((owner, name, original))
        saved = _host_reads.AS_ON_A_DEVICE
        _host_reads.AS_ON_A_DEVICE = True
        try:
            with _Dispatch(self):
                yield self
        finally:
            _host_reads.AS_ON_A_DEVICE = saved
            for owner, name, value in patches:
                setattr(owner, name, value)


# ----------------------------------------------------------------------------- the public functions


@dataclass
class Problem:
    hidden: torch.Tensor
    weight: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    jsd_mask: torch.Tensor
    k: int


def problem(n=12, h=16, v=300, k=6, seed=0) -> Problem:
    """A small student/teacher problem with an ignored target and masked rows (so that rows are stripped)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[1] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[3] = False
    jsd_mask = torch.ones(n, dtype=torch.bool)
    jsd_mask[5] = False
    return Problem(torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / 4, torch.randn(n, h, generator=g),
                   torch.randn(v, h, generator=g) / 4, targets, mask, jsd_mask, k)


def calls(p: Problem, backend: str, process_group=None):
    """name → fn(hidden, weight) returning a differentiable scalar (None: no gradient) and the output."""
    import ptd_kernels as ptd

    fused = dict(backend=backend, process_group=process_group)
    pair = (p.teacher_hidden, p.teacher_weight)
    out = {
        "linear_logprobs (with_entropy)": lambda h, w: _sum(ptd.linear_logprobs(h, w, p.targets, with_entropy=True,
                                                                                **fused)),
        "linear_topk (with targets)": lambda h, w: (None, ptd.linear_topk(h, w, p.k, targets=p.targets, **fused)),
        "linear_topk_jsd": lambda h, w: _sum(ptd.linear_topk_jsd(h, w, *pair, p.k, mask=p.mask, **fused)),
        "linear_sparse_jsd": lambda h, w: _sum(ptd.linear_sparse_jsd(
            h, w, *_sparse_teacher(p), mask=p.mask, **fused)),
        "linear_jsd": lambda h, w: _sum(ptd.linear_jsd(h, w, *pair, mask=p.mask, **fused)),
        "linear_ptd_terms": lambda h, w: _sum(ptd.linear_ptd_terms(h, w, p.targets, *pair, p.k, mask=p.mask,
                                                                   jsd_mask=p.jsd_mask, **fused)[:3]),
        "linear_jsd_loss": lambda h, w: _sum(ptd.linear_jsd_loss(h, w, *pair, mask=p.mask, **fused)),
        "linear_topk_jsd_loss": lambda h, w: _sum(ptd.linear_topk_jsd_loss(h, w, *pair, p.k, mask=p.mask, **fused)),
        "linear_policy_loss": lambda h, w: _sum(ptd.linear_policy_loss(
            h, w, p.targets, *pair, p.k, row_loss=_policy(p), mask=p.mask, jsd_mask=p.jsd_mask, **fused)),
        "linear_logprobs_at": lambda h, w: _sum(ptd.linear_logprobs_at(h, w, _sparse_teacher(p)[0], mask=p.mask,
                                                                       with_entropy=True, **fused)),
    }
    if process_group is None:
        ids = _sparse_teacher(p)[0]
        logits = lambda h, w: h @ w.T  # noqa: E731
        teacher_logits = p.teacher_hidden @ p.teacher_weight.T
        out.update({
            "logprobs (with_entropy)": lambda h, w: _sum(ptd.logprobs(logits(h, w), p.targets, with_entropy=True,
                                                                      backend=backend)),
            "jsd": lambda h, w: _sum(ptd.jsd(logits(h, w), teacher_logits, mask=p.mask, backend=backend)),
            "topk_jsd": lambda h, w: _sum(ptd.topk_jsd(logits(h, w), teacher_logits, p.k, mask=p.mask,
                                                       backend=backend)),
            "topk_overlap": lambda h, w: (None, ptd.topk_overlap(ids, ids.flip(-1))),
        })
    return out


def _policy(p: Problem):
    """PTD-PO's named token losses on the problem's rows (clipped ratio, k3 KL, λ·D_K, an entropy bonus)."""
    import ptd_kernels as ptd

    n = p.hidden.shape[0]
    g = torch.Generator().manual_seed(2)
    return ptd.PolicyLoss(torch.randn(n, generator=g), old_logprobs=-5 + torch.randn(n, generator=g) * 0.1,
                          ref_logprobs=-5 + torch.randn(n, generator=g) * 0.1, kl_coef=0.01, ptd_coef=0.05,
                          entropy_coef=0.001)


def _sum(outs):
    outs = outs if isinstance(outs, tuple) else (outs,)
    return sum(o.sum() for o in outs), outs


def _sparse_teacher(p: Problem):
    ids = torch.stack([torch.randperm(p.weight.shape[0], generator=torch.Generator().manual_seed(i))[:p.k]
                       for i in range(p.hidden.shape[0])])
    logprobs = torch.log_softmax(torch.randn(p.hidden.shape[0], p.k, generator=torch.Generator().manual_seed(1)), -1)
    return ids, logprobs - 0.5


def count_call(fn, p: Problem) -> tuple[Counts, Counts]:
    """(forward syncs, backward syncs) of one call; its inputs are made before counting starts."""
    import ptd_kernels  # noqa: F401 - imported before counting: its import makes tensors

    hidden, weight = p.hidden.clone().requires_grad_(), p.weight.clone().requires_grad_()
    counter = HostSyncCounter()
    with counter.active():
        with counter.phase("forward"):
            loss, _ = fn(hidden, weight)
        with counter.phase("backward"):
            if loss is not None:
                loss.backward()
    return counter.phases["forward"], counter.phases["backward"]


@contextlib.contextmanager
def sync_free():
    import ptd_kernels

    saved = ptd_kernels.config.SYNC_FREE
    ptd_kernels.config.SYNC_FREE = True
    try:
        yield
    finally:
        ptd_kernels.config.SYNC_FREE = saved


@contextlib.contextmanager
def one_rank_group():
    """A gloo process group of one rank (the vocabulary-parallel path with the whole vocabulary)."""
    import tempfile

    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def measure(backends, p: Problem | None = None) -> list[dict]:
    """Every public function's syncs: rows of {function, backend, path, forward, backward} (Counts)."""
    p = p or problem()
    rows = []
    with one_rank_group() as group:
        for backend in backends:
            for path in ("default", "sync-free", "vocabulary-parallel"):
                if path == "sync-free" and not hasattr(__import__("ptd_kernels").config, "SYNC_FREE"):
                    continue
                with sync_free() if path == "sync-free" else contextlib.nullcontext():
                    cases = calls(p, backend, group if path == "vocabulary-parallel" else None)
                    for name, fn in cases.items():
                        forward, backward = count_call(fn, p)
                        rows.append(dict(function=name, backend=backend, path=path, forward=forward,
                                         backward=backward))
    return rows


#: The packages of the kernel backends, whose launchers' syncs are counted apart (their owners' to remove).
KERNEL_PACKAGES = ("triton", "cublas")


def in_launchers(counts: Counts) -> int:
    """How many of ``counts`` the kernel backends' launchers make (``backends/triton/``, ``backends/cublas/``)."""
    prefixes = tuple(os.path.join("ptd_kernels", "backends", name) + os.sep for name in KERNEL_PACKAGES)
    return sum(s.where.startswith(prefixes) for s in counts.syncs)


def _cell(counts: Counts) -> str:
    launchers = in_launchers(counts)
    own = len(counts) - launchers
    return f"{own}" + (f" (+{launchers} in launchers)" if launchers else "")


def markdown(rows: list[dict]) -> str:
    """The table of docs/host_syncs.md."""
    lines = [
        "# Host synchronizations per call",
        "",
        "Generated by `python bench/host_syncs.py` (do not edit by hand). A host synchronization is an op",
        "that makes the CPU wait for every GPU kernel queued before it: reading a device value (`item`, `bool`,",
        "`tolist`), `nonzero` and boolean-mask indexing (their output size is data), a copy from pageable host",
        "memory. The counter runs on a CPU and counts the ops that would do so on a GPU, taking the branches a",
        "GPU takes; see `bench/host_syncs.py` for what it counts and what it cannot see. Counts are per call,",
        "forward (the call) and backward (`.backward()` of the sum of its outputs), on a problem with one",
        "ignored target and masked rows (N = 12, V = 300, K = 6).",
        "",
        "- **default**: a call reads, once, the few device values it needs on the host: the number of live",
        "  rows (so that masked rows are left out of every sweep) and the range of the ids (a target or a",
        "  sparse-teacher id outside [0, V) is a clear error). One transfer: 1 sync when the call has ids or",
        "  masks, else 0.",
        "- **sync-free** (`ptd_kernels.config.SYNC_FREE = True`): no call reads the device. Ids are not",
        "  checked: a target or sparse-teacher id outside [0, V) gives an undefined value in its row instead",
        "  of an error (a gather at it may fail, on a GPU as a device-side assert), and a repeated sparse id is",
        "  not refused. Masked rows are computed with zero hidden states (a copy of the hidden states) and",
        "  their outputs zeroed, so a NaN in one still reaches no output or gradient. `topk_overlap` skips",
        "  its check that no row repeats an id.",
        "- **vocabulary-parallel**: with `process_group=` (here a one-rank gloo group): the call's one",
        "  exchange is read once — every rank's slice size, the arguments that must agree, fingerprints of",
        "  the replicated tensors (computed on the device, no copy of the hidden states) and the values the",
        "  default path reads. 1 sync per call, also under `SYNC_FREE`. The logits-level functions take no",
        "  process group.",
        "",
        "\"(+n in launchers)\": syncs made inside a kernel backend's launchers (`ptd_kernels/backends/triton/`,",
        "`ptd_kernels/backends/cublas/`), listed below with the rest.",
        "",
    ]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    for backend in backends:
        lines += [f"## backend=\"{backend}\"", "",
                  "| function | " + " | ".join(f"{p}: forward | {p}: backward" for p in paths) + " |",
                  "| --- |" + " ---: | ---: |" * len(paths)]
        functions = list(dict.fromkeys(r["function"] for r in rows if r["backend"] == backend))
        for name in functions:
            cells = []
            for path in paths:
                row = next((r for r in rows if r["backend"] == backend and r["path"] == path
                            and r["function"] == name), None)
                cells += ["—", "—"] if row is None else [_cell(row["forward"]), _cell(row["backward"])]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Where", ""]
    for row in rows:
        for phase in ("forward", "backward"):
            if len(row[phase]):
                lines.append(f"- {row['function']}, {row['backend']}, {row['path']}, {phase}: {row[phase].summary()}")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "host_syncs.md"))
    parser.add_argument("--backends", default=None, help="comma-separated (default: every registered backend that "
                        "runs here; on a CPU, under Triton's interpreter)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import ptd_kernels

    backends = args.backends.split(",") if args.backends else ptd_kernels.backends_for("cpu")
    torch.set_num_threads(1)
    text = markdown(measure(tuple(backends)))
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
