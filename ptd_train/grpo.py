"""The PTD-PO / GRPO loss of docs/method.md §3 as small pure functions over per-token terms.

Shapes: B prompts × G rollouts = R rollouts; T response positions; per-token tensors are
``[R, T]`` with a boolean ``mask`` marking real response tokens. Rollout r belongs to group
``r // G`` (rollouts of one prompt are contiguous).

The per-token formulas (the clipped ratio objective, k3, how the terms combine) are
``ptd_kernels.PolicyLoss``'s, written once there: :func:`policy_loss` states the trainer's loss as
those named token losses — what ``ptd_kernels.linear_policy_loss`` sums in one sweep — and
:func:`ptd_po_loss` evaluates the same loss on per-token terms already computed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ptd_kernels.policy_loss import PolicyLoss, k3
from ptd_kernels.policy_loss import clipped_objective as clipped_pg_loss

__all__ = ["LossParts", "clipped_pg_loss", "group_advantages", "k3", "loss_parts", "policy_loss", "ptd_groups",
           "ptd_po_loss", "ptd_set", "ptd_term", "released_surrogate", "token_mean"]


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """``rewards`` [B, G] → advantages [B, G]: A = (r − mean r) / (std r + eps) per group.

    ``std`` is the sample standard deviation (Bessel-corrected, as TRL's GRPO); ``"none"`` skips
    the division (Dr. GRPO).
    """
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + eps)
    if scale_rewards == "none":
        return centered
    raise ValueError(f"scale_rewards: expected 'group' or 'none', got {scale_rewards!r}")


def ptd_groups(rewards: torch.Tensor, has_hint: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """Groups [B] that get PTD: a hint exists and mean reward < ``threshold``.

    ``rewards`` [B, G]; a NaN reward (a rollout no reward function could score) is left out of its
    group's mean."""
    return has_hint.bool().to(rewards.device) & (torch.nanmean(rewards, dim=1) < threshold)


def ptd_set(rewards: torch.Tensor, has_hint: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """The PTD set F as a bool [B, G]: failed rollouts (reward < 1; never a NaN reward) of PTD groups."""
    return ptd_groups(rewards, has_hint, threshold)[:, None] & (rewards < 1.0)


def ptd_term(jsd: torch.Tensor, mask: torch.Tensor, in_ptd_set: torch.Tensor,
             token_count: torch.Tensor | None = None) -> torch.Tensor:
    """The PTD term of docs/method.md §3 without λ: Σ_{i∈F,t} D_K(i,t) / Σ_{i∈F} |y_i|.

    ``jsd`` and ``mask`` (response tokens) [R, T], ``in_ptd_set`` (F) [R]. ``token_count``: the
    denominator when it is not this batch's own Σ_F |y| (data parallel: the global count; with
    gradient accumulation: rescaled to one micro-batch), any positive number. 0 when it is 0.
    """
    f_mask = mask.bool() & in_ptd_set.bool()[:, None]
    total = (jsd * f_mask.to(jsd.dtype)).sum()
    count = f_mask.sum().to(jsd.dtype) if token_count is None else token_count.to(jsd.dtype)
    return total / torch.where(count > 0, count, torch.ones_like(count))


def token_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Σ x over masked tokens / ``count`` (default: the number of masked tokens); 0 when there are
    none. Data parallel, ``count`` is the global number, so the ranks' values add up to the mean
    over the global batch."""
    m = mask.to(x.dtype)
    n = m.sum() if count is None else count.to(x.dtype)
    return (x * m).sum() / n.clamp(min=1.0)


def released_surrogate(jsd: torch.Tensor) -> torch.Tensor:
    """What the authors' released code optimizes in place of D_K: the same value, zero gradient.

    Their JSD_β = β·Σ q log(q/m) + (1−β)·Σ sg(p) (log sg(p) − log m), m = β·q + (1−β)·p, stop-grads
    the student weight p but differentiates the mixture m. Its derivative is
        −Σ_v (β q_v + (1−β) p_v) · dm_v / m_v = −Σ_v dm_v = −(1−β)·Σ_v dp_v = 0,
    since the weights add up to m and Σ_v p_v = 1 (on the |S|+1 Top-K atoms with the tail as well;
    tests/kernels/test_reference.py checks both in float64). So the surrogate is exactly ``jsd.detach()``:
    the value is logged, no gradient flows, and in a ``ptd-released`` run the only thing PTD
    changes is that PTD groups lose their reference-KL term.
    """
    return jsd.detach()


def policy_loss(advantages, mask, logp_ref, ref_kl_mask, *, kl_coef: float = 0.01, ptd_coef: float = 0.05,
                eps_low: float = 0.2, eps_high: float = 0.3, token_count: torch.Tensor | None = None,
                ptd_token_count: torch.Tensor | None = None, in_ptd_set: torch.Tensor | None = None) -> PolicyLoss:
    """The loss of docs/method.md §3 as ``ptd_kernels.PolicyLoss`` over the flattened tokens [R·T] (a row per token):

        L = token_mean(ℓ) + kl_coef·token_mean(k3) + λ · Σ_{i∈F,t} D_K(i,t) / Σ_{i∈F} |y_i|

    ``advantages`` [R] (broadcast to the tokens), ``mask`` [R, T], ``logp_ref`` [R, T] or None (no k3 term),
    ``ref_kl_mask`` [R] (False: the rollout drops its k3 term). The behaviour policy is the current one,
    detached (one update per batch: ρ = 1). ``token_count`` / ``ptd_token_count``: the global numbers of
    response tokens and of F's tokens (data parallel); default this batch's own — F from ``in_ptd_set`` [R]
    (D_K is 0 off F, so the PTD term reads only F's tokens).
    """
    rows, length = mask.shape
    weights = mask.to(torch.float32) / (mask.sum() if token_count is None else token_count).to(torch.float32).clamp(
        min=1.0)
    if ptd_token_count is None:
        ptd_token_count = (mask & in_ptd_set[:, None]).sum() if in_ptd_set is not None else mask.sum()
    with_kl = kl_coef != 0.0 and logp_ref is not None
    return PolicyLoss(advantages.to(torch.float32)[:, None].expand(rows, length).reshape(-1),
                      weights=weights.reshape(-1), epsilon_low=eps_low, epsilon_high=eps_high,
                      ref_logprobs=logp_ref.reshape(-1) if with_kl else None, kl_coef=kl_coef if with_kl else 0.0,
                      kl_mask=ref_kl_mask[:, None].expand(rows, length).reshape(-1) if with_kl else None,
                      ptd_coef=ptd_coef, ptd_tokens=ptd_token_count)


@dataclass
class LossParts:
    loss: torch.Tensor
    pg: torch.Tensor
    kl: torch.Tensor
    ptd: torch.Tensor
    clip_frac: torch.Tensor


def loss_parts(loss: torch.Tensor, policy: PolicyLoss, logp, entropy, jsd) -> LossParts:
    """The logged parts of the loss ``loss`` of ``policy`` on the per-token terms (detached; the PTD part 0 when
    λ is)."""
    parts = policy.parts(logp.reshape(-1), entropy.reshape(-1), jsd.reshape(-1))
    ptd = parts["ptd"] if policy.ptd_coef != 0.0 else torch.zeros_like(parts["ptd"])
    return LossParts(loss, parts["policy"], parts["kl"], ptd, parts["clip_fraction"])


def ptd_po_loss(
    logp,
    logp_old,
    logp_ref,
    advantages,
    mask,
    jsd,
    in_ptd_set,
    ref_kl_mask,
    *,
    kl_coef: float = 0.01,
    ptd_coef: float = 0.05,
    eps_low: float = 0.2,
    eps_high: float = 0.3,
    token_count: torch.Tensor | None = None,
    ptd_token_count: torch.Tensor | None = None,
) -> LossParts:
    """L = token_mean(ℓ) + kl_coef·token_mean(k3) + λ·Σ_{i∈F,t} D_K / Σ_{i∈F} |y_i|  (docs/method.md §3), on per-token
    terms already computed: :func:`policy_loss`'s named token losses, summed over the response tokens.

    Per-token ``[R, T]``: ``logp`` (differentiable), ``logp_old`` (None: ``logp`` detached), ``logp_ref`` (or
    None when ``kl_coef`` is 0), ``jsd`` (D_K; differentiable, read on F only), ``mask``. Per rollout ``[R]``:
    ``advantages``, ``in_ptd_set`` (F) and ``ref_kl_mask`` (False for members of PTD groups when
    ``ptd_drop_ref_kl``). Both token means divide by every response token of the batch; the dropped k3 terms
    count as 0. Data parallel, ``token_count`` and ``ptd_token_count`` are the global numbers of response
    tokens and of F's tokens: each rank's loss is then its share of the global batch's loss.
    """
    policy = policy_loss(advantages, mask, logp_ref, ref_kl_mask, kl_coef=kl_coef, ptd_coef=ptd_coef, eps_low=eps_low,
                         eps_high=eps_high, token_count=token_count, ptd_token_count=ptd_token_count,
                         in_ptd_set=in_ptd_set)
    if logp_old is not None:
        policy = replace(policy, old_logprobs=logp_old.reshape(-1))
    f_mask = mask & in_ptd_set[:, None]
    on_f = torch.where(f_mask, jsd, torch.zeros((), dtype=jsd.dtype, device=jsd.device)).reshape(-1)
    losses = policy.row_losses(logp.reshape(-1), torch.zeros_like(on_f), on_f)
    loss = torch.where(mask.reshape(-1), losses, torch.zeros((), dtype=losses.dtype, device=losses.device)).sum()
    return loss_parts(loss, policy, logp.detach(), torch.zeros_like(logp), on_f.detach())
