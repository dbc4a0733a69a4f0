"""The trainer's RL step (``python -m ptd_train.run``, the embedded default) in two source trees, paired.

    python bench/train_step_paired.py --old /tmp/ptd-old --new . [--steps 12] [--reps 3]

Each rep runs the same command once per tree (PYTHONPATH = the tree), the order alternating by rep, one
process, one torch thread (the trainer's default), from one cached warm start computed first (not timed).
A step's time is the ``seconds`` rank 0 writes to ``metrics.jsonl`` (sampling, rewards, reference and
teacher passes, the loss and its backward, the optimizer step); the first 2 steps of each run are
dropped. The result is the median over reps of new/old (each run's median step), beside each tree's
pooled median. Writes ``<out>/train_step_paired.{json,md}`` when ``--out`` is given. Run it alone on the
machine (e.g. under ``flock /tmp/ptd-cpu.lock``); the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from report_data import write_results

WARMUP_STEPS = 2


def run(tree: str, steps: int, warmstart_dir: str) -> list[float]:
    """One single-process training run of the embedded default from ``tree``: its per-step seconds."""
    out_dir = tempfile.mkdtemp(prefix="ptd_step_paired_")
    cmd = [sys.executable, "-m", "ptd_train.run", "--max_steps", str(steps), "--device", "cpu", "--eval_size", "8",
           "--eval_steps", "0", "--save_steps", "0", "--no_progress", "--no_plot", "--warmstart_dir", warmstart_dir,
           "--output_dir", out_dir]
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, cwd=os.path.abspath(tree))
    if done.returncode:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"training run failed in {tree}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["seconds"] for line in f if line.strip()][WARMUP_STEPS:]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True)
    parser.add_argument("--new", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    warmstart_dir = tempfile.mkdtemp(prefix="ptd_warmstart_")
    load_start = os.getloadavg()[0]
    for tree in (opts.old, opts.new):  # the warm start, once per tree (a cache hit when the code agrees)
        run(tree, WARMUP_STEPS + 1, warmstart_dir)
    steps = {"old": [], "new": []}
    ratios = []
    for rep in range(opts.reps):
        order = ("old", "new") if rep % 2 == 0 else ("new", "old")
        medians = {}
        for side in order:
            seconds = run(getattr(opts, side), opts.steps, warmstart_dir)
            steps[side] += seconds
            medians[side] = statistics.median(seconds)
            print(f"rep {rep + 1} {side}: median {medians[side]:.3f} s/step", file=sys.stderr, flush=True)
        ratios.append(medians["new"] / medians["old"])
    data = dict(steps=opts.steps, reps=opts.reps, load_start=round(load_start, 2),
                load_end=round(os.getloadavg()[0], 2), old_median_s=statistics.median(steps["old"]),
                new_median_s=statistics.median(steps["new"]), ratios=[round(r, 4) for r in ratios],
                median_ratio=statistics.median(ratios), seconds=steps)
    md = (f"`python -m ptd_train.run` (embedded default), CPU, one thread; {opts.reps} paired reps × {opts.steps} "
          f"steps (first {WARMUP_STEPS} dropped); 1-min load {data['load_start']} → {data['load_end']}.\n\n"
          "| tree | median s/step |\n| --- | ---: |\n"
          f"| old | {data['old_median_s']:.3f} |\n| new | {data['new_median_s']:.3f} |\n\n"
          f"new / old, median over reps: {data['median_ratio']:.3f} (per rep: "
          f"{', '.join(f'{r:.3f}' for r in ratios)})\n")
    print(md)
    if opts.out:
        write_results(opts.out, "train_step_paired", data, md)
    return data


if __name__ == "__main__":
    main()
