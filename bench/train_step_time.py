"""Step time of the trainer (``python -m ptd_train.run``): one process vs two data-parallel processes.

    python bench/train_step_time.py [--steps 40] [--reps 3] [--out bench/results] [--device cpu|cuda]

The embedded default (tiny Qwen3-VL, 8 prompts × 8 rollouts per step, PTD-PO with the defaults),
from one cached warm start (computed once, first, outside the timings), run ``--reps`` times in
each set-up, interleaved: one process; ``torchrun --nproc_per_node 2`` with DDP; the same with
``--fsdp true`` (FSDP2). On CPU every process has one torch thread (the trainer's default) and the
process group is gloo. A step's time is the ``seconds`` that rank 0 writes to ``metrics.jsonl``
(sampling, rewards, reference and teacher passes, loss, backward, optimizer step; with two
processes it includes waiting for the other rank's collectives); the first 2 steps of each run are
dropped. ``--device cuda`` makes one single-process run on the GPU (bf16 autocast): a single GPU
cannot host two NCCL ranks, so its 2-process rows are skipped. Writes
``<out>/train_step_time[-cuda].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from report_data import write_results

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETUPS = [("1 process", 1, False), ("2 processes, DDP", 2, False), ("2 processes, FSDP2", 2, True)]
WARMUP_STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, fsdp: bool, steps: int, device: str, warmstart_dir: str, log) -> dict:
    """One training run; returns rank 0's per-step seconds and the run's wall time (start-up included)."""
    out_dir = tempfile.mkdtemp(prefix="ptd_step_time_")
    args = ["--max_steps", str(steps), "--device", device, "--eval_size", "8", "--eval_steps", "0", "--save_steps",
            "0", "--no_progress", "--no_plot", "--warmstart_dir", warmstart_dir, "--output_dir", out_dir]
    if fsdp:
        args += ["--fsdp", "true"]
    if world == 1:
        cmd = [sys.executable, "-m", "ptd_train.run", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(_free_port()), "-m", "ptd_train.run", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    start = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.time() - start
    if done.returncode:
        log(done.stderr[-3000:])
        raise SystemExit(f"training run failed: {' '.join(cmd)}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        seconds = [json.loads(line)["seconds"] for line in f if line.strip()]
    return dict(step_s=seconds[WARMUP_STEPS:], wall_s=wall)


def markdown(data) -> str:
    dev = data["device"]
    lines = [f"`python -m ptd_train.run` (embedded default: tiny Qwen3-VL, 8 prompts × 8 rollouts per step), "
             f"{dev}{' (bf16 autocast)' if dev == 'cuda' else ', one torch thread per process, gloo'}; "
             f"{data['reps']} interleaved runs × {data['steps']} steps per set-up (first {WARMUP_STEPS} of each "
             f"dropped), one cached warm start; 1-min load average {data['load_start']} → {data['load_end']}.", "",
             "| set-up | median s/step | mean s/step | × 1 process (median) | wall per run, start-up included |",
             "| --- | ---: | ---: | ---: | ---: |"]
    base = data["rows"]["1 process"]["median_s"]
    for label, r in data["rows"].items():
        walls = ", ".join(f"{w:.1f}" for w in r["wall_s"])
        lines.append(f"| {label} | {r['median_s']:.3f} | {r['mean_s']:.3f} | {r['median_s'] / base:.2f}× | "
                     f"{walls} s |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--warmstart_dir", default=None, help="warm-start cache (default: a temporary folder)")
    opts = parser.parse_args(argv)

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    setups = SETUPS if opts.device == "cpu" else SETUPS[:1]
    warmstart_dir = opts.warmstart_dir or tempfile.mkdtemp(prefix="ptd_warmstart_")
    load_start, start = os.getloadavg()[0], time.time()
    log("warm start (once, not timed) …")
    run(1, False, 1, opts.device, warmstart_dir, log)
    rows = {label: dict(step_s=[], wall_s=[]) for label, _, _ in setups}
    for rep in range(opts.reps):
        for label, world, fsdp in setups:
            log(f"[{time.time() - start:.0f}s] rep {rep + 1}: {label}")
            r = run(world, fsdp, opts.steps, opts.device, warmstart_dir, log)
            rows[label]["step_s"] += r["step_s"]
            rows[label]["wall_s"].append(round(r["wall_s"], 1))
    for r in rows.values():
        r.update(median_s=statistics.median(r["step_s"]), mean_s=statistics.mean(r["step_s"]))
    data = dict(device=opts.device, steps=opts.steps, reps=opts.reps, load_start=round(load_start, 2),
                load_end=round(os.getloadavg()[0], 2), wall_s=round(time.time() - start, 1), rows=rows)
    md = markdown(data)
    print(md)
    write_results(opts.out, "train_step_time" + ("" if opts.device == "cpu" else f"-{opts.device}"), data, md)


if __name__ == "__main__":
    main()
