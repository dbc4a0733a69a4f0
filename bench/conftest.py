"""Shared set-up of the benchmark suites: shapes, inputs, timing, peak memory, OOM and budget rows.

Every row (one test = one method at one shape) records in ``extra_info``:

- ``op``, ``method``, ``shape`` (N, H, V), ``dtype``, ``device``, ``suite`` ("main" or "scaling");
- ``peak_bytes``: live tensor bytes at the peak of one call beyond its inputs — MemTracker on CPU,
  ``torch.cuda.max_memory_allocated`` (reset just before) on CUDA — and ``grad_bytes``, the bytes
  of the input gradients inside that peak (working memory = peak − grads);
- ``ours`` (a ptd method), ``floor`` (which GEMM floor the op is compared to);
- ``cpu_s``: the median process CPU time of a timed call (all threads; steadier than wall time
  on a shared, loaded machine);
- ``status``: "ok", "OOM" (the call ran out of memory, or on CPU would exceed the memory budget),
  or "not run (…)" (the time budget was spent). Non-ok rows still appear in the JSON (their time
  is a no-op's, and report.py prints the status instead).

Times are pytest-benchmark's; compare rows of one run only (same machine, same load). There are
no timing assertions anywhere.

Environment (all optional):
    PTD_BENCH_SHAPES   "N,H,V;N,H,V" main shapes (default: CPU 2048,1024,32000; CUDA the bf16 set)
    PTD_BENCH_SCALING  1/0: the CPU memory-scaling sweep over N (default 1 on CPU, 0 on CUDA)
    PTD_BENCH_SCALING_SHAPES, PTD_BENCH_SCALING_V_SHAPES  its N sweep (default N in 1k..8k at H=64,
                       V=8192) and V sweep (V in 32k, 128k at N=1024, H=64; ptd methods only)
    PTD_BENCH_ROUNDS   timed rounds per row (default CPU 2, CUDA 5; fewer when a call is slow)
    PTD_BENCH_ROW_S    a row's timed rounds stop growing beyond this many seconds (CPU 20, CUDA 5)
    PTD_BENCH_BUDGET_S wall-clock budget of the session (CPU default 750 s, so the whole run stays
                       under 15 minutes on 2 cores; 0 = none); rows that would start later are
                       recorded "not run (time budget)", lowest priority last
    PTD_BENCH_MEM_GB   CPU memory budget for materializing peers (default: half the available RAM)
    PTD_BENCH_LABEL    device label of the results files (default: "cpu" or the CUDA device name)
    PTD_BENCH_BACKENDS ptd backends the ptd rows time, comma-separated (default: CUDA every registered
                       backend of triton and cublas that runs there; CPU torch)
    PTD_BENCH_DEADLINE a wall-clock deadline (seconds since the epoch) instead of the budget: rows that
                       would start later are "not run (time budget)" (bench/gpu_check.sh sets it)
    PTD_BENCH_JOURNAL  a JSON-lines file: a "meta" line when the session starts, one "row" line per row
                       as soon as it ends (skipped and failed rows too), an "end" line at the end — a
                       hang or a crash loses only the row in flight (report.py reads the file)
    PTD_BENCH_RESUME   1: leave out the rows the journal already holds (a session after a crash)
    PTD_BENCH_ROW_TIMEOUT_S  a row running longer is recorded "timeout" in the journal and the process
                       ends (exit code 75); an error that breaks the CUDA context is recorded and ends
                       it too (76): bench/gpu_check.sh then resumes in a fresh process. With a journal,
                       SIGTERM (``timeout``'s) records the row in flight as "stopped" before the end
    PTD_BENCH_ENV      a JSON file of the environment phase (bench/gpu_env.py): its measured ceilings go
                       into the session's metadata
    PTD_BENCH_FAULT    rehearsal only: "hang:TEXT" hangs, "cuda_error:TEXT" raises a CUDA-context error
                       in the first row whose id contains TEXT (how --dry proves the watchdog)
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import statistics
import sys
import time

import pytest
import torch
from journal import Journal, Watchdog, broken_context, read_records
from report_data import cpu_model

import ptd_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SESSION_START = time.time()


def _label() -> str:
    if os.environ.get("PTD_BENCH_LABEL"):
        return os.environ["PTD_BENCH_LABEL"]
    if DEVICE == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu"


LABEL = _label()


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in part.split(",")) for part in text.replace(" ", "").split(";") if part]


# CUDA: H100-class, bf16. The target shape (N=8192, V=151936) first, so that a spent time budget
# cuts the least informative rows.
_CUDA_SHAPES = "8192,4096,151936;8192,4096,128256;2048,4096,151936;32768,4096,151936;2048,4096,128256;32768,4096,128256"
_CPU_SHAPES = "2048,1024,32000"
SHAPES = _parse_shapes(os.environ.get("PTD_BENCH_SHAPES") or os.environ.get("PTD_BENCH_SHAPE")
                       or (_CUDA_SHAPES if DEVICE == "cuda" else _CPU_SHAPES))
# Memory scaling (CPU): N sweep at small H, and a V sweep at small N (working memory flat in V).
SCALING = os.environ.get("PTD_BENCH_SCALING", "1" if DEVICE == "cpu" else "0") == "1"
# N sweep at H=64, V=8192 (every method); V sweep at N=1024 (ptd methods only: the claim is that
# their working memory is flat in V; the peers' N·V growth already shows in the N sweep).
_SCALING_N = "1024,64,8192;2048,64,8192;4096,64,8192;8192,64,8192"
_SCALING_V = "1024,64,32768;1024,64,131072"
SCALING_N_SHAPES = _parse_shapes(os.environ.get("PTD_BENCH_SCALING_SHAPES", _SCALING_N)) if SCALING else []
SCALING_V_SHAPES = _parse_shapes(os.environ.get("PTD_BENCH_SCALING_V_SHAPES", _SCALING_V)) if SCALING else []
# Cheapest points first (by N·V), so that a spent time budget cuts the most expensive ones.
SCALING_SHAPES = sorted(SCALING_N_SHAPES + [s for s in SCALING_V_SHAPES if s not in SCALING_N_SHAPES],
                        key=lambda s: (s[0] * s[2], s[0]))

# The whole CPU session stays under 15 minutes on a 2-core machine: rows that would start after
# this budget are recorded "not run (time budget)", lowest-priority rows last (see the ordering).
_DEFAULT_BUDGET = "750" if DEVICE == "cpu" else ""
ROUNDS = int(os.environ.get("PTD_BENCH_ROUNDS", "5" if DEVICE == "cuda" else "2"))
# A row's timed rounds stop growing once they would exceed this many seconds.
ROW_SECONDS = float(os.environ.get("PTD_BENCH_ROW_S", "20" if DEVICE == "cpu" else "5"))
_budget = os.environ.get("PTD_BENCH_BUDGET_S", _DEFAULT_BUDGET)
BUDGET_S = float(_budget) if _budget and float(_budget) > 0 else None
DEADLINE = (float(os.environ["PTD_BENCH_DEADLINE"]) if os.environ.get("PTD_BENCH_DEADLINE")
            else SESSION_START + BUDGET_S if BUDGET_S is not None else None)

# The ptd backends the ptd rows time: on CUDA both CUDA paths (the Triton kernels and cuBLAS GEMMs with
# Triton elementwise blocks), so that one run says which is faster at each shape; on a CPU the torch path.
_DEFAULT_BACKENDS = ([b for b in ("triton", "cublas") if b in ptd_kernels.backends_for("cuda")]
                     if DEVICE == "cuda" else ["torch"])
BACKENDS = [b for b in os.environ.get("PTD_BENCH_BACKENDS", ",".join(_DEFAULT_BACKENDS)).split(",") if b]

JOURNAL = Journal(os.environ.get("PTD_BENCH_JOURNAL"))
ROW_TIMEOUT_S = float(os.environ.get("PTD_BENCH_ROW_TIMEOUT_S") or 0) or None
EXIT_TIMEOUT, EXIT_BROKEN_CONTEXT = 75, 76


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


MEM_BUDGET = (float(os.environ["PTD_BENCH_MEM_GB"]) * 2**30 if os.environ.get("PTD_BENCH_MEM_GB")
              else _available_bytes() // 2)


def shape_id(shape) -> str:
    n, h, v = shape
    return f"N{n}-H{h}-V{v}"


def pytest_configure(config):
    config.addinivalue_line("markers", "tier(n): priority of a row: 0 (default) the rows behind the targets, 1 the "
                            "scaling sweep, 2 the other suites, 3 extras; lower tiers run first, so a spent time "
                            "budget cuts the highest")
    config.addinivalue_line("markers", "vsweep: scaling row that also runs the V sweep (ptd methods)")


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
    if "scale_shape" in metafunc.fixturenames:
        shapes = SCALING_SHAPES if metafunc.definition.get_closest_marker("vsweep") else SCALING_N_SHAPES
        metafunc.parametrize("scale_shape", shapes, ids=[shape_id(s) for s in shapes])


def pytest_collection_modifyitems(config, items):
    """Priority, then shape-major order: the rows behind the targets first (tier 0), then the scaling
    sweep (1), the other suites (2) and the extras (3), so that a spent time budget cuts the least
    needed rows (with several main shapes, every row up to tier 2 of the first, the target shape,
    runs before the others); within a tier every row of one shape runs together, so one shape's inputs are
    alive at a time (on CUDA, inputs of other shapes would eat the headroom the OOM rows measure)."""

    def key(item):
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        marker = item.get_closest_marker("tier")
        tier = marker.args[0] if marker else 0
        if params.get("shape") in SHAPES:
            index = SHAPES.index(params["shape"])
            # Several main shapes (the CUDA set): the target shape's rows up to tier 2 (its peers, TRL's
            # kernels and the soft-cap rows among them) come first, then the other shapes by tier.
            if len(SHAPES) > 1 and index == 0 and tier <= 2:
                return (-1, tier, 0)
            return (tier, index, 0)
        if params.get("scale_shape") in SCALING_SHAPES:
            return (1, SCALING_SHAPES.index(params["scale_shape"]), 0)
        return (4, 0, 0)

    items.sort(key=key)
    if os.environ.get("PTD_BENCH_RESUME") == "1" and JOURNAL:
        done = {r["test"] for r in read_records(JOURNAL.path) if r.get("record") == "row"}
        left_out = [item for item in items if item.nodeid in done]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [item for item in items if item.nodeid not in done]


# ----------------------------------------------------------------------------- inputs


class Inputs:
    """Student (hidden, weight requiring grad; targets) and detached teacher tensors for one shape."""

    def __init__(self, shape):
        n, h, v = shape
        self.shape = shape
        gen = torch.Generator(device=DEVICE).manual_seed(0)

        def randn(*size, scale):
            return (torch.randn(*size, generator=gen, device=DEVICE) * scale).to(DTYPE)

        self.hidden = randn(n, h, scale=0.5).requires_grad_()
        self.weight = randn(v, h, scale=h**-0.5).requires_grad_()
        self.targets = torch.randint(0, v, (n,), generator=gen, device=DEVICE)
        # The teacher: the student's layer perturbed, on its own hidden states, so that the two
        # distributions overlap as a hint-augmented reference model's would (top-K overlap > 0).
        self.teacher_hidden = (self.hidden.detach() + randn(n, h, scale=0.25)).contiguous()
        self.teacher_weight = (self.weight.detach() + randn(v, h, scale=0.5 * h**-0.5)).contiguous()

    @property
    def student(self):
        return self.hidden, self.weight, self.targets

    @property
    def teacher(self):
        return self.teacher_hidden, self.teacher_weight

    @property
    def all(self):
        return self.hidden, self.weight, self.targets, self.teacher_hidden, self.teacher_weight


_CACHE: dict = {}


def inputs_for(shape) -> Inputs:
    """One shape's inputs at a time (the order of the items makes this a cache hit per shape)."""
    if _CACHE.get("shape") != shape:
        _CACHE.clear()
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        _CACHE["shape"], _CACHE["inputs"] = shape, Inputs(shape)
    return _CACHE["inputs"]


