"""The launch plan of the Triton kernels on a GPU this machine does not have.

``recording(gpu)`` makes Triton believe that ``gpu`` is the current device: a stand-in driver
(``triton.runtime.driver.set_active``) reports its target, its SM count and limits, and turns every
launch into a record instead of a launch. Called inside it with meta tensors in place of device
memory, the real launchers pick their tiles, warps, stages and grids as they would on that GPU;
Triton compiles each kernel they launch for the target with its bundled ``ptxas``, and each launch
is recorded with its grid and what the compiler made of it:

- registers per thread and local memory per thread (register spills), read from the cubin with
  the bundled ``cuobjdump``;
- shared memory per block (the compiler's own figure, the one Triton checks before a launch);
- the dot operations of the kernel and the instructions they became: ``wgmma.mma_async``
  (Hopper's asynchronous warp-group MMA), ``tcgen05.mma`` (Blackwell), ``mma.sync`` (the
  Ampere-style fallback) or FMAs (no tensor core), counted from the TTGIR and the PTX.

Compile results can come from a plan cache: a dict from Triton's own compile hash (the hash of the
kernel's source and of every jit function it calls, its constexprs and specialization, the compile
options, the Triton build and the ptxas version) to those figures. A kernel whose hash is in it is
not compiled again; ``bench/kernel_plan.py`` writes the cache of every configuration beside its
table, so a check of the whole plan takes seconds while the kernels and the compiler are those
the table was made with, and recompiles exactly what changed.

Nothing is launched and no device memory is touched: a launcher's torch work runs on meta tensors.
Must run with the interpreter off (``TRITON_INTERPRET`` unset), in a process whose kernels were
defined with it off: ``run_plan`` starts worker processes (``python -m
ptd_kernels.backends.triton.launch_plan``). Used by ``tests/kernels/test_triton_launch_plan.py`` and
``bench/kernel_plan.py``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GPU:
    """The facts of a GPU that the launchers and the checks read."""

    name: str
    arch: int  # compute capability × 10 (90: sm_90a, 100: sm_100a)
    multiprocessor_count: int
    max_shared_mem: int  # bytes of shared memory one block may use (opt-in maximum)
    max_num_regs: int = 65536  # 32-bit registers per SM
    max_threads_per_block: int = 1024

    def properties(self) -> dict:
        """What ``driver.utils.get_device_properties`` returns on the real device (CUDA's keys)."""
        return {"max_shared_mem": self.max_shared_mem, "max_num_regs": self.max_num_regs,
                "multiprocessor_count": self.multiprocessor_count, "warpSize": 32,
                "sm_clock_rate": 0, "mem_clock_rate": 0, "mem_bus_width": 0}


H100 = GPU("H100 SXM (sm_90a)", 90, 132, 232_448)
B200 = GPU("B200 (sm_100a)", 100, 148, 232_448)
GPUS = {"sm90": H100, "sm100": B200}
# The tiles are chosen on sm_90a; on sm_100a ptxas caps some of the same kernels at 64 or 128
# registers and spills a few bytes: there the spill limit is reported, not checked.
CHECK_SPILLS = {"sm90": True, "sm100": False}
MAX_REGISTERS_PER_THREAD = 255

# Metadata fields a CompiledKernel needs to stand up without its binary (``_plan_cache_manager``): a
# plan cache entry keeps those that differ from these defaults (the hash and target are known).
_METADATA_DEFAULTS = {"num_ctas": 1, "warp_size": 32, "tmem_size": 0, "global_scratch_size": 0,
                      "global_scratch_align": 1, "profile_scratch_size": 0, "profile_scratch_align": 1,
                      "launch_cooperative_grid": False, "launch_pdl": False, "tensordesc_meta": []}
_METADATA_KEYS = ("name", "num_warps", "num_stages", "shared", *_METADATA_DEFAULTS)
# The constexprs a plan table shows (a kernel's tiles and what its programs own).
TILE_CONSTEXPRS = ("OWN_ROWS", "BLOCK_N", "BLOCK_V", "BLOCK_H", "CHUNK", "K_PAD", "BLOCK_B", "BLOCK_D", "BLOCK_SIZE")
_CACHED_BINARY = b"ptd launch plan: no binary, figures from the plan cache\n"


@dataclass(frozen=True)
class CompiledKernel:
    """What the compiler made of one specialization of a kernel."""

    kernel: str
    num_warps: int
    num_stages: int
    registers: int  # per thread
    spill_bytes: int  # local memory per thread (ptxas' stack frame: spilled registers)
    shared_bytes: int  # per block
    dots: int  # dot operations in the TTGIR
    wgmma_dots: int  # of which lowered to Hopper's warp-group MMA
    tcgen05_dots: int  # of which lowered to Blackwell's tensor-core MMA
    mma_sync: int  # mma.sync instructions in the PTX (the pre-Hopper tensor-core path)
    tiles: dict = field(default_factory=dict, compare=False, hash=False)  # TILE_CONSTEXPRS of the kernel
    compile_hash: str = ""
    cached: bool = False  # figures read from the plan cache, not from a compile in this run

    @property
    def async_mma_dots(self) -> int:
        return self.wgmma_dots + self.tcgen05_dots


@dataclass(frozen=True)
class Launch:
    """One launch a launcher made: the kernel as compiled and its grid."""

    compiled: CompiledKernel
    grid: tuple[int, int, int]

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes) per thread of the one kernel in ``cubin`` (``cuobjdump -res-usage``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", file.name], capture_output=True, text=True,
                             check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"cuobjdump reported no resource usage:\n{out}")
    registers, stack, local = (int(g) for g in usage.groups())
    return registers, max(stack, local)


