"""Zero-spoiler hints: the leak check, and that the embedded hints pass it by construction."""

import numpy as np
import pytest

from ptd_train.hints import HINT_KINDS, HintLeakError, check_hint, leak_reason
from ptd_train.tasks import GridCountTask


@pytest.mark.parametrize(
    "hint, answer",
    [
        ("total 4", "4"),
        ("there are 4 red cells", "4"),
        ("there are four red cells", "4"),
        ("rows hold 1 2 0 1 red cells", "4"),  # per-row counts that add up to the answer
        ("the answer is blue", "blue"),
        ("look left: the object is a Cat", "cat"),
        ("count rows ; then the total", "9"),
    ],
)
def test_leak_check_rejects_spoilers(hint, answer):
    assert leak_reason(hint, answer) is not None
    with pytest.raises(HintLeakError, match="leaks the answer"):
        check_hint(hint, answer)


@pytest.mark.parametrize(
    "hint, answer",
    [
        ("look only at cells a1 b3 c4 d2 and ignore the blue cells .", "4"),  # cell names are not counts
        ("count the red cells in row a , then rows b c d , then add the rows .", "4"),
        ("look at the 3 cars on the left", "7"),
        ("the object is on the left, next to a table", "cat"),
    ],
)
def test_leak_check_accepts_zero_spoiler_hints(hint, answer):
    assert leak_reason(hint, answer) is None
    assert check_hint(hint, answer) == hint


def test_every_embedded_hint_is_zero_spoiler():
    task = GridCountTask(eval_size=50, dev_size=10)
    examples = task.test + task.dev + task.sample(np.random.default_rng(0), 500)
    answers = {int(e.answer) for e in examples}
    assert len(answers) >= 10
    for e in examples:
        for kind in HINT_KINDS:
            h = e.hint(kind)
            check_hint(h, e.answer)
            # no number at all: not the answer, not a count of anything
            assert not any(w.isdigit() for w in h.split()), h
        assert e.hint("none") is None
