"""ptd inside the trainers people already run.

- :mod:`ptd_kernels.integrations.hf`: any Hugging Face causal LM or VLM — its last hidden states,
  its output layer (weight, bias, logit scale, soft-cap), and a forward that returns log-probs,
  entropy and PTD-PO terms through ptd instead of logits.
- :mod:`ptd_kernels.integrations.trl`: TRL's ``GRPOTrainer`` and ``DistillationTrainer`` on ptd's
  kernels, per trainer instance (``use_ptd_kernels``).
- :mod:`ptd_kernels.integrations.verl`: a drop-in for verl's fused linear-for-PPO head.

PTD-PO on TRL (the trainer) is ``ptd_train.trl.PTDGRPOTrainer``.

Nothing is imported here: each submodule pulls in its framework (transformers, TRL) only when
it is imported itself.
"""
