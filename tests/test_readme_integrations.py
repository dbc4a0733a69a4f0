"""The README's "Use ptd in your trainer" snippets run as written, with tiny local models in place
of the hub ids (nothing is downloaded)."""

from __future__ import annotations

import os
import re

import pytest
import torch
from _tiny_hf import save_tiny_qwen3

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
STUDENT_ID, TEACHER_ID = "Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B"

pytestmark = pytest.mark.usefixtures("one_thread")


def _snippets() -> list[str]:
    text = open(README, encoding="utf-8").read()
    start = text.index("## Use ptd in your trainer")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def local_ids(tmp_path_factory):
    return {STUDENT_ID: save_tiny_qwen3(tmp_path_factory.mktemp("student")),
            TEACHER_ID: save_tiny_qwen3(tmp_path_factory.mktemp("teacher"), hidden=48, layers=1, seed=1)}


def _run(index: int, local_ids: dict, tmp_path, monkeypatch) -> dict:
    code = _snippets()[index]
    for hub_id, path in local_ids.items():
        code = code.replace(f'"{hub_id}"', repr(path))
    assert "Qwen/" not in code
    monkeypatch.chdir(tmp_path)  # the trainers' output_dir
    scope: dict = {}
    exec(compile(code, f"README.md (trainer snippet {index + 1})", "exec"), scope)
    return scope


def test_one_snippet_per_integration():
    snippets = _snippets()
    assert len(snippets) == 4
    for snippet, module in zip(snippets, ("integrations import hf", "integrations.trl", "ptd_train.trl",
                                          "integrations.verl")):
        assert module in snippet


def test_hf_snippet(local_ids, tmp_path, monkeypatch):
    scope = _run(0, local_ids, tmp_path, monkeypatch)
    out, labels = scope["out"], scope["labels"]
    assert out.log_probs.shape == labels[:, 1:].shape and bool((out.log_probs < 0).all())
    assert scope["model"].lm_head.weight.grad is not None


def test_trl_snippet(local_ids, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    scope = _run(1, local_ids, tmp_path, monkeypatch)
    grpo, distill = scope["grpo"], scope["distill"]
    assert "forward" in grpo.model.__dict__ and "_compute_loss" in distill.__dict__
    for trainer in (grpo, distill):
        assert trainer.state.global_step == 2
        assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_ptd_po_snippet(local_ids, tmp_path, monkeypatch, capsys):
    pytest.importorskip("trl")
    scope = _run(2, local_ids, tmp_path, monkeypatch)
    first = scope["trainer"].state.log_history[0]
    assert first["ptd/rollouts"] > 0 and first["ptd/jsd"] > 0
    assert "ptd/jsd" in capsys.readouterr().out


def test_verl_snippet(local_ids, tmp_path, monkeypatch):
    scope = _run(3, local_ids, tmp_path, monkeypatch)
    assert scope["log_probs"].shape == (2, 16) and scope["hidden_states"].grad is not None
