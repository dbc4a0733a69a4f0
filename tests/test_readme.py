"""Every Python snippet of the README and of the docs this repository writes for users is checked:
each carries a marker on the line before it, and

- ``<!-- runs -->``: the snippet runs as written (its own asserts must hold);
- ``<!-- file: examples/X.py -->``: the snippet is that file, its docstring aside (tests/test_examples.py
  runs the file);
- ``<!-- excerpt: examples/X.py -->``: every line of the snippet is a line of that file, in order;
- ``<!-- tested: tests/.../test_X.py -->``: that test runs the page's snippets (with tiny local models
  in place of hub ids, say).

Relative links of these pages (the README, examples/README.md and every page of docs/) point to files
that exist. The README stays within 250 lines.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every page a user reads: the README, the examples' index and every page of docs/.
PAGES = ["README.md", "examples/README.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))
BLOCK = re.compile(r"(?:<!-- (runs|file|excerpt|tested)(?:: (\S+))? -->\n)?```python\n(.*?)```", re.S)


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _blocks():
    """(page, kind, file, code) for every python block of the pages."""
    for page in PAGES:
        for match in BLOCK.finditer(_read(page)):
            yield page, match.group(1), match.group(2), match.group(3)


def _without_docstring(text: str) -> str:
    if text.startswith('"""'):
        text = text[text.index('"""', 3) + 3:]
    return text.lstrip("\n")


def _runnable():
    return [pytest.param(code, id=f"{page}:{index}") for index, (page, kind, _file, code) in enumerate(_blocks())
            if kind == "runs"]


def test_every_snippet_is_checked():
    unmarked = [(page, code.splitlines()[0]) for page, kind, _file, code in _blocks() if kind is None]
    assert not unmarked, f"python blocks without a runs / file / excerpt / tested marker: {unmarked}"
    for page, kind, test_file, _code in _blocks():
        if kind == "tested":
            assert test_file and os.path.exists(os.path.join(ROOT, test_file)), f"{page}: no test file {test_file}"
            assert os.path.basename(page) in _read(test_file), f"{test_file} does not name {page}"


@pytest.mark.parametrize("code", _runnable())
def test_snippet_runs(code, tmp_path, monkeypatch):
    from ptd_kernels import config

    for knob in [name for name in vars(config) if name.isupper()]:  # a snippet may set a knob: undone after
        monkeypatch.setattr(config, knob, getattr(config, knob))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, "snippet", "exec"), {})


def test_snippets_match_their_files():
    for page, kind, path, code in _blocks():
        if kind == "file":
            assert code == _without_docstring(_read(path)), f"{page}: the block of {path} differs from the file"
        elif kind == "excerpt":
            lines = [line.strip() for line in _read(path).splitlines()]
            position = 0
            for line in (line.strip() for line in code.splitlines() if line.strip()):
                assert line in lines[position:], f"{page}: {line!r} is not in {path} (in this order)"
                position = lines.index(line, position) + 1


def test_kernel_api_example():
    """The README's first example: its asserts hold, and its backward reaches the student's leaves only."""
    text = _read("README.md")
    code = re.search(r"```python\n(.*?)```", text[text.index("## The kernel API in one example"):], re.S).group(1)
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md (kernel API example)", "exec"), scope)
    assert scope["hidden"].grad is not None and scope["weight"].grad is not None
    assert bool(torch.isfinite(scope["weight"].grad).all())
    assert scope["teacher_hidden"].grad is None


def test_softcap_example():
    import ptd_kernels as ptd

    text = _read("docs/api.md")
    code = re.search(r"```python\n(.*?)```", text[text.index("## Soft-capping and logit scale"):], re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/api.md (soft-capping example)", "exec"), scope)
    assert (scope["scale"], scope["softcap"]) == (1.0, 30.0)
    want = ptd.reference.linear_logprobs(scope["hidden"], scope["weight"], torch.tensor([1, 2, 3, 4]), softcap=30.0)
    torch.testing.assert_close(scope["logp"], want)


def test_links_resolve():
    broken = []
    for page in PAGES:
        folder = os.path.dirname(page)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(page)):
            if re.match(r"[a-z]+://", target):
                continue
            path = os.path.normpath(os.path.join(folder, target))
            if not os.path.exists(os.path.join(ROOT, path)):
                broken.append(f"{page} -> {target}")
    assert not broken, broken


def test_readme_is_short_and_says_how_to_start():
    text = _read("README.md")
    assert len(text.splitlines()) <= 250
    commands = ('pip install -e ".[dev]"', "python -m ptd_train.run", "torchrun --nproc_per_node N -m ptd_train.run",
                "python -m ptd_train.compare", "pytest ", "pytest bench --benchmark-only")
    for command in commands:
        assert command in text, command
    assert "Apache-2.0" in text and "Python 3.10" in text
    assert "SPEC" not in text and "shared/" not in text
    for page in PAGES:
        assert "SPEC §" not in _read(page) and "../shared/SPEC.md" not in _read(page), page
