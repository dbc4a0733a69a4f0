"""The PTD-PO / GRPO loss of SPEC §3 as small pure functions over per-token terms.

Shapes: B prompts × G rollouts = R rollouts; T response positions; per-token tensors are
``[R, T]`` with a boolean ``mask`` marking real response tokens. Rollout r belongs to group
``r // G`` (rollouts of one prompt are contiguous).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def clipped_pg_loss(logp, logp_old, advantages, eps_low: float = 0.2, eps_high: float = 0.3):
    """Per-token ℓ = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A), ρ = exp(logp − logp_old).

    ``advantages`` broadcast against ``logp`` ([R, 1] per rollout). Returns (ℓ, clipped) where
    ``clipped`` marks tokens whose clipped branch is the active minimum.
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π ‖ π_ref): exp(r − logp) − (r − logp) − 1, r = logp_ref."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1.0


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
    """SPEC §3's PTD term without λ: Σ_{i∈F,t} D_K(i,t) / Σ_{i∈F} |y_i|.

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
    tests/test_reference.py checks both in float64). So the surrogate is exactly ``jsd.detach()``:
    the value is logged, no gradient flows, and in a ``ptd-released`` run the only thing PTD
    changes is that PTD groups lose their reference-KL term.
    """
    return jsd.detach()


@dataclass
class LossParts:
    loss: torch.Tensor
    pg: torch.Tensor
    kl: torch.Tensor
    ptd: torch.Tensor
    clip_frac: torch.Tensor


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
    """L = token_mean(ℓ) + kl_coef·token_mean(k3) + λ·Σ_{i∈F,t} D_K / Σ_{i∈F} |y_i|  (SPEC §3).

    Per-token ``[R, T]``: ``logp`` (differentiable), ``logp_old``, ``logp_ref`` (or None when
    ``kl_coef`` is 0), ``jsd`` (D_K; differentiable, 0 off F), ``mask``. Per rollout ``[R]``:
    ``advantages``, ``in_ptd_set`` (F) and ``ref_kl_mask`` (False for members of PTD groups when
    ``ptd_drop_ref_kl``). Both token means divide by every response token of the batch; the
    dropped k3 terms count as 0. Data parallel, ``token_count`` and ``ptd_token_count`` are the
    global numbers of response tokens and of F's tokens: each rank's loss is then its share of the
    global batch's loss.
    """
    pg_tok, clipped = clipped_pg_loss(logp, logp_old, advantages[:, None], eps_low, eps_high)
    pg = token_mean(pg_tok, mask, token_count)
    if kl_coef != 0.0 and logp_ref is not None:
        # where(), not a product: rows without a reference pass may hold a placeholder logp_ref, and
        # exp(logp_ref − logp) can overflow there (inf · 0 would be NaN).
        kl_terms = torch.where(ref_kl_mask[:, None], k3(logp, logp_ref), torch.zeros_like(logp))
        kl = token_mean(kl_terms, mask, token_count)
    else:
        kl = logp.new_zeros(())
    any_f = bool((mask & in_ptd_set[:, None]).any()) if ptd_token_count is None else bool(ptd_token_count > 0)
    ptd = ptd_term(jsd, mask, in_ptd_set, ptd_token_count) if ptd_coef != 0.0 and any_f else logp.new_zeros(())
    loss = pg + kl_coef * kl + ptd_coef * ptd
    clip_frac = token_mean(clipped.float(), mask, token_count).detach()
    return LossParts(loss, pg.detach(), kl.detach(), ptd.detach(), clip_frac)
