"""Model side: the embedded tiny Qwen3-VL built from a config, loading a local checkpoint through
the Auto classes, the backbone passes the trainer runs (each prompt encoded once, its KV cache
continued per rollout), and :class:`ModelWithFusedHead`, which applies the output layer through
``ptd_kernels`` inside its own forward.

Nothing here downloads anything. Qwen-VL facts this relies on (transformers ≥ 5,
``models/qwen3_vl/modeling_qwen3_vl.py``; Qwen2-VL and Qwen2.5-VL take the same inputs):

- multimodal RoPE needs ``mm_token_type_ids`` (1 at image tokens, else 0) whenever
  ``image_grid_thw`` is given, and ``mrope_section`` must sum to ``head_dim / 2``; text tokens
  after the prompt have the same position on the t, h and w axes;
- ``deepstack_visual_indexes=[]`` switches Qwen3-VL's DeepStack off (one vision layer is all the
  tiny model has), and the vision position table is a square (``num_position_embeddings`` = 8·8
  patches for a 56×56 image with 7-pixel patches).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from ptd_kernels import linear_jsd, linear_logprobs, linear_policy_loss, linear_ptd_terms
from ptd_kernels.integrations.hf import logit_transform, sparse_teacher_terms
from ptd_kernels.rowmath import transform_logits

from .prompts import IMAGE_PAD, PAD, VIDEO_PAD, VISION_END, VISION_START, PromptBatch
from .vision import VisionBatch

IGNORE = -100


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
    """A local checkpoint directory → (model, tokenizer, processor or None), no network.

    Vision-language checkpoints (any with a ``vision_config``: Qwen2-VL, Qwen2.5-VL, Qwen3-VL)
    load through ``AutoModelForImageTextToText``, text-only ones through ``AutoModelForCausalLM``.
    The processor is the checkpoint's own processor class without its video processor (video
    processors need torchvision; the trainer takes images only); None when the checkpoint has no
    image processor config (then prompts use the word-level format and ``vision.patchify``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    is_vl = getattr(config, "vision_config", None) is not None
    auto = AutoModelForImageTextToText if is_vl else AutoModelForCausalLM
    model = auto.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    has_image_processor = any(
        os.path.exists(os.path.join(path, f)) for f in ("preprocessor_config.json", "processor_config.json")
    )
    processor = image_processor_of(path, config) if is_vl and has_image_processor else None
    return model, tok, processor


def image_processor_of(path: str, config):
    """The checkpoint's processor class (e.g. ``Qwen2VLProcessor``) loaded without a video processor."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ValueError(f"model_name_or_path: no processor class known for model type {config.model_type!r}")
    base = processor_class_from_name(name)

    class ImagesOnly(base):
        @classmethod
        def get_attributes(cls):
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = base.__name__
    return ImagesOnly.from_pretrained(path, local_files_only=True)


def stop_token_ids(model, tok) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS and the generation config's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({tok.eos_token_id, *ids} - {None})


def is_vision_language(model) -> bool:
    return getattr(model.config, "vision_config", None) is not None


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


def distinct_prompts(prompt_ids, prompt_mask, vision: VisionBatch | None) -> tuple[list[int], list[int]]:
    """(first row of each distinct prompt, prompt index of every row): rows with the same tokens,
    mask and image are one prompt (the G rollouts of a prompt), encoded once."""
    img = vision.image_rows if vision is not None else [None] * len(prompt_ids)
    seen: dict = {}
    first, inverse = [], []
    for r, (ids, m) in enumerate(zip(prompt_ids.tolist(), prompt_mask.tolist())):
        key = (img[r], tuple(ids), tuple(m))
        if key not in seen:
            seen[key] = len(first)
            first.append(r)
        inverse.append(seen[key])
    return first, inverse


def text_positions(model, positions: torch.Tensor) -> torch.Tensor:
    """Position ids of text tokens: ``[B, L]``, or ``[3, B, L]`` (the same on t, h, w) for a
    model with multimodal RoPE."""
    return positions[None].expand(3, -1, -1) if is_vision_language(model) else positions


def encode_prefix(model, prompt_ids, prompt_mask, vision: VisionBatch | None) -> Prefix:
    """Run left-padded prompts ``[B, P]`` (with their images) through the backbone once, keeping
    the cache. Multimodal rope positions come from the model's own ``get_rope_index``; text-only
    prompts count positions from their first real token, as ``generate`` does."""
    core = backbone(model)
    if vision is None:
        positions = (prompt_mask.long().cumsum(1) - 1).clamp(min=0)
        out = core(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=text_positions(model, positions),
            use_cache=True,
        )
        return Prefix(out.last_hidden_state[:, -1], out.cache, prompt_mask, prompt_mask.long().sum(1))
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
        if getattr(feats, "deepstack_features", None) is not None:  # Qwen3-VL
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
        position_ids=text_positions(model, pos),
        cache=prefix.cache,
        use_cache=True,
    )
    prefix.mask, prefix.next_pos = att, prefix.next_pos + L
    return out.last_hidden_state


def response_hidden(model, prompt_ids, prompt_mask, vision: VisionBatch | None, response_ids, response_mask):
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
        shared = None if vision is None else vision.select(first)
        prefix = encode_prefix(model, prompt_ids[first], prompt_mask[first], shared).select(inverse)
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


# ----------------------------------------------------------------------------- the output layer through ptd


def targets_of(resp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Response ids flattened to kernel targets, ``IGNORE`` where the mask is off."""
    return resp.masked_fill(~mask, IGNORE).reshape(-1)


class StudentTerms(NamedTuple):
    """Per-token terms of the student pass, each ``[R·T]``: log-prob, entropy, D_K (or the full
    JSD), top-K overlap and the teacher mass Σ_S q (0 off F or without Top-K)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    jsd: torch.Tensor
    overlap: torch.Tensor
    teacher_mass: torch.Tensor


class ModelWithFusedHead(torch.nn.Module):
    """A (vision-)language model as the trainer runs it: the backbone, then the output layer
    through ``ptd_kernels`` (no ``[tokens, vocab]`` logits; only sampling forms one row of logits
    per sequence).

    The output-layer weights are read inside this module's forward methods: FSDP2 gathers a
    sharded module's parameters only inside a forward of the module it wraps (the other methods
    are registered as forward methods with it, see ``distributed.parallelize``), and DDP
    synchronizes the gradients of what its ``forward`` computed — the differentiable student pass.
    """

    FORWARD_METHODS = ("hidden", "logprobs", "prefix", "next_token_logits", "prefix_logprobs")

    def __init__(self, model):
        super().__init__()
        self.model = model
        # the logit scale / soft-cap of the checkpoint's own config (Gemma-2/3, Cohere, Granite, ...)
        scale, softcap, _ = logit_transform(model.config)
        self.logit_transform = dict(logit_scale=scale, softcap=softcap)

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return output_layer(self.model)

    def forward(self, env, x: PromptBatch, resp, mask, teacher_hidden=None, teacher_head=None, jsd_mask=None,
                teacher_transform=None, teacher_topk=None, row_loss=None):
        """The student pass → :class:`StudentTerms`, differentiable in the model.

        ``teacher_hidden`` [R·T, H'] (None when no rollout is in F, or λ = 0: log-prob and
        entropy only) with ``teacher_head`` = (W', b') the teacher's output layer (None: this
        model's own, the current policy as teacher) and ``teacher_transform`` its logit scale and
        soft-cap (None: this model's). ``teacher_topk``: a served teacher's (ids, log-probs)
        [R·T, K] in place of ``teacher_hidden`` (the sparse-teacher JSD, support = its ids).
        ``row_loss`` (a ``ptd_kernels.PolicyLoss`` or a callable over the [R·T] tokens): the loss itself,
        from one sweep (``ptd_kernels.linear_policy_loss``; a local Top-K teacher or none) → (loss,
        :class:`StudentTerms` detached).
        """
        cfg = env.cfg
        W, b = self.output_layer()
        Wt, bt = (W, b) if teacher_head is None else teacher_head
        transforms = {**self.logit_transform, **{"teacher_" + k: v for k, v in
                                                 (teacher_transform or self.logit_transform).items()}}
        R, T = resp.shape
        targets = targets_of(resp, mask)
        with env.amp():
            h = response_hidden(self.model, x.ids, x.mask, x.vision, resp, mask)
        h = h.reshape(R * T, -1).to(W.dtype)
        # what the Top-K head and the full-vocabulary ablation share
        with_teacher = dict(
            beta=cfg.ptd_beta, bias=b, teacher_bias=bt, temperature=cfg.temperature, backend=env.backend, **transforms
        )
        if row_loss is not None:
            if teacher_topk is not None or (teacher_hidden is not None and cfg.ptd_full_vocab):
                raise ValueError("the one-sweep loss takes a local Top-K teacher or none (not a served teacher, not "
                                 "the full-vocabulary JSD)")
            pair, teacher_args = (), {}
            if teacher_hidden is not None:
                pair = (teacher_hidden, Wt, min(cfg.ptd_k, W.shape[0]))
                teacher_transform = {k: v for k, v in transforms.items() if k.startswith("teacher_")}
                teacher_args = dict(beta=cfg.ptd_beta, support=cfg.ptd_support, tail=cfg.ptd_tail, teacher_bias=bt,
                                    jsd_mask=jsd_mask, **teacher_transform)
            loss, out = linear_policy_loss(h, W, targets, *pair, row_loss=row_loss, bias=b, temperature=cfg.temperature,
                                           backend=env.backend, return_terms=True, **self.logit_transform,
                                           **teacher_args)
            return loss, StudentTerms(out.logp, out.entropy, out.jsd, out.overlap, out.teacher_mass)
        if teacher_topk is not None:
            return StudentTerms(*sparse_teacher_terms(
                h, W, targets, *teacher_topk, jsd_mask, beta=cfg.ptd_beta, tail=cfg.ptd_tail, bias=b,
                temperature=cfg.temperature, backend=env.backend, **self.logit_transform))
        if teacher_hidden is not None and not cfg.ptd_full_vocab:
            out = linear_ptd_terms(
                h,
                W,
                targets,
                teacher_hidden,
                Wt,
                min(cfg.ptd_k, W.shape[0]),
                support=cfg.ptd_support,
                tail=cfg.ptd_tail,
                jsd_mask=jsd_mask,
                **with_teacher,
            )
            return StudentTerms(out.logp, out.entropy, out.jsd, out.overlap, out.teacher_mass)
        logp, entropy = linear_logprobs(
            h, W, targets, bias=b, temperature=cfg.temperature, with_entropy=True, backend=env.backend,
            **self.logit_transform,
        )
        zero = torch.zeros(R * T, device=h.device)
        jsd = zero
        if teacher_hidden is not None:  # full-vocabulary ablation
            jsd = linear_jsd(h, W, teacher_hidden, Wt, mask=jsd_mask, **with_teacher)
        return StudentTerms(logp, entropy, jsd, zero, zero)

    def hidden(self, env, x: PromptBatch, resp, mask) -> torch.Tensor:
        """Last hidden states at response positions ``[R, T, H]`` in the output layer's dtype
        (the teacher pass: the teacher's output layer is applied in the student's kernel call)."""
        with env.amp():
            h = response_hidden(self.model, x.ids, x.mask, x.vision, resp, mask)
        return h.to(self.output_layer()[0].dtype)

    def logprobs(self, env, x: PromptBatch, resp, mask, temperature: float) -> torch.Tensor:
        """Teacher-forced log-probs of ``resp`` ``[R, T]`` (0 where the mask is off)."""
        W, b = self.output_layer()
        with env.amp():
            h = response_hidden(self.model, x.ids, x.mask, x.vision, resp, mask)
        logp = linear_logprobs(
            h.reshape(-1, h.shape[-1]).to(W.dtype),
            W,
            targets_of(resp, mask),
            bias=b,
            temperature=temperature,
            backend=env.backend,
            **self.logit_transform,
        )
        return logp.view(resp.shape)

    def prefix(self, env, x: PromptBatch) -> Prefix:
        """The prompts encoded once, ready to be continued (see :class:`Prefix`)."""
        with env.amp():
            return encode_prefix(self.model, x.ids, x.mask, x.vision)

    def next_token_logits(self, env, prefix: Prefix, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits ``[B, V]`` of the token after ``prefix`` (after ``ids`` [B, 1], which then
        join the prefix): one row per sequence, what sampling needs. The checkpoint's scale and soft-cap
        are applied (``rowmath.transform_logits``); the sampler divides by its temperature."""
        W, b = self.output_layer()
        with env.amp():
            h = prefix.last if ids is None else continue_prefix(self.model, prefix, ids, torch.ones_like(ids))[:, -1]
            return transform_logits(torch.nn.functional.linear(h.to(W.dtype), W, b).float(), **self.logit_transform)

    def prefix_logprobs(self, env, prefix: Prefix, resp, mask) -> torch.Tensor:
        """Teacher-forced log-probs ``[B, T]`` of ``resp`` continuing ``prefix`` (advances it)."""
        W, b = self.output_layer()
        with env.amp():
            h = prefix_response_hidden(self.model, prefix, resp, mask)
        logp = linear_logprobs(
            h.reshape(-1, h.shape[-1]).to(W.dtype),
            W,
            targets_of(resp, mask),
            bias=b,
            temperature=env.cfg.temperature,
            backend=env.backend,
            **self.logit_transform,
        )
        return logp.view(resp.shape)
