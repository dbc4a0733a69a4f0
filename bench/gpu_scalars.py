"""Values read back to the host while counting, answered for the *modelled data*.

Counting runs on tensors without data, so a branch on a tensor's value (``bool(mask.all())``,
``int(ids.max())``) cannot be evaluated. Each read-back is answered by the rule for its site — the
function reading it and a piece of its source line — under the modelled data: every row live, every
target and id in range, no tie at the k-th place, every boolean mask all True. A read-back at a site
no rule names raises ``UnmodelledScalar``: a changed branch in the library then shows up instead of
being guessed.
"""

from __future__ import annotations

import linecache
import os
import sys
from collections import Counter
from dataclasses import dataclass

import torch

_TORCH_DIR = os.path.dirname(torch.__file__)
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
_MACHINERY = {os.path.join(_BENCH_DIR, name) for name in ("gpu_count.py", "gpu_scalars.py", "gpu_work.py")}


class UnmodelledScalar(Exception):  # not a RuntimeError: library code catching those must not swallow it
    """A value read back to the host at a site with no rule: the modelled branch is unknown."""


@dataclass(frozen=True)
class ScalarRule:
    """The value a read-back at a site takes under the modelled data.

    function: the name of the Python function reading it back; fragment: a piece of its source line;
    value: the answer, or a callable (frame locals, tensor) → answer.
    """

    function: str
    fragment: str
    value: object
    why: str
    library: str = "ptd_kernels"  # the package whose code reads it back


def _summary(frame_locals, _tensor):
    """A call's one read of its device values (``backends.call.open_call``) under the modelled data: every
    row live (and with a divergence), every id in range, no repeated sparse-teacher id."""
    arguments = frame_locals["checked"].arguments
    rows = (arguments.get("hidden") if arguments.get("hidden") is not None else arguments["logits"]).shape[0]
    return [float(rows) if name in ("live rows", "jsd rows") else 0.0
            for name, _ in frame_locals["checked"].summary]


SCALAR_RULES = (
    ScalarRule("open_call", ".tolist()", _summary,
               "every row live, every target and teacher id in [0, V), no repeated teacher id"),
    ScalarRule("_baddbmm_accumulates", "float(c[0, 0])", 11.5,
               "cuBLAS adds 16-bit products into a float32 output in place (the cublas backend's probe passes)"),
    # peers
    ScalarRule("fused_linear_cross_entropy_forward", ".item()", lambda _f, t: t.numel(),
               "no ignored target: the count of live rows is the row count", "liger_kernel"),
)


def calling_site():
    """(function name, source line, frame locals, "file:line") of the innermost frame outside torch and the
    counting machinery."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_TORCH_DIR) and filename not in _MACHINERY:
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            return frame.f_code.co_name, line, frame.f_locals, f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "?", "", {}, "?"


RULE_USES: Counter = Counter()  # rule → read-backs it answered (a rule nothing uses any more can go)


def modelled_scalar(tensor):
    """The value of a read-back of ``tensor`` under the modelled data, by the rule for its site."""
    function, line, frame_locals, where = calling_site()
    for rule in SCALAR_RULES:
        if rule.function == function and rule.fragment in line:
            RULE_USES[rule] += 1
            return rule.value(frame_locals, tensor) if callable(rule.value) else rule.value
    raise UnmodelledScalar(
        f"a value is read back to the host in {function}() at {where} ({line!r}) and no rule of "
        "bench/gpu_scalars.SCALAR_RULES says what it is under the modelled data: add one")
