"""GRPO + PTD-PO, read top to bottom.  ``python -m ptd_train.run [--flags]``  (SPEC §1, §3)
Data parallel: ``torchrun --nproc_per_node N -m ptd_train.run [--fsdp true] [--flags]``.

One RL step (each rank on its share of the step's prompts):
  1. G rollouts per prompt from the policy on the hint-free prompt x (temperature sampling,
     vision placeholder tokens suppressed); verifier rewards; group advantages;
  2. teacher pass: the frozen reference (or the current policy, no grad) on x^h = [x ; hint],
     same image, teacher-forced on the student's tokens — only for rollouts in the PTD set F —
     keeping the last hidden states at response positions;
  3. student pass: the policy's backbone on x + y; its last hidden states at response positions
     go with the output-layer weights to ``ptd_kernels.linear_ptd_terms`` (log-prob, entropy,
     Top-K JSD, overlap in one sweep; no batch×length×vocab logits are ever formed);
  4. loss of SPEC §3 over the global batch (clipped GRPO, k3 reference KL except in PTD groups,
     λ·JSD on F), AdamW, clipping on the global gradient norm; log the step.
Before step 1 (embedded model only) a cached supervised warm start (``warmstart.py``) brings the
tiny model to where RL has rewards to work with; held-out greedy accuracy is measured before and
after (``rollout.py``). Process groups, sharding and lockstep live in ``distributed.py``,
checkpoints in ``checkpoint.py``.
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

from . import checkpoint, grpo, teacher_server
from .config import TrainConfig
from .distributed import SINGLE, Dist, clip_grad_norm, full_model_state, full_output_layer, parallelize, started, unwrap
from .model import ModelWithPTDHead, build_tiny_model, is_vision_language, load_model_and_tokenizer, stop_token_ids
from .prompts import Env, build_tokenizer
from .rollout import decode, evaluate, generate
from .tasks import Example, GridCountTask, load_jsonl, reward
from .vision import VisionGeometry
from .warmstart import warm_start

# ============================================================================ setup


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, str]:
    """(device, kernel backend); under torchrun each process takes the GPU of its local rank."""
    kind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if kind == "cuda" else torch.device(kind)
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


def load_model(cfg: TrainConfig, device: torch.device, backend: str):
    """(Hugging Face model, tokenizer, processor or None, Env): the embedded tiny Qwen3-VL with
    its word-level tokenizer, or a local checkpoint."""
    if cfg.model_name_or_path is None:
        tok = build_tokenizer(GridCountTask.words)
        model, processor = build_tiny_model(tok, seed=cfg.warmstart_seed), None
    else:
        model, tok, processor = load_model_and_tokenizer(cfg.model_name_or_path)
    model.to(device)
    geo = VisionGeometry.of(model, cfg.model_name_or_path) if is_vision_language(model) else None
    env = Env(cfg, tok, geo, device, backend, processor=processor, stop_ids=stop_token_ids(model, tok))
    return model, tok, processor, env


def sample_prompts(cfg: TrainConfig, task, train: list[Example] | None, rng: np.random.Generator) -> list[Example]:
    """The step's global batch of ``prompts_per_step`` prompts (every rank draws the same)."""
    if task is not None:
        return task.sample(rng, cfg.prompts_per_step)
    return [
        train[i] for i in rng.choice(len(train), size=cfg.prompts_per_step, replace=len(train) < cfg.prompts_per_step)
    ]


def step_seed(seed: int, step: int, rank: int = 0) -> None:
    """Each step's prompts and samples depend only on (seed, step) — and the rank, whose rollouts
    differ: paired runs see the same stream, and a resumed run continues it exactly. Rank 0
    draws what a single process draws."""
    base = seed * 1_000_003 + step
    torch.manual_seed(base if rank == 0 else int(np.random.SeedSequence([base, rank]).generate_state(1)[0]))


# ============================================================================ one RL step