def _dot_counts(ttgir: str, ptx: str) -> dict:
    return {
        "dots": len(re.findall(r"= (?:tt\.dot|ttng\.warp_group_dot)\b", ttgir))
        + len(re.findall(r"\bttng\.tc_gen5_mma\b", ttgir)),
        "wgmma_dots": len(re.findall(r"= ttng\.warp_group_dot\b", ttgir)),
        "tcgen05_dots": len(re.findall(r"\bttng\.tc_gen5_mma\b", ttgir)),
        "mma_sync": len(re.findall(r"\bmma\.sync\.aligned\b", ptx)),
    }


def _constexprs(src) -> dict:
    names = src.fn.arg_names
    out = {}
    for key, value in getattr(src, "constants", {}).items():
        index = key[0] if isinstance(key, tuple) else key
        name = names[index] if isinstance(index, int) else index
        out[name] = getattr(value, "value", value)
    return {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in out.items()}


def _read(group: dict, suffix: str) -> str | bytes:
    path = next((p for name, p in group.items() if name.endswith(suffix)), None)
    if path is None:
        return ""
    with open(path, "rb" if suffix == ".cubin" else "r") as file:
        return file.read()


class _FunctionHandle:
    """What the stand-in ``load_binary`` returns in place of a CUfunction: the cubin's resource usage."""

    def __init__(self, registers: int, spill_bytes: int):
        self.registers, self.spill_bytes = registers, spill_bytes


