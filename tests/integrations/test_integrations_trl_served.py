"""ptd_kernels.integrations.trl on TRL's served-teacher trainers (ServerDistillationTrainer,
AsyncDistillationTrainer): stock TRL's losses, gradients and training in fp32, with a stand-in teacher
server returning canned top-k log-probs (tests/_served_teacher.py; no vLLM, no network), and no
tokens×vocabulary tensor on ptd's path."""

from __future__ import annotations

import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")
from _served_teacher import CannedTeacher, RolloutWorker, WeightTransfer  # noqa: E402
from _tiny_hf import (  # noqa: E402
    assert_same_loss_and_grads,
    assert_same_training,
    loss_and_grads,
    save_tiny_gemma2,
    save_tiny_qwen3,
    text_rows,
)
from datasets import Dataset  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from ptd_kernels.integrations import trl_served  # noqa: E402
from ptd_kernels.integrations.trl import use_ptd_kernels  # noqa: E402

server_distillation = pytest.importorskip("trl.experimental.server_distillation")
async_distillation = pytest.importorskip("trl.experimental.async_distillation")
from trl.experimental.async_distillation import async_distillation_trainer as async_module  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return save_tiny_gemma2(tmp_path_factory.mktemp("gemma2"), softcap=2.0)


def _vocab(path) -> int:
    return len(AutoTokenizer.from_pretrained(path))


def _common(**overrides):
    args = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_completion_length=6, bf16=False,
                report_to=[], use_cpu=True, save_strategy="no", seed=0, learning_rate=1e-2, logging_steps=1,
                disable_tqdm=True)
    args.update(overrides)
    return args


def _assert_same(stock, through_ptd):
    assert stock[0] > 0
    assert_same_loss_and_grads(stock, through_ptd)


# ----------------------------------------------------------------------------- ServerDistillationTrainer


def _server(monkeypatch, model, teacher, rows=None, **overrides):
    """A ServerDistillationTrainer whose teacher client is ``teacher`` (TRL builds its VLLMClient in the
    constructor: the stand-in takes that name for the construction)."""
    import trl.generation.vllm_client as vllm_client

    monkeypatch.setattr(vllm_client, "VLLMClient", lambda *args, **kwargs: teacher)
    config = dict(teacher_model_server_url="http://teacher.invalid", beta=0.5, loss_top_k=1)
    config.update(overrides)
    args = server_distillation.ServerDistillationConfig(**_common(**config))
    return server_distillation.ServerDistillationTrainer(model=model, args=args,
                                                         train_dataset=Dataset.from_list(rows or text_rows(4)))


def _fixed_batch(trainer):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.mark.parametrize(("beta", "top_k", "tail", "temperature"), [
    (0.0, 1, True, 1.0), (0.0, 4, True, 0.7), (0.0, 4, False, 1.0), (0.5, 1, True, 1.0), (0.5, 1, False, 1.3),
    (1.0, 1, True, 1.0), (1.0, 1, False, 1.0)])
def test_server_fixed_batch_equals_stock(monkeypatch, qwen3, beta, top_k, tail, temperature):
    vocab = _vocab(qwen3)
    # a confident teacher after some tokens (top-1 log-prob 0.0: the tail clamp is active), fewer than k
    # candidates after others
    teacher = CannedTeacher(vocab, confident=range(0, vocab, 3), short=range(1, vocab, 5))
    trainer = _server(monkeypatch, qwen3, teacher, beta=beta, loss_top_k=top_k, loss_add_tail=tail,
                      temperature=temperature)
    inputs = _fixed_batch(trainer)
    assert not inputs["completion_mask"].bool().all(), "a ragged batch (some completions end early); change the seed"
    stock = loss_and_grads(trainer, inputs)
    use_ptd_kernels(trainer)
    assert "compute_loss" in trainer.__dict__
    through_ptd = loss_and_grads(trainer, inputs)
    if beta == 1.0 and not tail:  # one atom renormalized: probability 1 on both sides, as stock computes
        assert stock[0] == 0 and through_ptd[0] == 0
    else:
        _assert_same(stock, through_ptd)
    _sequences, _lengths, requested_k, requested_temperature = teacher.requests[-1]
    assert (requested_k, requested_temperature) == (top_k, temperature)


