"""GRPO + PTD-PO, read top to bottom: the set-up, one RL step, the run.

``train(cfg)`` is a whole run; ``python -m ptd_train.run`` (``run.py``) is its command line, and
``torchrun --nproc_per_node N -m ptd_train.run [--fsdp true]`` runs it data parallel.

One RL step (each rank on its share of the step's prompts):
  1. G rollouts per prompt from the policy on the hint-free prompt x (temperature sampling,
     vision placeholder tokens suppressed); verifier rewards; group advantages;
  2. teacher pass: the frozen reference (or the current policy, no grad) on x^h = [x ; hint],
     same image, teacher-forced on the student's tokens — only for rollouts in the PTD set F —
     keeping the last hidden states at response positions;
  3. student pass and the PTD-PO loss over the global batch (clipped GRPO, k3 reference KL except in
     PTD groups, λ·JSD on F): the policy's backbone on x + y; its last hidden states at response
     positions go with the output-layer weights to ``ptd_kernels.linear_policy_loss`` (``grpo.policy_loss``:
     the loss as named token losses), which forms the loss and its gradients in one sweep over the
     vocabulary per side (no batch×length×vocab logits are ever formed). A served teacher and the
     full-vocabulary JSD take the per-row path: ``linear_ptd_terms`` (or the sparse / full JSD), then
     ``grpo.ptd_po_loss`` in PyTorch;
  4. AdamW, clipping on the global gradient norm; log the step.

A run has six phases, each announced by a line on stderr: set-up (device, data, model), warm start
(embedded task: a cached supervised warm start, ``warmstart.py``, brings the tiny model to where RL
has rewards to work with), evaluation before RL (held-out greedy accuracy, ``rollout.py``), RL,
evaluation after RL, saving. Process groups, sharding and lockstep live in ``distributed.py``,
checkpoints in ``checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

from . import checkpoint, grpo, teacher_server
from .config import TRAINED_MARKER, TrainConfig, UsageError, trained_marker
from .distributed import SINGLE, Dist, clip_grad_norm, full_model_state, full_output_layer, parallelize, started, unwrap
from .model import ModelWithFusedHead, build_tiny_model, is_vision_language, load_model_and_tokenizer, stop_token_ids
from .prompts import Env, build_tokenizer
from .rollout import decode, evaluate, generate
from .tasks import Example, GridCountTask, load_jsonl, reward
from .vision import VisionGeometry
from .warmstart import warm_start

PHASES = ("set-up", "warm start", "evaluation before RL", "RL", "evaluation after RL", "saving")


class Report:
    """The run's lines on stderr (rank 0, unless ``--quiet``): one per phase, ``[i/6] phase: what
    (seconds)``, details indented below it; the seconds of each phase are kept for the summary."""

    def __init__(self, enabled: bool):
        self.enabled, self.seconds, self.t0 = enabled, {}, time.time()

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def phase(self, name: str, text: str, seconds: float | None = None) -> None:
        if seconds is not None:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 1)
            text += f" ({seconds:.1f} s)"
        self.line(f"[{PHASES.index(name) + 1}/{len(PHASES)}] {name}: {text}")

    def detail(self, text: str) -> None:
        self.line("      " + text)


# ============================================================================ set-up


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, str]:
    """(device, kernel backend); under torchrun each process takes the GPU of its local rank."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here; use --device cpu (or auto)")
    kind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if kind == "cuda" else torch.device(kind)
    backend = cfg.backend
    if backend == "auto":  # the Triton interpreter on CPU would be slow: use the chunked torch path
        backend = "auto" if device.type == "cuda" else "torch"
    if backend in ("triton", "cublas") and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(f"--backend {backend}: its kernels need a CUDA device (or TRITON_INTERPRET=1, very slow); "
                         "use --backend torch on CPU")
    return device, backend


