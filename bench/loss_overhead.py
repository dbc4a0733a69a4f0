"""The fixed per-call cost of the trainer's loss at the default step's shape, in two source trees, paired.

    python bench/loss_overhead.py --old /tmp/ptd-old --new . [--old /tmp/older ...] [--rounds 30] [--calls 10]

The shape of ``python -m ptd_train.run``'s embedded default step (V = 71, H = 128; 64 rollouts × 4 tokens
= N = 256 rows, a teacher on 16 of the rollouts, K = 8, β = 0.5), where the loss's time is almost all fixed
per-call cost (Python and hundreds of tiny ATen calls), not GEMMs. Two calls, forward and backward, from
the same inputs (one seed), each with the trainer's logged parts:

- ``one-sweep``: ``linear_policy_loss`` with the trainer's ``grpo.policy_loss`` (``PolicyLoss``), then
  ``grpo.loss_parts``;
- ``per-row``: ``linear_ptd_terms`` and ``grpo.ptd_po_loss`` composed by autograd.

Each tree runs in a worker process of its own (``PYTHONPATH`` = the tree); the workers take turns in short
bursts of ``--calls`` calls, the order alternating by round, after a warm-up, so that load drift on a shared
machine hits both sides of a pair alike. The result per call is the median over rounds of new/old in the
workers' CPU time (one torch thread each) and in wall time, beside each side's median ms per call; each
``--old`` tree is paired with ``--new`` in the same rounds. A tree without ``linear_policy_loss`` or
``grpo.policy_loss`` runs the per-row call only. Writes ``<out>/loss_overhead.{json,md}`` with ``--out``. Run
it alone on the machine (e.g. under ``flock /tmp/ptd-cpu.lock``); the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from report_data import describe_tree

CALLS = ("one-sweep", "per-row")


def _calls():
    """call name → fn() running one call forward and backward, in whichever ptd_kernels is importable."""
    import torch

    import ptd_kernels as ptd
    from ptd_train import grpo

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rollouts, length, hidden_size, vocab, k = 64, 4, 128, 71, 8
    rows = rollouts * length
    weight = torch.randn(vocab, hidden_size) * 0.05
    hidden = torch.randn(rows, hidden_size)
    teacher_hidden = torch.randn(rows, hidden_size)
    teacher_weight = weight + 0.01 * torch.randn(vocab, hidden_size)
    mask = torch.ones(rollouts, length, dtype=torch.bool)
    mask[::3, 3] = False
    targets = torch.where(mask.reshape(-1), torch.randint(0, vocab, (rows,)), torch.full((rows,), -100))
    advantages = torch.randn(rollouts)
    in_ptd_set = torch.zeros(rollouts, dtype=torch.bool)
    in_ptd_set[:16] = True
    jsd_mask = in_ptd_set[:, None].expand(rollouts, length).reshape(-1)
    ref_logprobs = -torch.rand(rollouts, length) * 3

    def leaves():
        return hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)

    def per_row():
        h, w = leaves()
        terms = ptd.linear_ptd_terms(h, w, targets, teacher_hidden, teacher_weight, k, beta=0.5, jsd_mask=jsd_mask)
        logp = terms.logp.view(rollouts, length)
        parts = grpo.ptd_po_loss(logp, logp.detach(), ref_logprobs, advantages, mask, terms.jsd.view(rollouts, length),
                                 in_ptd_set, ~in_ptd_set, kl_coef=0.01, ptd_coef=1.0, eps_low=0.2, eps_high=0.3,
                                 token_count=mask.sum(), ptd_token_count=(mask & in_ptd_set[:, None]).sum())
        parts.loss.backward()

    calls = {"per-row": per_row}
    if hasattr(ptd, "linear_policy_loss") and hasattr(grpo, "policy_loss"):
        loss_fn = grpo.policy_loss(advantages, mask, ref_logprobs, ~in_ptd_set, kl_coef=0.01, ptd_coef=1.0,
                                   in_ptd_set=in_ptd_set)

        def one_sweep():
            h, w = leaves()
            loss, terms = ptd.linear_policy_loss(h, w, targets, teacher_hidden, teacher_weight, k, row_loss=loss_fn,
                                                 beta=0.5, jsd_mask=jsd_mask, return_terms=True)
            grpo.loss_parts(loss, loss_fn, terms.logp, terms.entropy, terms.jsd).loss.backward()

        calls["one-sweep"] = one_sweep
    return calls


def _worker() -> None:
    """Read ``<call> <count>`` lines; answer each with ``<wall ms> <cpu ms>`` per call (or ``-`` if absent)."""
    calls = _calls()
    for line in sys.stdin:
        name, count = line.split()
        fn = calls.get(name)
        if fn is None:
            print("-", flush=True)
            continue
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(int(count)):
            fn()
        print(f"{(time.perf_counter() - wall) / int(count) * 1e3} {(time.thread_time() - cpu) / int(count) * 1e3}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", action="append", required=True,
                        help="a tree whose ptd_kernels is a baseline (repeat for several, each paired with --new)")
    parser.add_argument("--new", required=True)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=10, help="calls per burst")
    parser.add_argument("--out", default=None, help="write <out>/loss_overhead.{json,md}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker()
    trees = {"new": os.path.abspath(args.new), **{f"old {i + 1}": os.path.abspath(t) for i, t in enumerate(args.old)}}
    workers = {side: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--old", tree, "--new",
                                       tree], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tree,
                                      env={**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"})
               for side, tree in trees.items()}

    def burst(side: str, call: str, count: int):
        workers[side].stdin.write(f"{call} {count}\n")
        workers[side].stdin.flush()
        answer = workers[side].stdout.readline().split()
        if not answer:
            raise SystemExit(f"the {side} worker ({trees[side]}) stopped")
        return None if answer == ["-"] else [float(x) for x in answer]

    load_before = os.getloadavg()
    started = time.time()
    for side in trees:  # warm-up, not counted
        for call in CALLS:
            burst(side, call, 3 * args.calls)
    times = {(side, call): [] for side in trees for call in CALLS}
    sides = list(trees)
    for r in range(args.rounds):
        for call in CALLS:
            for side in (sides if r % 2 == 0 else sides[::-1]):
                times[(side, call)].append(burst(side, call, args.calls))
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    load_after = os.getloadavg()
    rows = []
    for side in sides[1:]:
        for call in CALLS:
            old, new = times[(side, call)], times[("new", call)]
            if any(t is None for t in old + new):
                rows.append({"call": call, "old": describe_tree(trees[side]), "present": False})
                continue
            rows.append({"call": call, "old": describe_tree(trees[side]), "present": True,
                         "old_ms": statistics.median(o[1] for o in old), "new_ms": statistics.median(n[1] for n in new),
                         "cpu_ratio": statistics.median(n[1] / o[1] for o, n in zip(old, new)),
                         "wall_ratio": statistics.median(n[0] / o[0] for o, n in zip(old, new))})
    lines = [f"Measured: the trainer's loss call (forward, logged parts, backward) at the default step's shape "
             f"(V = 71, H = 128, N = 256 rows, a teacher on 16 of 64 rollouts, K = 8), each tree in its own worker "
             f"process, {args.rounds} interleaved rounds × {args.calls} calls per tree after a warm-up, one torch "
             f"thread, CPU time per call; {time.time() - started:.0f} s in all; 1-min load average "
             f"{load_before[0]:.2f} → {load_after[0]:.2f}.", "", f"new: {describe_tree(trees['new'])}", "",
             "| call | baseline | baseline ms | new ms | new / baseline CPU (median of rounds) | new / baseline wall |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if not row["present"]:
            lines.append(f"| {row['call']} | {row['old']} | — | — | (the baseline has no such call) | |")
            continue
        lines.append(f"| {row['call']} | {row['old']} | {row['old_ms']:.2f} | {row['new_ms']:.2f} | "
                     f"{row['cpu_ratio']:.3f} | {row['wall_ratio']:.3f} |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "loss_overhead.json"), "w") as f:
            json.dump({"rounds": args.rounds, "calls": args.calls, "load_before": load_before,
                       "load_after": load_after, "new": describe_tree(trees["new"]), "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "loss_overhead.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
