"""The trainer's step through the one-sweep loss (``ptd_kernels.linear_policy_loss`` with ``grpo.policy_loss``)
equals the per-row path (``linear_ptd_terms`` / ``linear_logprobs``, then ``grpo.ptd_po_loss`` in PyTorch):
the step's loss and its parts, the logged terms, the gradient norm and the parameters after a few steps
(float32, torch path)."""

import copy

import numpy as np
import pytest
import torch

import ptd_kernels
from ptd_train import trainer
from ptd_train.config import TrainConfig
from ptd_train.model import ModelWithFusedHead, TinyVLSpec, build_tiny_model
from ptd_train.prompts import Env, build_tokenizer
from ptd_train.tasks import GridCountTask
from ptd_train.vision import VisionGeometry

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(warmstart_max_steps=0, eval_size=8, prompts_per_step=2, group_size=4, progress=False, ptd_k=6)
SPEC = TinyVLSpec(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, vision_hidden=16,
                  vision_heads=1)
LOGGED = ("loss", "pg_loss", "kl", "ptd_loss", "clip_frac", "jsd", "overlap", "teacher_mass", "entropy", "neg_logp",
          "ptd_rollouts", "grad_norm")


def _steps(tmp_path, monkeypatch, one_sweep: bool, steps: int = 3, **overrides):
    monkeypatch.setattr(trainer, "one_sweep_loss", lambda cfg, teacher_topk: one_sweep)
    # rewards that differ within groups (a random tiny model never answers right): nonzero advantages
    monkeypatch.setattr(trainer, "reward", lambda text, answer: float(len(text) % 3 == 0))
    calls = []
    real = ptd_kernels.linear_policy_loss
    monkeypatch.setattr("ptd_train.model.linear_policy_loss", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = TrainConfig(output_dir=str(tmp_path), **{**TINY, **overrides}).resolved()
    task = GridCountTask(eval_size=4, dev_size=2)
    tok = build_tokenizer(list(task.words))
    policy = build_tiny_model(tok, SPEC, seed=0)
    env = Env(cfg, tok, VisionGeometry.of(policy), torch.device("cpu"), "torch")
    ref = ModelWithFusedHead(copy.deepcopy(policy).eval().requires_grad_(False))
    # plain SGD: Adam's normalization would turn a gradient coordinate that is rounding noise (a rare token's
    # row of the output layer, where terms cancel) into a step of size lr, and compare rounding, not gradients
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    metrics = []
    for step in range(1, steps + 1):
        trainer.step_seed(cfg.seed, step)
        metrics.append(trainer.rl_step(ModelWithFusedHead(policy), ref, opt, env,
                                       task.sample(np.random.default_rng([0, step]), cfg.prompts_per_step)))
    monkeypatch.undo()
    assert bool(calls) == (one_sweep and steps > 0)
    return metrics, torch.cat([p.detach().reshape(-1) for p in policy.parameters()])


@pytest.mark.parametrize(("overrides", "with_ptd", "with_kl"), [
    (dict(), True, False),  # PTD-PO's defaults (every group is a PTD group here: all drop the k3 term)
    (dict(ptd_drop_ref_kl=False, kl_coef=0.05), True, True),  # k3 and λ·D_K on the same rows
    (dict(kl_coef=0.05, teacher="policy", ptd_support="student", ptd_tail=False, ptd_drop_ref_kl=False), True,
     True),  # the policy's own output layer as the teacher (one GEMM over both sides' rows)
    (dict(ptd_grad="released"), True, False),  # the authors' surrogate: D_K's value, no gradient (a callable)
    (dict(ptd_threshold=0.3, kl_coef=0.05), True, True),  # some groups without PTD: they keep the k3 term
    (dict(ptd_coef=0.0, kl_coef=0.05), False, True),  # GRPO: no teacher, 3 GEMMs
], ids=["ptd-po", "ptd-po-with-kl", "policy-teacher", "released", "threshold", "grpo"])
def test_one_sweep_step_equals_the_per_row_step(tmp_path, monkeypatch, overrides, with_ptd, with_kl):
    (per_row, params_per_row), (one_sweep, params_one_sweep) = (
        _steps(tmp_path, monkeypatch, False, **overrides), _steps(tmp_path, monkeypatch, True, **overrides))
    assert any(m["ptd_rollouts"] > 0 and m["jsd"] > 0 for m in per_row) == with_ptd
    assert any(m["kl"] > 0 for m in per_row) == with_kl
    assert any(m["pg_loss"] != 0 for m in per_row)  # (ρ = 1: one update per batch, nothing is clipped)
    for a, b in zip(per_row, one_sweep):
        for key in LOGGED:
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), key
    torch.testing.assert_close(params_one_sweep, params_per_row, rtol=1e-5, atol=1e-6)
    assert not torch.equal(params_one_sweep, _steps(tmp_path, monkeypatch, True, steps=0, **overrides)[1])
