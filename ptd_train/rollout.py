"""Sampling and evaluation: KV-cached rollouts from the policy, greedy held-out accuracy, and the
reference completions the warm start and evaluation score.

``lm`` is a :class:`~ptd_train.model.ModelWithFusedHead` (sharded or not). Under torchrun,
``dist`` keeps the ranks in lockstep where FSDP2 needs it and reduces the evaluation."""

from __future__ import annotations

import torch

from .distributed import SINGLE, Dist
from .model import Prefix, distinct_prompts
from .prompts import Env, PromptBatch
from .tasks import Example, reward


def completion_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


@torch.no_grad()
def generate(lm, env: Env, x: PromptBatch, *, greedy: bool, prefix: Prefix | None = None, dist: Dist = SINGLE):
    """Rollouts → (response ids [R, T] padded, mask [R, T] of real tokens incl. the first stop token).

    KV-cached decoding that encodes each distinct prompt once (the G rollouts of a prompt share
    its prompt pass and image; the cache is repeated per rollout), then one token per step for all
    rows: temperature sampling (or greedy), vision placeholder tokens suppressed, pad after the
    stop token — what ``model.generate`` does, without re-encoding the image of every rollout.
    ``prefix``: an already encoded prompt batch (one row per rollout) to decode from instead.
    """
    was_training = lm.training
    lm.eval()
    cfg = env.cfg
    if prefix is None:
        first, inverse = distinct_prompts(x.ids, x.mask, x.vision)
        prefix = lm.prefix(env, x.select(first)).select(inverse)
    R = prefix.last.shape[0]
    done = torch.zeros(R, dtype=torch.bool, device=prefix.last.device)
    blocked = torch.tensor(env.blocked, dtype=torch.long, device=done.device)
    stop = torch.tensor(env.stop_ids, dtype=torch.long, device=done.device)
    logits = lm.next_token_logits(env, prefix)
    out = []
    for t in range(cfg.max_new_tokens):
        logits[:, blocked] = -float("inf")
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / cfg.temperature, -1), 1).squeeze(1)
        nxt = nxt.masked_fill(done, env.tok.pad_token_id)
        out.append(nxt)
        done |= torch.isin(nxt, stop)
        if t + 1 == cfg.max_new_tokens or dist.lockstep_all(bool(done.all())):
            break
        logits = lm.next_token_logits(env, prefix, nxt[:, None])
    lm.train(was_training)
    resp = torch.stack(out, 1)
    T = cfg.max_new_tokens
    if resp.shape[1] < T:
        resp = torch.cat([resp, resp.new_full((R, T - resp.shape[1]), env.tok.pad_token_id)], 1)
    is_stop = torch.isin(resp, stop)
    after_stop = (torch.cumsum(is_stop.long(), 1) - is_stop.long()) > 0
    mask = ~after_stop
    mask &= ~torch.isin(resp, blocked)
    resp = resp.masked_fill(~mask, env.tok.pad_token_id)
    return resp, mask


def decode(tok, resp, mask) -> list[str]:
    return [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(resp.cpu(), mask.cpu())]


@torch.no_grad()
def evaluate(
    lm, env: Env, examples: list[Example], hint_kind: str | None = None, batch: int = 100, dist: Dist = SINGLE
) -> dict:
    """Greedy accuracy on ``examples`` (hint-free unless ``hint_kind``) and the mean probability
    of the reference completion (hint-free only; a smoother signal than greedy accuracy).

    Each prompt is encoded once: greedy decoding and the teacher-forced reference completion
    both continue the same prompt cache. Under torchrun each rank scores an equal share and the
    sums are reduced."""
    was_training = lm.training
    lm.eval()
    mine, weights = dist.eval_share(examples)
    correct, p_correct = 0.0, 0.0
    for s in range(0, len(mine), batch):
        chunk, w = mine[s : s + batch], weights[s : s + batch]
        x = env.prompts(chunk, None if hint_kind is None else [hint_kind] * len(chunk))
        prefix = lm.prefix(env, x)
        keep = prefix.select(list(range(len(chunk)))) if hint_kind is None else prefix  # decoding grows its cache
        resp, mask = generate(lm, env, x, greedy=True, prefix=keep, dist=dist)
        rewards = [reward(t, ex.answer) for t, ex in zip(decode(env.tok, resp, mask), chunk)]
        correct += sum(r * wi for r, wi in zip(rewards, w))
        if hint_kind is None:
            g, gm = gold_batch(env, chunk)
            logp = lm.prefix_logprobs(env, prefix, g, gm)
            p_correct += (logp.sum(1).exp() * torch.tensor(w, device=logp.device)).sum().item()
    lm.train(was_training)
    totals = dist.sum(torch.tensor([correct, p_correct], dtype=torch.float64)).tolist()
    out = {"accuracy": totals[0] / len(examples)}
    if hint_kind is None:
        out["p_correct"] = totals[1] / len(examples)
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
