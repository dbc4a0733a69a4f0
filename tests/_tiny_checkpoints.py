"""Tiny checkpoints of the families ptd_train loads (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, a text-only
Qwen3), saved with their processor, and small JSONL datasets for them — shared by the tests."""

import json
import os

import numpy as np
import torch
from PIL import Image

from ptd_train.model import tiny_qwen3vl_config
from ptd_train.prompts import EOS, IMAGE_PAD, PAD, VIDEO_PAD, VISION_END, VISION_START, build_tokenizer
from ptd_train.tasks import GridCountTask
from ptd_train.tasks.grid_count import render

# A ChatML template written for these tests (the Qwen checkpoints ship their own).
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_WORDS = "what is plus add the two numbers . zero one two three four five six seven".split()
WORDS = list(GridCountTask.words) + ["user", "assistant", "Hint:"] + TEXT_WORDS
# the processor's own pixel limits: a 56×56 task image becomes 28×28, 2×2 merged tokens (our patchify would give 4×4)
MAX_PIXELS = 28 * 28


def _text_config(tok):
    vocab = tok.get_vocab()
    return dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2]),
        pad_token_id=vocab[PAD],
        bos_token_id=None,
        eos_token_id=vocab[EOS],
    )


def _special_ids(tok):
    v = tok.get_vocab()
    return dict(
        image_token_id=v[IMAGE_PAD],
        video_token_id=v[VIDEO_PAD],
        vision_start_token_id=v[VISION_START],
        vision_end_token_id=v[VISION_END],
        tie_word_embeddings=False,
    )


def _model(family, tok):
    import transformers as tf

    vision = dict(patch_size=7, spatial_merge_size=2, temporal_patch_size=2, depth=1, num_heads=1)
    if family == "qwen2_vl":
        config = tf.Qwen2VLConfig(
            text_config=_text_config(tok), vision_config=dict(vision, embed_dim=16, hidden_size=32, mlp_ratio=2),
            **_special_ids(tok),
        )  # fmt: skip
        return tf.Qwen2VLForConditionalGeneration(config)
    if family == "qwen2_5_vl":
        vc = dict(vision, hidden_size=16, intermediate_size=32, out_hidden_size=32)
        vc.update(window_size=28, fullatt_block_indexes=[0])
        config = tf.Qwen2_5_VLConfig(text_config=_text_config(tok), vision_config=vc, **_special_ids(tok))
        return tf.Qwen2_5_VLForConditionalGeneration(config)
    if family == "qwen3_vl":
        return tf.Qwen3VLForConditionalGeneration(tiny_qwen3vl_config(tok))
    text = {k: v for k, v in _text_config(tok).items() if k != "rope_parameters"}
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**text, tie_word_embeddings=True))  # tied output layer


def make_checkpoint(root, family):
    """A tiny checkpoint of ``family`` saved with its processor (or, text-only, its tokenizer)."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer(WORDS)
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    model = _model(family, tok)
    model.generation_config.eos_token_id = tok.eos_token_id
    path = str(root / family)
    model.save_pretrained(path)
    if family == "text":
        tok.save_pretrained(path)
        return path
    ip = Qwen2VLImageProcessorPil(
        patch_size=7, merge_size=2, temporal_patch_size=2, min_pixels=14 * 14, max_pixels=MAX_PIXELS,
        image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28],
    )  # fmt: skip
    base = processor_class_from_name(PROCESSOR_MAPPING_NAMES[family])
    get_attributes = base.get_attributes  # save with the processor class, its video processor left out
    base.get_attributes = classmethod(lambda cls: [a for a in get_attributes() if a != "video_processor"])
    try:
        base(image_processor=ip, tokenizer=tok, chat_template=TEMPLATE).save_pretrained(path)
    finally:
        base.get_attributes = get_attributes
    return path


def make_dataset(root, text: bool):
    rng = np.random.default_rng(0)
    lines = []
    os.makedirs(root / "img", exist_ok=True)
    for i in range(6):
        if text:
            a, b = int(rng.integers(0, 4)), int(rng.integers(0, 4))
            q = f"what is {TEXT_WORDS[8 + a]} plus {TEXT_WORDS[8 + b]} ?"
            lines.append(dict(image=None, question=q, answer=a + b, hint="add the two numbers ."))
        else:
            grid = rng.random((4, 4)) < 0.5
            Image.fromarray(render(grid, rng)).save(root / "img" / f"{i}.png")
            hint = "look only at cells a1 and ignore the blue cells ."
            lines.append(dict(image=f"img/{i}.png", question="how many red cells ?", answer=int(grid.sum()), hint=hint))
    path = root / ("text.jsonl" if text else "images.jsonl")
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)
