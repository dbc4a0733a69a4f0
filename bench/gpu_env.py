"""The environment of a GPU check: what the machine is and runs, its two ceilings measured in a few
seconds, and the wheels an offline machine needs carried.

    python bench/gpu_env.py report --out env.json      # GPU, driver, versions, bf16 GEMM TFLOP/s, copy GB/s
    python bench/gpu_env.py wheels --dir .whl          # are the carried wheels there, and is every
                                                       # requirement of theirs met (here: against the lent
                                                       # image's known packages; there: the installed ones)

The lent GPU machines of this workplace (Python 3.12, torch 2.11, triton 3.6, transformers 5.17) reach no
package registry. Everything the check needs beyond their image is pure Python and travels as wheels
(``WHEELS``), downloaded here with ``download_command()`` (bench/gpu_check.sh prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import zipfile

# The wheels the check carries: the peers (Liger-Kernel, cut-cross-entropy, TRL) and what TRL's import
# needs that the image lacks (datasets, and its dill and multiprocess). All pure Python (py3-none-any, or
# py312 for multiprocess): one download serves any x86-64 or Arm machine with Python 3.12.
WHEELS = (("liger-kernel", "0.8.5"), ("cut-cross-entropy", "25.1.1"), ("trl", "1.16.0"), ("datasets", "5.2.0"),
          ("dill", "0.4.1"), ("multiprocess", "0.70.19"))
PYTHON = "3.12"

# The lent image as this workplace describes it (device/KINDS.md, 2026-11): versions where known, else
# None (present, version not recorded: checked on the machine itself).
IMAGE = {
    "python": "3.12.3", "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "accelerate": "1.15.0",
    "numpy": "2.5.2", "huggingface-hub": "1.33.0", "safetensors": "0.8.0", "tokenizers": "0.23.2",
    "pandas": None, "pyarrow": None, "fsspec": None, "xxhash": None, "requests": None, "tqdm": None, "pyyaml": None,
    "jinja2": None, "psutil": None, "packaging": None, "filelock": None, "httpx": None, "matplotlib": None,
    "pillow": None, "pytest": None, "pytest-benchmark": None, "hypothesis": None, "setuptools": None,
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download_command(folder: str = ".whl") -> str:
    """The command that fetches ``WHEELS`` (run where a registry is reachable, from the repository root)."""
    specs = " ".join(f"{name}=={version}" for name, version in WHEELS)
    return (f"python3 -m pip download --no-deps --only-binary=:all: --python-version {PYTHON} --implementation cp "
            f"--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d {folder} {specs}")


# ----------------------------------------------------------------------------- wheels


def wheel_file(folder: str, name: str, version: str) -> str | None:
    """The wheel of ``name`` ``version`` in ``folder``, or None."""
    if not os.path.isdir(folder):
        return None
    stem = normalize(name).replace("-", "_")
    for file in sorted(os.listdir(folder)):
        if file.endswith(".whl") and normalize(file.split("-")[0]).replace("-", "_") == stem \
                and file.split("-")[1] == version:
            return os.path.join(folder, file)
    return None


def wheel_requirements(path: str) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _installed(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check_wheels(folder: str, against: str) -> tuple[list[str], list[str]]:
    """(report lines, problems). ``against``: "image" (the lent image as described, for a rehearsal
    here) or "installed" (this Python's packages, on the machine itself)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    env = {"python_version": PYTHON, "python_full_version": IMAGE["python"], "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
    lines, problems, unrecorded = [], [], []
    carried = {}
    for name, version in WHEELS:
        path = wheel_file(folder, name, version)
        if path is None:
            problems.append(f"{name}=={version}: no wheel in {folder}/")
            lines.append(f"  {name} {version}: MISSING from {folder}/")
        else:
            carried[normalize(name)] = (version, path)
            lines.append(f"  {name} {version}: {os.path.basename(path)}")
    for name, (_version, path) in carried.items():
        for text in wheel_requirements(path):
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = normalize(req.name)
            if dep in carried:
                have, where = carried[dep][0], "carried"
            elif against == "installed":
                have, where = _installed(req.name), "installed"
            else:
                have, where = IMAGE.get(dep, "absent"), "on the image"
            if have == "absent" or (against == "installed" and have is None):
                place = "installed" if against == "installed" else "on the image"
                problems.append(f"{name} needs {req}: neither carried nor {place}")
            elif have is not None and req.specifier and not req.specifier.contains(Version(have), prereleases=True):
                problems.append(f"{name} needs {req}: {have} {where}")
            elif have is None and str(req) not in unrecorded:
                unrecorded.append(str(req))
    if unrecorded:
        lines.append("  on the image, versions not recorded (checked there): " + ", ".join(unrecorded))
    return lines, problems


# ----------------------------------------------------------------------------- report


def _nvidia_smi() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "accelerate", "numpy", "pytest", "pytest-benchmark", "matplotlib",
                 "pyarrow", "fsspec", *(n for n, _ in WHEELS)):
        out[name] = _installed(name)
    return out


