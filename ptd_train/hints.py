"""Privileged hints (SPEC §1 step 2) and the zero-spoiler check.

A hint teaches *the way*, not the answer: spatial guidance (which cells to look at, what to
ignore) and reasoning directions (the procedure). It never contains the final answer, nor
numbers from which the answer is copied (per-row counts, a sum). Hints of the embedded task are
zero-spoiler by construction (their vocabulary has no number at all) and every hint the trainer
uses, embedded or read from a dataset, passes :func:`check_hint` before a teacher sees it.

Two grades of spatial hint on the embedded task. ``spatial`` names the exact red cells: no
number, but a teacher can count the names, so the hint determines the answer. ``coarse`` names
only the rows that hold red cells (all four when there is none, so that no text stands for the
answer 0): the answer stays open — k named rows hold between k and 4k red cells — which tests
"teaching the way, not the answer" more strictly. On random 4×4 grids with red density 1/2 a row
is empty with probability 1/16, so the coarse hint names all four rows for (15/16)^4 ≈ 77 % of
grids: a weak hint by construction.

Only the teacher context x^h = [x ; h] carries a hint; the student prompt is built without one
(``prompts.Env.prompts`` without hint kinds), which tests check.
"""

from __future__ import annotations

import re

# Hint kinds of the embedded task. "none" = no hint (the student's context, or the
# teacher-without-hint control). A dataset's single hint is the kind "default".
HINT_KINDS = ("spatial", "coarse", "procedure", "both")

CELL_WORDS = [f"{r}{c}" for r in "abcd" for c in range(1, 5)]
_SPATIAL_HEAD = "look only at cells".split()
_SPATIAL_TAIL = "and ignore the blue cells .".split()
_SPATIAL_EMPTY = "look at every row ; ignore the blue cells .".split()
_COARSE_HEAD = {1: "look only at row".split(), 2: "look only at rows".split()}  # one row / several
_PROCEDURE = "count the red cells in row a , then rows b c d , then add the rows .".split()
ROW_WORDS = list("abcd")
HINT_WORDS = sorted(
    set(CELL_WORDS + _SPATIAL_HEAD + _SPATIAL_TAIL + _SPATIAL_EMPTY + _PROCEDURE + [";"])
    | set(_COARSE_HEAD[1] + _COARSE_HEAD[2] + ROW_WORDS)  # words the lists above already hold: same vocabulary
)

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()


class HintLeakError(ValueError):
    """A hint would give the answer away."""


def coarse_hint(red_cells: list[str], rows: list[str]) -> str:
    """The rows (of ``rows``, in that order) that hold a red cell; every row when none does."""
    named = [r for r in rows if any(c[0] == r for c in red_cells)] or list(rows)
    return " ".join(_COARSE_HEAD[min(len(named), 2)] + named + _SPATIAL_TAIL)


def make_hints(red_cells: list[str], rows: list[str]) -> dict[str, str]:
    """All hint kinds for one grid; ``red_cells`` are cell names like ``b3`` (row letter, column),
    ``rows`` the grid's row letters."""
    if red_cells:
        spatial = " ".join(_SPATIAL_HEAD + red_cells + _SPATIAL_TAIL)
    else:
        spatial = " ".join(_SPATIAL_EMPTY)
    procedure = " ".join(_PROCEDURE)
    return {
        "spatial": spatial,
        "coarse": coarse_hint(red_cells, rows),
        "procedure": procedure,
        "both": spatial + " ; " + procedure,
    }


def _numbers(text: str) -> list[float]:
    """Standalone numbers in ``text`` (digits or number words); digits glued after letters
    (cell names like ``b3``) are names, not quantities."""
    out: list[float] = []
    for tok in re.findall(r"[A-Za-z]+\d*|\d+(?:\.\d+)?", text):
        if tok[0].isdigit():
            out.append(float(tok))
        elif tok.lower() in NUMBER_WORDS:
            out.append(float(NUMBER_WORDS.index(tok.lower())))
    return out


def leak_reason(hint: str, answer: str) -> str | None:
    """Why ``hint`` spoils ``answer``, or None when it is zero-spoiler.

    Rejected: the answer itself (as a word, or spelled out when it is a small whole number),
    and for numeric answers any number in the hint that equals it, or numbers that add up to it
    (per-row counts); a hint that states a result ("total", "answer is").
    """
    h = " " + re.sub(r"\s+", " ", hint.lower()) + " "
    a = answer.strip().lower()
    if re.search(r"\btotal\b|\banswer is\b|\bthe answer\b", h):
        return "states a result ('total' / 'the answer')"
    try:
        value = float(a)
    except ValueError:
        value = None
    if value is None:
        if a and re.search(r"(?<![a-z0-9])" + re.escape(a) + r"(?![a-z0-9])", h):
            return f"contains the answer {answer!r}"
        return None
    nums = _numbers(hint)
    if value in nums:
        return f"contains the answer {answer!r}"
    if len(nums) >= 2 and abs(sum(nums) - value) < 1e-9:
        return f"its numbers {nums} add up to the answer {answer!r}"
    return None


def leak_hint(completion: str) -> str:
    """The ptd-leak baseline's hint: the reference completion itself (it states the answer and
    fails :func:`check_hint`; the trainer uses it only with ``--teacher_hint leak
    --allow_answer_leak true``)."""
    return completion


def check_hint(hint: str, answer: str) -> str:
    """Return ``hint`` if it is zero-spoiler, else raise :class:`HintLeakError`."""
    reason = leak_reason(hint, answer)
    if reason is not None:
        raise HintLeakError(f"hint {hint!r} leaks the answer: {reason}")
    return hint
