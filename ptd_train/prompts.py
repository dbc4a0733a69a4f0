"""Prompts: the student context x and the hinted teacher context x^h = [x ; h] as model inputs.

Two formats. The embedded task (and a checkpoint saved without a chat template) uses a
word-level prompt: image placeholders, question, optional ``hint : …``, ``answer :``, with the
images patchified for the model's vision geometry. A real checkpoint uses its own chat template
and, for a vision-language model, its own image processor (resizing, normalization, patch layout)
through its processor class — built without a video processor, so no torchvision is needed.
:class:`Env` picks the format and turns examples into a :class:`PromptBatch`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .config import TrainConfig, UsageError
from .hints import HintLeakError, check_hint, leak_hint
from .tasks import Example
from .vision import VisionBatch, VisionGeometry, patchify, resize_for_model, stack_images

# Special tokens (Qwen spellings, so real checkpoints and the tiny one share the placeholder ids).
PAD = "<|endoftext|>"
EOS = "<|im_end|>"
BOS_USER = "<|im_start|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
UNK = "<unk>"
SPECIAL_TOKENS = [PAD, EOS, BOS_USER, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, UNK]
# Tokens a rollout may never contain: sampling suppresses them, every log-prob masks them
# (a sampled <|image_pad|> makes the next forward pass fail: image tokens ≠ image features).
PLACEHOLDER_TOKENS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``SPECIAL_TOKENS + words`` (whitespace-separated words).

    Round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    vocab: dict[str, int] = {}
    for w in SPECIAL_TOKENS + list(words):
        if w not in vocab:
            vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=[BOS_USER, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok


def placeholder_ids(tok) -> list[int]:
    """Ids of the vision placeholder tokens that exist in this vocabulary."""
    vocab = tok.get_vocab()
    return [vocab[t] for t in PLACEHOLDER_TOKENS if t in vocab]


def encode_prompt(tok, question: str, n_image_tokens: int | None, hint: str | None = None) -> list[int]:
    """Token ids of one word-level prompt: image placeholders (none when ``n_image_tokens`` is
    None: a text-only example), question, optional hint, answer cue.

    ``hint=None`` is the student context x; a hint string gives the teacher context x^h = [x ; h].
    """
    out: list[int] = []
    if n_image_tokens is not None:  # (not tok.get_vocab(): it copies the whole vocabulary)
        start, pad, end = ids = tok.convert_tokens_to_ids([VISION_START, IMAGE_PAD, VISION_END])
        if any(i is None or i == tok.unk_token_id for i in ids):
            raise ValueError(f"the tokenizer has no {VISION_START}, {IMAGE_PAD} and {VISION_END} tokens: an image "
                             "prompt in the word-level format needs all three")
        out += [start] + [pad] * n_image_tokens + [end]
    out += tok.encode(" " + question, add_special_tokens=False)
    if hint is not None:
        out += tok.encode(" hint : " + hint, add_special_tokens=False)
    return out + tok.encode(" answer :", add_special_tokens=False)


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → left-padded ids and attention mask ``[len(seqs), longest]`` (int64) on ``device``;
    an empty list is all padding."""
    L = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
            att[i, L - len(s) :] = 1
    return ids.to(device), att.to(device)


@dataclass
class PromptBatch:
    """Left-padded prompt ids and attention mask ``[B, P]`` and their images (None: text only)."""

    ids: torch.Tensor
    mask: torch.Tensor
    vision: VisionBatch | None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, rows: list[int]) -> PromptBatch:
        """The prompts ``rows`` (a row may repeat: the G rollouts of one prompt); images are shared."""
        vision = None if self.vision is None else self.vision.select(rows)
        return PromptBatch(self.ids[rows], self.mask[rows], vision)


class WordPrompts:
    """The embedded word-level format; images patchified with ``geo`` (resized to ``max_pixels``
    first when ``resize``: dataset images come in any size)."""

    def __init__(self, tok, geo: VisionGeometry | None, max_pixels: int | None, resize: bool):
        self.tok, self.geo, self.max_pixels, self.resize = tok, geo, max_pixels, resize

    def encode(self, ex: Example, hint: str | None):
        if ex.image is None:
            return encode_prompt(self.tok, ex.question, None, hint), None, None
        img = resize_for_model(ex.image, self.geo, self.max_pixels) if self.resize else ex.image
        patches, thw = patchify(img, self.geo)
        n_img = thw[0] * thw[1] * thw[2] // self.geo.merge_size**2
        return encode_prompt(self.tok, ex.question, n_img, hint), patches, thw