def ceilings(device: str, seconds: float = 4.0) -> dict:
    """The two ceilings of the work model, measured: a bf16 matrix product (8192³ on CUDA, with random
    operands, median of CUDA-event timings after a warm-up) and a device-to-device copy (1 GiB; bytes read
    plus bytes written). On a CPU, tiny sizes (a rehearsal of the code, not a figure to use)."""
    import torch

    cuda = device == "cuda"
    size, copy_bytes = (8192, 1 << 30) if cuda else (256, 1 << 22)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    src = torch.randn(copy_bytes // 4, device=device, generator=gen)
    dst = torch.empty_like(src)

    def timed(fn, budget):
        for _ in range(3):
            fn()
        times = []
        deadline = time.perf_counter() + budget
        while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 50):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2], len(times)

    gemm_s, gemm_n = timed(lambda: torch.mm(a, b), seconds / 2)
    copy_s, copy_n = timed(lambda: dst.copy_(src), seconds / 2)
    return {"kind": "measurement", "bf16_gemm_tflops": round(2 * size**3 / gemm_s / 1e12, 1),
            "gemm": f"{size}x{size}x{size} bf16 torch.mm, random operands, median of {gemm_n}",
            "copy_gb_s": round(2 * copy_bytes / copy_s / 1e9, 1),
            "copy": f"{copy_bytes >> 20} MiB device-to-device copy_, read + write, median of {copy_n}"}


def report(out: str | None, device: str | None = None) -> dict:
    """Everything about the machine, written to ``out`` as soon as it is known (then again with the
    ceilings)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = {"device": device, "python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "nvidia_smi": _nvidia_smi(), "versions": versions(),
            "torch_cuda": torch.version.cuda, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        data["gpu"] = {"name": props.name, "sms": props.multi_processor_count, "memory_bytes": props.total_memory,
                       "l2_bytes": getattr(props, "L2_cache_size", None), "capability": f"{props.major}.{props.minor}"}

    def write():
        if out:
            with open(out, "w") as f:
                json.dump(data, f, indent=1)

    write()
    data["ceilings"] = ceilings(device)
    write()
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="the machine, its versions and its measured ceilings")
    rep.add_argument("--out", default=None)
    rep.add_argument("--device", default=None, choices=("cuda", "cpu"))
    whl = sub.add_parser("wheels", help="check the carried wheels")
    whl.add_argument("--dir", default=".whl")
    whl.add_argument("--against", default="image", choices=("image", "installed"),
                     help="image: the lent image as described (a rehearsal); installed: this Python's packages")
    sub.add_parser("download-command", help="print the command that downloads the wheels")
    args = parser.parse_args(argv)
    if args.command == "download-command":
        print(download_command())
        return 0
    if args.command == "wheels":
        lines, problems = check_wheels(args.dir, args.against)
        print("\n".join(lines))
        for p in problems:
            print(f"  PROBLEM: {p}")
        if problems:
            print(f"  to fetch them where a registry is reachable: {download_command(args.dir)}")
        return int(bool(problems))
    data = report(args.out, args.device)
    c, gpu = data["ceilings"], data.get("gpu") or {}
    print(f"{gpu.get('name', data['device'])}: {gpu.get('sms', '?')} SMs; nvidia-smi: {data['nvidia_smi']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v))
    missing = [n for n, _ in WHEELS if not data["versions"].get(n)]
    if missing:
        print("not installed: " + ", ".join(missing))
    print(f"ceilings (measured): bf16 GEMM {c['bf16_gemm_tflops']} TFLOP/s ({c['gemm']}); copy {c['copy_gb_s']} GB/s "
          f"({c['copy']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
