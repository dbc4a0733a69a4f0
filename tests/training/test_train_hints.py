"""Zero-spoiler hints: the leak check, that the embedded hints pass it by construction, and that
the coarse hint leaves the answer open where the spatial one determines it."""

import itertools

import numpy as np
import pytest

from ptd_train import hints
from ptd_train.hints import HINT_KINDS, HintLeakError, check_hint, leak_reason, make_hints
from ptd_train.prompts import build_tokenizer
from ptd_train.tasks import GridCountTask
from ptd_train.tasks.grid_count import ROWS, cell_name


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
        # numbers read as the verifier compares answers (tasks.reward: the float value of the number)
        ("the result is -3", "-3"),
        ("the result is −3", "-3"),  # a Unicode minus
        ("the result is minus three", "-3"),
        ("negative 3 degrees", "-3"),
        ("it comes to 3.0", "3"),
        ("it comes to 3", "3.0"),
        ("about 0.5 of them", ".5"),
        ("three point five metres", "3.5"),
        ("twenty-one cars", "21"),
        ("twenty one cars", "21"),
        ("one hundred and five cars", "105"),
        ("1,000 cars", "1000"),
        ("there are three of them", "three"),  # an answer in words is a number too
        ("-1 on the left and 4 on the right", "3"),  # signed numbers that add up to it
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
        ("look at the 3 cars", "-3"),  # 3 is not -3: the verifier would not accept it either
        ("look at cells a1 b3 c4", "3"),  # cell names, not quantities
        ("one car , then two more", "4"),  # 1 and 2, not 12 or 3 = 4
        ("look at the signs , not the minus", "-3"),
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


def _every_grid():
    """(red cell names, count) for all 2^16 grids of the embedded task."""
    for bits in itertools.product((False, True), repeat=16):
        red = [cell_name(i // 4, i % 4) for i, b in enumerate(bits) if b]
        yield red, len(red)


def test_coarse_hint_never_determines_the_answer_the_spatial_one_always_does():
    counts = {"spatial": {}, "coarse": {}}
    for red, n in _every_grid():
        h = make_hints(red, list(ROWS))
        for kind in counts:
            counts[kind].setdefault(h[kind], set()).add(n)
        check_hint(h["coarse"], str(n))
    # spatial: every text goes with one count (a teacher counts the named cells)
    assert all(len(c) == 1 for c in counts["spatial"].values())
    # coarse: 15 texts (every non-empty set of rows), none of them pins the count down
    assert len(counts["coarse"]) == 15
    assert min(len(c) for c in counts["coarse"].values()) >= 2
    every_row = make_hints([], list(ROWS))["coarse"]
    assert counts["coarse"][every_row] == {0, *range(4, 17)}  # the empty grid has no text of its own


@pytest.mark.parametrize(
    "red, text",
    [
        (["b2", "b4"], "look only at row b and ignore the blue cells ."),
        (["a1", "c3", "c4"], "look only at rows a c and ignore the blue cells ."),
        (["d1", "a2", "b3", "c4"], "look only at rows a b c d and ignore the blue cells ."),
        ([], "look only at rows a b c d and ignore the blue cells ."),
    ],
)
def test_coarse_hint_names_the_rows_of_the_red_cells(red, text):
    assert make_hints(red, list(ROWS))["coarse"] == text


def test_hint_words_are_in_the_vocabulary_and_the_coarse_hint_adds_none():
    vocab = build_tokenizer(GridCountTask.words).get_vocab()
    for red, _ in itertools.islice(_every_grid(), 0, 1 << 16, 997):
        for text in make_hints(red, list(ROWS)).values():
            assert all(w in vocab for w in text.split()), text
    # the coarse hint reuses words the other hints already had: the embedded model's vocabulary,
    # hence its initialisation and every run without the coarse hint, are what they were
    before = set(hints.CELL_WORDS + hints._SPATIAL_HEAD + hints._SPATIAL_TAIL + hints._SPATIAL_EMPTY)
    before |= set(hints._PROCEDURE + [";"])
    assert set(hints.HINT_WORDS) == before


@pytest.mark.parametrize(
    "text, value",
    [("-3", -3.0), ("3.0", 3.0), ("minus three", -3.0), ("twenty-one", 21.0), ("one hundred and five", 105.0),
     ("three point five", 3.5), ("1,000", 1000.0), ("cat", None), ("three cats", None), ("inf", None)],
)
def test_number_value_reads_digits_and_words(text, value):
    assert hints.number_value(text) == value


def test_leak_check_agrees_with_the_verifier():
    """Whenever the verifier would accept a hint's number as the answer, the leak check rejects the hint."""
    from ptd_train.tasks import reward

    for answer in ("-3", "3", "3.0", "0.5", "12", "-0.25"):
        for number in ("-3", "3", "3.0", "3.00", "0.5", ".5", "12", "12.0", "-0.25", "-.25", "4"):
            hint = f"look at the {number} objects"
            if reward(number, answer) == 1.0:
                assert leak_reason(hint, answer) is not None, (hint, answer)
