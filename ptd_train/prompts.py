"""Prompts: the embedded word-level tokenizer, prompt token ids (student context x and hinted
teacher context x^h = [x ; h]) and :class:`Env`, which turns examples into model inputs."""

from __future__ import annotations

import contextlib

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .config import TrainConfig
from .hints import HintLeakError, check_hint, leak_hint
from .tasks import Example
from .vision import VisionGeometry, patchify, resize_for_model, stack_images

# Special tokens (Qwen spellings, so real checkpoints and the tiny one share the prompt code).
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


def encode_prompt(tok, question: str, n_image_tokens: int, hint: str | None = None) -> list[int]:
    """Token ids of one prompt: image placeholders, question, optional hint, answer cue.

    ``hint=None`` is the student context x; a hint string gives the teacher context x^h = [x ; h].
    Real chat checkpoints get their ``<|im_start|>user … <|im_end|> <|im_start|>assistant`` frame.
    """
    vocab = tok.get_vocab()
    ids = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    chat = bool(getattr(tok, "chat_template", None))  # a real chat checkpoint (ours has no template)
    out: list[int] = []
    if chat:
        out += [vocab[BOS_USER]] + ids("user\n")
    out += [vocab[VISION_START]] + [vocab[IMAGE_PAD]] * n_image_tokens + [vocab[VISION_END]]
    out += ids((" " if not chat else "") + question)
    if hint is not None:
        out += ids(" hint : " + hint if not chat else "\nHint: " + hint)
    if chat:
        out += [vocab[EOS]] + ids("\n") + [vocab[BOS_USER]] + ids("assistant\n")
    else:
        out += ids(" answer :")
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
        att[i, L - len(s) :] = 1
    return ids, att


class Env:
    """Everything a step needs that is not the model weights: the config, tokenizer, image
    geometry, device and kernel backend, and how examples become model inputs."""

    def __init__(self, cfg: TrainConfig, tok, geo: VisionGeometry, device: torch.device, backend: str):
        self.cfg, self.tok, self.geo, self.device, self.backend = cfg, tok, geo, device, backend
        self.blocked = placeholder_ids(tok)
        self.autocast = device.type == "cuda"  # bf16 compute on CUDA, fp32 weights

    def amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def image(self, ex: Example) -> tuple[torch.Tensor, tuple[int, int, int]]:
        img = ex.image if self.cfg.dataset is None else resize_for_model(ex.image, self.geo, self.cfg.max_pixels)
        return patchify(img, self.geo)

    def prompts(self, examples: list[Example], hint_kinds: list[str] | None = None):
        """Left-padded prompt ids/mask and the images of ``examples``.

        ``hint_kinds=None``: the student's hint-free context x. Otherwise one hint kind per
        example (``"none"`` = no hint); every hint passes the zero-spoiler check first.
        """
        ids, patches, grids = [], [], []
        for i, ex in enumerate(examples):
            p, thw = self.image(ex)
            n_img = thw[0] * thw[1] * thw[2] // self.geo.merge_size**2
            hint = None if hint_kinds is None else self.hint(ex, hint_kinds[i])
            ids.append(encode_prompt(self.tok, ex.question, n_img, hint))
            patches.append(p)
            grids.append(thw)
        pid, pmask = left_pad(ids, self.tok.pad_token_id)
        return pid.to(self.device), pmask.to(self.device), stack_images(patches, grids).to(self.device)

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
