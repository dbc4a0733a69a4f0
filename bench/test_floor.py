"""The floor: the bare GEMMs an op needs (no softmax, no divergence), at every main shape.

report.py divides each op's time by its floor: log-probs by the 3 GEMMs, the divergences and the
PTD head by the 4 (the teacher's logits too), the teacher top-K by the logits GEMM alone.
"""

import pytest
from conftest import FLOORS, gemm_floor, measure


@pytest.mark.parametrize("kind", FLOORS, ids=["1gemm", "3gemms", "4gemms"])
def test_floor(benchmark, inp, kind):
    measure(benchmark, lambda: gemm_floor(kind, inp), inp, op="floor", method=kind, nv_buffers=2)
