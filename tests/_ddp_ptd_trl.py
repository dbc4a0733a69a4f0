"""Run by tests/training/test_train_trl.py under torch.distributed.run: PTD-PO on TRL, 2 CPU processes (gloo).

argv: tiny model directory, output directory. Each rank writes rank{r}.json with its parameters
(a slice) and its logged PTD metrics.
"""

import json
import os
import sys
import tempfile

import torch
from _tiny_hf import flat_params, reward_by_length, text_rows
from datasets import Dataset

from ptd_train.trl import PTDGRPOConfig, PTDGRPOTrainer


def main(model_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    args = PTDGRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=5, bf16=False, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                         learning_rate=1e-2, logging_steps=1, disable_tqdm=True, max_steps=2, ptd_k=6,
                         ddp_backend="gloo")
    trainer = PTDGRPOTrainer(model=model_path, reward_funcs=reward_by_length, args=args,
                             train_dataset=Dataset.from_list(text_rows(8)))
    trainer.train()
    assert trainer.accelerator.num_processes == 2
    history = trainer.state.log_history
    result = {
        "params": flat_params(trainer.model)[:2000].tolist(),
        "jsd": [h["ptd/jsd"] for h in history if "ptd/jsd" in h],
        "rollouts": [h["ptd/rollouts"] for h in history if "ptd/rollouts" in h],
    }
    with open(os.path.join(out_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
