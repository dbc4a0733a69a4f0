"""PTD-PO's hinted teacher behind a server: the protocol, an in-process implementation, and the
conversion of its answers into the sparse teacher ptd's kernels take.

The teacher — the frozen initial policy — reads the hint-augmented prompt x^h teacher-forced on the
student's completion y and returns, per completion position, its top-K token ids and log-probs:
exactly what TRL's ``trl.generation.vllm_client.VLLMClient.get_sequence_logprobs`` asks of a vLLM
server (``prompt_logprobs``). So a vLLM server started on the initial checkpoint, reached through
TRL's client, is a teacher server; :class:`LocalTeacherServer` answers the same call in-process from
a local model (through ``ptd_kernels.linear_topk``: no tokens×vocabulary tensor), for tests and as
the reference a deployment is checked against. The student side is then
``ptd_kernels.linear_sparse_jsd``: support = the teacher's top-K ids, the tail atom from their
log-probs.

Restrictions: the served support is the teacher's top-K (``support="teacher"``); ``"union"`` and
``"student"`` need the teacher's log-probs at the student's own top-K ids, which a vLLM server's
``prompt_logprobs`` do not return (only its own top-k and the actual token). TRL's client sends token
ids only, so a vision-language teacher needs a client whose ``get_sequence_logprobs`` takes
``images=`` (none ships with TRL 1.16). The server must allow K log-probs (vLLM:
``--max-logprobs K``, its default is 20).
"""

from __future__ import annotations

import inspect
from typing import Protocol

import torch

import ptd_kernels as ptd
from ptd_kernels.integrations.hf import last_hidden_states, output_layer

from .prompts import left_pad

__all__ = ["LocalTeacherServer", "TeacherServer", "TrainerTeacherServer", "accepts_images", "check_config",
           "served_topk", "topk_of_rows"]


class TeacherServer(Protocol):
    """What PTD-PO asks of a teacher server (the signature of TRL's ``VLLMClient.get_sequence_logprobs``).

    ``sequences``: token ids, prompt (with the hint) then completion, no padding; ``prompt_lengths``:
    the prompt's length in each. Returns a dict of per-sequence lists over the completion positions:
    ``logprobs`` and ``logprob_token_ids`` (``top_logprobs`` each, by descending log-prob, at
    ``temperature``), ``actual_logprobs`` and ``actual_token_ids`` ([1] each: the completion's own
    token). A multimodal server also takes ``images=`` (per sequence, a list of images or None).
    """

    def get_sequence_logprobs(self, sequences: list[list[int]], prompt_lengths: list[int], top_logprobs: int = 100,
                              temperature: float = 1.0) -> dict[str, list]: ...


def accepts_images(client) -> bool:
    """Whether this client's ``get_sequence_logprobs`` takes ``images=``."""
    parameters = inspect.signature(client.get_sequence_logprobs).parameters
    return "images" in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


class LocalTeacherServer:
    """The :class:`TeacherServer` call answered by a local Hugging Face causal LM (text only).

    ``model``: the frozen teacher (moved to no device, never trained); its last hidden states go with
    its output layer (logit scale and soft-cap of its config included) to ``ptd_kernels.linear_topk``.
    ``pad_token_id``: what pads the batch it runs.
    """

    def __init__(self, model, pad_token_id: int = 0):
        self.model, self.pad_token_id = model, pad_token_id

    @torch.no_grad()
    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=100, temperature=1.0):
        device = output_layer(self.model).weight.device
        ids, mask = left_pad(sequences, self.pad_token_id, device)
        hidden = last_hidden_states(self.model, input_ids=ids, attention_mask=mask)
        return _answer(hidden, ids, [len(s) for s in sequences], prompt_lengths, output_layer(self.model),
                       top_logprobs, temperature)


