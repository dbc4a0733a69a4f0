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

Nothing is launched and no device memory is touched: a launcher's torch work runs on meta tensors.
Must run with the interpreter off (``TRITON_INTERPRET`` unset), in a process whose kernels were
defined with it off. Used by ``tests/test_triton_launch_plan.py`` and ``bench/kernel_plan.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
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
MAX_REGISTERS_PER_THREAD = 255


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
    constexprs: dict = field(default_factory=dict, compare=False, hash=False)

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


def _constexprs(src) -> dict:
    names = src.fn.arg_names
    out = {}
    for key, value in getattr(src, "constants", {}).items():
        index = key[0] if isinstance(key, tuple) else key
        name = names[index] if isinstance(index, int) else index
        out[name] = getattr(value, "value", value)
    return {k: (str(v) if not isinstance(v, (bool, int, float, str)) else v) for k, v in out.items()}


class _FunctionHandle:
    """What the stand-in ``load_binary`` returns in place of a CUfunction: the cubin's resource usage."""

    def __init__(self, registers: int, spill_bytes: int):
        self.registers, self.spill_bytes = registers, spill_bytes


class _Recorder:
    """The stand-in launcher class: built once per compiled kernel, called for each launch."""

    def __init__(self, driver, src, metadata):
        from triton.runtime.cache import get_cache_manager

        self.driver, self.src, self.metadata = driver, src, metadata
        group = get_cache_manager(metadata.hash).get_group(f"{metadata.name}.json") or {}
        self.ttgir = _read(group, ".ttgir")
        self.ptx = _read(group, ".ptx")

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *args):
        meta = self.metadata
        ttgir, ptx = self.ttgir, self.ptx
        compiled = CompiledKernel(
            kernel=meta.name, num_warps=meta.num_warps, num_stages=meta.num_stages,
            registers=function.registers, spill_bytes=function.spill_bytes, shared_bytes=meta.shared,
            dots=len(re.findall(r"= (?:tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma)\b", ttgir)),
            wgmma_dots=len(re.findall(r"= ttng\.warp_group_dot\b", ttgir)),
            tcgen05_dots=len(re.findall(r"\bttng\.tc_gen5_mma\b", ttgir)),
            mma_sync=len(re.findall(r"\bmma\.sync\.aligned\b", ptx)),
            constexprs=_constexprs(self.src),
        )
        self.driver.launches.append(Launch(compiled, (int(grid_x), int(grid_y), int(grid_z))))


def _read(group: dict, suffix: str) -> str:
    path = next((p for name, p in group.items() if name.endswith(suffix)), None)
    if path is None:
        return ""
    with open(path) as file:
        return file.read()


class _Utils:
    def __init__(self, gpu: GPU):
        self.gpu = gpu

    def get_device_properties(self, device):
        return self.gpu.properties()

    def load_binary(self, name, cubin, shared, device):
        registers, spill_bytes = _resource_usage(cubin)
        return None, _FunctionHandle(registers, spill_bytes), registers, spill_bytes, self.gpu.max_threads_per_block

    def unload_module(self, module):
        pass


class StandInDriver:
    """A Triton driver for a GPU that is not here: compiles for its target, records launches."""

    def __init__(self, gpu: GPU):
        from triton.backends.compiler import GPUTarget

        self.gpu = gpu
        self.target = GPUTarget("cuda", gpu.arch, 32)
        self.utils = _Utils(gpu)
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


@contextlib.contextmanager
def recording(gpu: GPU = H100):
    """Within: Triton targets ``gpu``, and kernel launches are compiled and recorded, not run.

    Yields the list the launches are appended to. Triton's own pre-launch check of shared memory
    (it raises ``OutOfResources``) is lifted inside, so that a kernel over the limit is recorded
    with its figure and a caller checks it against ``gpu.max_shared_mem``.
    """
    import triton.compiler.compiler as triton_compiler
    from triton.runtime import driver

    stand_in = StandInDriver(gpu)
    max_shared_mem = triton_compiler.max_shared_mem
    previous = driver._active  # None until first use: Triton then picks the real driver lazily
    driver.set_active(stand_in)
    triton_compiler.max_shared_mem = lambda device: 1 << 31
    try:
        yield stand_in.launches
    finally:
        triton_compiler.max_shared_mem = max_shared_mem
        driver.set_active(previous)


def as_row(launch: Launch, gpu: GPU = H100) -> dict:
    """A flat, JSON-ready description of a launch (the plan table's row)."""
    row = dataclasses.asdict(launch.compiled)
    row.update(grid=list(launch.grid), programs=launch.programs,
               waves=round(launch.programs / gpu.multiprocessor_count, 2))
    return row
