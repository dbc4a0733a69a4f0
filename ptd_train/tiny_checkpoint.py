"""Tiny local checkpoints, to try ptd offline: a text model and each Qwen-VL family, saved with
their tokenizer (and, for a vision-language model, its processor), plus a small JSONL dataset.

    python -m ptd_train.tiny_checkpoint --family qwen2_vl runs/tiny-qwen2-vl
    python -m ptd_train.tiny_checkpoint --family text runs/tiny-text --dataset
    python -m ptd_train.run --model_name_or_path runs/tiny-text --dataset runs/tiny-text/text.jsonl

Families: ``text`` (a Qwen3 causal LM, tied output layer), ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``.
Each model is a random initialisation of a few thousand parameters built from a config: nothing
is downloaded. The vocabulary is a word-level tokenizer over the embedded task's words and a few
arithmetic words, with a ChatML chat template; the checkpoints load with the Auto classes, with
``ptd_train.run --model_name_or_path`` and in the integrations (``ptd_kernels.integrations``, TRL).

**Processors without torchvision.** A Qwen-VL processor class builds a video processor, and video
processors need torchvision, which ptd does not depend on. :func:`images_only_processor_class`
returns the family's processor class with the video processor left out; it saves under the
family's own class name (so the checkpoint is a normal one) and loads such a checkpoint back::

    from ptd_train.tiny_checkpoint import images_only_processor_class
    processor = images_only_processor_class("qwen2_vl").from_pretrained(path)
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from .prompts import EOS, IMAGE_PAD, PAD, VIDEO_PAD, VISION_END, VISION_START, build_tokenizer
from .tasks import GridCountTask

FAMILIES = ("text", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# A ChatML template (the Qwen checkpoints ship their own): a message's content is a string, or a
# list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_WORDS = "what is plus add the two numbers . zero one two three four five six seven".split()
WORDS = list(GridCountTask.words) + ["user", "assistant", "Hint:"] + TEXT_WORDS
# The image processor's pixel limit: a 56×56 task image becomes 28×28, i.e. 4×4 patches of 7 px,
# merged 2×2 into 4 image tokens.
MAX_PIXELS = 28 * 28


def word_tokenizer(words=WORDS):
    """A word-level tokenizer over the trainer's special tokens and ``words``, with :data:`CHAT_TEMPLATE`."""
    tok = build_tokenizer(list(words))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def images_only_processor_class(model_type: str):
    """The processor class of ``model_type`` (e.g. ``"qwen2_vl"`` → ``Qwen2VLProcessor``) without its
    video processor, so that building, saving and loading it needs no torchvision. It carries the
    family's class name: what it saves is that family's ordinary processor files."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ValueError(f"model_type: no processor class known for {model_type!r}")
    base = processor_class_from_name(name)

    class ImagesOnly(base):
        @classmethod
        def get_attributes(cls):
            return [attribute for attribute in super().get_attributes() if attribute != "video_processor"]

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = base.__name__
    return ImagesOnly


def tiny_image_processor(max_pixels: int = MAX_PIXELS):
    """The Qwen-VL image processor (PIL, no torchvision) at the tiny models' patch layout: 7-pixel
    patches, 2×2 merge, 2 frames per temporal patch."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=7, merge_size=2, temporal_patch_size=2, min_pixels=14 * 14, max_pixels=max_pixels,
        image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28],
    )  # fmt: skip


def _text_config(tok) -> dict:
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


def _vision_token_ids(tok) -> dict:
    vocab = tok.get_vocab()
    return dict(
        image_token_id=vocab[IMAGE_PAD],
        video_token_id=vocab[VIDEO_PAD],
        vision_start_token_id=vocab[VISION_START],
        vision_end_token_id=vocab[VISION_END],
        tie_word_embeddings=False,
    )


