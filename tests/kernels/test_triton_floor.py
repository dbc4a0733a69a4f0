"""The Triton floor: stated in pyproject.toml, checked at first use, and kept by the kernels.

3.0 is the oldest Triton whose ``tl.dot`` takes ``input_precision`` (2.3 has only ``allow_tf32``),
which every kernel's dot passes. The kernels were compiled for sm_90a with Triton 3.0.0, 3.2.0 and
3.9.0 (docs/gpu.md). ``TL_NAMES_IN_FLOOR`` lists the ``tl.*`` names the kernels use, each present in
Triton 3.0.0's ``triton.language.__all__``: a kernel that starts using another one (``tl.topk``,
``tl.sort``, ``tl.gather``, ... came later) fails here until the floor is checked again.

The cuBLAS backend's elementwise kernels use the same names plus ``tl.cumsum`` (in 3.0) and, on a GPU,
``tl.topk``, first in Triton 3.4 (read from the 3.3.1 and 3.4.0 wheels' ``triton/language/__init__.py``):
that backend checks ``CUBLAS_TRITON_FLOOR`` at first use, and ``auto`` passes it by on an older Triton.
"""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.abspath(os.path.join(__file__, "..", "..", ".."))
KERNELS = os.path.join(ROOT, "ptd_kernels", "backends", "triton")
CUBLAS_KERNELS = os.path.join(ROOT, "ptd_kernels", "backends", "cublas")

# Checked against Triton 3.0.0's triton.language.__all__ (the wheel's triton/language/__init__.py).
TL_NAMES_IN_FLOOR = frozenset({
    "abs", "arange", "argmin", "cdiv", "constexpr", "debug_barrier", "dot", "exp", "float32", "float64", "full",
    "int32", "int64", "load", "log", "max", "maximum", "min", "minimum", "num_programs", "program_id", "store",
    "sum", "where", "zeros",
})


# Names the cuBLAS backend's kernels use beyond the floor, with the release that added each.
CUBLAS_NAMES_ABOVE_FLOOR = {"cumsum": (3, 0), "topk": (3, 4)}


def tl_names(folder: str) -> set[str]:
    used = set()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as file:
                used |= set(re.findall(r"\btl\.([A-Za-z_]\w*)", file.read()))
    return used


def test_kernels_use_only_names_the_floor_has():
    used = tl_names(KERNELS)
    newer = used - TL_NAMES_IN_FLOOR
    assert not newer, (f"the kernels use tl.{', tl.'.join(sorted(newer))}, not checked against the Triton floor: "
                       "find the release that added it, raise TRITON_FLOOR and pyproject's triton line if needed")


def test_pyproject_states_the_floor():
    from ptd_kernels.backends.triton._launch import TRITON_FLOOR

    with open(os.path.join(ROOT, "pyproject.toml")) as file:
        stated = re.findall(r'"triton>=([\d.]+)"', file.read())
    assert stated == [".".join(map(str, TRITON_FLOOR))]


@pytest.mark.parametrize("version", ["2.3.1", "2.1.0", "3.0.0", "3.2.0+git1234", "3.9.0", "4.0.0"])
def test_first_use_names_the_version_needed(version):
    from ptd_kernels.backends.triton._launch import TRITON_FLOOR, check_triton

    release = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    if release >= TRITON_FLOOR:
        check_triton(version)
        return
    with pytest.raises(ImportError, match=r"need triton>=3\.0 .* this is triton " + re.escape(version)):
        check_triton(version)


def test_the_installed_triton_passes():
    import triton

    from ptd_kernels.backends.triton._launch import check_triton

    check_triton(triton.__version__)


def test_cublas_kernels_use_only_names_their_floor_has():
    from ptd_kernels.backends.triton._launch import CUBLAS_TRITON_FLOOR

    newer = tl_names(CUBLAS_KERNELS) - TL_NAMES_IN_FLOOR - set(CUBLAS_NAMES_ABOVE_FLOOR)
    assert not newer, f"the cuBLAS kernels use tl.{', tl.'.join(sorted(newer))}: find the release that added it"
    assert max(CUBLAS_NAMES_ABOVE_FLOOR.values()) == CUBLAS_TRITON_FLOOR


def test_cublas_first_use_names_the_version_needed(monkeypatch):
    from ptd_kernels.backends.triton._launch import check_triton_for_cublas

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ImportError, match=r"backend='cublas' needs triton>=3\.4 on a GPU \(triton\.language\.topk\); "
                                          r"this is triton 3\.3\.1: install triton>=3\.4"):
        check_triton_for_cublas("3.3.1", has_topk=False)
    check_triton_for_cublas("3.4.0", has_topk=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter ranks instead of tl.topk: any floor Triton
    check_triton_for_cublas("3.3.1", has_topk=False)
