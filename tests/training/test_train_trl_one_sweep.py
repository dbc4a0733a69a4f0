"""PTDGRPOTrainer's one-sweep loss (``ptd_kernels.linear_policy_loss`` with TRL's per-token loss as a
PolicyLoss) equals its per-row path (``linear_ptd_terms``, then TRL's own ``_compute_loss`` plus the PTD
term): loss, gradients and TRL's metrics on fixed rollout batches for every loss type it takes, with the
KL, clipping against old log-probs, an entropy bonus and PTD groups; a setting it cannot express falls
back to the per-row path (tiny Qwen3 / Qwen3-VL built from configs, fp32, CPU)."""

from __future__ import annotations

import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")
from _tiny_hf import image_rows, save_tiny_qwen3_vl, text_rows  # noqa: E402
from datasets import Dataset  # noqa: E402

import ptd_kernels  # noqa: E402
from ptd_train.trl import PTDGRPOConfig, PTDGRPOTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
           "clip_ratio/low_min", "clip_ratio/high_max", "policy_loss", "entropy_coef", "ptd/jsd", "ptd/overlap",
           "ptd/teacher_mass")


def _reward(completions, **kwargs):
    """Rewards that differ within groups, one group all right (never a PTD group)."""
    return [float(len(c[0]["content"].split()) % 2 == 0) for c in completions]


def _trainer(model, rows, processor=None, **overrides):
    args = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=12, num_generations=4,
                max_completion_length=5, bf16=False, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                learning_rate=1e-2, logging_steps=1, disable_tqdm=True, ptd_k=5, beta=0.05, epsilon=0.2,
                epsilon_high=0.3, ptd_coef=0.5, num_iterations=2)
    args.update(overrides)
    return PTDGRPOTrainer(model=model, reward_funcs=_reward, args=PTDGRPOConfig(**args),
                          train_dataset=Dataset.from_list(rows), processing_class=processor)


def _loss_and_grads(trainer, batch, one_sweep: bool, monkeypatch):
    calls = []
    real = ptd_kernels.linear_policy_loss
    monkeypatch.setattr(ptd_kernels, "linear_policy_loss", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    if not one_sweep:
        monkeypatch.setattr(trainer, "one_sweep_unsupported", lambda inputs: "the per-row path, for comparison")
    trainer._metrics["train"].clear()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    monkeypatch.undo()
    assert bool(calls) == one_sweep
    return loss.detach(), grads, metrics


def _batch(trainer):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    # a policy that moved since the rollouts (ratios away from 1, both clips active) and away from the
    # reference (a k3 term with a gradient)
    g = torch.Generator().manual_seed(0)
    for key, scale in (("old_per_token_logps", 0.4), ("ref_per_token_logps", 0.3)):
        if batch.get(key) is not None:
            batch[key] = batch[key] + scale * torch.randn(batch[key].shape, generator=g)
    return batch


def _assert_equal(one_sweep, per_row):
    (loss, grads, metrics), (want, want_grads, want_metrics) = one_sweep, per_row
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    assert float(want_grads.abs().max()) > 0
    torch.testing.assert_close(grads, want_grads, rtol=1e-4, atol=1e-6 * float(want_grads.abs().max()))
    assert set(want_metrics) <= set(metrics) | {"ptd/rollouts"}
    for key in METRICS:
        if key in want_metrics:
            torch.testing.assert_close(torch.tensor(metrics[key]), torch.tensor(want_metrics[key]), rtol=1e-4,
                                       atol=1e-6, msg=key)


@pytest.mark.parametrize(("loss_type", "extra"), [
    ("dapo", {}), ("grpo", {}), ("bnpo", dict(ptd_drop_ref_kl=False)), ("dr_grpo", dict(entropy_coef=0.02)),
    ("dapo", dict(ptd_coef=0.0)),
], ids=["dapo", "grpo", "bnpo-keep-kl", "dr_grpo-entropy-bonus", "dapo-no-ptd"])
def test_one_sweep_equals_the_per_row_path(qwen3, monkeypatch, loss_type, extra):
    rows = text_rows(3)
    rows[1]["hint"] = None  # a prompt without a hint: never a PTD group
    trainer = _trainer(qwen3, rows, loss_type=loss_type, **extra)
    assert trainer.one_sweep_unsupported({}) is None
    batch = _batch(trainer)
    one_sweep = _loss_and_grads(trainer, batch, True, monkeypatch)
    metrics = one_sweep[2]
    assert metrics["kl"][0] > 0 and metrics["clip_ratio/region_mean"][0] > 0
    if extra.get("ptd_coef", 0.5):
        assert 0 < int(batch["ptd_rollout"].sum()) < 12 and metrics["ptd/jsd"][0] > 0
    _assert_equal(one_sweep, _loss_and_grads(trainer, batch, False, monkeypatch))


def test_one_sweep_equals_the_per_row_path_on_a_vlm(tmp_path, monkeypatch):
    path, processor = save_tiny_qwen3_vl(tmp_path)
    trainer = _trainer(path, image_rows(4), processor=processor, per_device_train_batch_size=4,
                       max_completion_length=4)
    batch = _batch(trainer)
    _assert_equal(_loss_and_grads(trainer, batch, True, monkeypatch), _loss_and_grads(trainer, batch, False,
                                                                                    monkeypatch))


@pytest.mark.parametrize(("overrides", "why"), [
    (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
    (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
    (dict(delta=1.5), "delta"),
], ids=["sapo", "sequence-level", "entropy-mask", "delta"])
def test_what_it_cannot_express_takes_the_per_row_path(qwen3, monkeypatch, overrides, why):
    trainer = _trainer(qwen3, text_rows(4), per_device_train_batch_size=4, **overrides)
    assert why in trainer.one_sweep_unsupported({})
    loss, grads, metrics = _loss_and_grads(trainer, _batch(trainer), False, monkeypatch)
    assert torch.isfinite(loss) and float(grads.abs().max()) > 0 and metrics["ptd/jsd"][0] > 0
