"""ptd_train with a served hinted teacher (--teacher_server): the in-process stand-in ('local') answers
through the served protocol and the run equals the local teacher's with support 'teacher'; what it
cannot run with is refused before any work."""

import copy

import numpy as np
import pytest
import torch

from ptd_train import run, teacher_server
from ptd_train.config import TrainConfig
from ptd_train.model import ModelWithFusedHead, TinyVLSpec, build_tiny_model
from ptd_train.prompts import Env, build_tokenizer
from ptd_train.tasks import GridCountTask
from ptd_train.vision import VisionGeometry

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(warmstart_max_steps=0, eval_size=8, prompts_per_step=2, group_size=4, progress=False, ptd_k=6,
            ptd_support="teacher")
SPEC = TinyVLSpec(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, vision_hidden=16,
                  vision_heads=1)


def _steps(tmp_path, served: bool, steps: int = 2):
    cfg = TrainConfig(output_dir=str(tmp_path), teacher_server="local" if served else None, **TINY).resolved()
    task = GridCountTask(eval_size=4, dev_size=2)
    tok = build_tokenizer(list(task.words))
    policy = build_tiny_model(tok, SPEC, seed=0)
    env = Env(cfg, tok, VisionGeometry.of(policy), torch.device("cpu"), "torch")
    ref = ModelWithFusedHead(copy.deepcopy(policy).eval().requires_grad_(False))
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    metrics = []
    for step in range(1, steps + 1):
        run.step_seed(cfg.seed, step)
        metrics.append(run.rl_step(ModelWithFusedHead(policy), ref, opt, env,
                                   task.sample(np.random.default_rng([0, step]), cfg.prompts_per_step)))
    return metrics, torch.cat([p.detach().reshape(-1) for p in policy.parameters()]), ref


def test_local_server_equals_the_local_teacher(tmp_path):
    (local, params_local, _), (served, params_served, ref) = _steps(tmp_path, False), _steps(tmp_path, True)
    assert isinstance(ref._ptd_teacher_server, teacher_server.TrainerTeacherServer)
    assert sum(m["ptd_rollouts"] for m in local) > 0 and all(m["teacher_mass"] > 0 for m in local)
    for a, b in zip(local, served):
        for key in ("loss", "jsd", "overlap", "teacher_mass", "entropy", "neg_logp", "ptd_rollouts"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(params_served, params_local, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(ptd_support="union"), "--ptd_support union"),
    (dict(teacher="policy"), "--teacher policy"),
    (dict(ptd_full_vocab=True), "--ptd_full_vocab"),
    (dict(fsdp=True), "--fsdp true with --teacher_server local"),
    (dict(teacher_server="grpc://teacher"), "expected local or an http"),
])
def test_refused_before_any_work(tmp_path, overrides, message):
    fields = {**TINY, "teacher_server": "local", **overrides}
    with pytest.raises(ValueError, match=message):
        TrainConfig(output_dir=str(tmp_path), **fields).resolved()
