"""The benchmark pages are generated, never hand-edited: docs/benchmarks.md and the README's table are
exactly what ``python bench/report.py --docs`` writes from the committed bench/results/, and the two
figures draw from those results."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
sys.path.insert(0, os.path.join(ROOT, "bench"))

report = pytest.importorskip("report")


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_docs_page_and_readme_table_are_generated():
    page, readme = report.docs_text(RESULTS, _read("README.md"))
    assert page == _read("docs/benchmarks.md"), "docs/benchmarks.md differs: run python bench/report.py --docs"
    assert readme == _read("README.md"), "the README's benchmark table differs: run python bench/report.py --docs"
    assert "| log-prob + entropy |" in readme  # the table is filled in


def test_figures_draw(tmp_path):
    pytest.importorskip("matplotlib")
    files = report.benchmark_files(RESULTS)["cpu"]
    rows, meta = report.load(files)
    written = report.write_report(rows, meta, str(tmp_path), "cpu")
    assert sorted(os.path.basename(path) for path in written) == ["cpu-scaling.png", "cpu.md", "cpu.png"]
    assert (tmp_path / "cpu.md").read_text() == _read("bench/results/cpu.md")