class _Recorder:
    """The stand-in launcher class: built once per compiled kernel, called for each launch."""

    def __init__(self, driver: StandInDriver, src, metadata):
        from triton.runtime.cache import get_cache_manager

        self.driver, self.src, self.metadata = driver, src, metadata
        self.entry = driver.cache.get(metadata.hash)
        self.cached = self.entry is not None
        if self.entry is None:
            group = get_cache_manager(metadata.hash).get_group(f"{metadata.name}.json") or {}
            with open(group[f"{metadata.name}.json"]) as file:
                full = json.load(file)
            metadata = {k: full[k] for k in _METADATA_KEYS if k in full and full[k] != _METADATA_DEFAULTS.get(k, ())}
            constexprs = _constexprs(src)
            self.entry = {"metadata": metadata, **_dot_counts(_read(group, ".ttgir"), _read(group, ".ptx")),
                          "tiles": {k: constexprs[k] for k in TILE_CONSTEXPRS if k in constexprs}}

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *args):
        entry, meta = self.entry, self.metadata
        entry.setdefault("registers", function.registers)
        entry.setdefault("spill_bytes", function.spill_bytes)
        self.driver.compiled[meta.hash] = entry
        compiled = CompiledKernel(
            kernel=meta.name, num_warps=meta.num_warps, num_stages=meta.num_stages,
            registers=entry["registers"], spill_bytes=entry["spill_bytes"], shared_bytes=meta.shared,
            dots=entry["dots"], wgmma_dots=entry["wgmma_dots"], tcgen05_dots=entry["tcgen05_dots"],
            mma_sync=entry["mma_sync"], tiles=entry["tiles"], compile_hash=meta.hash,
            cached=self.cached,
        )
        self.driver.launches.append(Launch(compiled, (int(grid_x), int(grid_y), int(grid_z))))


class _Utils:
    def __init__(self, gpu: GPU):
        self.gpu = gpu

    def get_device_properties(self, device):
        return self.gpu.properties()

    def load_binary(self, name, cubin, shared, device):
        if cubin == _CACHED_BINARY:  # figures come from the plan cache (``_Recorder``)
            handle = _FunctionHandle(None, None)
        else:
            handle = _FunctionHandle(*_resource_usage(cubin))
        return None, handle, handle.registers, handle.spill_bytes, self.gpu.max_threads_per_block

    def unload_module(self, module):
        pass


class StandInDriver:
    """A Triton driver for a GPU that is not here: compiles for its target, records launches."""

    def __init__(self, gpu: GPU, cache: dict | None = None):
        from triton.backends.compiler import GPUTarget

        self.gpu = gpu
        self.target = GPUTarget("cuda", gpu.arch, 32)
        self.utils = _Utils(gpu)
        self.cache = cache or {}  # compile hash → figures (the plan cache)
        self.compiled: dict = {}  # compile hash → figures of every kernel launched
        self.launches: list[Launch] = []

    def launcher_cls(self, src, metadata):
        return _Recorder(self, src, metadata)

    @staticmethod
    def is_active():
        return False

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.gpu.arch  # one device index per target: the JIT caches its binder per device

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")

    def get_device_capability(self, device=None):
        return divmod(self.gpu.arch, 10)

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver launches nothing, so it cannot time anything")


class PlanCacheMiss(Exception):
    """A kernel is not in the plan cache and the recording may not compile it."""


def _plan_cache_manager(cache: dict, scratch_dir: str, compile_missing: bool, gpu: GPU):
    """A Triton cache manager that answers a compile whose hash is in ``cache`` with the kernel's
    metadata and a placeholder binary (so Triton does not compile it), and defers to Triton's file
    cache otherwise (or raises ``PlanCacheMiss`` unless ``compile_missing``)."""
    from triton.runtime.cache import FileCacheManager

    class PlanCacheManager(FileCacheManager):
        def get_group(self, filename):
            padded = self.key + "=" * (-len(self.key) % 8)
            entry = cache.get(base64.b32decode(padded).hex())
            if entry is None and not compile_missing and filename.endswith(".json"):
                raise PlanCacheMiss(filename[: -len(".json")])
            if entry is None or not filename.endswith(".json"):
                return super().get_group(filename)
            folder = os.path.join(scratch_dir, self.key)
            os.makedirs(folder, exist_ok=True)
            name = filename[: -len(".json")]
            paths = {filename: os.path.join(folder, filename), f"{name}.cubin": os.path.join(folder, f"{name}.cubin")}
            metadata = {**_METADATA_DEFAULTS, "hash": base64.b32decode(padded).hex(),
                        "target": {"backend": "cuda", "arch": gpu.arch, "warp_size": 32}, **entry["metadata"]}
            with open(paths[filename], "w") as file:
                json.dump(metadata, file)
            with open(paths[f"{name}.cubin"], "wb") as file:
                file.write(_CACHED_BINARY)
            return paths

    return PlanCacheManager


