"""docs/served_teacher.md: its snippets run as written, with tiny local models in place of the hub id
and stand-ins in place of the servers (nothing is downloaded, no network, no vLLM)."""

from __future__ import annotations

import os
import re
import shlex

import pytest
import torch
from _tiny_hf import save_tiny_qwen3

trl = pytest.importorskip("trl")
from _served_teacher import CannedTeacher, RolloutWorker, WeightTransfer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

DOC = os.path.join(os.path.abspath(os.path.join(__file__, "..", "..", "..")), "docs", "served_teacher.md")
HUB_ID = "Qwen/Qwen3-0.6B"

pytestmark = pytest.mark.usefixtures("one_thread")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", open(DOC, encoding="utf-8").read(), re.S)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return save_tiny_qwen3(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = save_tiny_qwen3(tmp_path_factory.mktemp("teacher"), hidden=48, layers=1, seed=1)
    from ptd_train.teacher_server import LocalTeacherServer

    model = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    return LocalTeacherServer(model, AutoTokenizer.from_pretrained(path).pad_token_id)


def _run(index: int, student: str, tmp_path, monkeypatch) -> dict:
    code = _blocks("python")[index]
    assert f'"{HUB_ID}"' in code
    code = code.replace(f'"{HUB_ID}"', repr(student))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, f"docs/served_teacher.md (snippet {index + 1})", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2
    assert torch.isfinite(torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])).all()
    return scope


def _serve(monkeypatch, client):
    import trl.generation.vllm_client as vllm_client

    monkeypatch.setattr(vllm_client, "VLLMClient", lambda *args, **kwargs: client)


def test_one_snippet_per_use():
    python, shell = _blocks("python"), _blocks("bash")
    assert len(python) == 3 and len(shell) == 1
    for snippet, name in zip(python, ("ServerDistillationTrainer", "AsyncDistillationTrainer", "PTDGRPOTrainer")):
        assert name in snippet


def test_server_distillation_snippet(student, teacher, tmp_path, monkeypatch):
    _serve(monkeypatch, teacher)
    scope = _run(0, student, tmp_path, monkeypatch)
    assert "compute_loss" in scope["trainer"].__dict__


def test_async_distillation_snippet(student, tmp_path, monkeypatch):
    """The async trainer's own servers, CUDA-only MFU lookup, rollout worker, weight transfer and
    FlashAttention default are stubbed; the loss path is TRL's, with ptd's student side."""
    from trl.experimental.async_distillation import async_distillation_trainer as async_module

    class StudentServer:
        def wait_for_server_ready(self):
            pass

        def get_max_model_len(self):  # the token budget of a micro-batch: about 3 rollouts here
            return 48

    class EagerModels:
        @staticmethod
        def from_pretrained(path, **kwargs):
            return AutoModelForCausalLM.from_pretrained(path, **{**kwargs, "attn_implementation": "eager"})

    vocab = len(AutoTokenizer.from_pretrained(student))
    monkeypatch.setattr(async_module, "get_peak_flops_per_device", lambda *args: None)
    monkeypatch.setattr(async_module, "VLLMClient", lambda *args, **kwargs: StudentServer())
    monkeypatch.setattr(async_module, "AutoModelForCausalLM", EagerModels)
    monkeypatch.setattr(async_module, "WeightTransferClient", lambda *args, **kwargs: WeightTransfer())
    class Worker(RolloutWorker):  # built with AsyncRolloutWorker's arguments (the trainer also checks the type)
        def __init__(self, **kwargs):
            super().__init__(kwargs["processing_class"], list(kwargs["dataset"]), CannedTeacher(vocab),
                             kwargs["teacher_top_k"], kwargs["teacher_temperature"], per_sync=12)
            self._loop_kwargs = {}

    monkeypatch.setattr(async_module, "AsyncRolloutWorker", Worker)
    scope = _run(1, student, tmp_path, monkeypatch)
    assert "_compute_loss" in scope["trainer"].__dict__


def test_ptd_po_served_snippet(student, tmp_path, monkeypatch):
    from ptd_train.teacher_server import LocalTeacherServer

    initial = AutoModelForCausalLM.from_pretrained(student).eval().requires_grad_(False)
    _serve(monkeypatch, LocalTeacherServer(initial, AutoTokenizer.from_pretrained(student).pad_token_id))
    scope = _run(2, student, tmp_path, monkeypatch)
    trainer = scope["trainer"]
    assert trainer.ptd_teacher_model is None
    assert [h["ptd/rollouts"] for h in trainer.state.log_history if "ptd/rollouts" in h][0] > 0


def test_ptd_train_command_is_accepted(tmp_path):
    from transformers import HfArgumentParser

    from ptd_train.config import TrainConfig

    (command,) = _blocks("bash")
    argv = shlex.split(command.replace("\\\n", " "))
    argv = argv[argv.index("ptd_train.run") + 1:]
    (cfg,) = HfArgumentParser(TrainConfig).parse_args_into_dataclasses(args=argv + ["--output_dir", str(tmp_path)])
    cfg = cfg.resolved()
    assert cfg.teacher_server == "http://localhost:8000" and cfg.ptd_support == "teacher"
