"""The supervised warm start on the embedded task, cached once for every run that would compute
the same weights.

The cache is a folder shared by all output folders (``--warmstart_dir``; by default
``$PTD_CACHE/warmstart`` or ``~/.cache/ptd/warmstart``), one entry per key: the hash of everything
that determines the weights (:func:`cache_key`). An entry ``<key>/`` holds ``model.safetensors``
and ``info.json`` — no pickle, so a file placed there can hold numbers but never run code. Entries
are written to a temporary folder and renamed into place (a reader sees a whole entry or none),
and a lock file makes a second run with the same key wait for the first instead of training the
same weights again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from .checkpoint import build_fingerprint
from .config import UsageError, parse_hint_mix
from .model import ModelWithFusedHead, TinyVLSpec
from .prompts import Env
from .rollout import evaluate, gold_batch
from .tasks import GridCountTask

FORMAT = 4  # bumped whenever what a key covers or how an entry is stored changes


def model_fingerprint(path: str | None) -> dict:
    """What the warm start starts from: the embedded model's shape (its weights follow from
    ``warmstart_seed``), or a hash of a checkpoint folder's config and weight files."""
    if path is None:
        return {"embedded": dataclasses.asdict(TinyVLSpec())}
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith((".safetensors", ".bin", ".index.json")):
            digest.update(name.encode())
            with open(os.path.join(path, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return {"checkpoint": digest.hexdigest()}


def task_fingerprint(task: GridCountTask) -> str:
    """The task's vocabulary, dev images and the grids its training stream skips (those depend on
    the held-out size)."""
    digest = hashlib.sha256(" ".join(task.words).encode())
    for ex in task.dev:
        digest.update(ex.image.tobytes())
    digest.update(json.dumps(sorted(task._held_keys)).encode())
    return digest.hexdigest()


def cache_key(cfg, task: GridCountTask, device: torch.device, backend: str) -> tuple[str, dict]:
    """(key, spec): ``spec`` holds everything that determines the warm-start weights — every
    ``warmstart_*`` setting that changes them, the starting model, the task, the response length and
    clipping norm the warm start uses, the device and kernel backend, and the build (torch,
    instruction set, thread count); ``key`` is its hash, the name of the cache entry."""
    names = [f.name for f in dataclasses.fields(cfg) if f.name.startswith("warmstart_")]
    spec = {name: getattr(cfg, name) for name in names if name not in ("warmstart_dir", "warmstart_cache")}
    spec.update(model=model_fingerprint(cfg.model_name_or_path), task=task_fingerprint(task),
                max_new_tokens=cfg.max_new_tokens, max_grad_norm=cfg.max_grad_norm, device=device.type,
                backend=backend, build=build_fingerprint(), format=FORMAT)  # fmt: skip
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16], spec


@contextlib.contextmanager
def _exclusive(path: str):
    """Hold an exclusive lock on ``path`` (POSIX); elsewhere, no lock (entries are still renamed
    into place whole)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_entry(entry: str, model, spec: dict) -> dict:
    """Load a cache entry into ``model``; its info. Refuses (a :class:`UsageError`) an entry that is
    not one ptd wrote for this key."""
    from safetensors.torch import load_model

    fix = f"delete {entry} (it is trained again) or pass --no_warmstart_cache"
    try:
        with open(os.path.join(entry, "info.json"), encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("spec") != json.loads(json.dumps(spec)):
            raise ValueError("its settings are not this run's")
        load_model(model, os.path.join(entry, "model.safetensors"), strict=True)
    except Exception as e:  # any unreadable, foreign or damaged entry is reported the same way
        raise UsageError(f"warm-start cache {entry}: cannot be used ({str(e).splitlines()[0]}); {fix}") from None
    return saved["info"]


def _store_entry(entry: str, model, info: dict, spec: dict) -> None:
    from safetensors.torch import save_model

    parent = os.path.dirname(entry)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(entry) + ".tmp.", dir=parent)
    try:
        save_model(model, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "info.json"), "w", encoding="utf-8") as f:
            json.dump({"info": info, "spec": spec}, f, indent=2)
        os.rename(tmp, entry)  # atomic; fails if another process put the entry there first
    except OSError:
        if not os.path.isdir(entry):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def warm_start(model, env: Env, task: GridCountTask, log=print) -> dict:
    """The warm start of ``model`` (in place) and its info: loaded from the cache when an entry with
    this key exists, else trained (and cached, unless ``warmstart_cache`` is off).

    Supervised on a hint mix, it stops at the first evaluation where the hinted dev accuracy is
    ≥ ``warmstart_hinted_min`` (with the spatial hint, and with the answer-stating hint when the mix
    has ``leak``) and the hint-free one ≥ ``warmstart_target``.

    The data mixes hint-free and hinted prompts: a model that never saw a hint cannot use one,
    and then the teacher would be no better than the student. ``leak`` prompts (the hint states
    the answer: the reference completion) teach the model to copy a stated answer, as any real
    LLM would, so that the ptd-leak baseline's teacher is a competent answer-conditioned teacher.
    They are supervised data whose target is that very answer, so the warm start (and only it)
    builds them without ``--allow_answer_leak``; RL teachers still need that switch.
    """
    cfg = env.cfg
    if not cfg.warmstart_cache:
        return _train(model, env, task, log)
    key, spec = cache_key(cfg, task, env.device, env.backend)
    os.makedirs(cfg.warmstart_dir, exist_ok=True)
    entry = os.path.join(cfg.warmstart_dir, key)
    with _exclusive(entry + ".lock"):
        if os.path.isdir(entry):
            info = _load_entry(entry, model, spec)
            log(f"loaded from the cache {entry} ({info['steps']} steps)")
            return {**info, "cache": entry, "cached": True}
        info = _train(model, env, task, log)
        _store_entry(entry, model, info, spec)
        log(f"cached in {entry}")
    return {**info, "cache": entry, "cached": False}


def _train(model, env: Env, task: GridCountTask, log) -> dict:
    cfg = env.cfg
    kinds, weights = parse_hint_mix(cfg.warmstart_hint_mix)
    probs = np.asarray(weights) / sum(weights)
    leak = "leak" in kinds
    data_env = env  # builds the warm-start prompts (and the leak teacher's dev prompts)
    if leak:
        data_env = Env(dataclasses.replace(cfg, allow_answer_leak=True), env.tok, env.geo, env.device, env.backend,
                       processor=getattr(env.format, "processor", None), stop_ids=env.stop_ids)  # fmt: skip
    lm = ModelWithFusedHead(model)
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
                f"step {step}: loss {loss.item():.3f}, dev accuracy {free:.2f} without hint, {hinted:.2f} with the "
                "spatial hint" + (f", {info['dev_accuracy_leak']:.2f} with the answer" if leak else "")
            )
            teachers_ready = min(hinted, info.get("dev_accuracy_leak", 1.0)) >= cfg.warmstart_hinted_min
            if free >= cfg.warmstart_target and teachers_ready:
                break
    return info