def build_model(family: str, tok):
    """A randomly initialised tiny model of ``family`` for the vocabulary of ``tok``."""
    import transformers

    from .model import tiny_qwen3vl_config

    if family not in FAMILIES:
        raise ValueError(f"family: {family!r} is not one of {', '.join(FAMILIES)}")
    vision = dict(patch_size=7, spatial_merge_size=2, temporal_patch_size=2, depth=1, num_heads=1)
    if family == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            text_config=_text_config(tok), vision_config=dict(vision, embed_dim=16, hidden_size=32, mlp_ratio=2),
            **_vision_token_ids(tok),
        )  # fmt: skip
        return transformers.Qwen2VLForConditionalGeneration(config)
    if family == "qwen2_5_vl":
        vision_config = dict(vision, hidden_size=16, intermediate_size=32, out_hidden_size=32, window_size=28,
                             fullatt_block_indexes=[0])
        config = transformers.Qwen2_5_VLConfig(text_config=_text_config(tok), vision_config=vision_config,
                                               **_vision_token_ids(tok))
        return transformers.Qwen2_5_VLForConditionalGeneration(config)
    if family == "qwen3_vl":
        return transformers.Qwen3VLForConditionalGeneration(tiny_qwen3vl_config(tok))
    text = {key: value for key, value in _text_config(tok).items() if key != "rope_parameters"}
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**text, tie_word_embeddings=True))


def make_checkpoint(out, family: str, *, seed: int = 0) -> str:
    """Save a tiny ``family`` checkpoint into the folder ``out``: model, tokenizer and, for a
    vision-language family, its processor (images only). Returns the folder's path."""
    tok = word_tokenizer()
    torch.manual_seed(seed)
    model = build_model(family, tok)
    model.generation_config.eos_token_id = tok.eos_token_id
    path = str(out)
    model.save_pretrained(path)
    if family == "text":
        tok.save_pretrained(path)
        return path
    processor = images_only_processor_class(family)(image_processor=tiny_image_processor(), tokenizer=tok,
                                                   chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return path


def make_dataset(out, text: bool = False, *, examples: int = 6, seed: int = 0) -> str:
    """A small JSONL dataset in the trainer's format, written into the folder ``out``:
    ``images.jsonl`` with ``img/<i>.png`` (count the red cells of a grid), or with ``text=True``
    ``text.jsonl`` (add two numbers). Returns the file's path."""
    from PIL import Image

    from .tasks.grid_count import render

    rng = np.random.default_rng(seed)
    lines = []
    os.makedirs(out, exist_ok=True)
    if not text:
        os.makedirs(os.path.join(out, "img"), exist_ok=True)
    for i in range(examples):
        if text:
            a, b = int(rng.integers(0, 4)), int(rng.integers(0, 4))
            question = f"what is {TEXT_WORDS[8 + a]} plus {TEXT_WORDS[8 + b]} ?"
            lines.append(dict(image=None, question=question, answer=a + b, hint="add the two numbers ."))
        else:
            grid = rng.random((4, 4)) < 0.5
            Image.fromarray(render(grid, rng)).save(os.path.join(out, "img", f"{i}.png"))
            hint = "look only at cells a1 and ignore the blue cells ."
            lines.append(dict(image=f"img/{i}.png", question="how many red cells ?", answer=int(grid.sum()),
                              hint=hint))
    path = os.path.join(out, "text.jsonl" if text else "images.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ptd_train.tiny_checkpoint",
        description="Save a tiny, randomly initialised checkpoint (model, tokenizer and, for a vision-language "
        "family, its processor without a video processor) into OUT, to try ptd offline.",
    )
    parser.add_argument("out", metavar="OUT", help="folder to write (created; files in it are overwritten)")
    parser.add_argument("--family", choices=FAMILIES, default="text",
                        help="text: a Qwen3 causal LM; qwen2_vl, qwen2_5_vl, qwen3_vl: a Qwen-VL model (default: text)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")
    parser.add_argument("--dataset", action="store_true",
                        help="also write a 6-example JSONL dataset into OUT (text.jsonl for the text family, "
                        "images.jsonl with img/ otherwise)")
    args = parser.parse_args(argv)
    path = make_checkpoint(args.out, args.family, seed=args.seed)
    print(f"tiny {args.family} checkpoint: {path}")
    if args.dataset:
        print(f"dataset: {make_dataset(args.out, text=args.family == 'text')}")


if __name__ == "__main__":
    main()