def load_data(cfg: TrainConfig):
    """(task or None, train examples or None, held-out examples, dev examples). With ``--dataset``
    and no ``--eval_dataset`` the last ``eval_size`` lines are held out, at most half of the file
    (``eval_size`` 0: none)."""
    if cfg.dataset is None:
        task = GridCountTask(eval_size=cfg.eval_size)
        return task, None, task.test, task.dev
    train = load_jsonl(cfg.dataset)
    if cfg.eval_dataset is not None:
        test = load_jsonl(cfg.eval_dataset)
    elif cfg.eval_size == 0:
        test = []
    else:
        if len(train) < 2:
            raise UsageError(f"--dataset {cfg.dataset}: one example cannot be split into training and held-out "
                             "prompts; add lines, give --eval_dataset, or pass --eval_size 0")
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
        try:
            with _no_hf_progress_bar():
                model, tok, processor = load_model_and_tokenizer(cfg.model_name_or_path)
        except (OSError, ValueError, KeyError) as e:  # a folder that passed the checks but does not load
            if isinstance(e, UsageError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--model_name_or_path {cfg.model_name_or_path}: cannot load it ({first})") from e
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


# the fields that define the prompt stream: a resumed run must have the checkpoint's
SAME_STREAM = ("seed", "prompts_per_step", "group_size", "dataset", "model_name_or_path")


def check_resume(cfg: TrainConfig) -> dict | None:
    """The trainer state to resume from (None: start at step 0), or a :class:`UsageError` when the
    run cannot continue as asked: another prompt stream, or already at ``max_steps``."""
    if not cfg.resume:
        return None
    state = checkpoint.trainer_state(os.path.join(cfg.output_dir, "checkpoints"))
    if state is None:
        return None
    saved = state.get("config", {})
    for name in SAME_STREAM:
        if saved.get(name) != getattr(cfg, name):
            shown = "the default" if saved.get(name) is None else saved.get(name)
            raise UsageError(f"--resume: {cfg.output_dir} was trained with --{name} {shown}, not "
                             f"{getattr(cfg, name)}; resume with the same --{name}, or start a new run in another "
                             "--output_dir")
    checkpoint.SafeReader(checkpoint.latest(os.path.join(cfg.output_dir, "checkpoints"))).read_metadata()
    if state["step"] >= cfg.max_steps:
        raise UsageError(f"--resume: {cfg.output_dir} already finished {state['step']} RL steps (--max_steps "
                         f"{cfg.max_steps}); to train it further, pass a larger --max_steps, e.g. --max_steps "
                         f"{2 * state['step']} --resume true")
    return state


def describe_model(cfg: TrainConfig, model) -> str:
    n = sum(p.numel() for p in model.parameters())
    size = f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"
    size += " parameters"
    if cfg.model_name_or_path is None:
        return f"the embedded tiny Qwen3-VL ({size}, built from a config)"
    return f"{cfg.model_name_or_path} ({type(model).__name__}, {size})"


def describe_data(cfg: TrainConfig, train_set, test_set) -> str:
    held_out = f"{len(test_set)} held-out prompts" if test_set else "no held-out prompts"
    if cfg.dataset is None:
        return f"the embedded grid-count task ({held_out})"
    return f"{cfg.dataset} ({len(train_set)} training examples, {held_out})"


# ============================================================================ one RL step


def rl_step(
    policy, ref, opt, env: Env, examples: list[Example], *, teacher_head=None, dist: Dist = SINGLE, rollouts=None
) -> dict:
    """One update on this rank's prompts ``examples``; the loss and the metrics are those of the
    global batch. ``policy``/``ref``: ``ModelWithFusedHead`` (wrapped by ``parallelize``);
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

    # 3. student pass and the PTD-PO loss of the global batch: backbone hidden states at response positions →
    #    kernels (no logits tensor); token means divide by token counts summed over ranks; one update per
    #    batch, so the behaviour policy's log-probs are logp.detach() (ptd_grad="released": the authors'
    #    surrogate, same D_K value, zero gradient)
    policy.train()
    jsd_mask = in_f[:, None].expand(R, T).reshape(-1)
    f_tok = mask & in_f[:, None]
    loss_fn = grpo.policy_loss(adv, mask, logp_ref, ref_kl_mask, kl_coef=cfg.kl_coef, ptd_coef=cfg.ptd_coef,
                               eps_low=cfg.epsilon_low, eps_high=cfg.epsilon_high, token_count=dist.sum(mask.sum()),
                               ptd_token_count=dist.sum(f_tok.sum()))
    if one_sweep_loss(cfg, teacher_topk):
        row_loss = loss_fn
        if cfg.ptd_grad == "released":
            def row_loss(logp, entropy, jsd):
                return loss_fn(logp, entropy, grpo.released_surrogate(jsd))
        loss, terms = policy(env, x, resp, mask, teacher_hidden, teacher_head,
                             jsd_mask if teacher_hidden is not None else None, teacher.logit_transform,
                             row_loss=row_loss)
        parts = grpo.loss_parts(loss, loss_fn, terms.logp, terms.entropy, terms.jsd)
    else:
        terms = policy(env, x, resp, mask, teacher_hidden, teacher_head, jsd_mask, teacher.logit_transform,
                       teacher_topk)
        jsd_loss = grpo.released_surrogate(terms.jsd) if cfg.ptd_grad == "released" else terms.jsd
        parts = grpo.ptd_po_loss(terms.logp.view(R, T), None, logp_ref, adv, mask, jsd_loss.view(R, T), in_f,
                                 ref_kl_mask, kl_coef=cfg.kl_coef, ptd_coef=cfg.ptd_coef, eps_low=cfg.epsilon_low,
                                 eps_high=cfg.epsilon_high, token_count=dist.sum(mask.sum()),
                                 ptd_token_count=dist.sum(f_tok.sum()))
    logp, entropy, jsd = terms.logp.view(R, T), terms.entropy.view(R, T), terms.jsd.view(R, T)
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


def one_sweep_loss(cfg: TrainConfig, teacher_topk) -> bool:
    """Whether the step's loss comes from one sweep (``ptd_kernels.linear_policy_loss``): a local Top-K teacher
    or none; a served teacher and the full-vocabulary JSD take the per-row path."""
    return teacher_topk is None and not cfg.ptd_full_vocab


# ============================================================================ the run


def train(cfg: TrainConfig) -> dict:
    """A whole run (every rank calls it under torchrun); the evaluations, as in ``eval.json``."""
    cfg = cfg.resolved()
    cfg.check_files()
    state = check_resume(cfg)
    device, backend = resolve_device(cfg)
    with started(cfg, device) as dist:
        return _train(cfg, dist, backend, state)


def _train(cfg: TrainConfig, dist: Dist, backend: str, state: dict | None) -> dict:
    report = Report(enabled=dist.main and not cfg.quiet)
    if dist.device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)

    # 1. set-up
    t = time.time()
    task, train_set, test_set, dev_set = load_data(cfg)
    model, tok, processor, env = load_model(cfg, dist.device, backend)
    processes = f", {dist.world} processes ({'FSDP2' if dist.fsdp else 'DDP'})" if dist.world > 1 else ""
    report.phase("set-up", f"{describe_model(cfg, model)}; {describe_data(cfg, train_set, test_set)}; "
                 f"{dist.device.type}, {backend} kernels{processes}", time.time() - t)  # fmt: skip
    if cfg.resume and state is None:
        report.detail(f"--resume: no checkpoint in {cfg.output_dir} yet, so the run starts at step 0")

    # 2. warm start (computed once, on rank 0, and shared; resuming too: it is the frozen reference and teacher)
    t = time.time()
    warm = None
    if task is None:
        report.phase("warm start", "none (it is for the embedded task)")
    elif not cfg.warmstart:
        why = "a checkpoint is not warm-started again; --warmstart true does it" if (
            cfg.model_name_or_path is not None and cfg.warmstart_max_steps > 0) else "turned off"
        report.phase("warm start", f"none ({why})")
    else:
        report.phase("warm start", f"supervised on hinted and hint-free prompts until the hinted dev accuracy "
                     f"reaches {cfg.warmstart_hinted_min} (at most {cfg.warmstart_max_steps} steps)")
        warm = warm_start(model, env, task, report.detail) if dist.main else None
        warm = dist.broadcast_model(model, warm)
        seconds = time.time() - t
        report.seconds["warm start"] = round(seconds, 1)
        report.detail(f"done: {warm['steps']} steps; dev accuracy {warm['dev_accuracy']:.2f} without hint, "
                      f"{warm['dev_accuracy_hinted']:.2f} with the spatial hint ({seconds:.1f} s)")
    ref = ModelWithFusedHead(copy.deepcopy(model).eval().requires_grad_(False))  # frozen initial policy: KL, teacher
    vision_unused = is_vision_language(model) and task is None and train_set[0].image is None  # a text task
    policy = parallelize(ModelWithFusedHead(model), dist, trainable=True, unused_params=vision_unused)
    ref = parallelize(ref, dist, trainable=False)
    teacher_head = full_output_layer(ref) if cfg.teacher == "ref" else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # 3. evaluation before RL (or the state of the run resumed)
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    t = time.time()
    if state is not None:
        state = checkpoint.load(ckpt_dir, unwrap(policy), opt)
        start, evals = state["step"], state["evals"]
        if "held_out" not in evals:  # a checkpoint written before the curve was kept: its first point
            before = evals.get("accuracy_before")
            evals["held_out"] = [[0, before, evals["p_correct_before"]]] if before is not None else []
        if dist.main:  # drop the lines of steps after the checkpoint
            kept = []
            if os.path.exists(metrics_path):
                with open(metrics_path) as f:
                    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
            checkpoint.atomic_write_text("".join(kept), metrics_path)
        report.phase("evaluation before RL", f"from the checkpoint at step {start} (written by {state['world_size']} "
                     f"process(es), resumed by {dist.world}): {held_out_words(evals, 'before')}",
                     time.time() - t)  # fmt: skip
    else:
        start = 0
        evals = {"steps": 0, "eval_size": len(test_set)}
        if test_set:
            before = evaluate(unwrap(policy), env, test_set, dist=dist)
            evals.update(accuracy_before=before["accuracy"], p_correct_before=before["p_correct"],
                         held_out=[[0, before["accuracy"], before["p_correct"]]])  # fmt: skip
            if cfg.teacher_hint != "none" and (task is not None or any(ex.hints for ex in test_set)):
                hinted = evaluate(unwrap(policy), env, test_set, hint_kind=cfg.teacher_hint, dist=dist)
                evals["accuracy_hinted_before"] = hinted["accuracy"]
                evals["teacher_hint"] = f"the {cfg.teacher_hint}" if task is not None else "the dataset's"
        if warm is not None:
            evals["warmstart"] = warm
        if dist.main:
            os.makedirs(cfg.output_dir, exist_ok=True)  # the first write: a failed set-up leaves no folder
            checkpoint.atomic_write_text("", metrics_path)
        report.phase("evaluation before RL", held_out_words(evals, "before"), time.time() - t)

    # 4. RL
    t = time.time()
    report.phase("RL", f"steps {start + 1} to {cfg.max_steps}, {cfg.prompts_per_step} prompts × {cfg.group_size} "
                 f"rollouts each" if cfg.max_steps > start else "none (--max_steps 0)")  # fmt: skip
    bar = None
    if report.enabled and cfg.progress and cfg.max_steps > start:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc="      RL", dynamic_ncols=True, file=sys.stderr)
    rollouts = cfg.prompts_per_step * cfg.group_size
    eval_seconds = 0.0
    for step in range(start + 1, cfg.max_steps + 1):
        step_seed(cfg.seed, step, dist.rank)
        examples = sample_prompts(cfg, task, train_set, np.random.default_rng([cfg.seed, step]))
        m = rl_step(policy, ref, opt, env, dist.share(examples), teacher_head=teacher_head, dist=dist)
        m = {"step": step, **m}
        if test_set and cfg.eval_steps and step % cfg.eval_steps == 0 and step != cfg.max_steps:
            te = time.time()
            e = evaluate(unwrap(policy), env, test_set, dist=dist)
            m["eval_accuracy"], m["eval_p_correct"] = e["accuracy"], e["p_correct"]
            evals["held_out"].append([step, e["accuracy"], e["p_correct"]])
            eval_seconds += time.time() - te
        if dist.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
        if bar is not None:
            bar.update(1)
            fields = dict(reward=f"{m['reward_mean']:.2f}", ptd=f"{m['ptd_rollouts']}/{rollouts}",
                          jsd=f"{m['jsd']:.3f}")  # fmt: skip
            if "eval_accuracy" in m:
                fields["held_out"] = f"{m['eval_accuracy']:.2f}"
            bar.set_postfix(fields, refresh=False)
        if cfg.save_steps and step % cfg.save_steps == 0 and step != cfg.max_steps:
            save_checkpoint(ckpt_dir, policy, opt, step, evals, cfg, dist)
    if bar is not None:
        bar.close()
    if cfg.max_steps > start:
        rl_seconds = time.time() - t - eval_seconds
        report.seconds["RL"] = round(rl_seconds, 1)
        report.seconds["evaluations during RL"] = round(eval_seconds, 1)
        report.detail(f"done: {cfg.max_steps - start} steps in {rl_seconds:.1f} s "
                      f"({rl_seconds / (cfg.max_steps - start):.2f} s a step)")  # fmt: skip

    # 5. evaluation after RL
    t = time.time()
    if test_set and cfg.max_steps > start:
        after = evaluate(unwrap(policy), env, test_set, dist=dist)
        evals.update(accuracy_after=after["accuracy"], p_correct_after=after["p_correct"])
        evals["held_out"].append([cfg.max_steps, after["accuracy"], after["p_correct"]])
    elif test_set:  # no RL step: the model before is the model after
        evals.update(accuracy_after=evals["accuracy_before"], p_correct_after=evals["p_correct_before"])
    evals["steps"] = cfg.max_steps
    report.phase("evaluation after RL", held_out_words(evals, "after"), time.time() - t)

    # 6. saving: the last checkpoint (with the evaluation after RL), final/, curves.png, eval.json
    t = time.time()
    if cfg.max_steps > start:
        save_checkpoint(ckpt_dir, policy, opt, cfg.max_steps, evals, cfg, dist)
    state_dict = full_model_state(unwrap(policy), dist)  # every rank takes part under FSDP2
    written = []
    if dist.main:
        final = os.path.join(cfg.output_dir, "final")
        with _no_hf_progress_bar():  # its "Writing model shards" bar would interleave with the phase lines
            model.save_pretrained(final, state_dict=state_dict)
            (processor or tok).save_pretrained(final)
        warm_started = warm is not None or trained_marker(cfg.model_name_or_path or "").get("warm_started", False)
        marker = {"embedded": cfg.embedded_model(), "rl_steps": cfg.max_steps, "warm_started": warm_started,
                  "trained_by": dataclasses.asdict(cfg)}  # fmt: skip
        checkpoint.atomic_write_text(json.dumps(marker, indent=2) + "\n", os.path.join(final, TRAINED_MARKER))
        written = ["final/", "eval.json", "metrics.jsonl"]
        if cfg.plot:
            try:
                from .plots import plot_curves

                plot_curves(metrics_path, os.path.join(cfg.output_dir, "curves.png"), evals, run_title(cfg))
                written.append("curves.png")
            except Exception as e:  # a plot must never cost a finished run
                report.detail(f"plot failed: {e!r}")
    report.phase("saving", f"{', '.join(written)} in {cfg.output_dir}", time.time() - t)
    evals["seconds"] = dict(report.seconds)
    evals["seconds_this_process"] = round(time.time() - report.t0, 1)
    if dist.main:
        checkpoint.atomic_write_text(json.dumps(evals, indent=2) + "\n", os.path.join(cfg.output_dir, "eval.json"))
    return evals


@contextlib.contextmanager
def _no_hf_progress_bar():
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def save_checkpoint(ckpt_dir: str, policy, opt, step: int, evals: dict, cfg: TrainConfig, dist: Dist) -> None:
    state = {"step": step, "evals": evals, "world_size": dist.world, "config": dataclasses.asdict(cfg)}
    checkpoint.save(ckpt_dir, unwrap(policy), opt, state, dist)


def held_out_words(evals: dict, when: str) -> str:
    """The held-out numbers ``before`` or ``after`` RL, in words."""
    if evals.get(f"accuracy_{when}") is None:
        return "none (--eval_size 0)"
    text = (f"held-out accuracy {evals[f'accuracy_{when}']:.3f}, p(correct) {evals[f'p_correct_{when}']:.3f} "
            f"({evals.get('eval_size', '?')} prompts, greedy)")  # fmt: skip
    if when == "before" and "accuracy_hinted_before" in evals:
        text += f"; the teacher, with {evals.get('teacher_hint', 'its')} hint: {evals['accuracy_hinted_before']:.3f}"
    return text


def run_title(cfg: TrainConfig) -> str:
    """The run's setting in one line (the title of curves.png)."""
    model = "embedded tiny Qwen3-VL" if cfg.model_name_or_path is None else os.path.basename(
        os.path.normpath(cfg.model_name_or_path))
    task = "grid-count task" if cfg.dataset is None else os.path.basename(cfg.dataset)
    if cfg.ptd_coef == 0:
        method = "GRPO"
    else:
        jsd = "full-vocabulary JSD" if cfg.ptd_full_vocab else f"Top-{cfg.ptd_k} JSD"
        hint = f", {cfg.teacher_hint} hint" if cfg.dataset is None else ""
        method = f"PTD-PO (λ = {cfg.ptd_coef:g}, {jsd}{hint})"
    return (f"{method} · {model} · {task} · {cfg.prompts_per_step}×{cfg.group_size} rollouts/step, lr {cfg.lr:g}, "
            f"seed {cfg.seed}")
