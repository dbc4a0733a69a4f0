"""ptd_train.trl: PTD-PO on TRL's GRPOTrainer (tiny Qwen3 / Qwen3-VL saved to a temp dir, fp32, CPU).

The loss on a fixed rollout batch is that of docs/method.md §3 (``ptd_train.grpo.ptd_po_loss`` over log-probs and
Top-K JSD from ``ptd_kernels.reference``), values and gradients; training runs for text and a VLM
with the PTD term active; ``ptd_coef = 0`` is stock GRPO; gradient accumulation gives the
gradient of the full batch; the buffered batch is never changed; bad hints are refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")
from _tiny_hf import (  # noqa: E402
    flat_params,
    image_rows,
    reward_by_length,
    reward_says_yes,
    save_tiny_qwen3_vl,
    text_rows,
)
from datasets import Dataset  # noqa: E402

import ptd_kernels as ptd  # noqa: E402
from ptd_kernels.integrations import hf  # noqa: E402
from ptd_train.grpo import ptd_po_loss, ptd_set  # noqa: E402
from ptd_train.hints import HintLeakError  # noqa: E402
from ptd_train.trl import PTDGRPOConfig, PTDGRPOTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.abspath(os.path.join(__file__, "..", "..", ".."))


def _config(cls=PTDGRPOConfig, **overrides):
    args = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=6, bf16=False, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                learning_rate=1e-2, logging_steps=1, disable_tqdm=True)
    if cls is PTDGRPOConfig:
        args["ptd_k"] = 6
    args.update(overrides)
    return cls(**args)


def _trainer(model, rows, reward=reward_by_length, processor=None, cls=PTDGRPOTrainer, **overrides):
    config_cls = PTDGRPOConfig if issubclass(cls, PTDGRPOTrainer) else trl.GRPOConfig
    return cls(model=model, reward_funcs=reward, args=_config(config_cls, **overrides),
               train_dataset=Dataset.from_list(rows), processing_class=processor)


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def _assert_ptd_ran(trainer, steps):
    assert len(_logged(trainer, "loss")) == steps
    assert all(torch.isfinite(torch.tensor(_logged(trainer, "loss"))))
    assert min(_logged(trainer, "ptd/rollouts")) > 0
    jsd = _logged(trainer, "ptd/jsd")
    assert len(jsd) == steps and all(v > 0 for v in jsd)
    assert all(0 <= v <= 1 for v in _logged(trainer, "ptd/overlap"))
    assert all(0 < v <= 1 for v in _logged(trainer, "ptd/teacher_mass"))


def test_text_training_runs_with_ptd(qwen3):
    trainer = _trainer(qwen3, text_rows(8), max_steps=3)
    assert trainer.ptd_teacher_model is not None and trainer.ref_model is None  # a frozen copy when beta = 0
    before = flat_params(trainer.ptd_teacher_model)
    trainer.train()
    _assert_ptd_ran(trainer, 3)
    assert torch.equal(flat_params(trainer.ptd_teacher_model), before)  # the teacher stays frozen
    assert not torch.equal(flat_params(trainer.model), before)


def test_vlm_training_runs_with_ptd(tmp_path):
    path, processor = save_tiny_qwen3_vl(tmp_path)
    trainer = _trainer(path, image_rows(4), processor=processor, max_steps=3, max_completion_length=4, beta=0.05)
    assert trainer.ptd_teacher_model is trainer.ref_model
    # the teacher reads the same image and question, with the hint appended to the user turn
    trainer.model.train()
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    decode = processor.tokenizer.decode
    for i in range(4):
        student = decode(batch["prompt_ids"][i][batch["prompt_mask"][i].bool()])
        teacher = decode(batch["ptd_teacher_prompt_ids"][i][batch["ptd_teacher_prompt_mask"][i].bool()])
        assert "<|image_pad|>" in student
        assert teacher == student.replace("what color is it", "what color is it look at the left cells")
    assert torch.equal(batch["ptd_teacher_mm_token_type_ids"].sum(1), batch["mm_token_type_ids"].sum(1))
    trainer.train()
    _assert_ptd_ran(trainer, 3)


def test_zero_coef_equals_stock_grpo(qwen3):
    """ptd_coef = 0: no teacher, no dropped KL — the losses of stock GRPOTrainer (fp32, same seed)."""
    runs = {}
    for cls in (trl.GRPOTrainer, PTDGRPOTrainer):
        extra = dict(ptd_coef=0.0) if cls is PTDGRPOTrainer else {}
        trainer = _trainer(qwen3, text_rows(8), cls=cls, max_steps=3, beta=0.05, **extra)
        trainer.train()
        runs[cls] = (_logged(trainer, "loss"), _logged(trainer, "kl"), flat_params(trainer.model), trainer)
    (loss_a, kl_a, params_a, _), (loss_b, kl_b, params_b, ptd_trainer) = runs.values()
    assert ptd_trainer.ptd_teacher_model is None and not _logged(ptd_trainer, "ptd/jsd")
    assert len(loss_a) == 3 and max(kl_a) > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(kl_b, kl_a, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(params_b, params_a, rtol=0, atol=2e-4)


def test_fixed_batch_loss_is_spec_loss(qwen3):
    """On one rollout batch: loss and gradients = docs/method.md §3 (ptd_train.grpo) over reference log-probs and
    the reference Top-K JSD of the hint-conditioned teacher; F and the dropped KL as docs/method.md §3 says."""
    rewards_seen = []

    def reward(completions, **kwargs):
        values = [float(len(c[0]["content"].split()) % 2 == 0) for c in completions]
        rewards_seen.extend(values)
        return values

    rows = text_rows(3)
    rows[1]["hint"] = None  # a prompt without a hint: its group is never a PTD group
    trainer = _trainer(qwen3, rows, reward=reward, per_device_train_batch_size=12, max_completion_length=5,
                       beta=0.05, epsilon=0.2, epsilon_high=0.3, loss_type="dapo", scale_rewards="group",
                       ptd_coef=0.5, ptd_k=5)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    generation_batch = next(iter(trainer.get_train_dataloader()))  # 3 prompts × 4 rollouts, in sampler order
    batch = trainer._generate_and_score_completions(generation_batch)
    rewards = torch.tensor(rewards_seen).view(3, 4)
    has_hint = torch.tensor([row["hint"] is not None for row in generation_batch[::4]])
    assert int(has_hint.sum()) == 2
    in_f = ptd_set(rewards, has_hint)
    assert torch.equal(batch["ptd_rollout"], in_f.reshape(-1))
    assert torch.equal(batch["ptd_group"], (has_hint & (rewards.mean(1) < 1.0)).repeat_interleave(4))
    assert 0 < int(in_f.sum()) < 12, "the batch should mix F and non-F rollouts; change the seed"

    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    got_grads = [p.grad.clone() for p in trainer.model.parameters()]

    # docs/method.md §3 from the reference functions (float64 on the models' hidden states)
    model, teacher = trainer.model, trainer.ptd_teacher_model
    n = batch["completion_ids"].shape[1]
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    t_ids = torch.cat([batch["ptd_teacher_prompt_ids"], batch["completion_ids"]], 1)
    t_mask = torch.cat([batch["ptd_teacher_prompt_mask"], batch["completion_mask"]], 1)
    assert t_ids.shape[1] > ids.shape[1]  # the teacher reads the hint
    hidden = hf.last_hidden_states(model, input_ids=ids, attention_mask=mask)[:, -n - 1:-1].double()
    with torch.no_grad():
        t_hidden = hf.last_hidden_states(teacher, input_ids=t_ids, attention_mask=t_mask)[:, -n - 1:-1].double()
    weight, t_weight = model.lm_head.weight.double(), teacher.lm_head.weight.double()
    flat = hidden.reshape(-1, hidden.shape[-1])
    logp = ptd.reference.linear_logprobs(flat, weight, batch["completion_ids"].reshape(-1)).view(12, n)
    jsd = ptd.reference.linear_topk_jsd(flat, weight, t_hidden.reshape(-1, t_hidden.shape[-1]), t_weight, 5,
                                        beta=0.5).view(12, n)
    completion_mask = batch["completion_mask"].bool()
    parts = ptd_po_loss(logp, logp.detach(), batch["ref_per_token_logps"].double(), batch["advantages"].double(),
                        completion_mask, jsd, batch["ptd_rollout"], ~batch["ptd_group"], kl_coef=0.05, ptd_coef=0.5,
                        eps_low=0.2, eps_high=0.3)
    assert parts.ptd > 0 and parts.kl > 0
    torch.testing.assert_close(loss.double(), parts.loss, rtol=1e-5, atol=1e-7)
    trainer.model.zero_grad()
    parts.loss.backward()
    for got, want in zip(got_grads, [p.grad for p in trainer.model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    # the PTD term alone: λ · Σ_F D_K / Σ_F |y|
    trainer.ptd_coef = 0.0
    without = trainer.compute_loss(trainer.model, batch).detach()
    torch.testing.assert_close((loss.detach() - without).double(), 0.5 * parts.ptd, rtol=1e-4, atol=1e-8)


class _RecordingTrainer(PTDGRPOTrainer):
    """Checks that the buffered rollout batch is the same after every loss call."""

    def _compute_loss(self, model, inputs):
        before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        loss = super()._compute_loss(model, inputs)
        self.calls = getattr(self, "calls", 0) + 1
        for key, value in before.items():
            assert torch.equal(inputs[key], value), key
        return loss


def test_iterations_and_accumulation_keep_the_buffered_batch(qwen3):
    trainer = _trainer(qwen3, text_rows(8), cls=_RecordingTrainer, max_steps=2, beta=0.05, num_iterations=2,
                       gradient_accumulation_steps=2)
    trainer.train()
    assert trainer.calls == 4
    _assert_ptd_ran(trainer, 2)
    assert max(_logged(trainer, "kl")) == 0.0  # every group here fails: all of them lose their KL term


def test_accumulation_gives_the_full_batch_gradient(qwen3):
    """One SGD step on 8 rollouts: 2 accumulated micro-batches of 4 = one batch of 8."""
    params = []
    for per_device, accumulation in ((8, 1), (4, 2)):
        trainer = _trainer(qwen3, text_rows(8), max_steps=1, per_device_train_batch_size=per_device,
                           gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, ptd_coef=1.0)
        start = flat_params(trainer.model)
        trainer.train()
        assert _logged(trainer, "ptd/jsd")[0] > 0
        params.append(flat_params(trainer.model) - start)
    assert params[0].abs().max() > 1e-3
    torch.testing.assert_close(params[1], params[0], rtol=1e-4, atol=1e-6)


def test_hints_are_checked(qwen3):
    leaking = text_rows(4, hint="the answer is five")
    with pytest.raises(HintLeakError, match="leaks the answer"):
        _trainer(qwen3, leaking, max_steps=1).train()
    _trainer(qwen3, leaking, max_steps=1, ptd_allow_answer_leak=True).train()  # on purpose
    no_answer = [{k: v for k, v in row.items() if k != "answer"} for row in text_rows(4)]
    with pytest.raises(ValueError, match="ptd_answer_column"):
        _trainer(qwen3, no_answer, max_steps=1).train()
    no_hint = [{k: v for k, v in row.items() if k != "hint"} for row in text_rows(4)]
    with pytest.raises(ValueError, match="hint_column"):
        _trainer(qwen3, no_hint, max_steps=1).train()


def test_config_and_arguments_are_validated(qwen3):
    with pytest.raises(ValueError, match="ptd_support"):
        _config(ptd_support="both")
    with pytest.raises(ValueError, match="ptd_beta"):
        _config(ptd_beta=1.5)
    with pytest.raises(TypeError, match="PTDGRPOConfig"):
        PTDGRPOTrainer(model=qwen3, reward_funcs=reward_says_yes, args=_config(trl.GRPOConfig),
                       train_dataset=Dataset.from_list(text_rows(4)))


@pytest.mark.slow
def test_ddp_two_processes(qwen3, tmp_path):
    """Under accelerate's DDP (2 CPU processes, gloo) the PTD term is computed and the replicas stay equal."""
    script = os.path.join(ROOT, "tests", "_ddp_ptd_trl.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
           qwen3, str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert results[0]["params"] == pytest.approx(results[1]["params"], rel=0, abs=0)
    for result in results:
        assert result["jsd"] and all(v > 0 for v in result["jsd"])
        assert result["rollouts"] and sum(result["rollouts"]) > 0


# ----------------------------------------------------------------------------- served teacher


def _serve(monkeypatch, client):
    """TRL's VLLMClient, which PTDGRPOTrainer builds from ptd_teacher_server_url, is ``client`` here."""
    import trl.generation.vllm_client as vllm_client

    monkeypatch.setattr(vllm_client, "VLLMClient", lambda *args, **kwargs: client)
    return "http://teacher.invalid"


def _local_server(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptd_train.teacher_server import LocalTeacherServer

    model = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    return LocalTeacherServer(model, AutoTokenizer.from_pretrained(path).pad_token_id)


def test_served_teacher_equals_local_teacher(qwen3, monkeypatch):
    """A server holding the initial policy (the in-process stand-in, through the served protocol) gives the
    local frozen teacher's run with support 'teacher': losses, PTD metrics and parameters over 3 steps."""
    runs = []
    for served in (False, True):
        url = _serve(monkeypatch, _local_server(qwen3)) if served else None
        trainer = _trainer(qwen3, text_rows(8), max_steps=3, ptd_support="teacher", ptd_teacher_server_url=url)
        assert (trainer.ptd_teacher_model is None) == served
        trainer.train()
        _assert_ptd_ran(trainer, 3)
        runs.append(([_logged(trainer, key) for key in ("loss", "ptd/jsd", "ptd/overlap", "ptd/teacher_mass")],
                     flat_params(trainer.model)))
    (logged_a, params_a), (logged_b, params_b) = runs
    for a, b in zip(logged_a, logged_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(params_b, params_a, rtol=0, atol=2e-4)


def test_served_teacher_reads_the_hinted_prompt(qwen3, monkeypatch):
    """The server is asked for F's sequences only: hinted prompt + completion, K = ptd_k, the trainer's
    temperature; and a server that answers fewer than K log-probs is refused."""
    client = _local_server(qwen3)
    requests = []
    answer = client.get_sequence_logprobs

    def recording(sequences, prompt_lengths, top_logprobs, temperature):
        requests.append((sequences, prompt_lengths, top_logprobs, temperature))
        return answer(sequences, prompt_lengths, top_logprobs, temperature)

    client.get_sequence_logprobs = recording
    trainer = _trainer(qwen3, text_rows(4), ptd_support="teacher", ptd_k=5, temperature=0.8,
                       ptd_teacher_server_url=_serve(monkeypatch, client))
    trainer.model.train()
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    (sequences, prompt_lengths, k, temperature), = requests
    assert (k, temperature) == (5, 0.8) and len(sequences) == int(batch["ptd_rollout"].sum()) > 0
    decode = trainer.processing_class.decode
    for sequence, length in zip(sequences, prompt_lengths):
        assert decode(sequence[:length]).endswith("look at the left cells <|im_end|> <|im_start|> assistant")
    assert batch["ptd_teacher_topk_ids"].shape == (*batch["completion_ids"].shape, 5)

    client.get_sequence_logprobs = lambda *args, **kwargs: {
        key: [[row[:-1] for row in rows] for rows in value] for key, value in answer(*args, **kwargs).items()}
    with pytest.raises(ValueError, match="--max-logprobs"):
        trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))


def test_served_teacher_refusals(qwen3, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="ptd_support='union' with a teacher server"):
        _config(ptd_teacher_server_url="http://teacher.invalid")
    path, processor = save_tiny_qwen3_vl(tmp_path)
    with pytest.raises(NotImplementedError, match="images="):  # TRL's client sends token ids only
        _trainer(path, image_rows(4), processor=processor, max_completion_length=4, ptd_support="teacher",
                 ptd_teacher_server_url=_serve(monkeypatch, _local_server(qwen3)))
    trainer = _trainer(path, image_rows(4), processor=processor, max_completion_length=4, ptd_support="teacher")
    trainer.ptd_teacher_client = _local_server(qwen3)  # set by hand: checked when it is asked
    trainer.model.train()
    with pytest.raises(NotImplementedError, match="images="):
        trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
