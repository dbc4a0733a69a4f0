"""GRPO + PTD-PO, read top to bottom.  ``python -m ptd_train.run [--flags]``  (SPEC §1, §3)

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
Before step 1 (embedded model only) a cached supervised warm start (``warmstart.py``) brings the
tiny model to where RL has rewards to work with; held-out greedy accuracy is measured before and
after (``rollout.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

from ptd_kernels import linear_jsd, linear_logprobs, linear_ptd_terms

from . import grpo
from .checkpoint import atomic_save, atomic_write_text, rng_state, set_rng_state
from .config import TrainConfig
from .model import build_tiny_model, load_model_and_tokenizer, output_layer, response_hidden
from .prompts import Env, build_tokenizer
from .rollout import decode, evaluate, generate, targets_of
from .tasks import Example, GridCountTask, load_jsonl, reward
from .vision import VisionGeometry
from .warmstart import warm_start

# ============================================================================ setup


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


def step_seed(seed: int, step: int) -> None:
    """Each step's prompts and samples depend only on (seed, step): paired runs see the same
    stream, and a resumed run continues it exactly."""
    torch.manual_seed(seed * 1_000_003 + step)


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
