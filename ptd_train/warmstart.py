"""The supervised warm start of the embedded tiny model, cached on disk under a key of everything
that determines it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np
import torch

from .checkpoint import atomic_save, build_fingerprint
from .config import TrainConfig
from .hints import HINT_KINDS
from .model import ModelWithPTDHead, TinyVLSpec
from .prompts import Env
from .rollout import evaluate, gold_batch
from .tasks import GridCountTask


def cache_key(cfg: TrainConfig, task: GridCountTask) -> tuple[str, dict]:
    """(key, spec): ``spec`` holds everything that determines the warm-start weights (every
    ``warmstart_*`` field but the cache folder, the model shape, a fingerprint of the task, the
    clipping norm, and the build: torch, instruction set, thread count); ``key`` is its hash, part of
    the cached file's name."""
    keys = [f for f in dataclasses.fields(cfg) if f.name.startswith("warmstart_") and f.name != "warmstart_dir"]
    spec = {f.name: getattr(cfg, f.name) for f in keys}
    task_print = hashlib.sha256(task.dev[0].image.tobytes() + " ".join(task.words).encode()).hexdigest()
    spec.update(model=dataclasses.asdict(TinyVLSpec()), task=task_print, max_grad_norm=cfg.max_grad_norm,
                build=build_fingerprint(), version=3)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16], spec


def warm_start(model, env: Env, task: GridCountTask, log=print) -> dict:
    """Supervised warm start on a hint mix (cached in ``warmstart_dir``): stops at the first
    evaluation where the hinted dev accuracy is ≥ ``warmstart_hinted_min`` (with the spatial hint,
    and with the answer-stating hint when the mix has ``leak``) and the hint-free one
    ≥ ``warmstart_target``.

    The data mixes hint-free and hinted prompts: a model that never saw a hint cannot use one,
    and then the teacher would be no better than the student. ``leak`` prompts (the hint states
    the answer: the reference completion) teach the model to copy a stated answer, as any real
    LLM would, so that the ptd-leak baseline's teacher is a competent answer-conditioned teacher.
    They are supervised data whose target is that very answer, so the warm start (and only it)
    builds them without ``--allow_answer_leak``; RL teachers still need that switch.
    """
    cfg = env.cfg
    key, spec = cache_key(cfg, task)
    path = os.path.join(cfg.warmstart_dir, f"warmstart-{key}.pt")
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        log(f"warm start: loaded {path} (step {state['info']['steps']})")
        return state["info"]

    kinds, weights = zip(*[(k, float(w)) for k, w in (kv.split(":") for kv in cfg.warmstart_hint_mix.split(","))])
    probs = np.asarray(weights) / sum(weights)
    bad = [k for k in kinds if k not in ("none", "leak", *HINT_KINDS)]
    if bad:
        raise ValueError(f"warmstart_hint_mix: unknown hint kinds {bad}")
    leak = "leak" in kinds
    data_env = env  # builds the warm-start prompts (and the leak teacher's dev prompts)
    if leak:
        data_env = Env(dataclasses.replace(cfg, allow_answer_leak=True), env.tok, env.geo, env.device, env.backend)
    lm = ModelWithPTDHead(model)
    rng = np.random.default_rng([cfg.warmstart_seed, 17])
    torch.manual_seed(cfg.warmstart_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmstart_lr, weight_decay=0.0)
    t0 = time.time()
    info = {"steps": 0, "dev_accuracy": None, "dev_accuracy_hinted": None}
    if leak:
        info["dev_accuracy_leak"] = None
    for step in range(1, cfg.warmstart_max_steps + 1):
        batch = task.sample(rng, cfg.warmstart_batch)
        hk = list(rng.choice(kinds, size=len(batch), p=probs))
        g, gm = gold_batch(env, batch)
        logp = lm.logprobs(env, data_env.prompts(batch, hk), g, gm, temperature=1.0)
        loss = -logp.sum() / gm.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.warmstart_eval_every == 0 or step == cfg.warmstart_max_steps:
            free = evaluate(lm, env, task.dev)["accuracy"]
            hinted = evaluate(lm, env, task.dev, hint_kind="spatial")["accuracy"]
            info = {"steps": step, "dev_accuracy": free, "dev_accuracy_hinted": hinted}
            if leak:
                info["dev_accuracy_leak"] = evaluate(lm, data_env, task.dev, hint_kind="leak")["accuracy"]
            info.update(loss=loss.item(), seconds=round(time.time() - t0, 1))
            log(
                f"warm start {step}: loss {loss.item():.3f} dev acc {free:.2f} hinted {hinted:.2f}"
                + (f" leak {info['dev_accuracy_leak']:.2f}" if leak else "")
            )
            teachers_ready = min(hinted, info.get("dev_accuracy_leak", 1.0)) >= cfg.warmstart_hinted_min
            if free >= cfg.warmstart_target and teachers_ready:
                break
    os.makedirs(cfg.warmstart_dir, exist_ok=True)
    atomic_save({"model": model.state_dict(), "info": info, "spec": spec}, path)
    return info