@contextlib.contextmanager
def recording(gpu: GPU = H100, cache: dict | None = None, compile_missing: bool = True):
    """Within: Triton targets ``gpu``, and kernel launches are compiled and recorded, not run.

    Yields the stand-in driver: ``.launches`` (in launch order) and ``.compiled`` (the plan cache
    entries of every kernel launched). ``cache``: a plan cache (compile hash → figures); without
    ``compile_missing`` a kernel that is not in it raises ``PlanCacheMiss`` instead of compiling. Triton's
    own pre-launch check of shared memory (it raises ``OutOfResources``) is lifted inside, so that
    a kernel over the limit is recorded with its figure and a caller checks it against
    ``gpu.max_shared_mem``.
    """
    import triton
    import triton.compiler.compiler as triton_compiler
    from triton.runtime import driver

    stand_in = StandInDriver(gpu, cache)
    max_shared_mem = triton_compiler.max_shared_mem
    manager_class = triton.knobs.cache.manager_class
    previous = driver._active  # None until first use: Triton then picks the real driver lazily
    with tempfile.TemporaryDirectory(prefix="ptd-plan-") as scratch:
        driver.set_active(stand_in)
        triton_compiler.max_shared_mem = lambda device: 1 << 31
        triton.knobs.cache.manager_class = _plan_cache_manager(stand_in.cache, scratch, compile_missing, gpu)
        try:
            yield stand_in
        finally:
            triton.knobs.cache.manager_class = manager_class
            triton_compiler.max_shared_mem = max_shared_mem
            driver.set_active(previous)


def as_row(launch: Launch, gpu: GPU = H100) -> dict:
    """A flat, JSON-ready description of a launch (the plan table's row)."""
    row = dataclasses.asdict(launch.compiled)
    row.update(grid=list(launch.grid), programs=launch.programs,
               waves=round(launch.programs / gpu.multiprocessor_count, 2))
    return row


# ----------------------------------------------------------------------------- target configurations

ROWS, HIDDEN, TEACHER_HIDDEN = 8192, 4096, 5120  # N, H of the student, H' of a separate teacher
VOCABS = (128256, 151936)  # Llama 3, Qwen 2.5 / 3
TOPK = (1, 8, 20, 64, 100, 128, 256)
SOFTCAP = 30.0
# name → (operand dtype, TF32 on for float32 dots)
DTYPES = {"bf16": ("bfloat16", False), "fp16": ("float16", False), "fp32-tf32": ("float32", True),
          "fp32": ("float32", False)}
# What each public operation asks of the launchers (``call``):
OPS = {
    "logprobs": "row_stats: lse, Σp·z and the target logit (linear_logprobs, the log-prob + entropy forward)",
    "student_topk": "row_stats with top-K as well (the student side of the Top-K JSD terms)",
    "teacher_topk": "row_stats: lse and top-K only (the teacher side; linear_topk)",
    "head_backward": "head_backward with row, logit and target coefficients (the log-prob + entropy backward)",
    "head_backward_sparse": "head_backward with 2K + 1 sparse terms per row as well (the Top-K JSD backward)",
    "jsd_forward": "jsd_forward with both lse computed (row_stats twice, then the JSD sweep; linear_jsd)",
    "jsd_backward": "jsd_backward (linear_jsd's backward)",
}


