"""verl's fused linear-for-PPO head computed by ptd: same signature, same outputs.

    python examples/verl_fused_linear.py

In a verl worker process, before the actor builds its model::

    import verl.utils.experimental.torch_functional as verl_functional
    from ptd_kernels.integrations.verl import FusedLinearForPPO
    verl_functional.FusedLinearForPPO = FusedLinearForPPO
"""

import torch

from ptd_kernels.integrations.verl import FusedLinearForPPO

torch.manual_seed(0)
hidden_states = torch.randn(2, 16, 64, requires_grad=True)   # [B, T, H] from the backbone
vocab_weights = torch.randn(1000, 64, requires_grad=True)    # lm_head.weight [V, H]
input_ids = torch.randint(0, 1000, (2, 16))
rolled = torch.roll(input_ids, -1, -1)                       # verl passes the ids shifted by one
log_probs, entropy = FusedLinearForPPO()(hidden_states, vocab_weights, rolled, temperature=0.8)
(log_probs.sum() + 0.01 * entropy.sum()).backward()

# the same numbers from materialized logits, as verl's own head computes them
logits = (hidden_states @ vocab_weights.T / 0.8).log_softmax(-1)
want_log_probs = logits.gather(-1, rolled.unsqueeze(-1)).squeeze(-1)
want_entropy = -(logits.exp() * logits).sum(-1)
print("log_probs", tuple(log_probs.shape), "entropy", tuple(entropy.shape), log_probs.dtype)
print(f"largest difference from materialized logits: log-probs {(log_probs - want_log_probs).abs().max():.1e}, "
      f"entropy {(entropy - want_entropy).abs().max():.1e}")
print("gradients:", "hidden_states", tuple(hidden_states.grad.shape), "vocab_weights", tuple(vocab_weights.grad.shape))
