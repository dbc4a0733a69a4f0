"""Model side: the embedded tiny Qwen3-VL built from a config, loading a local checkpoint, and
the backbone passes the trainer runs (prompt once, KV cache continued per rollout; the output
layer is left to ``ptd_kernels``).

Nothing here downloads anything. Qwen3-VL facts this relies on (transformers ≥ 5,
``models/qwen3_vl/modeling_qwen3_vl.py``):

- multimodal RoPE needs ``mm_token_type_ids`` (1 at image tokens, else 0) whenever
  ``image_grid_thw`` is given, and ``mrope_section`` must sum to ``head_dim / 2``;
- ``deepstack_visual_indexes=[]`` switches DeepStack off (one vision layer is all we have),
  and the vision position table is a square (``num_position_embeddings`` = 8·8 patches for a
  56×56 image with 7-pixel patches).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from .prompts import IMAGE_PAD, PAD, VIDEO_PAD, VISION_END, VISION_START
from .vision import VisionBatch

# ----------------------------------------------------------------------------- model


@dataclass
class TinyVLSpec:
    """Shape of the embedded tiny Qwen3-VL (random init)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vision_hidden: int = 64
    vision_depth: int = 1
    vision_heads: int = 2
    patch_size: int = 7
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_size: int = 56


def tiny_qwen3vl_config(tok, spec: TinyVLSpec | None = None) -> Qwen3VLConfig:
    spec = spec or TinyVLSpec()
    head_dim = spec.hidden_size // spec.num_heads
    half = head_dim // 2  # mrope_section must sum to head_dim / 2 (t, h, w)
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    side = spec.image_size // spec.patch_size
    vocab = tok.get_vocab()
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=512,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope, mrope_interleaved=True),
            pad_token_id=vocab[PAD],
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden,
            intermediate_size=2 * spec.vision_hidden,
            num_heads=spec.vision_heads,
            patch_size=spec.patch_size,
            spatial_merge_size=spec.merge_size,
            temporal_patch_size=spec.temporal_patch_size,
            out_hidden_size=spec.hidden_size,
            num_position_embeddings=side * side,
            deepstack_visual_indexes=[],
        ),
        image_token_id=vocab[IMAGE_PAD],
        video_token_id=vocab[VIDEO_PAD],
        vision_start_token_id=vocab[VISION_START],
        vision_end_token_id=vocab[VISION_END],
        tie_word_embeddings=False,
    )


def build_tiny_model(tok, spec: TinyVLSpec | None = None, seed: int = 0) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_qwen3vl_config(tok, spec))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def load_model_and_tokenizer(path: str):
    """A local Qwen-VL checkpoint directory (model + tokenizer files), no network."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def output_layer(model):
    """(weight, bias) of the output layer: ``lm_head`` or the tied input embedding."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def backbone(model):
    """The part of the model that stops at the last hidden states (no output layer)."""
    return model.model


# ----------------------------------------------------------------------------- forward passes


def model_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: VisionBatch) -> dict:
    """kwargs for ``model(...)`` / ``model.generate(...)`` (mm_token_type_ids included)."""
    vision = vision.dense()
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=vision.pixel_values,
        image_grid_thw=vision.image_grid_thw,
        mm_token_type_ids=(input_ids == model.config.image_token_id).int(),
    )


