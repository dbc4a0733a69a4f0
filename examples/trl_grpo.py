"""TRL's GRPOTrainer on ptd's kernels: the policy's and the reference's log-probs and the entropy
come from ptd, without TRL's [B, T, V] logits chunks. Needs the trl extra (pip install -e ".[trl]").

    python examples/trl_grpo.py                    # a tiny local model, made on the spot (seconds on a CPU)
    python examples/trl_grpo.py Qwen/Qwen3-0.6B    # a model of your own
"""

import sys
import tempfile

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from ptd_kernels.integrations.trl import use_ptd_kernels
from ptd_train.tiny_checkpoint import make_checkpoint

model_id = sys.argv[1] if len(sys.argv) > 1 else make_checkpoint(tempfile.mkdtemp(), "text")
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "what is two plus three"}]}] * 8)


def reward_len(completions, **kwargs):  # longer answers score higher, up to 10 words
    return [min(len(c[0]["content"].split()), 10) / 10 for c in completions]


args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=8, max_steps=2, logging_steps=1, report_to=[],
                  bf16=torch.cuda.is_available())  # TRL defaults to bf16, which a CPU-only run must turn off
trainer = use_ptd_kernels(GRPOTrainer(model=model_id, reward_funcs=reward_len, args=args, train_dataset=dataset))
trainer.train()
for log in trainer.state.log_history[:-1]:
    print(f"step {log['step']}: loss {log['loss']:.4f}, reward {log['reward']:.3f}, entropy {log['entropy']:.3f}")
