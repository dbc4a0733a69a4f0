"""docs/formulas.md cannot rot: every place it names exists.

A place is written `path::name` in the page: ``path`` a Python file of the repository, ``name`` a function,
class or assignment at its module level, or ``Class.name`` for a method or class attribute (read with ``ast``:
nothing is imported). Tests are places too (``tests/test_x.py::test_y``). When a file has moved, the failure
says where a file of the same name now is, so the page can follow the move. The page's links to its own
sections and to the sections of the other docs resolve to headings.
"""

from __future__ import annotations

import ast
import functools
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = "docs/formulas.md"
PLACE = re.compile(r"`([\w./-]+\.py)::([\w.]+)`")
BARE_PATH = re.compile(r"`((?:ptd_kernels|ptd_train|tests|bench)/[\w./-]*)`")
LINK = re.compile(r"\]\(([\w./-]*\.md)?#([^)\s]+)\)")
# What a kernel engineer looks for: each must have a section of its own.
FORMULAS = ("logits", "row statistics", "log-prob", "entropy", "generalized jsd", "full-vocabulary jsd",
            "top-k support", "top-k jsd", "sparse", "ptd terms", "policy loss", "set f", "∂l/∂z")


def _read(root: str, path: str) -> str:
    with open(os.path.join(root, path), encoding="utf-8") as f:
        return f.read()


@functools.cache
def defined_names(path: str) -> frozenset[str]:
    """The names a module defines at its top level, and ``Class.name`` for what its classes define."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)

    def names_of(body) -> set[str]:
        names = set()
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(target.id for target in node.targets if isinstance(target, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
        return names

    names = names_of(tree.body)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{name}" for name in names_of(node.body))
    return frozenset(names)


def _same_name_elsewhere(root: str, path: str) -> list[str]:
    """Files of the repository named like ``path`` (where a moved file went)."""
    base = os.path.basename(path)
    found = []
    for folder in ("ptd_kernels", "ptd_train", "tests", "bench"):
        for directory, _, files in os.walk(os.path.join(root, folder)):
            if base in files:
                found.append(os.path.relpath(os.path.join(directory, base), root))
    return sorted(found)


def missing_places(text: str, root: str = ROOT) -> list[str]:
    """One line per place of ``text`` that does not exist under ``root``, saying what to fix."""
    problems = []
    for path, name in sorted(set(PLACE.findall(text))):
        full = os.path.join(root, path)
        if not os.path.isfile(full):
            moved = _same_name_elsewhere(root, path)
            hint = f"; a file of that name is at {', '.join(moved)}" if moved else ""
            problems.append(f"{PAGE} names {path}::{name}, but {path} does not exist{hint}: write its new path in "
                            f"{PAGE}")
        elif name not in defined_names(full):
            problems.append(f"{PAGE} names {path}::{name}, but {path} defines no {name} (renamed or removed?): "
                            f"fix {PAGE}")
    for path in sorted(set(BARE_PATH.findall(text))):
        if not os.path.exists(os.path.join(root, path)):
            problems.append(f"{PAGE} names {path}, which does not exist: fix {PAGE}")
    return problems


def slug(heading: str) -> str:
    """The anchor of a Markdown heading, as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page_text: str) -> set[str]:
    return {slug(line.lstrip("#")) for line in page_text.splitlines() if re.match(r"#{1,6} ", line)}


def test_every_place_exists():
    text = _read(ROOT, PAGE)
    assert len(PLACE.findall(text)) > 100, f"{PAGE} names fewer places than it should: is the format `path::name`?"
    problems = missing_places(text)
    assert not problems, "\n".join(problems)


def test_every_formula_has_a_section_with_its_code_and_its_tests():
    text = _read(ROOT, PAGE)
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    titles = [section.splitlines()[0].lower() for section in sections]
    for formula in FORMULAS:
        assert any(formula in title for title in titles), f"{PAGE} has no section for {formula!r}: {titles}"
    for title, section in zip(titles, sections):
        places = PLACE.findall(section)
        assert any(path.startswith("tests/") for path, _ in places), f"{PAGE}, section {title!r}: no test named"
        assert any(path.startswith(("ptd_kernels/", "ptd_train/")) for path, _ in places), (
            f"{PAGE}, section {title!r}: no code named")


def test_links_to_sections_resolve():
    text = _read(ROOT, PAGE)
    broken = []
    for target, anchor in LINK.findall(text):
        page = os.path.normpath(os.path.join(os.path.dirname(PAGE), target)) if target else PAGE
        if anchor not in anchors(_read(ROOT, page)):
            broken.append(f"{target or ''}#{anchor}")
    assert not broken, f"{PAGE}: links to sections that do not exist: {broken}"


def test_the_check_names_what_is_missing(tmp_path):
    """The checker itself: a missing file (with where it moved), a missing name, a method, a bare path."""
    (tmp_path / "ptd_kernels").mkdir()
    (tmp_path / "ptd_kernels" / "maths.py").write_text(
        "LIMIT = 1\nlimit: int = 2\n\n\ndef value():\n    pass\n\n\nclass Terms:\n    scale = 3\n\n"
        "    def grad(self):\n        pass\n", encoding="utf-8")
    (tmp_path / "tests" / "kernels").mkdir(parents=True)
    (tmp_path / "tests" / "kernels" / "test_maths.py").write_text("def test_value():\n    pass\n", encoding="utf-8")
    present = ("`ptd_kernels/maths.py::value` `ptd_kernels/maths.py::LIMIT` `ptd_kernels/maths.py::limit` "
               "`ptd_kernels/maths.py::Terms` `ptd_kernels/maths.py::Terms.grad` `ptd_kernels/maths.py::Terms.scale` "
               "`tests/kernels/test_maths.py::test_value` `ptd_kernels/maths.py` `ptd_kernels/`")
    assert missing_places(present, str(tmp_path)) == []
    absent = ("`ptd_kernels/maths.py::gradient` `ptd_kernels/maths.py::Terms.value` `tests/test_maths.py::test_value` "
              "`ptd_kernels/other.py`")
    problems = missing_places(absent, str(tmp_path))
    assert len(problems) == 4, problems
    assert any("defines no gradient" in p for p in problems)
    assert any("defines no Terms.value" in p for p in problems)
    assert any("tests/test_maths.py does not exist; a file of that name is at tests/kernels/test_maths.py" in p
               for p in problems)
    assert any("ptd_kernels/other.py, which does not exist" in p for p in problems)


def test_slugs_are_githubs():
    assert slug("Top-K JSD: tail atom, renormalized, K ≥ V") == "top-k-jsd-tail-atom-renormalized-k--v"
    assert slug("Per-token policy loss (`linear_policy_loss`)") == "per-token-policy-loss-linear_policy_loss"
    assert slug("3. The PTD-PO loss") == "3-the-ptd-po-loss"