@pytest.fixture
def inp(shape) -> Inputs:
    return inputs_for(shape)


@pytest.fixture
def sinp(scale_shape) -> Inputs:
    return inputs_for(scale_shape)


def zero_grads(*tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t.grad = None


# ----------------------------------------------------------------------------- GEMM floors

# The bare GEMMs an op needs, whatever the kernel: the student logits, d hidden and d weight
# (3), plus the teacher logits for the divergences (4), or the logits alone for a no-grad top-K (1).
FLOOR_3 = "3 GEMMs (logits, d hidden, d weight)"
FLOOR_4 = "4 GEMMs (student + teacher logits, d hidden, d weight)"
FLOOR_1 = "1 GEMM (logits)"
FLOORS = (FLOOR_1, FLOOR_3, FLOOR_4)


def gemm_floor(kind, inp: Inputs):
    hidden, weight = inp.hidden.detach(), inp.weight.detach()
    with torch.no_grad():
        logits = hidden @ weight.T
        if kind == FLOOR_1:
            return
        if kind == FLOOR_4:
            inp.teacher_hidden @ inp.teacher_weight.T  # noqa: B018 - the teacher GEMM, result dropped
        logits @ weight
        logits.T @ hidden


# ----------------------------------------------------------------------------- measurement


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def peak_bytes(fn, *inputs) -> int:
    """Peak live tensor bytes of one ``fn()`` call beyond ``inputs`` (which are already allocated)."""
    if DEVICE == "cuda":
        _sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync()
        return torch.cuda.max_memory_allocated() - base
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*[t for t in inputs if isinstance(t, torch.Tensor)])
    with tracker:
        fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    total = sum(stats.get("Total", 0) for stats in snapshot.values())
    # Inputs tracked as external are counted in the snapshot: report only what the call adds.
    return max(0, total - _tensor_bytes(inputs))


