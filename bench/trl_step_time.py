"""Step time of PTD-PO on TRL against stock TRL, on a tiny Qwen3 (CPU fp32 one thread, or CUDA bf16).

    python bench/trl_step_time.py [--beta 0.04] [--reps 3] [--steps 12] [--device cpu|cuda] [--out DIR]
                                  [--json FILE]

Three trainers with the same config, interleaved ``--reps`` times: stock ``GRPOTrainer`` (TRL 1.16
already computes its log-probs and entropy with its own fused ``ChunkedLogProbFunction``),
``GRPOTrainer`` on ptd's kernels (``use_ptd_kernels``) and ``PTDGRPOTrainer`` (λ = 0.05: the Top-K
JSD to the hinted teacher on top, which costs a teacher forward per step). A step is TRL's logged
``step_time``: generation, rewards, reference / teacher passes, loss and backward. The first two
steps of each run are dropped (warm-up). Prints, and with ``--out`` writes to
``DIR/trl_step_time[-<device>].{json,md}``, the median and mean ms/step and the load average (the
numbers move with it on a shared machine). ``--json FILE`` writes the same JSON to FILE after every
trainer's run, rows so far (what a GPU check keeps if its time runs out mid-way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from _tiny_hf import reward_by_length, save_tiny_qwen3, text_rows  # noqa: E402
from datasets import Dataset  # noqa: E402
from report_data import write_results  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from ptd_kernels.integrations.trl import use_ptd_kernels  # noqa: E402
from ptd_train.trl import PTDGRPOConfig, PTDGRPOTrainer  # noqa: E402

KINDS = ("stock GRPOTrainer", "GRPOTrainer + use_ptd_kernels", "PTDGRPOTrainer")


def step_times(kind: str, model_path: str, beta: float, steps: int, device: str) -> list[float]:
    cuda = device == "cuda"
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=16, bf16=cuda, report_to=[], use_cpu=not cuda, save_strategy="no", seed=0,
                  learning_rate=1e-3, logging_steps=1, disable_tqdm=True, max_steps=steps, beta=beta)
    ptd_po = kind == "PTDGRPOTrainer"
    args = PTDGRPOConfig(**common) if ptd_po else GRPOConfig(**common)
    trainer = (PTDGRPOTrainer if ptd_po else GRPOTrainer)(
        model=model_path, reward_funcs=reward_by_length, args=args, train_dataset=Dataset.from_list(text_rows(96)))
    if kind == "GRPOTrainer + use_ptd_kernels":
        use_ptd_kernels(trainer)
    trainer.train()
    return [h["step_time"] for h in trainer.state.log_history if "step_time" in h][2:]


def markdown(data) -> str:
    lines = [f"Tiny Qwen3 (hidden 32, 2 layers), 8 completions of ≤ 16 tokens per step (4 per prompt), "
             f"{data['device']} {data['dtype']}{', one thread' if data['device'] == 'cpu' else ''}, TRL "
             f"{data['trl']}, β (KL) {data['beta']}; {data['reps']} interleaved runs × {data['steps']} steps "
             f"(first 2 of each dropped); 1-min load average {data['load_start']} → {data['load_end']}.", "",
             "| trainer | median ms/step | mean ms/step | × stock (median) | steps |",
             "| --- | ---: | ---: | ---: | ---: |"]
    stock = data["rows"][KINDS[0]]["median_s"]
    for kind, r in data["rows"].items():
        lines.append(f"| {kind} | {r['median_s'] * 1e3:.1f} | {r['mean_s'] * 1e3:.1f} | {r['median_s'] / stock:.2f}× | "
                     f"{r['n']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beta", type=float, default=0.04, help="TRL's KL coefficient (> 0: a reference model)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: bf16 mixed precision")
    parser.add_argument("--out", default=None, help="folder to write trl_step_time[-cuda].{json,md} into")
    parser.add_argument("--json", default=None, help="a JSON file rewritten after every trainer's run")
    opts = parser.parse_args()
    if opts.device == "cpu":
        torch.set_num_threads(1)
    import trl

    load_start, start = os.getloadavg()[0], time.time()
    model_path = save_tiny_qwen3(tempfile.mkdtemp())
    times = {kind: [] for kind in KINDS}

    def results():
        return dict(device=opts.device, dtype="bf16" if opts.device == "cuda" else "fp32", trl=trl.__version__,
                    beta=opts.beta, reps=opts.reps, steps=opts.steps, load_start=round(load_start, 2),
                    load_end=round(os.getloadavg()[0], 2), wall_s=round(time.time() - start, 1),
                    rows={kind: dict(median_s=statistics.median(v), mean_s=statistics.mean(v), n=len(v), step_s=v)
                          for kind, v in times.items() if v})

    for _ in range(opts.reps):
        for kind in KINDS:
            times[kind] += step_times(kind, model_path, opts.beta, opts.steps, opts.device)
            if opts.json:
                with open(opts.json, "w") as f:
                    json.dump(results(), f, indent=1)
    data = results()
    md = markdown(data)
    print(md)
    if opts.out:
        write_results(opts.out, "trl_step_time" + ("" if opts.device == "cpu" else f"-{opts.device}"), data, md)


if __name__ == "__main__":
    main()
