"""PTD-PO on TRL: PTDGRPOTrainer is GRPOTrainer plus λ·Top-K JSD toward a hinted teacher on failed
rollouts. The teacher is the frozen initial policy reading the prompt with its hint; the student
never sees the hint. Needs the trl extra (pip install -e ".[trl]").

    python examples/trl_ptd_po.py                    # a tiny local model, made on the spot
    python examples/trl_ptd_po.py Qwen/Qwen3-0.6B    # a model of your own
"""

import sys
import tempfile

import torch
from datasets import Dataset

from ptd_train.tiny_checkpoint import make_checkpoint
from ptd_train.trl import PTDGRPOConfig, PTDGRPOTrainer

model_id = sys.argv[1] if len(sys.argv) > 1 else make_checkpoint(tempfile.mkdtemp(), "text")
# a hint per prompt (None where there is none) and the answer, which the hint must not contain
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "what is two plus three"}],
                              "hint": "add the two numbers", "answer": "five"}] * 8)


def correct(completions, answer, **kwargs):  # verifiable reward: 1 if the answer is in the completion
    return [float(a in c[0]["content"].split()) for c, a in zip(completions, answer)]


args = PTDGRPOConfig(output_dir=tempfile.mkdtemp(), ptd_coef=0.05, per_device_train_batch_size=4, num_generations=4,
                     ptd_k=16,  # the tiny model's vocabulary has 86 words; on a real one keep the default, 100
                     max_completion_length=8, max_steps=2, logging_steps=1, report_to=[],
                     bf16=torch.cuda.is_available())  # TRL defaults to bf16, which a CPU-only run must turn off
trainer = PTDGRPOTrainer(model=model_id, reward_funcs=correct, args=args, train_dataset=dataset)
trainer.train()
for log in trainer.state.log_history[:-1]:
    print(f"step {log['step']}: reward {log['reward']:.2f}, rollouts in the PTD set {log['ptd/rollouts']:g}, "
          f"Top-K JSD {log['ptd/jsd']:.2e}, top-K overlap {log['ptd/overlap']:.2f}, "
          f"teacher mass on the support {log['ptd/teacher_mass']:.3f}")
