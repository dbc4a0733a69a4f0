"""A drop-in for verl's fused linear-for-PPO head, computed by ptd.

It mirrors verl v0.7.0's ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (the
PyTorch backend of ``actor_rollout_ref.model.use_fused_kernels=True`` with
``fused_kernel_options.impl_backend=torch``; the file is unchanged on verl's main branch as of
commit b178a3c, January 2026). verl's model forward
(``verl/models/transformers/dense_common.py``, ``qwen2_vl.py``, ``qwen3_vl.py``) calls

    FusedLinearForPPO().forward(hidden_states=h, vocab_weights=lm_head.weight,
                                input_ids=torch.roll(input_ids, -1, -1), temperature=τ)

Semantics kept:

- ``hidden_states`` [T, H] or [B, T, H]; ``vocab_weights`` [V, H] (no bias); ``input_ids``
  [T] or [B, T]: at each position, the id whose log-prob is wanted (verl rolls the sequence by
  −1, so position t scores token t+1 and the last position the wrapped-around first token);
- logits = hidden_states @ vocab_weights.T / temperature; returns ``(log_probs, entropy)``
  shaped like ``input_ids``, ``log_probs`` = log softmax at the id, ``entropy`` = H(softmax);
- outputs in ``hidden_states``' dtype (verl casts its float32 results back to the logits'
  dtype); gradients flow to ``hidden_states`` and ``vocab_weights`` from both outputs, in
  their dtypes; none to ``input_ids`` or ``temperature``;
- ``chunk_size`` (verl's token chunk, default 512) is accepted; ptd picks its own blocks
  under the same no-[T, V] memory rule.

Differences: ptd computes in float32 from unrounded products (verl rounds the logits to the
input dtype first), so bf16 outputs can differ in the last bf16 bit; ids must lie in [0, V)
(verl's gather fails outside too), and -100 additionally gives 0 for both outputs.

To use it in a verl worker, before the actor builds its model::

    import verl.utils.experimental.torch_functional as verl_functional
    from ptd_kernels.integrations.verl import FusedLinearForPPO
    verl_functional.FusedLinearForPPO = FusedLinearForPPO

(verl imports the class at call time, so replacing the module attribute is enough; the change
is confined to that worker process, which is the user's own.)
"""

from __future__ import annotations

import torch

import ptd_kernels as ptd

__all__ = ["FusedLinearForPPO", "fused_linear_for_ppo"]

VERL_VERSION = "0.7.0"


def fused_linear_for_ppo(hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                         temperature: float = 1.0, chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, entropy)`` of softmax(hidden_states @ vocab_weights.T / temperature) at ``input_ids``,
    with verl's shapes and dtypes (see the module doc). Differentiable in ``hidden_states`` and
    ``vocab_weights``."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        temperature = float(temperature)
    if hidden_states.dim() == 3:
        if input_ids.dim() != 2 or tuple(input_ids.shape) != tuple(hidden_states.shape[:2]):
            raise ValueError(f"input_ids must be [B, T] = {tuple(hidden_states.shape[:2])} for hidden_states "
                             f"{tuple(hidden_states.shape)}, got {tuple(input_ids.shape)}")
    elif hidden_states.dim() == 2:
        if input_ids.dim() != 1 or input_ids.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"input_ids must be [T] = [{hidden_states.shape[0]}] for hidden_states "
                             f"{tuple(hidden_states.shape)}, got {tuple(input_ids.shape)}")
    else:
        raise ValueError(f"hidden_states must be [T, H] or [B, T, H], got shape {tuple(hidden_states.shape)}")
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    log_probs, entropy = ptd.linear_logprobs(rows, vocab_weights, input_ids.reshape(-1).long(),
                                             temperature=temperature, with_entropy=True)
    dtype = hidden_states.dtype
    return log_probs.to(dtype).view(input_ids.shape), entropy.to(dtype).view(input_ids.shape)


class FusedLinearForPPO(torch.nn.Module):
    """``FusedLinearForPPO(chunk_size=512)(hidden_states, vocab_weights, input_ids, temperature=1.0)``
    → ``(log_probs, entropy)``, as verl's module of the same name (see the module doc)."""

    def __init__(self, chunk_size: int = 512):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature, self.chunk_size)