def rl_step(
    policy, ref, opt, env: Env, examples: list[Example], *, teacher_head=None, dist: Dist = SINGLE, rollouts=None
) -> dict:
    """One update on this rank's prompts ``examples``; the loss and the metrics are those of the
    global batch. ``policy``/``ref``: ``ModelWithPTDHead`` (wrapped by ``parallelize``);
    ``teacher_head``: the reference's output layer, whole (``full_output_layer``; None: read from
    ``ref``, one process); ``rollouts``: given (response ids, mask) instead of sampling them."""
    cfg = env.cfg
    lm = unwrap(policy)  # the policy's no-grad passes; the student pass goes through policy(...)
    G, B = cfg.group_size, len(examples)
    R = B * G
    t0 = time.time()

    # 1. rollouts on the hint-free prompt, rewards, advantages
    x = env.prompts(examples).select([i // G for i in range(R)])  # no hint argument at all; rollout r ↦ prompt r // G
    resp, mask = rollouts if rollouts is not None else generate(lm, env, x, greedy=False, dist=dist)
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
    teacher = unwrap(ref) if cfg.teacher == "ref" else lm
    if cfg.teacher == "ref" and teacher_head is None:
        teacher_head = teacher.output_layer()
    rows = in_f.nonzero().flatten().tolist()
    pass_rows = dist.lockstep_rows(rows)  # FSDP2: every rank calls the teacher when one does
    teacher_hidden = teacher_topk = None
    if cfg.teacher_server is not None:  # served: the teacher's top-K of F's hinted sequences, no local pass
        teacher_topk = teacher_server.topk_of_rows(unwrap(ref), env, examples, rows, resp, mask)
    elif pass_rows:
        prompts_f = sorted({r // G for r in pass_rows})  # each prompt (and image) of F once ...
        xh = env.prompts([examples[i] for i in prompts_f], [hint_kind] * len(prompts_f))
        sel = [prompts_f.index(r // G) for r in pass_rows]  # ... then one row per rollout in F
        with torch.no_grad():
            th = teacher.hidden(env, xh.select(sel), resp[pass_rows], mask[pass_rows])[: len(rows)]
        if rows:
            teacher_hidden = th.new_zeros(R, T, th.shape[-1])
            teacher_hidden[rows] = th
            teacher_hidden = teacher_hidden.reshape(R * T, -1)

    # reference log-probs (hint-free) for the k3 term, only where it is not dropped
    logp_ref = None
    kl_rows = ref_kl_mask.nonzero().flatten().tolist()
    pass_rows = dist.lockstep_rows(kl_rows) if cfg.kl_coef != 0 else []
    if pass_rows:
        with torch.no_grad():
            lr_ = unwrap(ref).logprobs(env, x.select(pass_rows), resp[pass_rows], mask[pass_rows], cfg.temperature)
        if kl_rows:
            logp_ref = torch.zeros(R, T, device=env.device)
            logp_ref[kl_rows] = lr_

    # 3. student pass: backbone hidden states at response positions → kernels (no logits tensor)
    policy.train()
    jsd_mask = in_f[:, None].expand(R, T).reshape(-1)
    terms = policy(env, x, resp, mask, teacher_hidden, teacher_head, jsd_mask, teacher.logit_transform, teacher_topk)
    logp, entropy, jsd = terms.logp.view(R, T), terms.entropy.view(R, T), terms.jsd.view(R, T)

    # 4. SPEC §3 loss of the global batch: token means divide by token counts summed over ranks;
    #    one update per batch, so the behaviour policy's log-probs are logp.detach()
    #    (ptd_grad="released": the authors' surrogate, same D_K value, zero gradient)
    f_tok = mask & in_f[:, None]
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
        token_count=dist.sum(mask.sum()),
        ptd_token_count=dist.sum(f_tok.sum()),
    )
    (parts.loss * dist.world).backward()  # DDP and FSDP2 average gradients over ranks: this undoes it
    grad_norm = clip_grad_norm(policy, cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)

    def mean(x, m):  # Σ x·m / Σ m over the global batch
        m = m.to(x.dtype)
        return (dist.sum((x.detach() * m).sum()) / dist.sum(m.sum()).clamp(min=1.0)).item()

    rollout = torch.ones(R, dtype=torch.bool)
    return {
        "reward_mean": mean(rewards.flatten(), rollout),
        "accuracy": mean((rewards == 1).float().flatten(), rollout),
        "entropy": mean(entropy, mask),
        "neg_logp": -mean(logp, mask),
        "ptd_rollouts": int(dist.sum(in_f.sum())),
        "all_fail_groups": int(dist.sum((rewards.max(1).values < 1).sum())),
        "jsd": mean(jsd, f_tok),
        "overlap": mean(terms.overlap.view(R, T), f_tok),
        "teacher_mass": mean(terms.teacher_mass.view(R, T), f_tok),
        "loss": dist.sum(parts.loss.detach()).item(),
        "pg_loss": dist.sum(parts.pg).item(),
        "kl": dist.sum(parts.kl).item(),
        "ptd_loss": dist.sum(parts.ptd).item(),
        "clip_frac": dist.sum(parts.clip_frac).item(),
        "grad_norm": grad_norm,
        "response_len": mean(mask.sum(1).float(), rollout.to(mask.device)),
        "seconds": time.time() - t0,
    }


# ============================================================================ main


def train(cfg: TrainConfig) -> dict:
    cfg = cfg.resolved()
    device, backend = resolve_device(cfg)
    with started(cfg, device) as dist:
        return _train(cfg, dist, backend)


def _train(cfg: TrainConfig, dist: Dist, backend: str) -> dict:
    if dist.main:
        os.makedirs(cfg.output_dir, exist_ok=True)
    if dist.device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    verbose = cfg.progress and dist.main
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    t_start = time.time()

    task, train_set, test_set, dev_set = load_data(cfg)
    model, tok, processor, env = load_model(cfg, dist.device, backend)
    warm = None
    if task is not None and cfg.warmstart_max_steps > 0:  # computed once, on rank 0, and shared
        warm = warm_start(model, env, task, log) if dist.main else None
        warm = dist.broadcast_model(model, warm)
    ref = ModelWithPTDHead(copy.deepcopy(model).eval().requires_grad_(False))  # frozen initial policy: KL, teacher
    vision_unused = is_vision_language(model) and task is None and train_set[0].image is None  # a text task
    policy = parallelize(ModelWithPTDHead(model), dist, trainable=True, unused_params=vision_unused)
    ref = parallelize(ref, dist, trainable=False)
    teacher_head = full_output_layer(ref) if cfg.teacher == "ref" else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    state = checkpoint.load(ckpt_dir, unwrap(policy), opt) if cfg.resume else None
    if state is not None:
        check_same_stream(cfg, state["config"])
        start, evals = state["step"], state["evals"]
        if dist.main:  # drop the lines of steps after the checkpoint
            kept = []
            if os.path.exists(metrics_path):
                with open(metrics_path) as f:
                    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
            checkpoint.atomic_write_text("".join(kept), metrics_path)
        log(f"resumed from step {start} (saved by {state['world_size']} process(es), now {dist.world})")
    else:
        start = 0
        before = evaluate(unwrap(policy), env, test_set, dist=dist)
        evals = {"accuracy_before": before["accuracy"], "p_correct_before": before["p_correct"]}
        if cfg.teacher_hint != "none" and (task is not None or any(ex.hints for ex in test_set)):
            hinted = evaluate(unwrap(policy), env, test_set, hint_kind=cfg.teacher_hint, dist=dist)
            evals["accuracy_hinted_before"] = hinted["accuracy"]
        if warm is not None:
            evals["warmstart"] = warm
        log(f"before: {evals}")
        if dist.main:
            checkpoint.atomic_write_text("", metrics_path)

    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc="rl", dynamic_ncols=True, file=sys.stderr)
    for step in range(start + 1, cfg.max_steps + 1):
        step_seed(cfg.seed, step, dist.rank)
        examples = sample_prompts(cfg, task, train_set, np.random.default_rng([cfg.seed, step]))
        m = rl_step(policy, ref, opt, env, dist.share(examples), teacher_head=teacher_head, dist=dist)
        m = {"step": step, **m}
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step != cfg.max_steps:
            e = evaluate(unwrap(policy), env, test_set, dist=dist)
            m["eval_accuracy"], m["eval_p_correct"] = e["accuracy"], e["p_correct"]
        if dist.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward_mean']:.2f}", ptd=m["ptd_rollouts"], jsd=f"{m['jsd']:.3f}")
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
            trainer_state = {"step": step, "evals": evals, "world_size": dist.world, "config": dataclasses.asdict(cfg)}
            checkpoint.save(ckpt_dir, unwrap(policy), opt, trainer_state, dist)
    if bar is not None:
        bar.close()

    after = evaluate(unwrap(policy), env, test_set, dist=dist)
    evals.update(
        accuracy_after=after["accuracy"],
        p_correct_after=after["p_correct"],
        steps=cfg.max_steps,
        seconds_this_process=round(time.time() - t_start, 1),
    )
    state_dict = full_model_state(unwrap(policy), dist)  # every rank takes part under FSDP2
    if dist.main:
        checkpoint.atomic_write_text(json.dumps(evals, indent=2) + "\n", os.path.join(cfg.output_dir, "eval.json"))
        final = os.path.join(cfg.output_dir, "final")
        model.save_pretrained(final, state_dict=state_dict)
        (processor or tok).save_pretrained(final)
        if cfg.plot:
            try:
                from .plots import plot_curves

                plot_curves(metrics_path, os.path.join(cfg.output_dir, "curves.png"), evals)
            except Exception as e:  # a plot must never cost a finished run
                log(f"plot failed: {e!r}")
    log(
        f"after: accuracy {evals['accuracy_before']:.3f} → {evals['accuracy_after']:.3f} "
        f"({time.time() - t_start:.0f} s)"
    )
    return evals


def check_same_stream(cfg: TrainConfig, saved: dict) -> None:
    """A resumed run continues the saved prompt stream: the fields that define it must match."""
    for name in ("seed", "prompts_per_step", "group_size", "dataset", "model_name_or_path"):
        if saved.get(name) != getattr(cfg, name):
            raise ValueError(f"{name}: the checkpoint was written with {saved.get(name)!r}, not {getattr(cfg, name)!r}")


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(TrainConfig).parse_args_into_dataclasses(args=argv)
    return train(cfg)


if __name__ == "__main__":
    main()