def _answer(hidden, ids, lengths, prompt_lengths, layer, top_logprobs, temperature) -> dict[str, list]:
    """The server's answer from a left-padded batch's last hidden states [B, L, H]: position t predicts
    token t + 1."""
    width = ids.shape[1]
    rows, targets, spans = [], [], []
    for b, (length, prompt_length) in enumerate(zip(lengths, prompt_lengths)):
        start = width - length + prompt_length  # the first completion token, in padded coordinates
        rows.append(hidden[b, start - 1:width - 1])
        targets.append(ids[b, start:width])
        spans.append(width - start)
    if not rows:
        return {"logprobs": [], "logprob_token_ids": [], "actual_logprobs": [], "actual_token_ids": []}
    rows, targets = torch.cat(rows), torch.cat(targets)
    top = ptd.linear_topk(rows.to(layer.weight.dtype), layer.weight, min(top_logprobs, layer.weight.shape[0]),
                          bias=layer.bias, temperature=temperature, targets=targets, **layer.kernel_kwargs())
    out = {"logprobs": [], "logprob_token_ids": [], "actual_logprobs": [], "actual_token_ids": []}
    for part in zip(*(t.split(spans) for t in (top.logprobs, top.indices, top.target_logprobs, targets))):
        logprobs, indices, actual, actual_ids = (p.tolist() for p in part)
        out["logprobs"].append(logprobs)
        out["logprob_token_ids"].append(indices)
        out["actual_logprobs"].append([[v] for v in actual])
        out["actual_token_ids"].append([[v] for v in actual_ids])
    return out


def served_topk(client, sequences, prompt_lengths, k: int, temperature: float, width: int, device,
                images=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ask ``client`` for the teacher's top-``k`` and return ``(indices int64, logprobs float32)``, each
    ``[len(sequences), width, k]``: completion position j of sequence b at ``[b, j]`` (positions past a
    completion hold ids 0..k-1 and log-probs -inf; they are never read). Refuses an answer that lacks a
    position or has fewer than ``k`` finite log-probs (a vLLM server caps them at ``--max-logprobs``).
    """
    indices = torch.arange(k, device=device).expand(len(sequences), width, k).clone()
    logprobs = torch.full((len(sequences), width, k), float("-inf"), device=device)
    if not sequences:
        return indices, logprobs
    kwargs = {}
    if images is not None:
        if not accepts_images(client):
            raise NotImplementedError(
                f"{type(client).__name__}.get_sequence_logprobs sends token ids only (TRL's VLLMClient does), and "
                "this batch has images: a vision-language teacher needs a client that takes images=, or the local "
                "teacher")
        kwargs["images"] = images
    answer = client.get_sequence_logprobs(sequences=sequences, prompt_lengths=prompt_lengths, top_logprobs=k,
                                          temperature=temperature, **kwargs)
    for b, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        rows, row_ids = answer["logprobs"][b], answer["logprob_token_ids"][b]
        n = len(sequence) - prompt_length
        if n == 0:
            continue
        complete = len(rows) == len(row_ids) == n and all(len(r) == len(i) == k for r, i in zip(rows, row_ids))
        values = torch.tensor(rows, dtype=torch.float32) if complete else None
        if not complete or not bool(torch.isfinite(values).all()):
            raise ValueError(
                f"the teacher server answered {len(rows)} of {n} completion positions of sequence {b}, or fewer "
                f"than top_logprobs={k} finite log-probs at some (a vLLM server needs --max-logprobs >= {k})")
        indices[b, :n] = torch.tensor(row_ids, dtype=torch.long, device=device)
        logprobs[b, :n] = values.to(device)
    return indices, logprobs


# ----------------------------------------------------------------------------- ptd_train.run's served teacher


def check_config(cfg) -> None:
    """What ``--teacher_server`` cannot run with (checked before any work)."""
    problems = []
    if cfg.ptd_support != "teacher":
        problems.append(f"--ptd_support {cfg.ptd_support} (a server returns the teacher's own top-K only: use "
                        "teacher)")
    if cfg.teacher != "ref":
        problems.append(f"--teacher {cfg.teacher} (the served teacher is the frozen initial policy: use ref)")
    if cfg.ptd_full_vocab:
        problems.append("--ptd_full_vocab true (a server returns top-K, not the whole vocabulary)")
    if cfg.teacher_server == "local" and cfg.fsdp:
        problems.append("--fsdp true with --teacher_server local (the in-process check runs one process's model)")
    elif cfg.teacher_server != "local" and not cfg.teacher_server.startswith(("http://", "https://")):
        problems.append(f"--teacher_server {cfg.teacher_server!r} (expected local or an http(s) URL)")
    if problems:
        raise ValueError("teacher_server: cannot run with " + "; ".join(problems))


class TrainerTeacherServer:
    """``ptd_train``'s frozen initial policy (a ``ModelWithFusedHead``) answering the served-teacher call
    in-process: prompts and completions are split back out of the sequences and images encoded as the
    trainer encodes a prompt's (``images``: per sequence, a list of one RGB array, or None)."""

    def __init__(self, model, env):
        self.model, self.env = model, env

    @torch.no_grad()
    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=100, temperature=1.0, images=None):
        from .prompts import PromptBatch

        env = self.env
        pad = env.tok.pad_token_id
        prompt_ids, prompt_mask = left_pad([s[:p] for s, p in zip(sequences, prompt_lengths)], pad, env.device)
        completions = [s[p:] for s, p in zip(sequences, prompt_lengths)]
        width = max((len(c) for c in completions), default=0)
        resp = torch.tensor([c + [pad] * (width - len(c)) for c in completions], dtype=torch.long, device=env.device)
        mask = torch.tensor([[True] * len(c) + [False] * (width - len(c)) for c in completions], device=env.device)
        vision = None if images is None else _encode_images(env, [i[0] for i in images])
        hidden = self.model.hidden(env, PromptBatch(prompt_ids, prompt_mask, vision), resp, mask)
        weight, bias = self.model.output_layer()
        top = ptd.linear_topk(hidden[mask], weight, min(top_logprobs, weight.shape[0]), bias=bias,
                              temperature=temperature, targets=resp[mask], backend=env.backend,
                              **self.model.logit_transform)
        out = {"logprobs": [], "logprob_token_ids": [], "actual_logprobs": [], "actual_token_ids": []}
        spans = [len(c) for c in completions]
        for part in zip(*(t.split(spans) for t in (top.logprobs, top.indices, top.target_logprobs, resp[mask]))):
            logprobs, indices, actual, actual_ids = (p.tolist() for p in part)
            out["logprobs"].append(logprobs)
            out["logprob_token_ids"].append(indices)
            out["actual_logprobs"].append([[v] for v in actual])
            out["actual_token_ids"].append([[v] for v in actual_ids])
        return out


