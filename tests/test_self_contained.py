"""The repository explains itself: no file points outside it (to a specification a clone does not have), and
every in-repository pointer of the form ``docs/X.md`` or ``docs/method.md §N`` names a page, and a section,
that exist."""

from __future__ import annotations

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pointers to a document outside the repository. Exempt: the two test files that spell the patterns they
# check (test_readme.py also lists pages that other branches write).
OUTSIDE = re.compile(r"SPEC(?:\s*§|'s|\.md|\s+[a-z])|\.\./shared/")
EXEMPT = {"tests/test_self_contained.py", "tests/test_readme.py"}
DOC_POINTER = re.compile(r"\bdocs/([\w-]+\.md)(?: §(\d))?")
SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", "build", "dist", "runs", "node_modules"}


def _tracked_files() -> list[str]:
    """The repository's files: git's list in a checkout, else every file under the root."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [path for path in listed.splitlines() if os.path.isfile(os.path.join(ROOT, path))]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(folder, name), ROOT) for name in names]
        return files


def _texts():
    for path in _tracked_files():
        try:
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                yield path, f.read()
        except (UnicodeDecodeError, OSError):  # images and other binary files
            continue


def test_nothing_points_outside_the_repository():
    found = [f"{path}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)!r}"
             for path, text in _texts() if path not in EXEMPT for match in OUTSIDE.finditer(text)]
    assert not found, "pointers outside the repository (say it here, or point to docs/method.md):\n" + "\n".join(found)


def test_pointers_to_the_docs_resolve():
    with open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8") as f:
        sections = set(re.findall(r"^## (\d)\. ", f.read(), re.M))
    broken = []
    for path, text in _texts():
        if path in EXEMPT or not path.endswith((".py", ".sh", ".toml")):
            continue
        for match in DOC_POINTER.finditer(text):
            page, section = match.groups()
            if not os.path.isfile(os.path.join(ROOT, "docs", page)):
                broken.append(f"{path}: {match.group(0)} (no such page)")
            elif section and (page != "method.md" or section not in sections):
                broken.append(f"{path}: {match.group(0)} (no such section)")
    assert not broken, "\n".join(broken)


def test_the_pattern_catches_what_it_should():
    for pointer in ("SPEC §2", "SPEC§3", "SPEC's default", "../shared/SPEC.md", "the SPEC formula"):
        assert OUTSIDE.search(pointer), pointer
    for name in ("SPEC = TinyVLSpec(", "build(tok, SPEC, seed=0)", "SPECIAL_TOKENS"):
        assert not OUTSIDE.search(name), name
