"""The trainer's RL step with its loss from one sweep vs from the per-row path, paired, in one tree.

    python bench/train_step_loss_path.py [--vocab 71 32768] [--steps 30] [--reps 6] [--replay 300] [--out DIR]

``python -m ptd_train.run`` forms the PTD-PO loss with ``ptd_kernels.linear_policy_loss`` (one sweep: the
student's and the teacher's logits GEMMs and the two gradient GEMMs, 4 in all). This script runs the same
training twice per rep, the order alternating by rep: as is, and with the per-row path the trainer takes
for a served teacher (``linear_ptd_terms`` for log-prob, entropy and Top-K JSD, then the loss through
autograd: 5 GEMMs, the extra one the recompute of the backward). Everything else in the step — sampling,
rewards, the teacher's and reference's passes, the backbone's backward, the optimizer — is the same code,
so the difference between the two is what the one sweep saves in a real step.

Vocabularies: ``71`` is the embedded default (the tiny Qwen3-VL and its word-level tokenizer, from one
cached warm start). A larger value runs the same model shape (H = 128, 2 layers) as a local checkpoint
whose tokenizer is the embedded task's words padded with unused words to that many tokens — a random
initialisation (``--ptd_k 8``, the checkpoint defaults otherwise), where every group fails and every
rollout is in the PTD set: the output layer's share of the step is that of a real vocabulary.

Whole runs differ by a few percent from run to run, more than the embedded default's loss can save, so
``--replay`` also times that step on one fixed batch, in one process, the two paths alternating and the model
and optimizer restored before each step: the mean of the paired differences, with its standard error.

One process, one torch thread (the trainer's default); a step's time is the ``seconds`` that
``metrics.jsonl`` records; the first 2 steps of a run are dropped. Run it alone on the machine (e.g. under
``flock /tmp/ptd-cpu.lock``); the load average is recorded. Writes ``<out>/train_step_loss_path.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from report_data import describe_tree, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WARMUP_STEPS = 2
EMBEDDED_VOCAB = 71
PATHS = ("one sweep", "per row")
# the child process: the trainer, with its loss path forced to the per-row one when asked
CHILD = ("import sys\nimport ptd_train.trainer as trainer\n"
         "if sys.argv[1] == 'per row':\n"
         "    trainer.one_sweep_loss = lambda cfg, teacher_topk: False\n"
         "from ptd_train.run import main\nmain(sys.argv[2:])\n")


def padded_checkpoint(vocab: int, folder: str) -> str:
    """The embedded model's shape, randomly initialised, with the embedded task's tokenizer padded to ``vocab``
    words, saved in ``folder``."""
    sys.path.insert(0, ROOT)
    from ptd_train.model import build_tiny_model
    from ptd_train.prompts import build_tokenizer
    from ptd_train.tasks import GridCountTask

    tok = build_tokenizer(list(GridCountTask.words))
    padding = vocab - len(tok.get_vocab())
    if padding < 0:
        raise SystemExit(f"--vocab {vocab}: the embedded task alone has {len(tok.get_vocab())} tokens")
    tok = build_tokenizer(list(GridCountTask.words) + [f"<unused_{i}>" for i in range(padding)])
    model = build_tiny_model(tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run(path: str, steps: int, model_args: list[str]) -> list[float]:
    """One single-process training run with the loss from ``path``: its per-step seconds."""
    out_dir = tempfile.mkdtemp(prefix="ptd_loss_path_")
    args = ["--max_steps", str(steps), "--device", "cpu", "--eval_size", "8", "--eval_steps", "0", "--save_steps",
            "0", "--no_progress", "--no_plot", "--output_dir", out_dir, *model_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, path, *args], env=env, capture_output=True, text=True,
                          timeout=3600, cwd=ROOT)
    if done.returncode:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"training run failed ({path})")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["seconds"] for line in f if line.strip()][WARMUP_STEPS:]


def measure(vocab: int, steps: int, reps: int, scratch: str) -> dict:
    """Paired reps of both loss paths at one vocabulary size."""
    if vocab == EMBEDDED_VOCAB:
        model_args = ["--warmstart_dir", os.path.join(scratch, "warmstart")]
        run(PATHS[0], WARMUP_STEPS + 1, model_args)  # computes the warm start once, outside the timings
    else:
        model_args = ["--model_name_or_path", padded_checkpoint(vocab, os.path.join(scratch, f"vocab{vocab}")),
                      "--ptd_k", "8"]
    seconds = {path: [] for path in PATHS}
    ratios = []
    for rep in range(reps):
        medians = {}
        for path in (PATHS if rep % 2 == 0 else PATHS[::-1]):
            step_seconds = run(path, steps, model_args)
            seconds[path] += step_seconds
            medians[path] = statistics.median(step_seconds)
            print(f"V={vocab} rep {rep + 1} {path}: median {medians[path]:.4f} s/step", file=sys.stderr, flush=True)
        ratios.append(medians["one sweep"] / medians["per row"])
    return dict(vocab=vocab, median_s={path: statistics.median(seconds[path]) for path in PATHS},
                ratios=[round(r, 4) for r in ratios], median_ratio=statistics.median(ratios), seconds=seconds)


def replay(pairs: int, scratch: str) -> dict:
    """The embedded default's RL step on one fixed batch — the same prompts and rollouts, the model and the
    optimizer restored before each step — with the loss from each path in turn, ``pairs`` times each, in this
    process: the same work every time, so the paired difference is the loss path's alone (the sampling,
    identical for both paths, is left out by giving the rollouts)."""
    sys.path.insert(0, ROOT)
    import copy

    import numpy as np
    import torch

    from ptd_train import trainer
    from ptd_train.config import TrainConfig
    from ptd_train.distributed import full_output_layer
    from ptd_train.model import ModelWithFusedHead
    from ptd_train.rollout import generate
    from ptd_train.warmstart import warm_start

    torch.set_num_threads(1)
    cfg = TrainConfig(output_dir=os.path.join(scratch, "replay"), device="cpu",
                      warmstart_dir=os.path.join(scratch, "warmstart")).resolved()
    task, train_set, _, _ = trainer.load_data(cfg)
    model, _, _, env = trainer.load_model(cfg, torch.device("cpu"), "torch")
    warm_start(model, env, task, log=lambda *args: None)
    ref = ModelWithFusedHead(copy.deepcopy(model).eval().requires_grad_(False))
    policy = ModelWithFusedHead(model)
    teacher_head = full_output_layer(ref)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(0)
    examples = trainer.sample_prompts(cfg, task, train_set, np.random.default_rng(0))
    x = env.prompts(examples).select([i // cfg.group_size for i in range(len(examples) * cfg.group_size)])
    rollouts = generate(policy, env, x, greedy=False)
    start = copy.deepcopy(policy.state_dict())
    chosen = {"path": PATHS[0]}
    trainer.one_sweep_loss = lambda cfg, teacher_topk: chosen["path"] == "one sweep"
    seconds = {path: [] for path in PATHS}
    ptd_rollouts = None
    for pair in range(pairs + 2):  # the first 2 pairs warm up
        for path in (PATHS if pair % 2 == 0 else PATHS[::-1]):
            policy.load_state_dict(start)
            opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            chosen["path"] = path
            torch.manual_seed(pair)
            metrics = trainer.rl_step(policy, ref, opt, env, examples, teacher_head=teacher_head, rollouts=rollouts)
            ptd_rollouts = metrics["ptd_rollouts"]
            if pair >= 2:
                seconds[path].append(metrics["seconds"])
    differences = [one - per for one, per in zip(seconds["one sweep"], seconds["per row"])]
    spread = statistics.stdev(differences) / len(differences) ** 0.5
    return dict(pairs=pairs, ptd_rollouts=ptd_rollouts, rollouts=len(examples) * cfg.group_size,
                median_s={path: statistics.median(seconds[path]) for path in PATHS},
                mean_difference_s=statistics.mean(differences), standard_error_s=spread,
                median_difference_s=statistics.median(differences), seconds=seconds)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[EMBEDDED_VOCAB, 32768])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--replay", type=int, default=300, metavar="PAIRS",
                        help="pairs of replayed default steps (0: none)")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ptd_loss_path_") as scratch:
        replayed = replay(opts.replay, scratch) if opts.replay else None
        rows = [measure(vocab, opts.steps, opts.reps, scratch) for vocab in opts.vocab]
    data = dict(tree=describe_tree(ROOT), steps=opts.steps, reps=opts.reps, load_start=round(load_start, 2),
                load_end=round(os.getloadavg()[0], 2), replay=replayed, rows=rows)
    lines = [f"`python -m ptd_train.run`, CPU, one thread: the step with its loss from one sweep vs the per-row path, "
             f"{opts.reps} paired reps × {opts.steps} steps per path (first {WARMUP_STEPS} dropped); 1-min load "
             f"{data['load_start']} → {data['load_end']}; {data['tree']}. Measured.", "",
             "| vocabulary | one sweep, median s/step | per row, median s/step | saved per step | "
             "one sweep / per row (median of paired reps) |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        one, per = row["median_s"]["one sweep"], row["median_s"]["per row"]
        name = f"{row['vocab']} (embedded default)" if row["vocab"] == EMBEDDED_VOCAB else f"{row['vocab']} (padded)"
        lines.append(f"| {name} | {one:.4f} | {per:.4f} | {1e3 * (per - one):.1f} ms | {row['median_ratio']:.3f} "
                     f"({', '.join(f'{r:.3f}' for r in row['ratios'])}) |")
    if replayed:
        one, per = replayed["median_s"]["one sweep"], replayed["median_s"]["per row"]
        lines += ["", f"The embedded default's step replayed on one fixed batch ({replayed['rollouts']} rollouts, "
                  f"{replayed['ptd_rollouts']} in the PTD set; model and optimizer restored before each step; "
                  f"sampling left out), {replayed['pairs']} pairs in one process:", "",
                  "| one sweep, median s/step | per row, median s/step | one sweep − per row, mean of pairs ± "
                  "standard error |", "| ---: | ---: | ---: |",
                  f"| {one:.4f} | {per:.4f} | {1e3 * replayed['mean_difference_s']:+.2f} ± "
                  f"{1e3 * replayed['standard_error_s']:.2f} ms |"]
    md = "\n".join(lines) + "\n"
    print(md)
    if opts.out:
        write_results(opts.out, "train_step_loss_path", data, md)
    return data


if __name__ == "__main__":
    main()