def _rss_reset() -> int | None:
    """Reset the process's peak RSS (Linux clear_refs) and return the current RSS, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss("VmRSS")
    except OSError:
        return None


def _rss(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _record_only(benchmark, status: str, note: str = ""):
    """Keep a row that was not timed in the JSON (its status says why), instead of dropping it."""
    benchmark.extra_info["status"] = status
    if note:
        benchmark.extra_info["note"] = note
    benchmark.pedantic(lambda: None, rounds=1, iterations=1, warmup_rounds=0)


def measure(benchmark, fn, inp: Inputs, *, op: str, method: str, ours: bool = False, floor: str | None = None,
            grads: tuple = (), nv_buffers: float = 0.0, compiled: bool = False, suite: str = "main",
            rounds: int | None = None, extra: dict | None = None, model: tuple | None = None, auto_call=None):
    """Time ``fn`` (one full fwd+bwd or fwd call) and record its peak memory.

    grads: the inputs whose gradients the call forms (counted in ``grad_bytes``).
    nv_buffers: how many N×V float32 buffers a materializing method holds at its peak (a rough
        estimate, 0 for fused methods): on CPU a row whose estimate exceeds the memory budget is
        recorded as OOM without running (a real CPU OOM would kill the whole session).
    compiled: a torch.compile'd peer. It gets an untimed warm-up call (compilation; CUDA rows
        always get one, for Triton's); if that call fails (no C++ compiler for inductor, say) the
        row is skipped with the reason. Compiled code cannot run under MemTracker (a dispatch
        mode), so on CPU its peak is the growth of the process's peak RSS over the timed calls
        instead (``mem_method`` says which). Every CPU row also records that RSS figure
        (``rss_peak_bytes``) as a cross-check.
    extra: more ``extra_info`` fields, e.g. ``variant`` and ``base_method`` for a ptd row with a logit
        transform (report.py compares it with the plain row of ``base_method``), or a peer's ``check``.
    model: (op, path) of the row in the GPU work model (bench/results/gpu_model.json), e.g.
        ("linear_logprobs", "cublas") or ("trl_chunked_logprob", None): report.py puts the model's
        prediction beside the measurement.
    auto_call: for a ptd row, ``auto_call(backend)`` runs the row's call with that backend: the row
        records which backend ``backend="auto"`` selects for these inputs (``auto_backend``).
    """
    n, h, v = inp.shape
    info = benchmark.extra_info
    info.update(op=op, method=method, shape=f"N={n},H={h},V={v}", n=n, h=h, v=v, dtype=str(DTYPE).replace("torch.", ""),
                device=LABEL, suite=suite, ours=ours, floor=floor, status="ok",
                grad_bytes=_tensor_bytes(grads), load1=round(os.getloadavg()[0], 2), **(extra or {}))
    if model:
        info["model_op"], info["model_path"] = model
    if ours:
        info["entry_point"] = entry_point(method)
    if auto_call is not None:
        info["auto_backend"] = auto_pick(auto_call, (op, entry_point(method), inp.shape))
    if DEADLINE is not None and time.time() > DEADLINE:
        return _record_only(benchmark, "not run (time budget)",
                            f"budget {BUDGET_S:.0f} s spent" if BUDGET_S else "the deadline passed")
    if DEVICE == "cpu" and nv_buffers * n * v * 4 > MEM_BUDGET:
        est = nv_buffers * n * v * 4 / 2**30
        return _record_only(benchmark, "OOM", f"would need ~{est:.1f} GiB > budget {MEM_BUDGET / 2**30:.1f} GiB")

    all_inputs = inp.all
    cpu_times: list[float] = []

    def call():
        fn()
        _sync()

    def timed_call():
        start = time.process_time()
        call()
        cpu_times.append(time.process_time() - start)

    try:
        if compiled:
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - a peer that cannot compile here is skipped, not failed
                if _is_oom(exc):
                    raise
                pytest.skip(f"{method}: torch.compile failed here ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:120] if str(exc) else ''})")
        elif DEVICE == "cuda":
            call()
        zero_grads(*grads)
        start = time.perf_counter()
        if DEVICE == "cuda" or not compiled:
            info["peak_bytes"] = peak_bytes(fn, *all_inputs)
            info["mem_method"] = "cuda max_memory_allocated" if DEVICE == "cuda" else "MemTracker"
        else:
            call()
        first = time.perf_counter() - start  # about one call (an upper bound: MemTracker adds overhead)
        if rounds is None:
            rounds = max(1, min(ROUNDS, int(ROW_SECONDS / max(first, 1e-6))))
        info["rounds"] = rounds
        zero_grads(*grads)
        rss_base = _rss_reset() if DEVICE == "cpu" else None
        benchmark.pedantic(timed_call, rounds=rounds, iterations=1, warmup_rounds=0)
        # CPU seconds of this process (all its threads) per call: unlike wall time, barely moved by
        # other processes' load on a shared machine, so ratios of it are the steadier ones there.
        info["cpu_s"] = statistics.median(cpu_times) if cpu_times else None
        if rss_base is not None:
            info["rss_peak_bytes"] = max(0, _rss("VmHWM") - rss_base)
            if "peak_bytes" not in info:
                info["peak_bytes"], info["mem_method"] = info["rss_peak_bytes"], "peak RSS"
    except Exception as exc:  # noqa: BLE001 - only OOM is recorded, anything else fails the row
        if not _is_oom(exc):
            raise
        note = str(exc).splitlines()[0][:160]
        del exc
        zero_grads(*grads)
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        info.pop("peak_bytes", None)
        return _record_only(benchmark, "OOM", note)
    finally:
        zero_grads(*grads)


# ----------------------------------------------------------------------------- auto's choice


def entry_point(method: str) -> str:
    """A ptd row's method without its backend, e.g. "ptd linear_jsd_loss" for "ptd linear_jsd_loss (cublas)"."""
    return re.sub(r" \((?:" + "|".join(map(re.escape, ptd_kernels.backend_names())) + r")\)", "", method)


