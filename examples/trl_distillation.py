"""TRL's DistillationTrainer on ptd's kernels: TRL's generalized JSD (same β) through ptd, or with
``topk=K`` PTD-PO's Top-K JSD (union support, tail atom), with no [B, T, V] logits of either model.
Needs the trl extra (pip install -e ".[trl]").

    python examples/trl_distillation.py                                    # tiny local student and teacher
    python examples/trl_distillation.py Qwen/Qwen3-0.6B Qwen/Qwen3-1.7B    # models of your own (same vocabulary)
"""

import sys
import tempfile

import torch
from datasets import Dataset
from trl import DistillationConfig, DistillationTrainer

from ptd_kernels.integrations.trl import use_ptd_kernels
from ptd_train.tiny_checkpoint import make_checkpoint

model_id = sys.argv[1] if len(sys.argv) > 1 else make_checkpoint(tempfile.mkdtemp(), "text")
teacher_id = sys.argv[2] if len(sys.argv) > 2 else make_checkpoint(tempfile.mkdtemp(), "text", seed=1)
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "what is two plus three"}]}] * 8)

# None: TRL's full JSD through ptd; 16: the Top-K JSD, which TRL does not have (K = 100 on a real
# vocabulary; the tiny model's has 86 words, and K ≥ V gives the full JSD)
for topk in (None, 16):
    args = DistillationConfig(output_dir=tempfile.mkdtemp(), beta=0.5, max_completion_length=8,
                              per_device_train_batch_size=4, max_steps=2, logging_steps=1, report_to=[],
                              bf16=torch.cuda.is_available())  # TRL defaults to bf16: off on a CPU
    trainer = DistillationTrainer(model=model_id, teacher_model=teacher_id, train_dataset=dataset, args=args)
    use_ptd_kernels(trainer, topk=topk).train()
    losses = [round(log["loss"], 4) for log in trainer.state.log_history if "loss" in log]
    print(f"{'full JSD' if topk is None else f'Top-K JSD, K={topk}'}: loss per step {losses}")
