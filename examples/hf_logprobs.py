"""Per-token log-probs and entropy of a Hugging Face model through ptd: no [B, L, V] logits.

    python examples/hf_logprobs.py                    # a tiny local model, made on the spot
    python examples/hf_logprobs.py Qwen/Qwen3-0.6B    # any causal LM or VLM you have
"""

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ptd_kernels.integrations import hf
from ptd_train.tiny_checkpoint import make_checkpoint

model_id = sys.argv[1] if len(sys.argv) > 1 else make_checkpoint(tempfile.mkdtemp(), "text")
model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
batch = AutoTokenizer.from_pretrained(model_id)(["what is two plus three"], return_tensors="pt")

hf.add_fused_head(model)                       # this instance only; generate() is unchanged
labels = batch["input_ids"].clone()            # -100 marks positions to skip (prompt, padding)
out = model(**batch, labels=labels, fused_head=True)
(-out.log_probs.sum()).backward()              # gradients reach the backbone and lm_head as usual
print("log-probs", tuple(out.log_probs.shape), "entropy", tuple(out.entropy.shape),
      "(position t scores token t+1)")
print("log-probs of the sentence's tokens:", [round(x, 3) for x in out.log_probs[0].tolist()])
gap = hf.check_against_logits(model, **batch)  # once per new architecture: ptd = the model's own logits
print(f"largest difference from the model's own logits: {gap:.1e}")