@dataclass(frozen=True)
class Configuration:
    """One call of a launcher at the target shape: N = ROWS, H = HIDDEN, V = vocab."""

    op: str
    dtype: str
    softcap: bool
    bias: bool
    vocab: int = VOCABS[-1]
    k: int = 0
    beta: float = 0.5
    shared_layer: bool = False  # jsd: the teacher uses the student's output layer

    @property
    def label(self) -> str:
        parts = [self.op, self.dtype, "cap" if self.softcap else "nocap", "bias" if self.bias else "nobias"]
        if self.op in ("student_topk", "teacher_topk", "head_backward_sparse"):
            parts.append(f"k{self.k}")
        if self.op.startswith("jsd"):
            parts.append(f"beta{self.beta:g}" + ("-shared" if self.shared_layer else ""))
        return "-".join(parts) + f"-V{self.vocab}"


def configurations(vocabs=VOCABS, dtypes=tuple(DTYPES), topk=TOPK, betas=(0.0, 0.5, 1.0), shared=(False, True)):
    """Every configuration of the plan: each op × dtype × soft-cap × bias × vocabulary (× K, β, layer)."""
    for op in OPS:
        for dtype in dtypes:
            for softcap in (False, True):
                for bias in (False, True):
                    for vocab in vocabs:
                        base = dict(op=op, dtype=dtype, softcap=softcap, bias=bias, vocab=vocab)
                        if op in ("student_topk", "teacher_topk", "head_backward_sparse"):
                            yield from (Configuration(**base, k=k) for k in topk)
                        elif op.startswith("jsd"):
                            yield from (Configuration(**base, beta=b, shared_layer=s) for b in betas for s in shared)
                        else:
                            yield Configuration(**base)


def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype, device="meta")


def call(config: Configuration) -> None:
    """Run the launcher(s) of ``config`` on meta tensors (inside ``recording``: compile and record)."""
    import torch

    from ..base import GradNeeds, Head, HeadGradCoefs, JSDStats, LogitSpec, SparseTerms
    from .head_backward import head_backward
    from .jsd_backward import jsd_backward
    from .jsd_forward import jsd_forward
    from .row_stats import row_stats

    dtype_name, tf32 = DTYPES[config.dtype]
    n, h, v = ROWS, HIDDEN, config.vocab
    cap = SOFTCAP if config.softcap else None
    int64, f32 = torch.int64, torch.float32

    def head(hidden_size=h, weight=None):
        weight = _meta(v, hidden_size, dtype=dtype_name) if weight is None else weight
        bias = _meta(v, dtype=dtype_name) if config.bias else None
        return Head(_meta(n, hidden_size, dtype=dtype_name), weight, bias, LogitSpec(1.0, 1.0, cap))

    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        student = head()
        rows = _meta(n, dtype=f32)
        targets = _meta(n, dtype=int64)
        if config.op == "logprobs":
            row_stats(student, targets=targets, k=0, with_mean_logit=True, lse_dtype=torch.float64)
        elif config.op == "student_topk":
            row_stats(student, targets=targets, k=config.k, with_mean_logit=True, lse_dtype=torch.float64)
        elif config.op == "teacher_topk":
            row_stats(student, k=config.k, with_mean_logit=False, lse_dtype=torch.float64)
        elif config.op in ("head_backward", "head_backward_sparse"):
            sparse = ()
            if config.op == "head_backward_sparse":
                slots = 2 * config.k + 1  # the union of both top-K sets and the target
                sparse = (SparseTerms(_meta(n, dtype=int64), _meta(n, slots, dtype=int64), _meta(n, slots, dtype=f32),
                                      distinct_rows=True),)
            head_backward(student, rows, HeadGradCoefs(rows, rows, rows, targets, rows, sparse), GradNeeds())
        else:
            teacher = (Head(_meta(n, h, dtype=dtype_name), student.weight, student.bias, LogitSpec(1.0, 1.0, cap))
                       if config.shared_layer else head(TEACHER_HIDDEN))
            if config.op == "jsd_forward":
                jsd_forward(student, teacher, config.beta)
            else:
                lse = _meta(n, dtype=torch.float64)
                jsd_backward(student, teacher, config.beta, JSDStats(rows, rows, lse, lse), rows, GradNeeds())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32