class ChatPrompts:
    """A checkpoint's chat template, with the hint appended to the user turn; images go through
    the checkpoint's processor (``processor=None``: a text-only model and its tokenizer)."""

    def __init__(self, tok, processor=None, max_pixels: int | None = None):
        self.tok, self.processor = tok, processor
        self.image_kwargs = {}
        if processor is not None and max_pixels is not None:  # cap the image processor's own limit
            size = dict(processor.image_processor.size)
            self.image_kwargs = {"size": {**size, "longest_edge": min(max_pixels, size["longest_edge"])}}

    def encode(self, ex: Example, hint: str | None):
        text = ex.question if hint is None else f"{ex.question}\nHint: {hint}"
        if self.processor is None:
            if ex.image is not None:
                raise UsageError("--dataset: an example has an image but the model is text-only; give a "
                                 "vision-language checkpoint or a text dataset")
            ids = self.tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            return list(ids), None, None
        content = ([{"type": "image"}] if ex.image is not None else []) + [{"type": "text", "text": text}]
        chat = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        images = None if ex.image is None else [ex.image]
        out = self.processor(text=[chat], images=images, return_tensors="pt", **self.image_kwargs)
        ids = out["input_ids"][0].tolist()
        if ex.image is None:
            return ids, None, None
        return ids, out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())


class Env:
    """Everything a step needs that is not the model weights: the config, tokenizer, prompt
    format, device and kernel backend, the token ids that end a response and those it may not
    contain."""

    def __init__(
        self,
        cfg: TrainConfig,
        tok,
        geo: VisionGeometry | None,
        device: torch.device,
        backend: str,
        processor=None,
        stop_ids: list[int] | None = None,
    ):
        self.cfg, self.tok, self.geo, self.device, self.backend = cfg, tok, geo, device, backend
        self.blocked = placeholder_ids(tok)
        self.stop_ids = stop_ids or [tok.eos_token_id]
        self.autocast = device.type == "cuda"  # bf16 compute on CUDA, fp32 weights
        if processor is not None or (geo is None and getattr(tok, "chat_template", None)):
            self.format = ChatPrompts(tok, processor, cfg.max_pixels)
        elif geo is not None and getattr(tok, "chat_template", None):
            raise UsageError(
                "--model_name_or_path: a vision-language checkpoint with a chat template needs its image processor "
                "(preprocessor_config.json or processor_config.json) to build prompts"
            )
        else:
            max_pixels = 512 * 512 if cfg.max_pixels is None else cfg.max_pixels
            self.format = WordPrompts(tok, geo, max_pixels, resize=cfg.dataset is not None)

    def amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def prompts(self, examples: list[Example], hint_kinds: list[str] | None = None) -> PromptBatch:
        """Left-padded prompts of ``examples`` with their images, on the device.

        ``hint_kinds=None``: the student's hint-free context x. Otherwise one hint kind per
        example (``"none"`` = no hint); every hint passes the zero-spoiler check first.
        """
        ids, patches, grids = [], [], []
        for i, ex in enumerate(examples):
            hint = None if hint_kinds is None else self.hint(ex, hint_kinds[i])
            p_ids, p, thw = self.format.encode(ex, hint)
            ids.append(p_ids)
            if p is not None:
                patches.append(p)
                grids.append(thw)
        if patches and len(patches) != len(examples):
            raise ValueError("dataset: a batch mixes examples with and without images")
        pid, pmask = left_pad(ids, self.tok.pad_token_id)
        vision = stack_images(patches, grids).to(self.device) if patches else None
        return PromptBatch(pid.to(self.device), pmask.to(self.device), vision)

    def hint(self, ex: Example, kind: str) -> str | None:
        """The hint of this kind, checked zero-spoiler. The one exception is ``"leak"`` (the
        ptd-leak baseline, which states the answer): config.resolved() admits it only with
        ``allow_answer_leak``, and it is refused here too without that flag."""
        if kind == "leak":
            if not self.cfg.allow_answer_leak:
                raise HintLeakError("teacher_hint 'leak' states the answer; needs --allow_answer_leak true")
            return leak_hint(ex.completion or ex.answer)
        hint = ex.hint(kind)
        if hint is not None:
            check_hint(hint, ex.answer)
        return hint
