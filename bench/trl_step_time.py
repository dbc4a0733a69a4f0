"""Step time of PTD-PO on TRL against stock TRL, on a tiny Qwen3 (CPU, fp32, one thread).

    python bench/trl_step_time.py [--beta 0.04] [--reps 3] [--steps 12]

Three trainers with the same config, interleaved ``--reps`` times: stock ``GRPOTrainer``,
``GRPOTrainer`` on ptd's kernels (``use_ptd_kernels``) and ``PTDGRPOTrainer`` (λ = 0.05).
A step is TRL's logged ``step_time``: generation, rewards, reference / teacher passes, loss
and backward. The first two steps of each run are dropped (warm-up). Prints the median and
mean ms/step and the machine's load average (the numbers move with it on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from _tiny_hf import reward_by_length, save_tiny_qwen3, text_rows  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from ptd_kernels.integrations.trl import use_ptd_kernels  # noqa: E402
from ptd_train.trl import PTDGRPOConfig, PTDGRPOTrainer  # noqa: E402

KINDS = ("stock GRPOTrainer", "GRPOTrainer + use_ptd_kernels", "PTDGRPOTrainer")


def step_times(kind: str, model_path: str, beta: float, steps: int) -> list[float]:
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=16, bf16=False, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                  learning_rate=1e-3, logging_steps=1, disable_tqdm=True, max_steps=steps, beta=beta)
    ptd_po = kind == "PTDGRPOTrainer"
    args = PTDGRPOConfig(**common) if ptd_po else GRPOConfig(**common)
    trainer = (PTDGRPOTrainer if ptd_po else GRPOTrainer)(
        model=model_path, reward_funcs=reward_by_length, args=args, train_dataset=Dataset.from_list(text_rows(96)))
    if kind == "GRPOTrainer + use_ptd_kernels":
        use_ptd_kernels(trainer)
    trainer.train()
    return [h["step_time"] for h in trainer.state.log_history if "step_time" in h][2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beta", type=float, default=0.04, help="TRL's KL coefficient (> 0: a reference model)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    model_path = save_tiny_qwen3(tempfile.mkdtemp())
    times = {kind: [] for kind in KINDS}
    for _ in range(opts.reps):
        for kind in KINDS:
            times[kind] += step_times(kind, model_path, opts.beta, opts.steps)
    print(f"load average {os.getloadavg()[0]:.2f}, beta {opts.beta}")
    stock = statistics.median(times[KINDS[0]])
    for kind, values in times.items():
        median = statistics.median(values)
        print(f"{kind:31s} median {median * 1e3:6.1f} ms/step  mean {statistics.mean(values) * 1e3:6.1f}  "
              f"({median / stock:.2f}× stock, n={len(values)})")


if __name__ == "__main__":
    main()