def plan(configs, gpu: GPU = H100, cache: dict | None = None, compile_missing: bool = True
         ) -> tuple[list[dict], dict]:
    """Each configuration's launches as rows (``as_row`` + the configuration's fields), and the plan
    cache entries of the kernels launched. In this process: the interpreter must be off."""
    rows = []
    with recording(gpu, cache, compile_missing) as stand_in:
        for config in configs:
            first = len(stand_in.launches)
            call(config)
            for index, launch in enumerate(stand_in.launches[first:]):
                rows.append({"config": config.label, **dataclasses.asdict(config), "launch": index,
                             **as_row(launch, gpu)})
    return rows, stand_in.compiled


def run_plan(configs, gpu: str = "sm90", cache: dict | None = None, jobs: int = 1, timeout: float = 3600,
             compile_missing: bool = True) -> tuple[list[dict], dict, list[str]]:
    """``plan`` in ``jobs`` worker processes with the interpreter off (configurations dealt out by
    launcher and dtype, so that a kernel is compiled by one worker). Returns the rows in the order
    given, the plan cache entries, and (without ``compile_missing``) the labels of the
    configurations that launch a kernel not in ``cache``."""
    configs = list(configs)
    groups: dict = {}
    for index, config in enumerate(configs):
        groups.setdefault((config.op.split("_")[0], config.dtype), []).append(index)
    shares = [[] for _ in range(max(1, min(jobs, len(groups))))]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(shares, key=len).extend(group)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with tempfile.TemporaryDirectory(prefix="ptd-plan-") as folder:
        cache_path = os.path.join(folder, "cache.json")
        with open(cache_path, "w") as file:
            json.dump(cache or {}, file)
        workers = []
        for number, share in enumerate(shares):
            if not share:
                continue
            request = os.path.join(folder, f"request{number}.json")
            with open(request, "w") as file:
                json.dump({"gpu": gpu, "cache": cache_path, "indices": share, "compile_missing": compile_missing,
                           "configs": [dataclasses.asdict(configs[i]) for i in share]}, file)
            out = os.path.join(folder, f"out{number}.json")
            workers.append((subprocess.Popen([sys.executable, "-m", __name__, request, out], env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out))
        rows_by_index: dict = {}
        compiled: dict = {}
        errors, missing = [], []
        for process, out in workers:
            stdout, stderr = process.communicate(timeout=timeout)
            if process.returncode != 0:
                errors.append(stderr[-4000:])
                continue
            with open(out) as file:
                result = json.load(file)
            compiled.update(result["compiled"])
            missing.extend(result["missing"])
            for row in result["rows"]:
                rows_by_index.setdefault(row.pop("index"), []).append(row)
        if errors:
            raise RuntimeError("launch plan worker failed:\n" + "\n".join(errors))
    rows = [row for index in range(len(configs)) for row in rows_by_index.get(index, [])]
    return rows, compiled, missing


def _worker(request_path: str, out_path: str) -> None:
    with open(request_path) as file:
        request = json.load(file)
    with open(request["cache"]) as file:
        cache = json.load(file)
    rows, compiled, missing = [], {}, []
    for index, fields in zip(request["indices"], request["configs"]):
        config = Configuration(**fields)
        try:
            config_rows, config_compiled = plan([config], GPUS[request["gpu"]], cache, request["compile_missing"])
        except PlanCacheMiss:
            missing.append(config.label)
            continue
        rows.extend({"index": index, **row} for row in config_rows)
        compiled.update(config_compiled)
    with open(out_path, "w") as file:
        json.dump({"rows": rows, "compiled": compiled, "missing": missing}, file)


_FIGURES = ("registers", "spill_bytes", "dots", "wgmma_dots", "tcgen05_dots", "mma_sync", "tiles")


def pack(rows: list[dict], compiled: dict) -> dict:
    """A plan's rows and compile figures, each kernel's once: {"kernels": [plan cache entry with its
    "hash"], "configs": [{the Configuration's fields that differ from the defaults, "launches":
    [[kernel index, grid x, grid y, grid z], ...]}]}. ``unpack`` gives the rows back, ``plan_cache``
    the cache."""
    defaults = Configuration("", "", False, False)
    kernels: dict = {}
    configs = []
    for row in rows:
        key = row["compile_hash"]
        if key not in kernels:
            kernels[key] = len(kernels)
        if not configs or configs[-1][0] != row["config"]:
            fields = {f.name: row[f.name] for f in dataclasses.fields(Configuration)
                      if f.name in ("op", "dtype", "softcap", "bias") or row[f.name] != getattr(defaults, f.name)}
            configs.append((row["config"], fields, []))
        configs[-1][2].append([kernels[key], *row["grid"]])
    return {"kernels": [{"hash": key, **compiled[key]} for key in kernels],
            "configs": [{**fields, "launches": launches} for _, fields, launches in configs]}


def plan_cache(packed: dict) -> dict:
    """The plan cache (compile hash → figures) of a ``pack``-ed plan."""
    kernels = packed.get("kernels")
    return {k["hash"]: k for k in kernels} if isinstance(kernels, list) else {}


def unpack(packed: dict, gpu: GPU = H100) -> list[dict]:
    """The rows of a ``pack``-ed plan (as ``plan`` gives them, without ``cached``)."""
    rows = []
    for config in packed["configs"]:
        fields = dataclasses.asdict(Configuration(**{k: v for k, v in config.items() if k != "launches"}))
        label = Configuration(**fields).label
        for index, (kernel_index, *grid) in enumerate(config["launches"]):
            kernel = packed["kernels"][kernel_index]
            meta = kernel["metadata"]
            programs = grid[0] * grid[1] * grid[2]
            rows.append({"config": label, **fields, "launch": index, "kernel": meta["name"],
                         "num_warps": meta["num_warps"], "num_stages": meta["num_stages"],
                         "shared_bytes": meta["shared"], **{k: kernel[k] for k in _FIGURES},
                         "compile_hash": kernel["hash"], "grid": grid, "programs": programs,
                         "waves": round(programs / gpu.multiprocessor_count, 2)})
    return rows


def check(rows: list[dict], gpu: GPU = H100, spills: bool = True) -> list[str]:
    """The launch plan's limits, one line per row that breaks one:

    - shared memory ≤ the GPU's per-block maximum, for every launch;
    - no register spill for 16-bit operands at K ≤ 128 (every launch of a bf16/fp16 configuration
      whose top-K, if any, is at most 128), unless ``spills`` is False;
    - every dot of a 16-bit configuration on the asynchronous tensor-core MMA (wgmma on sm_90a,
      tcgen05 on sm_100a), and no mma.sync.
    """
    problems = []
    for row in rows:
        where = f"{row['config']} launch {row['launch']} ({row['kernel']})"
        if row["shared_bytes"] > gpu.max_shared_mem:
            problems.append(f"{where}: {row['shared_bytes']} B of shared memory > {gpu.max_shared_mem} B")
        if row["dtype"] in ("bf16", "fp16"):
            if spills and row["k"] <= 128 and row["spill_bytes"]:
                problems.append(f"{where}: {row['spill_bytes']} B of register spills per thread")
            async_dots = row["wgmma_dots"] + row["tcgen05_dots"]
            if row["dots"] != async_dots or row["mma_sync"]:
                problems.append(f"{where}: {async_dots} of {row['dots']} dots on the async tensor-core MMA, "
                                f"{row['mma_sync']} mma.sync")
    return problems


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
