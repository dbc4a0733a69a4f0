"""The soft-cap and logit-scale variants of the ptd rows (see TRANSFORMS): their arguments, inputs and row
names."""

from __future__ import annotations

import pytest
from conftest import DEVICE, Inputs

# Soft-capping and logit scale against the plain rows: the ptd rows of every op also run with
# ``softcap=30.0`` (Gemma-2/3's ``final_logit_softcapping``: a tanh per logit, and its derivative in
# the backward) and with ``logit_scale=0.125`` (Granite's 1/``logits_scaling`` = 1/8: one multiply
# per logit), on the student and, for the divergences, on the teacher too (its own
# ``teacher_softcap`` / ``teacher_logit_scale``, as a distillation pair of one family has). They are
# parametrizations of the plain test, so each runs right after its plain row (same load). The logits
# stay those of the plain row: the soft-cap at 30 barely bends these (|z| ≲ 3), and the logit-scale
# rows take hidden states multiplied by 1/s, as a model trained with that scale produces; otherwise
# the flatter distributions would change the data-dependent work (the streaming top-K's pruning)
# and the ratio would not be the transform's cost.
TRANSFORMS = {"plain": {}, "softcap": {"softcap": 30.0}, "logit_scale": {"logit_scale": 0.125}}
# On CUDA the plain rows come first (both backends, the peers, every shape's tier 0) and the transforms
# are extras (tier 3): the first GPU run is for the rule of ``auto`` and the peers, the transforms' cost
# is measured on CPU (bench/transform_cost.py).
TRANSFORM_PARAMS = [t if t == "plain" or DEVICE != "cuda" else pytest.param(t, marks=pytest.mark.tier(3))
                    for t in TRANSFORMS]


class ScaledInputs:
    """``inp`` with the student's and the teacher's hidden states multiplied by ``factor`` (new leaves)."""

    def __init__(self, inp: Inputs, factor: float):
        self.shape = inp.shape
        self.weight, self.targets, self.teacher_weight = inp.weight, inp.targets, inp.teacher_weight
        self.hidden = (inp.hidden.detach() * factor).requires_grad_()
        self.teacher_hidden = inp.teacher_hidden * factor

    student, teacher, all = Inputs.student, Inputs.teacher, Inputs.all


def transform_inputs(inp: Inputs, name: str):
    """The inputs of a transform's row: ``inp`` itself, or for a logit scale s, hidden states × 1/s (cached
    on ``inp``, so the plain and the scaled rows of one shape share them) — the same logits either way."""
    scale = TRANSFORMS[name].get("logit_scale")
    if scale is None:
        return inp
    cache = inp.__dict__.setdefault("scaled", {})
    if scale not in cache:
        cache[scale] = ScaledInputs(inp, 1.0 / scale)
    return cache[scale]


def transform_args(name: str, teacher: bool = False) -> dict:
    """The keyword arguments of a transform, for the student (and the teacher)."""
    kw = dict(TRANSFORMS[name])
    if teacher:
        kw.update({f"teacher_{k}": v for k, v in TRANSFORMS[name].items()})
    return kw


def transform_row(name: str, base_method: str) -> tuple[str, dict]:
    """(method, extra_info) of a ptd row: a variant records ``variant`` and the plain row's ``base_method``;
    report.py compares the two and keeps variants out of the op's fastest ptd entry point."""
    if name == "plain":
        return base_method, {}
    label = ", ".join(f"{k} {v:g}" for k, v in TRANSFORMS[name].items())
    return f"{base_method} + {label}", {"variant": name, "base_method": base_method}