class Prefix:
    """A batch of prompts run once through the backbone, ready to be continued.

    ``last`` [B, H] is the last prompt position's hidden state (it scores the first response
    token), ``cache`` the keys/values of every prompt position, ``mask`` the attention mask so far
    and ``next_pos`` [B] the (text) rope position of the next token. Gradients flow through all of
    it when the prefix was encoded with grad enabled.
    """

    def __init__(self, last, cache, mask, next_pos):
        self.last, self.cache, self.mask, self.next_pos = last, cache, mask, next_pos

    def select(self, rows) -> Prefix:
        """A new prefix of the sequences ``rows`` (a row may repeat: the G rollouts of one prompt
        continue the same prompt). The cache is copied by ``index_select``, so continuing one
        prefix never changes another, and gradients reach the shared prompt rows."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.last.device)
        cache = copy.copy(self.cache)
        cache.layers = []
        for layer in self.cache.layers:
            layer = copy.copy(layer)
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)
            cache.layers.append(layer)
        return Prefix(self.last.index_select(0, idx), cache, self.mask.index_select(0, idx), self.next_pos[idx])


def distinct_prompts(prompt_ids, prompt_mask, vision: VisionBatch) -> tuple[list[int], list[int]]:
    """(first row of each distinct prompt, prompt index of every row): rows with the same tokens,
    mask and image are one prompt (the G rollouts of a prompt), encoded once."""
    img = vision.image_rows
    seen: dict = {}
    first, inverse = [], []
    for r, (ids, m) in enumerate(zip(prompt_ids.tolist(), prompt_mask.tolist())):
        key = (img[r], tuple(ids), tuple(m))
        if key not in seen:
            seen[key] = len(first)
            first.append(r)
        inverse.append(seen[key])
    return first, inverse


def encode_prefix(model, prompt_ids, prompt_mask, vision: VisionBatch) -> Prefix:
    """Run left-padded prompts ``[B, P]`` (with their images) through the backbone once, keeping
    the cache. Multimodal rope positions come from the model's own ``get_rope_index``."""
    core = backbone(model)
    core.rope_deltas = None  # recompute 3-D positions for this batch (generate() or a past call may have left some)
    inputs = dict(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        image_grid_thw=vision.image_grid_thw,
        mm_token_type_ids=(prompt_ids == model.config.image_token_id).int(),
    )
    if vision.rows is None:
        inputs["pixel_values"] = vision.pixel_values
    else:  # encode each distinct image once, then hand every sequence its image's features
        feats = core.get_image_features(vision.pixel_values, vision.grids, return_dict=True)
        feats.pooler_output = tuple(feats.pooler_output[r] for r in vision.rows)
        feats.deepstack_features = [tuple(f[r] for r in vision.rows) for f in feats.deepstack_features]
        inputs["mm_encoder_outputs"] = {"image": feats}
    out = core(**inputs, use_cache=True)
    # get_rope_index: delta = (largest position + 1) − (number of real tokens), per row
    next_pos = prompt_mask.long().sum(1) + core.rope_deltas.view(-1).to(prompt_mask.device)
    core.rope_deltas = None
    return Prefix(out.last_hidden_state[:, -1], out.cache, prompt_mask, next_pos)


def continue_prefix(model, prefix: Prefix, ids, mask) -> torch.Tensor:
    """Feed ``ids`` [B, L] (text tokens, right after the prefix) and return their last hidden
    states [B, L, H]; ``prefix`` is advanced in place (its cache grows by L positions)."""
    L = ids.shape[1]
    pos = prefix.next_pos[:, None] + torch.arange(L, device=ids.device)
    att = torch.cat([prefix.mask, mask.to(prefix.mask.dtype)], 1)
    out = backbone(model)(
        input_ids=ids,
        attention_mask=att,
        position_ids=pos[None].expand(3, -1, -1),  # text tokens: the same position on t, h and w
        cache=prefix.cache,
        use_cache=True,
    )
    prefix.mask, prefix.next_pos = att, prefix.next_pos + L
    return out.last_hidden_state


def response_hidden(model, prompt_ids, prompt_mask, vision: VisionBatch, response_ids, response_mask):
    """Last hidden states at the positions that predict each response token.

    ``prompt_*`` are left-padded ``[B, P]``; ``response_*`` right-padded ``[B, T]``.
    Returns ``[B, T, H]``: row (b, t) is the state after prompt + response[:t], i.e. the one whose
    output distribution scores response token t. The output layer is *not* applied.

    Rows that share a prompt (same tokens and image: the G rollouts of one prompt) share its
    forward pass: each distinct prompt is encoded once, its cache is repeated per row, and only
    the response tokens run per row. The result equals one full forward pass over
    ``[prompt ; response]`` per row (tests check it, values and gradients).
    """
    first, inverse = distinct_prompts(prompt_ids, prompt_mask, vision)
    if len(first) < len(inverse):
        prefix = encode_prefix(model, prompt_ids[first], prompt_mask[first], vision.select(first)).select(inverse)
    else:
        prefix = encode_prefix(model, prompt_ids, prompt_mask, vision)
    return prefix_response_hidden(model, prefix, response_ids, response_mask)


def prefix_response_hidden(model, prefix: Prefix, response_ids, response_mask) -> torch.Tensor:
    """:func:`response_hidden` from an encoded prompt batch (advances ``prefix``)."""
    T = response_ids.shape[1]
    first_state = prefix.last[:, None]
    if T == 1:
        return first_state
    rest = continue_prefix(model, prefix, response_ids[:, : T - 1], response_mask[:, : T - 1])
    return torch.cat([first_state, rest], 1)
