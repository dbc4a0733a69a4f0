"""Every Triton kernel compiles for an H100 (sm_90) down to a cubin, on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python semantics, not the compiler:
a construct that only the real lowering rejects (a loop bound it cannot type, a dtype mismatch in
a comparison, a tile that does not fit) would pass every CPU test and fail on the first GPU.
Triton compiles for a named target without a device (with its bundled ptxas), so this test does,
for the constexpr configurations the launchers use on CUDA (default tiles and warps, every
optional input present, soft-capping on), in float32 and bfloat16, for each β branch of the JSD kernels.

The kernels must be imported with the interpreter off, so one subprocess compiles every case
(``python tests/test_triton_compile.py`` prints the results as JSON) and each test reads its own.
Skipped where Triton's NVIDIA backend is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

DTYPES = {"fp32": "ieee", "bf16": "tf32"}  # operand dtype → the tl.dot input_precision (TF32 off, torch's default)
# Every case has the soft-cap on; the variants after the dtype: "nocap" (the default softcap=None build),
# "studentcap" (a cap on the student's side only), "tf32" (float32 with torch's TF32 switch on).
CASES = (
    [f"row_stats-k{k}-{d}" for k in (0, 100) for d in DTYPES]
    + [f"head_backward-{s}-{d}" for s in ("dense", "sparse") for d in DTYPES]
    + [f"jsd_{direction}-beta{b}-{d}" for direction in ("forward", "backward") for b in ("0.0", "0.5", "1.0")
       for d in DTYPES]
    + ["row_stats-k100-fp32-nocap", "head_backward-sparse-fp32-nocap", "jsd_backward-beta0.5-fp32-nocap",
       "jsd_forward-beta0.3-bf16-studentcap", "head_backward-dense-fp64", "jsd_backward-beta0.5-fp64",
       "row_stats-k0-fp64", "head_backward-dense-fp32-tf32", "jsd_forward-beta0.5-fp32-tf32"]
)
VARIANTS = ("nocap", "studentcap", "tf32")


def _compile_case(case: str) -> None:
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ptd_kernels.backends.triton import _launch, _math, jsd
    from ptd_kernels.backends.triton import head_backward as hb
    from ptd_kernels.backends.triton import row_stats as rs

    def compile_for_h100(kernel, dtype, constexprs, num_warps, int64_ptrs=(), operand_ptrs=()):
        """``operand_ptrs`` point to ``dtype`` data, ``int64_ptrs`` to int64, other pointers to the
        accumulator dtype (fp64 for fp64 operands, else fp32), and every other non-constexpr argument is
        an i32 scalar."""
        names = kernel.arg_names
        signature = {}
        for name in names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                accumulator = "fp64" if dtype == "fp64" else "fp32"  # statistics, coefficients, gradients
                pointee = "i64" if name in int64_ptrs else dtype if name in operand_ptrs else accumulator
                signature[name] = f"*{pointee}"
            else:
                signature[name] = "i32"
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(c),): v for c, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert compiled.asm.get("cubin"), "no cubin produced"

    name, *rest, dtype = case.split("-")
    variant = None
    if dtype in VARIANTS:
        variant, dtype = dtype, rest.pop()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[dtype]
    block_n, block_v, block_h, warps = _launch.default_tiles(torch_dtype)
    torch.backends.cuda.matmul.allow_tf32 = variant == "tf32"
    precision = _launch.dot_precision(torch_dtype)
    assert precision == ("tf32" if variant == "tf32" else DTYPES.get(dtype, "ieee")), (precision, dtype)
    cap, teacher_cap = variant != "nocap", variant not in ("nocap", "studentcap")
    acc = tl.float64 if dtype == "fp64" else tl.float32
    if name == "row_stats":
        k = int(rest[0][1:])
        k_pad = max(2, triton.next_power_of_2(k)) if k else 0
        block_n, block_v, block_h, warps = rs._default_tiles(k_pad)
        compile_for_h100(
            rs._row_stats_kernel, dtype,
            dict(HAS_BIAS=True, HAS_CAP=cap, HAS_TARGETS=True, WITH_MEAN=True, TOPK=k > 0, K_PAD=max(k_pad, 2),
                 NUM_SEG=4, RANK_MERGE=False, ACC_DTYPE=acc, DOT_UPCAST=False, PRECISION=precision,
                 BLOCK_N=block_n, BLOCK_V=max(block_v, k_pad), BLOCK_H=block_h), warps,
            int64_ptrs=("y_ptr", "part_keys_ptr"), operand_ptrs=("h_ptr", "w_ptr", "b_ptr"))
    elif name == "head_backward":
        compile_for_h100(
            hb._head_backward_kernel, dtype,
            dict(HAS_BIAS=True, HAS_CAP=cap, HAS_LOGIT_COEF=True, HAS_TARGETS=True, HAS_SPARSE=rest[0] == "sparse",
                 NEED_X_GRAD=True, NEED_W_GRAD=True, NEED_B_GRAD=True, DOT_UPCAST=False, PRECISION=precision,
                 BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, GROUP_N=_launch.GROUP_N), warps,
            int64_ptrs=("targets_ptr", "sparse_ids_ptr"), operand_ptrs=("x_ptr", "w_ptr", "b_ptr"))
    else:
        beta = float(rest[0][len("beta"):])
        constexprs = dict(HAS_BIAS=True, HAS_TEACHER_BIAS=True, SHARED_WEIGHT=beta == 0.5, HAS_CAP=cap,
                          T_HAS_CAP=teacher_cap,
                          BETA_CASE=_math.beta_case(beta), DOT_UPCAST=False, PRECISION=precision,
                          T_DOT_UPCAST=False, T_PRECISION=precision,
                          BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, GROUP_N=_launch.GROUP_N)
        kernel = jsd._jsd_forward_kernel
        if name == "jsd_backward":
            kernel = jsd._jsd_backward_kernel
            constexprs.update(NEED_X_GRAD=True, NEED_W_GRAD=True, NEED_B_GRAD=True)
        compile_for_h100(kernel, dtype, constexprs, warps,
                         operand_ptrs=("x_ptr", "w_ptr", "b_ptr", "tx_ptr", "tw_ptr", "tb_ptr"))


def _main() -> None:
    results = {}
    for case in CASES:
        try:
            _compile_case(case)
            results[case] = "ok"
        except Exception as exc:  # report every case, not just the first failure
            results[case] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    print(json.dumps(results))


def _why_not() -> str | None:
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"this Triton cannot compile for a named target ({exc})"
    return None if "nvidia" in backends else "Triton's NVIDIA backend is not installed"


@pytest.fixture(scope="module")
def results():
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_for_h100(results, case):
    assert results[case] == "ok", results[case]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _main()
