"""Privileged hints and the zero-spoiler check.

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

import math
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

# number words the leak check reads (with "minus"/"negative", compounds such as "twenty-one" or
# "one hundred and five", and "point" decimals such as "three point five")
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
SCALE_WORDS = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
SIGN_WORDS = ("minus", "negative")


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


# a word (a cell name like b3 is one: letters, then digits), or a number: sign (ASCII or Unicode
# minus), digits with optional thousands commas, optional decimals — what ``tasks.reward`` reads,
# and a little more
_TOKEN = re.compile(r"[a-z]+\d*|[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-\u2212]?\.\d+")


def _digits(token: str) -> float | None:
    try:
        value = float(token.replace("\u2212", "-").replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None  # "inf" and "nan" are words here


def _numbers(text: str) -> list[float]:
    """Every number ``text`` states: digits (signed, decimal, with thousands commas) and number
    words (signed, compound, with "point" decimals). Digits glued after letters (cell names like
    ``b3``) are names, not quantities."""
    out: list[float] = []
    tokens = _TOKEN.findall(text.lower())
    i = 0
    while i < len(tokens):
        sign = 1.0
        j = i
        if tokens[j] in SIGN_WORDS and j + 1 < len(tokens):
            sign, j = -1.0, j + 1
        value = _digits(tokens[j]) if not tokens[j][0].isalpha() else None
        if value is not None:
            out.append(sign * value)
            i = j + 1
            continue
        value, j = _word_number(tokens, j)
        if value is not None:
            out.append(sign * value)
            i = j
        else:
            i += 1
    return out


def _word_number(tokens: list[str], i: int) -> tuple[float | None, int]:
    """The number spelled by the words from ``tokens[i]`` on, and the index after it; (None, i)
    when ``tokens[i]`` starts none. A unit after a unit starts a new number ("one two" is 1 and 2);
    a unit after a tens word joins it ("twenty one" is 21)."""
    total, current, last, j = 0.0, 0.0, None, i
    while j < len(tokens):
        word = tokens[j]
        if word in NUMBER_WORDS and last in (None, "tens", "scale"):
            if last == "tens" and NUMBER_WORDS.index(word) >= 10:
                break
            current += NUMBER_WORDS.index(word)
            last = "unit" if last != "tens" else "done"
        elif word in TENS_WORDS and last in (None, "scale"):
            current += 10 * (TENS_WORDS.index(word) + 2)
            last = "tens"
        elif word in SCALE_WORDS and last in ("unit", "tens", "done"):
            if SCALE_WORDS[word] == 100:
                current *= 100
            else:
                total, current = total + current * SCALE_WORDS[word], 0.0
            last = "scale"
        elif word == "and" and last == "scale" and j + 1 < len(tokens) and (
                tokens[j + 1] in NUMBER_WORDS or tokens[j + 1] in TENS_WORDS):
            pass
        elif word == "point" and last in ("unit", "done", "tens") and j + 1 < len(tokens) and tokens[j + 1] in (
                NUMBER_WORDS[:10]):
            digits = ""
            while j + 1 < len(tokens) and tokens[j + 1] in NUMBER_WORDS[:10]:
                digits += str(NUMBER_WORDS.index(tokens[j + 1]))
                j += 1
            return total + current + float("0." + digits), j + 1
        else:
            break
        j += 1
    if last is None:
        return None, i
    return total + current, j


def number_value(text: str) -> float | None:
    """The number ``text`` is, written in digits or in words ("-3", "3.0", "minus three"), or None."""
    value = _digits(text.strip().lower())
    if value is not None:
        return value
    tokens = _TOKEN.findall(text.lower())
    nums = _numbers(text)
    if len(nums) == 1 and all(t in (*NUMBER_WORDS, *TENS_WORDS, *SCALE_WORDS, *SIGN_WORDS, "and", "point")
                              for t in tokens):
        return nums[0]
    return None


def leak_reason(hint: str, answer: str) -> str | None:
    """Why ``hint`` spoils ``answer``, or None when it is zero-spoiler.

    Rejected: a hint that states a result ("total", "the answer"); a non-numeric answer written in
    the hint as a word; for an answer that is a number (in digits or words), any number in the hint
    equal to it — read as the verifier reads numbers, and more widely: signed ("-3", "minus
    three"), decimal ("3.0" for "3"), with thousands commas, in words — or numbers in the hint that
    add up to it (per-row counts).
    """
    h = " " + re.sub(r"\s+", " ", hint.lower()) + " "
    a = answer.strip().lower()
    if re.search(r"\btotal\b|\banswer is\b|\bthe answer\b", h):
        return "states a result ('total' / 'the answer')"
    value = number_value(a)
    if value is None:
        if a and re.search(r"(?<![a-z0-9])" + re.escape(a) + r"(?![a-z0-9])", h):
            return f"contains the answer {answer!r}"
        return None
    nums = _numbers(hint)
    if any(abs(n - value) <= 1e-9 * max(1.0, abs(value)) for n in nums):
        return f"contains the answer {answer!r} (as a number)"
    if len(nums) >= 2 and abs(sum(nums) - value) <= 1e-9 * max(1.0, abs(value)):
        return f"its numbers {[float(n) if n % 1 else int(n) for n in nums]} add up to the answer {answer!r}"
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
