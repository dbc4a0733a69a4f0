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
from dataclasses import dataclass

import torch

_TORCH_DIR = os.path.dirname(torch.__file__)
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
_MACHINERY = {os.path.join(_BENCH_DIR, name) for name in ("gpu_count.py", "gpu_scalars.py", "gpu_work.py")}


class UnmodelledScalar(RuntimeError):
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


SCALAR_RULES = (
    ScalarRule("live_index", "live.all()", True, "every row is live (no ignored target, no masked row)"),
    ScalarRule("weighted_loss", "live.sum()", lambda _f, t: t.numel(), "every row is live"),
    ScalarRule("check_targets", ".any()", False, "every target lies in [0, V)"),
    ScalarRule("check_sparse_teacher", ".any()", False, "teacher ids lie in [0, V) and do not repeat"),
    ScalarRule("topk_ids", "ambiguous.any()", False, "no tie straddles the k-th place"),
    ScalarRule("_add_sparse", "inside.any()", True, "every block holds some sparse term"),
    ScalarRule("pad_sparse", "ids.max()", lambda f, _t: f["vocab"] - 1, "ids span the vocabulary"),
    ScalarRule("pad_sparse", "ids.min()", 0, "ids span the vocabulary"),
    ScalarRule("pad_sparse", "counts.max()", lambda f, _t: f["rows"].numel() // max(1, f["n"]),
               "every row has all its sparse terms (distinct support ids: |S| = 2K for the union)"),
    ScalarRule("head_backward", "row_index.min()", 0, "sparse rows are rows of the call"),
    ScalarRule("head_backward", "row_index.max()", lambda f, _t: f["n"] - 1, "sparse rows are rows of the call"),
    ScalarRule("backward", "grad == 1", True, "the loss is the last node (incoming gradient 1)"),
    # peers
    ScalarRule("fused_linear_jsd_backward", "torch.equal", True, "the loss is the last node (gradient 1)"),
    ScalarRule("fused_linear_cross_entropy_backward", "torch.equal", True, "the loss is the last node"),
    ScalarRule("fused_linear_cross_entropy_forward", ".item()", lambda _f, t: _all_rows(t), "no ignored target"),
    ScalarRule("fused_linear_cross_entropy_forward", "torch.all", True, "no ignored target"),
    ScalarRule("backward", "grad_output != 1.0", False, "the loss is the last node (gradient 1)"),
)


def _all_rows(tensor):
    return tensor.numel() if tensor.dtype != torch.bool else True


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


def modelled_scalar(tensor):
    function, line, frame_locals, where = calling_site()
    for rule in SCALAR_RULES:
        if rule.function == function and rule.fragment in line:
            value = rule.value(frame_locals, tensor) if callable(rule.value) else rule.value
            return value
    raise UnmodelledScalar(
        f"a value is read back to the host in {function}() at {where} ({line!r}) and no rule of "
        "bench/gpu_scalars.SCALAR_RULES says what it is under the modelled data: add one")
