"""ptd_kernels.integrations.trl: TRL's GRPOTrainer and DistillationTrainer on ptd's kernels give
stock TRL's losses and gradients (fp32, tiny models saved to a temp dir, CPU)."""

from __future__ import annotations

import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")
from _tiny_hf import (  # noqa: E402
    assert_same_loss_and_grads,
    assert_same_training,
    image_rows,
    loss_and_grads,
    reward_by_length,
    save_tiny_qwen3,
    save_tiny_qwen3_vl,
    text_rows,
)
from datasets import Dataset  # noqa: E402

import ptd_kernels as ptd  # noqa: E402
from ptd_kernels.integrations import hf  # noqa: E402
from ptd_kernels.integrations.trl import use_ptd_kernels  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_qwen3(tmp_path_factory.mktemp("teacher"), hidden=48, layers=1, seed=1)


def _common(**overrides):
    args = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_completion_length=6,
                bf16=False, report_to=[], use_cpu=True, save_strategy="no", seed=0, learning_rate=1e-2,
                logging_steps=1, disable_tqdm=True)
    args.update(overrides)
    return args


def _grpo(model, rows, processor=None, **overrides):
    args = trl.GRPOConfig(**_common(num_generations=4, **overrides))
    return trl.GRPOTrainer(model=model, reward_funcs=reward_by_length, args=args, train_dataset=Dataset.from_list(rows),
                           processing_class=processor)


def _fixed_batch(trainer):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 1.0), (0.05, 0.7)])
def test_grpo_fixed_batch_equals_stock(qwen3, beta, temperature):
    trainer = _grpo(qwen3, text_rows(4), beta=beta, temperature=temperature)
    inputs = _fixed_batch(trainer)
    assert ("ref_per_token_logps" in inputs) == (beta > 0)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    models = [trainer.model] + ([trainer.ref_model] if beta > 0 else [])

    def logps():  # as TRL computes old / reference log-probs, in chunks of 2 sequences
        with torch.no_grad():
            return [trainer._get_per_token_logps_and_entropies(m, ids, mask, inputs["completion_ids"].shape[1],
                                                               batch_size=2)[0] for m in models]

    stock, stock_logps = loss_and_grads(trainer, inputs), logps()
    use_ptd_kernels(trainer)
    assert all("forward" in m.__dict__ for m in models)
    assert_same_loss_and_grads(stock, loss_and_grads(trainer, inputs))
    for a, b in zip(stock_logps, logps()):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_grpo_vlm_fixed_batch_equals_stock(tmp_path):
    path, processor = save_tiny_qwen3_vl(tmp_path)
    trainer = _grpo(path, image_rows(4), processor, max_completion_length=4)
    inputs = _fixed_batch(trainer)
    assert inputs["pixel_values"].shape[0] > 0
    stock = loss_and_grads(trainer, inputs)
    use_ptd_kernels(trainer)
    assert_same_loss_and_grads(stock, loss_and_grads(trainer, inputs))


def test_grpo_training_equals_stock(qwen3):
    """Three optimizer steps (2 iterations per rollout batch, 2 accumulation steps): same losses."""
    def make_trainer(through_ptd):
        trainer = _grpo(qwen3, text_rows(8), max_steps=3, beta=0.05, num_iterations=2, gradient_accumulation_steps=2)
        return use_ptd_kernels(trainer) if through_ptd else trainer

    assert_same_training(make_trainer)


def _distillation(student, teacher, beta, rows=None, **overrides):
    args = trl.DistillationConfig(**_common(beta=beta, **overrides))
    return trl.DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                   train_dataset=Dataset.from_list(rows or text_rows(4)))


@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 1.0), (0.5, 0.7), (1.0, 1.0)])
def test_distillation_fixed_batch_equals_stock(qwen3, teacher, beta, temperature):
    trainer = _distillation(qwen3, teacher, beta, temperature=temperature)
    inputs = _fixed_batch(trainer)
    stock = loss_and_grads(trainer, inputs)
    stock_entropy = trainer._metrics["train"]["entropy"][-1]
    use_ptd_kernels(trainer)
    assert "_compute_loss" in trainer.__dict__
    assert_same_loss_and_grads(stock, loss_and_grads(trainer, inputs))
    assert trainer._metrics["train"]["entropy"][-1] == pytest.approx(stock_entropy, rel=1e-5)
    other = _distillation(qwen3, teacher, beta)
    assert "_compute_loss" not in other.__dict__  # instance-scoped