def _encode_images(env, images):
    """RGB arrays → the VisionBatch ``env`` builds for prompts with these images."""
    from .prompts import WordPrompts
    from .vision import patchify, resize_for_model, stack_images

    fmt = env.format
    patches, grids = [], []
    for image in images:
        if isinstance(fmt, WordPrompts):
            p, thw = patchify(resize_for_model(image, fmt.geo, fmt.max_pixels) if fmt.resize else image, fmt.geo)
        else:
            out = fmt.processor.image_processor(images=[image], return_tensors="pt", **fmt.image_kwargs)
            p, thw = out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())
        patches.append(p)
        grids.append(thw)
    return stack_images(patches, grids).to(env.device)


def connect(ref, env):
    """The teacher server of ``env.cfg.teacher_server``, built once per frozen model ``ref``."""
    client = getattr(ref, "_ptd_teacher_server", None)
    if client is None:
        url = env.cfg.teacher_server
        if url == "local":
            client = TrainerTeacherServer(ref, env)
        else:
            from trl.generation.vllm_client import VLLMClient

            client = VLLMClient(base_url=url, connection_timeout=60.0)
        ref._ptd_teacher_server = client
    return client


def topk_of_rows(ref, env, examples, rows: list[int], resp, mask) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The served teacher's top-K for the rollouts ``rows`` (F) of this step, as ``(ids, log-probs)``
    [R·T, K] (rows off F hold placeholders, never read); None when F is empty. Rollout r belongs to
    prompt r // G; the teacher reads that prompt with its hint (``--teacher_hint``), as the local
    teacher pass does."""
    if not rows:
        return None
    cfg = env.cfg
    group = cfg.group_size
    R, T = resp.shape
    owners = [examples[r // group] for r in rows]
    hinted = env.prompts(owners, [cfg.teacher_hint] * len(rows))
    sequences = [hinted.ids[i][hinted.mask[i].bool()].tolist() + resp[r][mask[r]].tolist()
                 for i, r in enumerate(rows)]
    prompt_lengths = [int(hinted.mask[i].sum()) for i in range(len(rows))]
    images = [[ex.image] for ex in owners] if hinted.vision is not None else None
    vocab = ref.output_layer()[0].shape[0]
    k = min(cfg.ptd_k, vocab)
    indices, logprobs = served_topk(connect(ref, env), sequences, prompt_lengths, k, cfg.temperature, T, env.device,
                                    images=images)
    all_indices = torch.arange(k, device=env.device).expand(R, T, k).clone()
    all_logprobs = torch.full((R, T, k), float("-inf"), device=env.device)
    all_indices[rows], all_logprobs[rows] = indices, logprobs
    return all_indices.reshape(R * T, k), all_logprobs.reshape(R * T, k)
