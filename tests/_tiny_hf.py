"""Tiny Hugging Face models, tokenizers and processors built from configs (nothing downloaded), for
the integration tests (the trainer's and the user's tiny checkpoints: ``ptd_train.tiny_checkpoint``).

Word-level tokenizers with a small chat template, a tiny Qwen3 causal LM, a tiny Qwen3-VL with
an image-only processor (``ptd_train.tiny_checkpoint.images_only_processor_class``), and a tiny
soft-capped Gemma-2 — each saved to a directory so that TRL can rebuild its reference model from
the path.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from ptd_train.tiny_checkpoint import images_only_processor_class

PAD, EOS, TURN = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = ("user assistant system what is two plus three the answer yes no maybe one four five hint look at "
         "left right cells color red blue green it").split()

TEXT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ p['text'] }} {% endif %}"
    "{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def word_tokenizer(vision: bool = False) -> PreTrainedTokenizerFast:
    specials = [PAD, EOS, TURN] + (VISION if vision else [])
    vocab = {w: i for i, w in enumerate(specials + WORDS + ["<unk>"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token=PAD, eos_token=EOS,
                                  additional_special_tokens=specials[2:], padding_side="left")
    tok.chat_template = VL_TEMPLATE if vision else TEXT_TEMPLATE
    return tok


def _ids(tok) -> dict:
    return dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)


def save_tiny_qwen3(path, *, hidden: int = 32, layers: int = 2, seed: int = 0, tie: bool = False,
                    vocab: int | None = None) -> str:
    """A tiny Qwen3 causal LM and its tokenizer, saved to ``path`` (``vocab``: a larger output layer than the
    tokenizer's words, for memory checks)."""
    tok = word_tokenizer()
    config = Qwen3Config(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=128, tie_word_embeddings=tie, **_ids(tok))
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_tiny_gemma2(path, *, softcap: float = 2.0, seed: int = 0) -> str:
    """A tiny Gemma-2 (final_logit_softcapping = ``softcap``) and its tokenizer, saved to ``path``."""
    tok = word_tokenizer()
    config = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                          final_logit_softcapping=softcap, query_pre_attn_scalar=8, sliding_window=16, **_ids(tok))
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():  # random init gives small logits; widen them so the soft-cap bends them
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


IMAGE_SIZE = 28  # 4×4 patches of 7 px → 2×2 merged → 4 image tokens


def save_tiny_qwen3_vl(path, *, seed: int = 0):
    """A tiny Qwen3-VL and its tokenizer saved to ``path``; returns (path, processor)."""
    tok = word_tokenizer(vision=True)
    images = Qwen2VLImageProcessor(patch_size=7, merge_size=2, temporal_patch_size=2, min_pixels=IMAGE_SIZE ** 2,
                                   max_pixels=IMAGE_SIZE ** 2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor_class = images_only_processor_class("qwen3_vl")  # no video processor: no torchvision needed
    processor = processor_class(image_processor=images, tokenizer=tok, chat_template=VL_TEMPLATE)
    vocab = tok.get_vocab()
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=False, rope_scaling=dict(rope_type="default", mrope_section=[2, 1, 1],
                                                                      mrope_interleaved=True), **_ids(tok)),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=7, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[]),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False, **_ids(tok))
    torch.manual_seed(seed)
    Qwen3VLForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), processor


def random_image(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype("uint8"))


def text_rows(n: int, *, hint: str | None = "look at the left cells", answer: str = "five") -> list[dict]:
    questions = ["what is two plus three", "what is the answer", "is it one plus four"]
    return [{"prompt": [{"role": "user", "content": questions[i % len(questions)]}], "hint": hint, "answer": answer}
            for i in range(n)]


def image_rows(n: int, *, hint: str | None = "look at the left cells", answer: str = "red") -> list[dict]:
    return [{"prompt": [{"role": "user", "content": "what color is it"}], "image": random_image(i), "hint": hint,
             "answer": answer} for i in range(n)]


def reward_says_yes(completions, **kwargs):
    """1 when the completion contains 'yes': rare for a random tiny model, so most groups fail."""
    return [float("yes" in (c[0]["content"] if isinstance(c, list) else c).split()) for c in completions]


def reward_by_length(completions, **kwargs):
    """A spread of rewards in [0, 1): every rollout fails, groups have non-zero advantages."""
    return [min(len((c[0]["content"] if isinstance(c, list) else c).split()), 9) / 10 for c in completions]


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def loss_and_grads(trainer, inputs):
    """A trainer's loss on ``inputs`` and the gradients of its model's parameters."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


def assert_same_loss_and_grads(stock, through_ptd, *, rtol=1e-5):
    """Two ``loss_and_grads`` results agree: the loss to ``rtol``, every gradient to fp32 accuracy."""
    (loss_a, grads_a), (loss_b, grads_b) = stock, through_ptd
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=1e-7)
    assert len(grads_a) == len(grads_b) > 10
    scale = max(g.abs().max() for g in grads_a)
    assert scale > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)


def assert_same_training(make_trainer, steps: int = 3):
    """``make_trainer(through_ptd)`` trained as stock and through ptd: the same logged losses and parameters."""
    runs = []
    for through_ptd in (False, True):
        trainer = make_trainer(through_ptd)
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], flat_params(trainer.model)))
    (losses_a, params_a), (losses_b, params_b) = runs
    assert len(losses_a) == steps
    torch.testing.assert_close(losses_b, losses_a, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(params_b, params_a, rtol=0, atol=2e-4)  # Adam steps of 1e-2 each