def test_distillation_topk_equals_reference(qwen3, teacher):
    """Top-K JSD (union support, tail) = ptd_kernels.reference on the two models' completion states;
    K ≥ V is the full JSD, as stock TRL computes it."""
    trainer = _distillation(qwen3, teacher, 0.5)
    inputs = _fixed_batch(trainer)
    stock_loss = trainer.compute_loss(trainer.model, inputs).detach()
    student, teacher_model = trainer.model, trainer.teacher_model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    n = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        h_s = hf.last_hidden_states(student, input_ids=ids, attention_mask=mask)[:, -n - 1:-1]
        h_t = hf.last_hidden_states(teacher_model, input_ids=ids, attention_mask=mask)[:, -n - 1:-1]
    valid = inputs["completion_mask"].bool()
    want = ptd.reference.linear_topk_jsd(h_s[valid].double(), student.lm_head.weight.double(), h_t[valid].double(),
                                         teacher_model.lm_head.weight.double(), 4, beta=0.5).mean()
    use_ptd_kernels(trainer, topk=4)
    got = trainer.compute_loss(trainer.model, inputs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)
    assert got < stock_loss  # a coarse-grained JSD is a lower bound of the full one
    use_ptd_kernels(trainer, topk=10_000)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, inputs).detach(), stock_loss, rtol=1e-5, atol=1e-8)


def test_bad_options_are_refused(qwen3, teacher):
    grpo = _grpo(qwen3, text_rows(4))
    with pytest.raises(ValueError, match="topk applies to DistillationTrainer"):
        use_ptd_kernels(grpo, topk=4)
    with pytest.raises(TypeError, match="GRPOTrainer, trl.DistillationTrainer and trl.experimental"):
        use_ptd_kernels(object())
    distillation = _distillation(qwen3, teacher, 0.5)
    with pytest.raises(ValueError, match="topk must be"):
        use_ptd_kernels(distillation, topk=0)
    with pytest.raises(ValueError, match="support"):
        use_ptd_kernels(distillation, topk=4, support="both")


@pytest.mark.parametrize("trainer_class", ["GRPOTrainer", "PTDGRPOTrainer"])
def test_cast_lm_head_to_fp32_is_honoured(qwen3, trainer_class):
    """Under bf16 autocast with cast_lm_head_to_fp32, TRL's log-probs are those of a float32 head on the
    autocast backbone's hidden states; ptd's are too (a bfloat16 head is off by > 1e-4 here)."""
    from ptd_train.trl import PTDGRPOConfig, PTDGRPOTrainer

    overrides = dict(bf16=True, cast_lm_head_to_fp32=True)
    if trainer_class == "GRPOTrainer":
        trainer = _grpo(qwen3, text_rows(4), **overrides)
        stock_trainer = trainer
    else:
        args = PTDGRPOConfig(**_common(num_generations=4, ptd_k=6, **overrides))
        trainer = PTDGRPOTrainer(model=qwen3, reward_funcs=reward_by_length, args=args,
                                 train_dataset=Dataset.from_list(text_rows(4)))
        stock_trainer = _grpo(qwen3, text_rows(4), **overrides)
    assert trainer.model.lm_head.weight.dtype == torch.float32
    inputs = _fixed_batch(stock_trainer)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    n = inputs["completion_ids"].shape[1]

    def logps(t):
        with torch.no_grad():
            return t._get_per_token_logps_and_entropies(t.model, ids, mask, n)[0]

    stock = logps(stock_trainer)
    if trainer is stock_trainer:
        use_ptd_kernels(trainer)
    got = logps(trainer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = hf.last_hidden_states(trainer.model, input_ids=ids, attention_mask=mask)[:, -n - 1:-1]
    weight = trainer.model.lm_head.weight
    targets = inputs["completion_ids"]

    def head(h, w):
        return torch.log_softmax(h.double() @ w.double().T, -1).gather(-1, targets[..., None]).squeeze(-1)

    fp32_head, bf16_head = head(hidden.float(), weight.float()), head(hidden.bfloat16(), weight.bfloat16())
    valid = inputs["completion_mask"].bool()
    assert (bf16_head - fp32_head)[valid].abs().max() > 1e-4
    torch.testing.assert_close(stock[valid].double(), fp32_head[valid], rtol=0, atol=2e-5)
    torch.testing.assert_close(got[valid].double(), fp32_head[valid], rtol=0, atol=2e-5)