def test_server_training_equals_stock(monkeypatch, qwen3):
    """Three optimizer steps (2 accumulation steps each): the same losses and parameters."""
    vocab = _vocab(qwen3)
    def make_trainer(through_ptd):
        trainer = _server(monkeypatch, qwen3, CannedTeacher(vocab, confident=range(0, vocab, 4)),
                          rows=text_rows(12), max_steps=3, gradient_accumulation_steps=2,
                          per_device_train_batch_size=2)
        return use_ptd_kernels(trainer) if through_ptd else trainer

    assert_same_training(make_trainer)


def test_server_softcapped_model_equals_stock(monkeypatch, gemma2):
    """Gemma-2's final_logit_softcapping: stock reads it through the model's logits, ptd from the config."""
    trainer = _server(monkeypatch, gemma2, CannedTeacher(_vocab(gemma2)), beta=0.0, loss_top_k=3)
    inputs = _fixed_batch(trainer)
    stock = loss_and_grads(trainer, inputs)
    use_ptd_kernels(trainer)
    _assert_same(stock, loss_and_grads(trainer, inputs))


def test_server_refusals(monkeypatch, qwen3):
    trainer = _server(monkeypatch, qwen3, CannedTeacher(_vocab(qwen3)))
    with pytest.raises(ValueError, match="do not apply to ServerDistillationTrainer"):
        use_ptd_kernels(trainer, topk=4)
    trainer.reverse_kl_top_1_mode = "argmax"
    with pytest.raises(ValueError, match="reverse_kl_top_1_mode='argmax'"):
        use_ptd_kernels(trainer)


def _confident_positions(inputs, teacher) -> int:
    """Completion positions where the stand-in's top-1 log-prob is within 1e-7 of 0 (TRL's tail clamp)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    n = inputs["completion_ids"].shape[1]
    previous = ids[:, -n - 1:-1][inputs["completion_mask"].bool()]
    return sum(float(teacher.distribution(int(t), 1.0).max()) > -1e-7 for t in previous)


# ----------------------------------------------------------------------------- AsyncDistillationTrainer


def _async(monkeypatch, model, teacher, rows=None, **overrides):
    """An AsyncDistillationTrainer on CPU: TRL reads the GPU's name for its MFU metric and builds a client
    of the student's vLLM server in its constructor; both are stubbed, as is the rollout worker."""
    monkeypatch.setattr(async_module, "get_peak_flops_per_device", lambda *args: None)
    monkeypatch.setattr(async_module, "VLLMClient", lambda *args, **kwargs: None)
    config = dict(per_device_train_batch_size=3, teacher_top_k=4, token_budget=-1, vllm_server_timeout=5.0,
                  model_init_kwargs={"attn_implementation": "eager", "dtype": "float32"}, beta=0.0)
    config.update(overrides)
    args = async_distillation.AsyncDistillationConfig(**_common(**config))
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = rows or text_rows(6)
    # the dataloader reads one batch ahead: each weight sync queues enough for a few batches
    worker = RolloutWorker(tokenizer, rows, teacher, args.teacher_top_k, args.teacher_temperature,
                            per_sync=3 * args.per_device_train_batch_size)
    return async_distillation.AsyncDistillationTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                                       processing_class=tokenizer, rollout_worker=worker,
                                                       weight_transfer=WeightTransfer())


def _async_batch(trainer):
    trainer.rollout_worker.start()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return next(iter(trainer.get_train_dataloader()))


def _metrics(trainer):
    return {key: trainer._metrics["train"][key][-1] for key in ("jsd", "entropy", "teacher_entropy")}


@pytest.mark.parametrize(("beta", "tail", "teacher_temperature"), [
    (0.0, True, 1.0), (0.0, False, 0.8), (0.5, True, 1.0), (0.5, False, 1.0), (1.0, True, 1.2)])
def test_async_fixed_batch_equals_stock(monkeypatch, qwen3, beta, tail, teacher_temperature):
    vocab = _vocab(qwen3)
    teacher = CannedTeacher(vocab, confident=range(0, vocab, 3), short=range(1, vocab, 5))
    trainer = _async(monkeypatch, qwen3, teacher, beta=beta, add_tail_bucket=tail,
                     teacher_temperature=teacher_temperature)
    inputs = _async_batch(trainer)
    stock = loss_and_grads(trainer, inputs)
    stock_metrics = _metrics(trainer)
    use_ptd_kernels(trainer)
    assert "_compute_loss" in trainer.__dict__
    _assert_same(stock, loss_and_grads(trainer, inputs))
    for key, value in _metrics(trainer).items():
        assert value == pytest.approx(stock_metrics[key], rel=1e-5, abs=1e-7), key


