"""Every elementwise kernel of the cuBLAS backend compiles for an H100 (sm_90a) at the tiles its launchers
use on a GPU, on a machine without one, within Hopper's shared memory and without register spills.

The interpreter runs the kernels' Python semantics, not the compiler (a global that is not a constexpr,
a tile that does not fit, a sort that spills would all pass every CPU test). One subprocess, with the
interpreter off, compiles each case with Triton's bundled ptxas (``python tests/kernels/test_cublas_compile.py``
prints the JSON) and reads the register and spill counts from ``ptxas -v``. Marked slow: ~15 s per case.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

# Hopper's largest shared memory per block (opt-in), bytes.
MAX_SHARED = 232448
CASES = ["stats-k0", "stats-k100", "stats-k256", "stats-k0-fp64", "head_grad-bf16", "head_grad-fp32",
         "jsd_stats-beta0.5", "jsd_grad-beta0.0-bf16", "gather", "block_gather"]


def _compile_case(case: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from ptd_kernels.backends.cublas import (
        _blocks,
        block_gather_kernel,
        gather_kernel,
        grad_kernel,
        jsd_grad_kernel,
        jsd_stats_kernel,
        stats_kernel,
    )
    from ptd_kernels.backends.triton.rowmath import beta_case

    def build(kernel, constexprs: dict, pointers: dict, warps: int) -> dict:
        """``pointers``: pointee type per pointer argument (default fp32); other arguments are i32."""
        names = kernel.arg_names
        signature = {name: "constexpr" if name in constexprs else
                     f"*{pointers.get(name, 'fp32')}" if name.endswith("_ptr") else "i32" for name in names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(c),): v for c, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert compiled.asm.get("cubin"), "no cubin"
        ptx = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cublas-{case}-{os.getpid()}.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
        os.remove(ptx)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill", report)]
        registers = [int(x) for x in re.findall(r"Used (\d+) registers", report)]
        return {"shared": compiled.metadata.shared, "registers": max(registers, default=0),
                "spill_bytes": sum(spills)}

    name, *rest = case.split("-")
    fp64 = "fp64" in rest
    acc = "fp64" if fp64 else "fp32"
    if name == "stats":
        k = int(rest[0][1:])
        block_r, block_c, warps = _blocks.GPU_TILES["stats_topk" if k else "stats"]
        k_pad = triton.next_power_of_2(k) if k else 1
        cap = stats_kernel.scratch_width(k_pad, block_c) if k else 1
        return build(stats_kernel._block_stats_kernel,
                     dict(HAS_BIAS=True, HAS_CAP=True, WITH_MEAN=True, HAS_TARGETS=True, TOPK=k > 0, WRITE_Z=False,
                          K_PAD=k_pad, CAP=cap, RANK_SELECT=False, BLOCK_R=block_r, BLOCK_C=block_c),
                     dict(a_ptr=acc, bias_ptr="fp64" if fp64 else "bf16", scalars_ptr=acc, targets_ptr="i64",
                          m_ptr=acc, s_ptr=acc, t_ptr=acc, target_ptr=acc, top_ptr="i64", scratch_ptr="i64"), warps)
    if name == "head_grad":
        block_r, block_c, warps = _blocks.GPU_TILES["grad"]
        narrow = rest[0] == "bf16"
        return build(grad_kernel._head_grad_kernel,
                     dict(HAS_BIAS=True, HAS_CAP=True, HAS_LOGIT_COEF=True, HAS_TARGETS=True, HAS_SPARSE=True,
                          NARROW_IN_PLACE=narrow, BLOCK_R=block_r, BLOCK_C=block_c),
                     dict(dz_ptr="bf16" if narrow else "fp32", bias_ptr=rest[0], targets_ptr="i64",
                          sparse_ids_ptr="i64"), warps)
    if name in ("jsd_stats", "jsd_grad"):
        block_r, block_c, warps = _blocks.GPU_TILES["jsd"]
        beta = float(rest[0][len("beta"):])
        constexprs = dict(HAS_BIAS=True, T_HAS_BIAS=True, HAS_CAP=True, T_HAS_CAP=True, BETA_CASE=beta_case(beta),
                          BLOCK_R=block_r, BLOCK_C=block_c)
        pointers = dict(bias_ptr="bf16", t_bias_ptr="bf16", lse_ptr="fp64", t_lse_ptr="fp64")
        if name == "jsd_stats":
            return build(jsd_stats_kernel._jsd_stats_kernel, constexprs, pointers, warps)
        return build(jsd_grad_kernel._jsd_grad_kernel, dict(constexprs, NARROW_IN_PLACE=True),
                     dict(pointers, dz_ptr="bf16"), warps)
    if name == "gather":
        block_m, block_h, warps = _blocks.GPU_TILES["gather"]
        return build(gather_kernel._gather_logits_kernel,
                     dict(HAS_BIAS=True, HAS_CAP=True, BLOCK_M=block_m, BLOCK_H=block_h),
                     dict(x_ptr="bf16", w_ptr="bf16", bias_ptr="bf16", ids_ptr="i64"), warps)
    block_r, block_m, warps = _blocks.GPU_TILES["block_gather"]
    return build(block_gather_kernel._block_gather_kernel,
                 dict(HAS_BIAS=True, HAS_CAP=True, BLOCK_R=block_r, BLOCK_M=block_m),
                 dict(bias_ptr="bf16", ids_ptr="i64"), warps)


def _main() -> None:
    results = {}
    for case in CASES:
        try:
            results[case] = _compile_case(case)
        except Exception as exc:  # report every case, not just the first failure
            results[case] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    print(json.dumps(results))


_RESULTS: dict | None = None


def _results() -> dict:
    global _RESULTS
    if _RESULTS is None:
        pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(os.path.join(__file__, "..", "..", "..")),
                                             env.get("PYTHONPATH", "")])
        out = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                             timeout=1800)
        assert out.returncode == 0, out.stderr[-3000:]
        _RESULTS = json.loads(out.stdout.strip().splitlines()[-1])
    return _RESULTS


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_for_sm90_within_shared_memory_without_spills(case):
    result = _results()[case]
    assert isinstance(result, dict), result
    assert result["shared"] <= MAX_SHARED, result
    assert result["spill_bytes"] == 0, result


if __name__ == "__main__":
    _main()