_AUTO: dict = {}


class _Picked(BaseException):
    """Raised by the spy of ``auto_pick`` as soon as a backend is selected: the call does no work."""


def auto_pick(run, key) -> str:
    """The backend ``backend="auto"`` selects for ``run("auto")``: the name of the first registered
    backend whose instance the call asks for, observed by a spy that stops the call right there (no
    kernel runs). Cached per ``key``."""
    if key in _AUTO:
        return _AUTO[key]
    from ptd_kernels.backends import registry

    picked = []
    original = registry.BackendEntry.instance

    def spy(entry):
        picked.append(entry.name)
        raise _Picked

    registry.BackendEntry.instance = spy
    try:
        run("auto")
    except _Picked:
        pass
    except Exception as exc:  # noqa: BLE001 - a call that fails before selecting says so in the row
        picked.append(f"unknown ({type(exc).__name__})")
    finally:
        registry.BackendEntry.instance = original
    _AUTO[key] = picked[0] if picked else "unknown (no backend selected)"
    return _AUTO[key]


# ----------------------------------------------------------------------------- session metadata

_SKIPPED: list = []


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "got empty parameter set" in reason:  # a sweep switched off, not a skipped peer
            return
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("triton", "liger_kernel", "cut_cross_entropy", "trl"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", None)
            if out[name] is None:
                from importlib.metadata import version

                out[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - a missing peer is not an error here
            out[name] = None
    return out


_LOAD_START = os.getloadavg()


def _ceilings() -> dict | None:
    """The ceilings the environment phase measured (PTD_BENCH_ENV), or None."""
    path = os.environ.get("PTD_BENCH_ENV")
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("ceilings")


def session_meta() -> dict:
    """The session's metadata (the ``ptd`` entry of the JSON, the journal's "meta" line)."""
    return {
        "label": LABEL,
        "kind": DEVICE,
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else cpu_model(),
        "dtype": str(DTYPE).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "backends": BACKENDS,
        "load_start": [round(x, 2) for x in _LOAD_START],
        "mem_budget_gib": round(MEM_BUDGET / 2**30, 1) if DEVICE == "cpu" else None,
        "versions": _versions(),
        "ceilings": _ceilings(),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    meta = session_meta()
    meta.update(load_end=[round(x, 2) for x in os.getloadavg()], wall_s=round(time.time() - SESSION_START, 1),
                skipped=_SKIPPED)
    output_json["ptd"] = meta


# ----------------------------------------------------------------------------- the journal and the watchdog


def pytest_sessionstart(session):
    if JOURNAL:
        JOURNAL.write({"record": "meta", "pid": os.getpid(), "datetime": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       **session_meta()})


def pytest_sessionfinish(session, exitstatus):
    if JOURNAL:
        JOURNAL.write({"record": "end", "pid": os.getpid(), "load_end": [round(x, 2) for x in os.getloadavg()],
                       "wall_s": round(time.time() - SESSION_START, 1), "exitstatus": int(exitstatus)})


def _row_record(item, status: str | None = None, note: str | None = None) -> dict:
    """The journal's line for ``item``: its extra_info (what ``measure`` recorded so far), its median
    when it was timed, and its status."""
    bench = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    record = {"record": "row", "test": item.nodeid, **dict(getattr(bench, "extra_info", None) or {})}
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    if stats is not None and status is None:
        record["median"] = stats.median
    if status is not None:
        record["status"] = status
    record.setdefault("status", "ok" if "median" in record else "not timed")
    if note:
        record["note"] = note
    return record


def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0][:300]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when == "teardown" or (call.when == "setup" and report.passed):
        return
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        JOURNAL.write(_row_record(item, "skipped", reason.removeprefix("Skipped: ")))
    elif report.failed:
        exc = call.excinfo.value if call.excinfo else None
        JOURNAL.write(_row_record(item, "error", _first_line(f"{type(exc).__name__}: {exc}") if exc else "failed"))
        if exc is not None and (DEVICE == "cuda" and broken_context(exc) or isinstance(exc, _RehearsedContextError)):
            print(f"\n{item.nodeid}: the CUDA context is broken ({_first_line(exc)}); this process ends, a fresh one "
                  "resumes after the rows in the journal", file=sys.stderr)
            os._exit(EXIT_BROKEN_CONTEXT)
    else:
        JOURNAL.write(_row_record(item))


class _RehearsedContextError(RuntimeError):
    """The error PTD_BENCH_FAULT="cuda_error:..." raises: handled as a broken CUDA context on any device."""


_CURRENT: list = []  # the row in flight


def _stopped(signum, frame):
    """SIGTERM (``timeout``'s signal at the GPU check's hard cap): the row in flight is recorded as stopped."""
    if _CURRENT:
        JOURNAL.write(_row_record(_CURRENT[0], "stopped", "the session's time limit ended it"))
    os._exit(124)


if JOURNAL:
    signal.signal(signal.SIGTERM, _stopped)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _CURRENT[:] = [item]
    watchdog = None
    if ROW_TIMEOUT_S:
        def expire():
            JOURNAL.write(_row_record(item, "timeout", f"still running after {ROW_TIMEOUT_S:.0f} s"))
            print(f"\n{item.nodeid}: still running after {ROW_TIMEOUT_S:.0f} s: recorded as a timeout; this process "
                  "ends, a fresh one resumes after the rows in the journal", file=sys.stderr)

        watchdog = Watchdog(ROW_TIMEOUT_S, expire, EXIT_TIMEOUT)
        watchdog.start()
    try:
        yield
    finally:
        _CURRENT.clear()
        if watchdog is not None:
            watchdog.cancel()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    kind, _, text = os.environ.get("PTD_BENCH_FAULT", "").partition(":")
    if text and text in item.nodeid:
        if kind == "hang":
            time.sleep(3600)
        elif kind == "cuda_error":
            raise _RehearsedContextError("CUDA error: an illegal memory access was encountered (a rehearsed fault)")
    yield
