"""GRPO + PTD-PO, one readable file.  ``python -m ptd_train.run [--flags]``  (SPEC §1, §3)

One RL step:
  1. sample B prompts; G rollouts each from the policy on the hint-free prompt x (temperature
     sampling, vision placeholder tokens suppressed); verifier rewards; group advantages;
  2. teacher pass: the frozen reference (or the current policy, no grad) on x^h = [x ; hint],
     same image, teacher-forced on the student's tokens — only for rollouts in the PTD set F —
     keeping the last hidden states at response positions;
  3. student pass: the policy's backbone on x + y; its last hidden states at response positions
     go with the output-layer weights to ``ptd_kernels.linear_ptd_terms`` (log-prob, entropy,
     Top-K JSD, overlap in one sweep; no batch×length×vocab logits are ever formed);
  4. loss of SPEC §3 (clipped GRPO, k3 reference KL except in PTD groups, λ·JSD on F), AdamW,
     grad-norm clip; log the step.
Before step 1 (embedded model only) a cached supervised warm start brings the tiny model to
where RL has rewards to work with; held-out greedy accuracy is measured before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import sys
import time

import numpy as np
import torch

from ptd_kernels import linear_jsd, linear_logprobs, linear_ptd_terms

from . import grpo
from .config import TrainConfig
from .hints import HINT_KINDS, HintLeakError, check_hint, leak_hint
from .model import (
    Prefix,
    TinyVLSpec,
    VisionBatch,
    VisionGeometry,
    build_tiny_model,
    build_tokenizer,
    continue_prefix,
    distinct_prompts,
    encode_prefix,
    encode_prompt,
    left_pad,
    load_model_and_tokenizer,
    output_layer,
    patchify,
    placeholder_ids,
    prefix_response_hidden,
    resize_for_model,
    response_hidden,
    stack_images,
)
from .tasks import Example, GridCountTask, load_jsonl, reward

IGNORE = -100


# ============================================================================ setup


class Env:
    """Everything a step needs that is not the model weights."""

    def __init__(self, cfg: TrainConfig, tok, geo: VisionGeometry, device: torch.device, backend: str):
        self.cfg, self.tok, self.geo, self.device, self.backend = cfg, tok, geo, device, backend
        self.blocked = placeholder_ids(tok)
        self.autocast = device.type == "cuda"  # bf16 compute on CUDA, fp32 weights

    def amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else _nullcontext()

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


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, str]:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    backend = cfg.backend
    if backend == "auto":  # the Triton interpreter on CPU would be slow: use the chunked torch path
        backend = "auto" if device.type == "cuda" else "torch"
    return device, backend


def load_data(cfg: TrainConfig):
    """(task or None, train examples or None, held-out examples, dev examples)."""
    if cfg.dataset is None:
        task = GridCountTask(eval_size=cfg.eval_size)
        return task, None, task.test, task.dev
    train = load_jsonl(cfg.dataset)
    if cfg.eval_dataset is not None:
        test = load_jsonl(cfg.eval_dataset)
    else:
        if len(train) < 2:
            raise ValueError(f"dataset: {cfg.dataset} needs at least 2 lines to hold some out")
        n = min(cfg.eval_size, len(train) // 2)
        train, test = train[:-n], train[-n:]
    return None, train, test, test


def sample_prompts(cfg: TrainConfig, task, train: list[Example] | None, rng: np.random.Generator) -> list[Example]:
    if task is not None:
        return task.sample(rng, cfg.prompts_per_step)
    return [
        train[i] for i in rng.choice(len(train), size=cfg.prompts_per_step, replace=len(train) < cfg.prompts_per_step)
    ]


def completion_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


# ============================================================================ generation / eval


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


# ============================================================================ warm start


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
    keys = [f for f in dataclasses.fields(cfg) if f.name.startswith("warmstart_") and f.name != "warmstart_dir"]
    spec = {f.name: getattr(cfg, f.name) for f in keys}
    task_print = hashlib.sha256(task.dev[0].image.tobytes() + " ".join(task.words).encode()).hexdigest()
    spec.update(model=dataclasses.asdict(TinyVLSpec()), task=task_print, max_grad_norm=cfg.max_grad_norm, version=2)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
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
    rng = np.random.default_rng([cfg.warmstart_seed, 17])
    torch.manual_seed(cfg.warmstart_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmstart_lr, weight_decay=0.0)
    W, b = output_layer(model)
    t0 = time.time()
    info = {"steps": 0, "dev_accuracy": None, "dev_accuracy_hinted": None}
    if leak:
        info["dev_accuracy_leak"] = None
    for step in range(1, cfg.warmstart_max_steps + 1):
        batch = task.sample(rng, cfg.warmstart_batch)
        hk = list(rng.choice(kinds, size=len(batch), p=probs))
        pid, pmask, vision = data_env.prompts(batch, hk)
        g, gm = gold_batch(env, batch)
        with env.amp():
            h = response_hidden(model, pid, pmask, vision, g, gm)
        logp = linear_logprobs(
            h.reshape(-1, h.shape[-1]).to(W.dtype), W, targets_of(g, gm), bias=b, temperature=1.0, backend=env.backend
        )
        loss = -logp.sum() / gm.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.warmstart_eval_every == 0 or step == cfg.warmstart_max_steps:
            free = evaluate(model, env, task.dev)["accuracy"]
            hinted = evaluate(model, env, task.dev, hint_kind="spatial")["accuracy"]
            info = {"steps": step, "dev_accuracy": free, "dev_accuracy_hinted": hinted}
            if leak:
                info["dev_accuracy_leak"] = evaluate(model, data_env, task.dev, hint_kind="leak")["accuracy"]
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


# ============================================================================ one RL step


def student_pass(policy, env: Env, pid, pmask, vision, resp, mask, teacher_hidden, Wt, bt, jsd_mask):
    """Per-token (logp, entropy, D_K, overlap, teacher mass), each [R·T], differentiable in the policy.

    The policy's backbone gives the last hidden states at response positions; the kernels apply
    the output layer row-block by row-block, so no [R, T, V] logits tensor is ever formed.
    ``teacher_hidden`` is None when no rollout is in F (or λ = 0): log-prob and entropy only.
    """
    cfg = env.cfg
    W, b = output_layer(policy)
    R, T = resp.shape
    targets = targets_of(resp, mask)
    policy.train()
    with env.amp():
        h = response_hidden(policy, pid, pmask, vision, resp, mask)
    h = h.reshape(R * T, -1).to(W.dtype)
    zero = torch.zeros(R * T, device=env.device)
    overlap, teacher_mass = zero, zero
    if teacher_hidden is not None and not cfg.ptd_full_vocab:
        out = linear_ptd_terms(
            h,
            W,
            targets,
            teacher_hidden,
            Wt,
            min(cfg.ptd_k, W.shape[0]),
            beta=cfg.ptd_beta,
            support=cfg.ptd_support,
            tail=cfg.ptd_tail,
            bias=b,
            teacher_bias=bt,
            temperature=cfg.temperature,
            jsd_mask=jsd_mask,
            backend=env.backend,
        )
        logp, entropy, jsd, overlap = out.logp, out.entropy, out.jsd, out.overlap
        teacher_mass = out.teacher_mass
    else:
        logp, entropy = linear_logprobs(
            h, W, targets, bias=b, temperature=cfg.temperature, with_entropy=True, backend=env.backend
        )
        jsd = zero
        if teacher_hidden is not None:  # full-vocabulary ablation
            jsd = linear_jsd(
                h,
                W,
                teacher_hidden,
                Wt,
                beta=cfg.ptd_beta,
                bias=b,
                teacher_bias=bt,
                temperature=cfg.temperature,
                mask=jsd_mask,
                backend=env.backend,
            )
    return logp, entropy, jsd, overlap, teacher_mass


def rl_step(policy, ref, opt, env: Env, examples: list[Example]) -> dict:
    cfg = env.cfg
    G, B = cfg.group_size, len(examples)
    R = B * G
    t0 = time.time()

    # 1. rollouts on the hint-free prompt, rewards, advantages
    pid, pmask, vision = env.prompts(examples)  # student context x: no hint argument at all
    owner = [i // G for i in range(R)]  # rollout r belongs to prompt r // G
    pid, pmask, vision = pid[owner], pmask[owner], vision.select(owner)
    resp, mask = generate(policy, env, pid, pmask, vision, greedy=False)
    texts = decode(env.tok, resp, mask)
    rewards = torch.tensor([reward(t, examples[r // G].answer) for r, t in enumerate(texts)]).view(B, G)
    adv = grpo.group_advantages(rewards, cfg.scale_rewards).reshape(R).to(env.device)
    hint_kind = cfg.teacher_hint  # "none": the teacher-without-hint control, same PTD set
    has_hint = torch.tensor([bool(ex.hints) for ex in examples])
    in_f = (
        grpo.ptd_set(rewards, has_hint, cfg.ptd_threshold).reshape(R)
        if cfg.ptd_coef != 0
        else torch.zeros(R, dtype=torch.bool)
    )
    ptd_group = grpo.ptd_groups(rewards, has_hint, cfg.ptd_threshold).repeat_interleave(G)
    ref_kl_mask = ~ptd_group if (cfg.ptd_drop_ref_kl and cfg.ptd_coef != 0) else torch.ones(R, dtype=torch.bool)
    in_f, ref_kl_mask = in_f.to(env.device), ref_kl_mask.to(env.device)
    T = resp.shape[1]

    # 2. teacher pass on x^h = [x ; hint], same image, teacher-forced on the student's tokens (F only)
    teacher = ref if cfg.teacher == "ref" else policy
    Wt, bt = output_layer(teacher)
    rows = in_f.nonzero().flatten().tolist()
    teacher_hidden = None
    if rows:
        prompts_f = sorted({r // G for r in rows})  # each prompt (and image) of F once ...
        tid, tmask, tvision = env.prompts([examples[i] for i in prompts_f], [hint_kind] * len(prompts_f))
        sel = [prompts_f.index(r // G) for r in rows]  # ... then one row per rollout in F
        with torch.no_grad(), env.amp():
            th = response_hidden(teacher, tid[sel], tmask[sel], tvision.select(sel), resp[rows], mask[rows])
        teacher_hidden = torch.zeros(R, T, th.shape[-1], dtype=Wt.dtype, device=env.device)
        teacher_hidden[rows] = th.to(Wt.dtype)
        teacher_hidden = teacher_hidden.reshape(R * T, -1)

    # reference log-probs (hint-free) for the k3 term, only where it is not dropped
    logp_ref = None
    kl_rows = ref_kl_mask.nonzero().flatten().tolist()
    if cfg.kl_coef != 0 and kl_rows:
        Wr, br = output_layer(ref)
        with torch.no_grad(), env.amp():
            hr = response_hidden(
                ref, pid[kl_rows], pmask[kl_rows], vision.select(kl_rows), resp[kl_rows], mask[kl_rows]
            )
        lr_ = linear_logprobs(
            hr.reshape(-1, hr.shape[-1]).to(Wr.dtype),
            Wr,
            targets_of(resp[kl_rows], mask[kl_rows]),
            bias=br,
            temperature=cfg.temperature,
            backend=env.backend,
        )
        logp_ref = torch.zeros(R, T, device=env.device)
        logp_ref[kl_rows] = lr_.view(len(kl_rows), T)

    # 3. student pass: backbone hidden states at response positions → kernels (no logits tensor)
    jsd_mask = in_f[:, None].expand(R, T).reshape(-1)
    logp, entropy, jsd, overlap, teacher_mass = student_pass(
        policy, env, pid, pmask, vision, resp, mask, teacher_hidden, Wt, bt, jsd_mask
    )
    logp, entropy, jsd = logp.view(R, T), entropy.view(R, T), jsd.view(R, T)

    # 4. SPEC §3 loss; one update per batch, so the behaviour policy's log-probs are logp.detach()
    #    (ptd_grad="released": the authors' surrogate, same D_K value, zero gradient)
    jsd_loss = grpo.released_surrogate(jsd) if cfg.ptd_grad == "released" else jsd
    parts = grpo.ptd_po_loss(
        logp,
        logp.detach(),
        logp_ref,
        adv,
        mask,
        jsd_loss,
        in_f,
        ref_kl_mask,
        kl_coef=cfg.kl_coef,
        ptd_coef=cfg.ptd_coef,
        eps_low=cfg.epsilon_low,
        eps_high=cfg.epsilon_high,
    )
    parts.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)

    f_tok = mask & in_f[:, None]
    mean_f = lambda x: grpo.token_mean(x.detach().view(R, T), f_tok).item()  # noqa: E731
    return {
        "reward_mean": rewards.mean().item(),
        "accuracy": (rewards == 1).float().mean().item(),
        "entropy": grpo.token_mean(entropy.detach(), mask).item(),
        "neg_logp": -grpo.token_mean(logp.detach(), mask).item(),
        "ptd_rollouts": int(in_f.sum()),
        "all_fail_groups": int((rewards.max(1).values < 1).sum()),
        "jsd": mean_f(jsd),
        "overlap": mean_f(overlap),
        "teacher_mass": mean_f(teacher_mass),
        "loss": parts.loss.item(),
        "pg_loss": parts.pg.item(),
        "kl": parts.kl.item(),
        "ptd_loss": parts.ptd.item(),
        "clip_frac": parts.clip_frac.item(),
        "grad_norm": float(grad_norm),
        "response_len": mask.sum(1).float().mean().item(),
        "seconds": time.time() - t0,
    }


# ============================================================================ checkpoints


def atomic_save(obj, path: str):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def step_seed(seed: int, step: int) -> None:
    """Each step's prompts and samples depend only on (seed, step): paired runs see the same
    stream, and a resumed run continues it exactly."""
    torch.manual_seed(seed * 1_000_003 + step)


# ============================================================================ main


def train(cfg: TrainConfig) -> dict:
    cfg = cfg.resolved()
    os.makedirs(cfg.output_dir, exist_ok=True)
    device, backend = resolve_device(cfg)
    if device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    log = (lambda *a: None) if not cfg.progress else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t_start = time.time()

    task, train_set, test_set, dev_set = load_data(cfg)
    if cfg.model_name_or_path is None:
        tok = build_tokenizer(GridCountTask.words)
        policy = build_tiny_model(tok, seed=cfg.warmstart_seed)
    else:
        policy, tok = load_model_and_tokenizer(cfg.model_name_or_path)
    policy.to(device)
    geo = VisionGeometry.of(policy, cfg.model_name_or_path)
    env = Env(cfg, tok, geo, device, backend)

    warm = None
    if task is not None and cfg.warmstart_max_steps > 0:
        warm = warm_start(policy, env, task, log)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)  # frozen initial policy: KL anchor and teacher
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    eval_path = os.path.join(cfg.output_dir, "eval.json")
    start, evals = 0, {}
    if cfg.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # RNG states must stay on CPU
        policy.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start, evals = state["step"], state["evals"]
        kept = []
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
        atomic_write_text("".join(kept), metrics_path)
        log(f"resumed from step {start}")
    else:
        before = evaluate(policy, env, test_set)
        evals = {"accuracy_before": before["accuracy"], "p_correct_before": before["p_correct"]}
        if cfg.teacher_hint != "none" and (task is not None or any(ex.hints for ex in test_set)):
            evals["accuracy_hinted_before"] = evaluate(policy, env, test_set, hint_kind=cfg.teacher_hint)["accuracy"]
        if warm is not None:
            evals["warmstart"] = warm
        log(f"before: {evals}")
        atomic_write_text("", metrics_path)

    def save(step: int):
        atomic_save(
            {
                "model": policy.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": rng_state(),
                "step": step,
                "evals": evals,
                "config": dataclasses.asdict(cfg),
            },
            ckpt_path,
        )

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc="rl", dynamic_ncols=True, file=sys.stderr)
    with open(metrics_path, "a") as mf:
        for step in range(start + 1, cfg.max_steps + 1):
            step_seed(cfg.seed, step)
            examples = sample_prompts(cfg, task, train_set, np.random.default_rng([cfg.seed, step]))
            m = rl_step(policy, ref, opt, env, examples)
            m = {"step": step, **m}
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step != cfg.max_steps:
                e = evaluate(policy, env, test_set)
                m["eval_accuracy"], m["eval_p_correct"] = e["accuracy"], e["p_correct"]
            mf.write(json.dumps(m) + "\n")
            mf.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward_mean']:.2f}", ptd=m["ptd_rollouts"], jsd=f"{m['jsd']:.3f}")
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
                save(step)
    if bar is not None:
        bar.close()

    after = evaluate(policy, env, test_set)
    evals.update(
        accuracy_after=after["accuracy"],
        p_correct_after=after["p_correct"],
        steps=cfg.max_steps,
        seconds_this_process=round(time.time() - t_start, 1),
    )
    atomic_write_text(json.dumps(evals, indent=2) + "\n", eval_path)
    final = os.path.join(cfg.output_dir, "final")
    policy.save_pretrained(final)
    tok.save_pretrained(final)
    try:
        from .plots import plot_curves

        if cfg.plot:
            plot_curves(metrics_path, os.path.join(cfg.output_dir, "curves.png"), evals)
    except Exception as e:  # a plot must never cost a finished run
        log(f"plot failed: {e!r}")
    log(
        f"after: accuracy {evals['accuracy_before']:.3f} → {evals['accuracy_after']:.3f} "
        f"({time.time() - t_start:.0f} s)"
    )
    return evals


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(TrainConfig).parse_args_into_dataclasses(args=argv)
    return train(cfg)


if __name__ == "__main__":
    main()
