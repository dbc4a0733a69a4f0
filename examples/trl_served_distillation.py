"""TRL's ServerDistillationTrainer (the teacher behind a server returning its top-k ids and log-probs per
position) with ptd's student side: the student's log-probs at the teacher's candidates from one fused
sweep of its output layer, never a [B, T, V] logits tensor. Needs the trl extra (pip install -e ".[trl]").

    python examples/trl_served_distillation.py                          # tiny student, in-process stand-in teacher
    python examples/trl_served_distillation.py MODEL http://host:8000   # a model of yours and a vLLM teacher server

With no server URL, ptd_train.teacher_server.LocalTeacherServer answers TRL's client call in-process from a
tiny local teacher (what a vLLM server started on the teacher checkpoint would return).
"""

import sys
import tempfile

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

from ptd_kernels.integrations.trl import use_ptd_kernels
from ptd_train.tiny_checkpoint import make_checkpoint

model_id = sys.argv[1] if len(sys.argv) > 1 else make_checkpoint(tempfile.mkdtemp(), "text")
server_url = sys.argv[2] if len(sys.argv) > 2 else None
if server_url is None:  # the stand-in teacher server: TRL's client is answered in-process
    import trl.generation.vllm_client as vllm_client

    from ptd_train.teacher_server import LocalTeacherServer

    teacher = AutoModelForCausalLM.from_pretrained(make_checkpoint(tempfile.mkdtemp(), "text", seed=1)).eval()
    stand_in = LocalTeacherServer(teacher.requires_grad_(False), pad_token_id=teacher.config.pad_token_id or 0)
    vllm_client.VLLMClient = lambda *args, **kwargs: stand_in

dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "what is two plus three"}]}] * 8)
# β = 0: the teacher's top-8 forward KL; β > 0: TRL's top-1 (plus the actual token) JSD
for beta, top_k in ((0.0, 8), (0.5, 1)):
    args = ServerDistillationConfig(output_dir=tempfile.mkdtemp(), teacher_model_server_url=server_url or "http://stand-in",
                                    beta=beta, loss_top_k=top_k, per_device_train_batch_size=4, max_completion_length=8,
                                    max_steps=2, logging_steps=1, report_to=[], bf16=torch.cuda.is_available())
    trainer = use_ptd_kernels(ServerDistillationTrainer(model=model_id, args=args, train_dataset=dataset))
    trainer.train()
    losses = [round(log["loss"], 4) for log in trainer.state.log_history if "loss" in log]
    print(f"beta={beta}, top-{top_k}: loss per step {losses} (student side: ptd's fused output layer)")