def test_async_head_is_float32_under_bf16(monkeypatch, qwen3):
    """TRL's async trainer computes the student's logits in float32 whatever the mixed precision; so does
    ptd (a bfloat16 head would fail this check)."""
    trainer = _async(monkeypatch, qwen3, CannedTeacher(_vocab(qwen3)), bf16=True)
    inputs = _async_batch(trainer)
    with torch.no_grad():
        stock = trainer.compute_loss(trainer.model, inputs)
        use_ptd_kernels(trainer)
        torch.testing.assert_close(trainer.compute_loss(trainer.model, inputs), stock, rtol=1e-5, atol=1e-7)


def test_async_softcapped_model_equals_stock(monkeypatch, gemma2):
    trainer = _async(monkeypatch, gemma2, CannedTeacher(_vocab(gemma2)), beta=0.5)
    inputs = _async_batch(trainer)
    stock = loss_and_grads(trainer, inputs)
    use_ptd_kernels(trainer)
    _assert_same(stock, loss_and_grads(trainer, inputs))


def test_async_training_equals_stock(monkeypatch, qwen3):
    vocab = _vocab(qwen3)
    def make_trainer(through_ptd):
        trainer = _async(monkeypatch, qwen3, CannedTeacher(vocab, confident=range(0, vocab, 4)), max_steps=3)
        if through_ptd:
            use_ptd_kernels(trainer)
            other = _async(monkeypatch, qwen3, CannedTeacher(vocab))
            assert "_compute_loss" not in other.__dict__  # instance-scoped
        return trainer

    assert_same_training(make_trainer)


# ----------------------------------------------------------------------------- memory


