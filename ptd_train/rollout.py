"""Sampling and evaluation: KV-cached rollouts from the policy, greedy held-out accuracy, and the
reference completions the warm start and evaluation score."""

from __future__ import annotations

import torch

from ptd_kernels import linear_logprobs

from .model import Prefix, continue_prefix, distinct_prompts, encode_prefix, output_layer, prefix_response_hidden
from .prompts import Env
from .tasks import Example, reward
from .vision import VisionBatch

IGNORE = -100


def completion_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


@torch.no_grad()
def generate(model, env: Env, pid, pmask, vision: VisionBatch, *, greedy: bool, prefix: Prefix | None = None):
    """Rollouts → (response ids [R, T] padded, mask [R, T] of real tokens incl. the first EOS).

    KV-cached decoding that encodes each distinct prompt once (the G rollouts of a prompt share
    its prompt pass and image; the cache is repeated per rollout), then one token per step for all
    rows: temperature sampling (or greedy), vision placeholder tokens suppressed, pad after EOS —
    what ``model.generate`` does, without re-encoding the image of every rollout.
    ``prefix``: an already encoded prompt batch (one row per rollout) to decode from instead.
    """
    was_training = model.training
    model.eval()
    cfg = env.cfg
    W, b = output_layer(model)
    with env.amp():
        if prefix is None:
            first, inverse = distinct_prompts(pid, pmask, vision)
            prefix = encode_prefix(model, pid[first], pmask[first], vision.select(first)).select(inverse)
        R = prefix.last.shape[0]
        h = prefix.last
        done = torch.zeros(R, dtype=torch.bool, device=h.device)
        blocked = torch.tensor(env.blocked, dtype=torch.long, device=h.device)
        out = []
        for t in range(cfg.max_new_tokens):
            logits = torch.nn.functional.linear(h.to(W.dtype), W, b).float()
            logits[:, blocked] = -float("inf")
            if greedy:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(logits / cfg.temperature, -1), 1).squeeze(1)
            nxt = nxt.masked_fill(done, env.tok.pad_token_id)
            out.append(nxt)
            done |= nxt == env.tok.eos_token_id
            if t + 1 == cfg.max_new_tokens or bool(done.all()):
                break
            h = continue_prefix(model, prefix, nxt[:, None], torch.ones_like(nxt[:, None]))[:, -1]
    model.train(was_training)
    resp = torch.stack(out, 1)
    T = cfg.max_new_tokens
    if resp.shape[1] < T:
        resp = torch.cat([resp, resp.new_full((R, T - resp.shape[1]), env.tok.pad_token_id)], 1)
    is_eos = resp == env.tok.eos_token_id
    after_eos = (torch.cumsum(is_eos.long(), 1) - is_eos.long()) > 0
    mask = ~after_eos
    mask &= ~torch.isin(resp, blocked)
    resp = resp.masked_fill(~mask, env.tok.pad_token_id)
    return resp, mask


def decode(tok, resp, mask) -> list[str]:
    return [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(resp.cpu(), mask.cpu())]


def targets_of(resp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return resp.masked_fill(~mask, IGNORE).reshape(-1)


@torch.no_grad()
def evaluate(model, env: Env, examples: list[Example], hint_kind: str | None = None, batch: int = 100) -> dict:
    """Greedy accuracy on ``examples`` (hint-free unless ``hint_kind``) and the mean probability
    of the reference completion (hint-free only; a smoother signal than greedy accuracy).

    Each prompt is encoded once: greedy decoding and the teacher-forced reference completion
    both continue the same prompt cache."""
    was_training = model.training
    model.eval()
    correct, p_correct = 0.0, 0.0
    for s in range(0, len(examples), batch):
        chunk = examples[s : s + batch]
        pid, pmask, vision = env.prompts(chunk, None if hint_kind is None else [hint_kind] * len(chunk))
        with env.amp():
            prefix = encode_prefix(model, pid, pmask, vision)
        keep = prefix.select(list(range(len(chunk)))) if hint_kind is None else prefix  # decoding grows its cache
        resp, mask = generate(model, env, pid, pmask, vision, greedy=True, prefix=keep)
        correct += sum(reward(t, ex.answer) for t, ex in zip(decode(env.tok, resp, mask), chunk))
        if hint_kind is None:
            g, gm = gold_batch(env, chunk)
            with env.amp():
                h = prefix_response_hidden(model, prefix, g, gm)
            W, b = output_layer(model)
            logp = linear_logprobs(
                h.reshape(-1, h.shape[-1]).to(W.dtype),
                W,
                targets_of(g, gm),
                bias=b,
                temperature=env.cfg.temperature,
                backend=env.backend,
            )
            p_correct += logp.view(len(chunk), g.shape[1]).sum(1).exp().sum().item()
    model.train(was_training)
    out = {"accuracy": correct / len(examples)}
    if hint_kind is None:
        out["p_correct"] = p_correct / len(examples)
    return out


def gold_batch(env: Env, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference completions (+ EOS), right-padded: ids [B, T] and mask [B, T]."""
    gold = [completion_ids(env.tok, ex.completion or ex.answer) for ex in examples]
    T = max(map(len, gold))
    g = torch.full((len(examples), T), env.tok.pad_token_id, dtype=torch.long)
    gm = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, ids in enumerate(gold):
        g[i, : len(ids)] = torch.tensor(ids)
        gm[i, : len(ids)] = True
    return g.to(env.device), gm.to(env.device)