class _LargestTensors(TorchDispatchMode):
    """The largest tensor any operation produced while active, and the largest with a ``vocab``-sized dim."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest, self.largest_vocab = vocab, (0, None), (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, (t.numel(), tuple(t.shape)), key=lambda x: x[0])
                if self.vocab in t.shape:
                    self.largest_vocab = max(self.largest_vocab, (t.numel(), tuple(t.shape)), key=lambda x: x[0])
        return out


def _largest_tensors(trainer, inputs, vocab):
    trainer.model.zero_grad()
    with _LargestTensors(vocab) as seen:
        trainer.compute_loss(trainer.model, inputs).backward()
    return seen.largest, seen.largest_vocab


@pytest.mark.parametrize("kind", ["server", "async"])
def test_no_tokens_by_vocabulary_tensor(monkeypatch, tmp_path, kind):
    """With a 4096-word output layer (H = 8): stock forms a [rows, V] (or [B, L, V]) float32 tensor; on ptd's
    path the largest tensor with a vocabulary dimension is the weight or its gradient [V, H], and no tensor
    reaches rows·V/2 (the chunked torch backend with small blocks, so that its blocks are visible here)."""
    from ptd_kernels import config

    vocab, hidden = 4096, 8
    path = save_tiny_qwen3(tmp_path, hidden=hidden, layers=1, vocab=vocab)
    teacher = CannedTeacher(vocab)
    if kind == "server":
        trainer = _server(monkeypatch, path, teacher, rows=text_rows(8), beta=0.0, loss_top_k=4,
                          per_device_train_batch_size=8, max_completion_length=8)
        inputs = _fixed_batch(trainer)
        rows = int(inputs["completion_mask"].sum())
    else:
        trainer = _async(monkeypatch, path, teacher, rows=text_rows(8), per_device_train_batch_size=8)
        inputs = _async_batch(trainer)
        rows = int(inputs["completion_mask"].sum())
    _, (stock, stock_shape) = _largest_tensors(trainer, inputs, vocab)
    assert stock >= rows * vocab, (stock_shape, rows)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # auto → the chunked torch backend on CPU
    monkeypatch.setattr(config, "CHUNK_BYTES", 64 << 10)
    use_ptd_kernels(trainer)
    (largest, shape), (largest_vocab, vocab_shape) = _largest_tensors(trainer, inputs, vocab)
    assert largest_vocab <= vocab * hidden, (vocab_shape, rows)  # the weight and its gradient
    assert largest < rows * vocab // 2, (shape, rows)


# ----------------------------------------------------------------------------- the building blocks


def _reference_logprobs(hidden, weight, bias, temperature, logit_scale, softcap):
    """Full-row float64 log-probs (materialized: the oracle)."""
    z = hidden.double() @ weight.double().T + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z / temperature, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("n", "width", "transform"), [
    (1, 1, dict(temperature=1.0, logit_scale=1.0, softcap=None)),
    (9, 5, dict(temperature=0.7, logit_scale=0.5, softcap=3.0)),
    (6, 3, dict(temperature=1.3, logit_scale=2.0, softcap=None))])
def test_candidate_logprobs_match_the_full_row(dtype, n, width, transform):
    """Values, entropy and gradients (hidden, weight, bias) against float64 log_softmax of the whole row;
    V = 37 (no multiple of a tile), negative candidate ids read as id 0."""
    vocab, hidden_size = 37, 16
    g = torch.Generator().manual_seed(n)
    hidden = (torch.randn(n, hidden_size, generator=g) * 0.7).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.5).to(dtype).requires_grad_()
    bias = (torch.randn(vocab, generator=g) * 0.1).to(dtype).requires_grad_()
    candidates = torch.randint(0, vocab, (n, width), generator=g)
    candidates[0, -1] = -1
    upstream = torch.randn(n, width, generator=g, dtype=torch.float64)

    logp, entropy = trl_served.candidate_logprobs(hidden, weight, candidates, bias=bias, with_entropy=True,
                                                  **transform)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (logp.double() * upstream).sum().backward()
    got = [t.grad.double() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None

    full = _reference_logprobs(hidden, weight, bias, **transform)
    want = full.gather(1, candidates.clamp_min(0))
    want_entropy = -(full.exp() * full).sum(-1)
    (want * upstream).sum().backward()
    tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(logp.double(), want.detach(), **tolerance)
    torch.testing.assert_close(entropy.double(), want_entropy.detach(), **tolerance)
    for a, b in zip(got, (t.grad.double() for t in (hidden, weight, bias))):
        if dtype == torch.bfloat16:
            # computed in float32, stored in the parameters' bfloat16
            torch.testing.assert_close(a, b, rtol=2 ** -7, atol=2 ** -6 * float(b.abs().max()))
        else:
            torch.testing.assert_close(a, b, rtol=tolerance["rtol"] * 10, atol=tolerance["atol"] * 10)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("tail", [True, False])
def test_served_divergence_is_trls(beta, tail):
    """served_divergence_terms = TRL's _add_tail_bucket + _jsd_divergence (values and gradients), masked
    candidates and a confident row (top-1 log-prob 0: the clamped tail) included."""
    g = torch.Generator().manual_seed(3)
    student_logits = torch.randn(6, 20, generator=g, dtype=torch.float64).float() * 3
    student_logits[2, 4] += 40.0  # a confident student row
    student = torch.log_softmax(student_logits, -1).requires_grad_()
    teacher = torch.log_softmax(torch.randn(6, 20, generator=g) * 3, -1)
    teacher[1] = torch.full((20,), -200.0).index_fill(0, torch.tensor([7]), 0.0)  # a confident teacher row
    ids = torch.stack([torch.randperm(20, generator=g)[:4] for _ in range(6)])
    valid = torch.rand(6, 4, generator=g) > 0.3
    valid[:, 0] = True
    student_at, teacher_at = student.gather(1, ids), teacher.gather(1, ids)

    terms, _, _ = trl_served.served_divergence_terms(student_at, teacher_at, valid, beta=beta, tail=tail)
    (grad,) = torch.autograd.grad(terms.sum(), student, retain_graph=True)

    neg_inf = torch.tensor(float("-inf"))
    s, t = torch.where(valid, student_at, neg_inf), torch.where(valid, teacher_at, neg_inf)
    if tail:
        s, support = async_module._add_tail_bucket(s, valid)
        t, _ = async_module._add_tail_bucket(t, valid)
    else:
        s, t, support = s - s.logsumexp(-1, keepdim=True), t - t.logsumexp(-1, keepdim=True), valid
    want = async_module._jsd_divergence(s, t, beta, support)
    (want_grad,) = torch.autograd.grad(want.sum(), student)
    assert want.sum(-1).min() >= 0 and want.sum() > 0
    torch.testing.assert_close(terms, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)


def test_candidate_outside_the_vocabulary_is_refused():
    hidden, weight = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="candidate id 7 is outside the student's vocabulary"):
        trl_served.candidate_logprobs(hidden, weight, torch.tensor([[1, 7], [0, 2]]))
