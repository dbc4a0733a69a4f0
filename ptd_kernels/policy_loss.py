"""The token losses of GRPO-style policy optimization and of PTD-PO, as per-row functions of the per-row terms.

A row is one response token. Its terms are log p(y) (``logp``), the entropy H(p) (``entropy``) and the
Top-K JSD D_K against the teacher (``jsd``, 0 off the rows that have one). :class:`PolicyLoss` names the
loss of one row as a function of those three numbers and of per-row data (advantages, old and reference
log-probs, normalization weights):

    loss_n = w_n·(ℓ_n + kl_coef·[kl_mask_n]·(ρ_n·)k3_n)  +  ptd_coef·D_n / ptd_tokens  −  entropy_coef·u_n·H_n

    ℓ_n  = −min(ρ_n·A_n, clip(ρ_n, 1 − ε_low, 1 + ε_high)·A_n),   ρ_n = exp(logp_n − old_logp_n)
    k3_n = exp(r_n − logp_n) − (r_n − logp_n) − 1,                 r_n = ref_logp_n

w_n are the normalization weights of the policy and KL terms (``normalization_weights``: GRPO's per-sequence
mean then mean over sequences, DAPO's token mean over the batch, Dr. GRPO's constant denominator), u_n those
of the entropy bonus (by default w_n), ptd_tokens = Σ_{i∈F} |y_i| the number of tokens with a divergence;
the factor ρ_n of the k3 term only with ``kl_ratio`` (TRL's ``use_bias_correction_kl``: its gradient is then
the unbiased reverse-KL gradient).
Each formula is written once, here: ``clipped_objective``, ``k3``, ``PolicyLoss.row_losses`` (values,
differentiable by autograd) and ``PolicyLoss.row_gradients`` (the same values and their closed-form
derivatives w.r.t. logp, entropy and D, which the one-sweep loss ``ptd_kernels.linear_policy_loss`` needs
while it holds a block's logits). ``ptd_train`` builds its loss from them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch

__all__ = ["PolicyLoss", "clipped_objective", "k3", "normalization_weights", "NORMALIZATIONS"]

#: The normalizations of the policy term (TRL's ``loss_type`` names): "grpo" — per-sequence mean, then mean
#: over sequences; "dapo" (and "bnpo", its per-batch twin) — token mean over the batch; "dr_grpo" — a
#: constant denominator (sequences × maximal length).
NORMALIZATIONS = ("grpo", "dapo", "bnpo", "dr_grpo")


def clipped_objective(logp, old_logprobs, advantages, epsilon_low: float = 0.2, epsilon_high: float = 0.3):
    """ℓ = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A), ρ = exp(logp − old_logprobs), per row.

    Returns (ℓ, clipped) where ``clipped`` marks rows whose clipped branch is the active minimum.
    """
    ratio = torch.exp(logp - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def k3(logp, ref_logprobs):
    """The k3 estimator of KL(π ‖ π_ref) per row: exp(r − logp) − (r − logp) − 1, r = ref_logprobs."""
    d = ref_logprobs - logp
    return torch.exp(d) - d - 1.0


def normalization_weights(mask: torch.Tensor, normalization: str = "dapo", *, token_count=None,
                          sequence_count=None, max_length: int | None = None) -> torch.Tensor:
    """Per-row weights [R·T] of the policy and KL terms from a response mask [R, T] (bool or 0/1).

    ``"dapo"`` / ``"bnpo"``: 1 / (number of response tokens) — ``token_count`` when the count is the
    global one (data parallel, gradient accumulation: any positive number or 0-dim tensor);
    ``"grpo"``: 1 / (|y_r| · number of sequences) — ``sequence_count`` (default R) when global;
    ``"dr_grpo"``: 1 / (number of sequences · ``max_length``) (default T). Padding gets 0.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a [sequences, length] tensor, got {getattr(mask, 'shape', type(mask))}")
    m = mask.to(torch.float32)
    sequences = m.shape[0] if sequence_count is None else sequence_count
    if normalization in ("dapo", "bnpo"):
        count = m.sum() if token_count is None else torch.as_tensor(token_count, dtype=m.dtype, device=m.device)
        weights = m / count.clamp(min=1.0)
    elif normalization == "grpo":
        weights = m / (m.sum(1, keepdim=True).clamp(min=1.0) * sequences)
    else:
        length = m.shape[1] if max_length is None else max_length
        weights = m / (sequences * length)
    return weights.reshape(-1)


def _number(name: str, value, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"PolicyLoss.{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low):
        bound = "" if low is None else f" ≥ {low:g}"
        raise ValueError(f"PolicyLoss.{name} must be a finite number{bound}, got {value}")
    return value


@dataclass(frozen=True)
class PolicyLoss:
    """The named token losses of a policy step (see the module doc for the formula).

    Per-row tensors [N] (rows as the loss function's rows; padding rows may hold anything):

    - ``advantages``: A_n (broadcast a sequence's advantage to its tokens);
    - ``weights``: w_n, the normalization of the policy and KL terms (``normalization_weights``);
      None: 1 / (number of live rows), the token mean;
    - ``old_logprobs``: the log-probs of the policy that sampled the rows; None: the current log-probs
      themselves, detached (one update per batch: ρ = 1, ∂ρ/∂logp = 1);
    - ``ref_logprobs`` with ``kl_coef``: the k3 term against a reference model; ``kl_mask`` (bool): the rows
      that keep it (PTD-PO drops it for the members of PTD groups); None: every row; ``kl_ratio``: the term
      times the ratio ρ (differentiated too);
    - ``entropy_weights``: u_n of the entropy bonus ``entropy_coef`` (None: ``weights``).

    ``ptd_coef`` (λ) weighs Σ D_n / ``ptd_tokens``: D_n is the divergence of the rows that have one (the
    loss function's ``jsd_mask``); ``ptd_tokens`` (a number or a 0-dim tensor, e.g. a global count) None:
    the number of live rows with a divergence. No gradient flows into any of these tensors.
    """

    advantages: torch.Tensor
    weights: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    epsilon_low: float = 0.2
    epsilon_high: float = 0.3
    ref_logprobs: torch.Tensor | None = None
    kl_coef: float = 0.0
    kl_mask: torch.Tensor | None = None
    ptd_coef: float = 0.0
    ptd_tokens: float | torch.Tensor | None = None
    entropy_coef: float = 0.0
    entropy_weights: torch.Tensor | None = None
    kl_ratio: bool = False

    #: the fields that hold one value per row
    ROW_FIELDS = ("advantages", "weights", "old_logprobs", "ref_logprobs", "kl_mask", "entropy_weights")

    # ------------------------------------------------------------------------- checks

    def checked(self, n: int, device: torch.device) -> PolicyLoss:
        """This loss with its numbers checked (ValueError/TypeError naming the field) for N rows on ``device``."""
        for name in self.ROW_FIELDS:
            value = getattr(self, name)
            if value is None:
                if name == "advantages":
                    raise TypeError("PolicyLoss.advantages must be a tensor [N], got None")
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"PolicyLoss.{name} must be a torch.Tensor [N], got {type(value).__name__}")
            if value.shape != (n,):
                raise ValueError(f"PolicyLoss.{name} must have shape ({n},) (one value per row of hidden), got "
                                 f"{tuple(value.shape)}")
            if name == "kl_mask":
                if value.dtype != torch.bool:
                    raise TypeError(f"PolicyLoss.kl_mask must be a bool tensor, got {value.dtype}")
            elif not value.dtype.is_floating_point:
                raise TypeError(f"PolicyLoss.{name} must be a floating-point tensor, got {value.dtype}")
            if value.device != device:
                raise ValueError(f"PolicyLoss.{name} is on {value.device} but hidden is on {device}")
        epsilon_low = _number("epsilon_low", self.epsilon_low, low=0.0)
        epsilon_high = _number("epsilon_high", self.epsilon_high, low=0.0)
        kl_coef = _number("kl_coef", self.kl_coef)
        ptd_coef = _number("ptd_coef", self.ptd_coef)
        entropy_coef = _number("entropy_coef", self.entropy_coef)
        if not isinstance(self.kl_ratio, bool):
            raise TypeError(f"PolicyLoss.kl_ratio must be True or False, got {self.kl_ratio!r}")
        if kl_coef != 0.0 and self.ref_logprobs is None:
            raise ValueError(f"PolicyLoss.kl_coef={kl_coef:g} needs ref_logprobs (the reference model's log-probs); "
                             "pass them, or kl_coef=0")
        ptd_tokens = self.ptd_tokens
        if isinstance(ptd_tokens, torch.Tensor):
            if ptd_tokens.numel() != 1 or ptd_tokens.is_complex() or ptd_tokens.dtype == torch.bool:
                raise TypeError(f"PolicyLoss.ptd_tokens must be a number or a one-element tensor, got shape "
                                f"{tuple(ptd_tokens.shape)} {ptd_tokens.dtype}")
            if ptd_tokens.requires_grad:
                raise TypeError("PolicyLoss.ptd_tokens requires grad: pass a number or a detached tensor")
        elif ptd_tokens is not None:
            ptd_tokens = _number("ptd_tokens", ptd_tokens, low=0.0)
        return replace(self, epsilon_low=epsilon_low, epsilon_high=epsilon_high, kl_coef=kl_coef, ptd_coef=ptd_coef,
                       ptd_tokens=ptd_tokens, entropy_coef=entropy_coef)

    def map_rows(self, take) -> PolicyLoss:
        """The same loss with ``take`` applied to every per-row tensor (e.g. a selection of rows)."""
        return replace(self, **{name: take(getattr(self, name)) for name in self.ROW_FIELDS
                                if getattr(self, name) is not None})

    def resolved(self, weights: torch.Tensor, ptd_tokens: torch.Tensor) -> PolicyLoss:
        """The defaults made concrete: ``weights`` and ``ptd_tokens`` where they are None."""
        return replace(self, weights=weights if self.weights is None else self.weights,
                       ptd_tokens=ptd_tokens if self.ptd_tokens is None else self.ptd_tokens)

    def for_rows(self, order: torch.Tensor | None, dtype: torch.dtype) -> PolicyLoss:
        """This loss with its per-row tensors detached, taken at ``order`` (int64 [n]; None: as they are) and in
        ``dtype`` (a mask stays bool), and a tensor ``ptd_tokens`` in ``dtype``: done once per call, so that
        the loss of a block of rows (``rows`` a slice) reads views."""
        def take(t):
            t = t.detach()
            t = t if order is None else t.index_select(0, order)
            return t if t.dtype == torch.bool else t.to(dtype)

        tokens = self.ptd_tokens
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().to(dtype).reshape(())
        return replace(self, ptd_tokens=tokens, **{name: take(getattr(self, name)) for name in self.ROW_FIELDS
                                                   if getattr(self, name) is not None})

    @property
    def uses_entropy_gradient(self) -> bool:
        return self.entropy_coef != 0.0

    # ------------------------------------------------------------------------- the loss of rows

    def _row_data(self, rows, dtype, device, *, entropy: bool = True):
        """(advantages, weights, old, ref, kl_mask, entropy weights) of the rows (``rows``: an index or a
        slice; None: all), detached, in ``dtype``; the entropy weights None unless ``entropy``."""
        def at(t):
            if t is None:
                return None
            t = t.detach() if t.requires_grad else t
            t = t if rows is None else t[rows]
            return t if t.dtype in (torch.bool, dtype) else t.to(dtype)

        if self.weights is None or self.ptd_tokens is None:
            raise ValueError("PolicyLoss.weights and ptd_tokens are None: linear_policy_loss fills them in; to "
                             "evaluate the loss directly, give both")
        return (at(self.advantages), at(self.weights), at(self.old_logprobs), at(self.ref_logprobs),
                at(self.kl_mask),
                at(self.entropy_weights if self.entropy_weights is not None else self.weights) if entropy else None)

    def _per_token(self, numerator: float, dtype):
        """numerator / ptd_tokens (0 tokens: the numerator), a number or a 0-dim tensor on the tokens' device
        (a number stays on the host: no copy to the device)."""
        tokens = self.ptd_tokens
        if not isinstance(tokens, torch.Tensor):
            return numerator / tokens if tokens > 0 else numerator
        tokens = tokens.detach() if tokens.requires_grad else tokens
        tokens = tokens if tokens.dtype == dtype else tokens.to(dtype)
        tokens = tokens.reshape(()) if tokens.dim() else tokens
        return numerator / torch.where(tokens > 0, tokens, 1.0)

    def row_losses(self, logp, entropy, jsd, rows=None):
        """loss_n of the rows (``rows``: an index into the per-row tensors; None: all), differentiable in
        ``logp``, ``entropy`` and ``jsd`` (their rows' values, [r] each)."""
        advantages, weights, old, ref, kl_mask, entropy_weights = self._row_data(
            rows, logp.dtype, logp.device, entropy=self.entropy_coef != 0.0)
        ptd_scale = self._per_token(self.ptd_coef, logp.dtype)
        old = logp.detach() if old is None else old
        pg, _ = clipped_objective(logp, old, advantages, self.epsilon_low, self.epsilon_high)
        policy = pg
        if self.kl_coef != 0.0:
            kl = k3(logp, ref)
            if self.kl_ratio:
                kl = kl * torch.exp(logp - old)
            if kl_mask is not None:  # where(), not a product: a placeholder ref can make k3 overflow
                kl = torch.where(kl_mask, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
            policy = policy + self.kl_coef * kl
        loss = weights * policy + ptd_scale * jsd
        if self.entropy_coef != 0.0:
            loss = loss - self.entropy_coef * entropy_weights * entropy
        return loss

    def __call__(self, logp, entropy, jsd):
        """``row_losses`` of every row: the callable form, ``row_loss(logp, entropy, jsd) -> loss [N]``."""
        return self.row_losses(logp, entropy, jsd)

    def row_gradients(self, logp, entropy, jsd, rows=None):
        """(loss, ∂loss/∂logp, ∂loss/∂entropy, ∂loss/∂jsd) of the rows, [r] each, in closed form (no graph).

        ∂ℓ/∂logp = −ρ·A where the unclipped branch is the minimum (or ties with it), else 0;
        ∂k3/∂logp = 1 − exp(r − logp); ∂loss/∂D = ptd_coef / ptd_tokens; ∂loss/∂H = −entropy_coef·u_n.
        """
        with torch.no_grad():
            advantages, weights, old, ref, kl_mask, entropy_weights = self._row_data(
                rows, logp.dtype, logp.device, entropy=self.entropy_coef != 0.0)
            ptd_scale = self._per_token(self.ptd_coef, logp.dtype)
            zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
            if old is None:  # ρ = 1 inside [1 − ε_low, 1 + ε_high]: both branches are A (NaN: no gradient)
                ratio = None
                policy = -advantages
                d_policy = torch.where(torch.isnan(advantages), zero, policy)
            else:
                ratio = torch.exp(logp - old)
                unclipped = ratio * advantages
                clipped = torch.clamp(ratio, 1.0 - self.epsilon_low, 1.0 + self.epsilon_high) * advantages
                policy = -torch.minimum(unclipped, clipped)
                d_policy = torch.where(unclipped <= clipped, -unclipped, zero)
            if self.kl_coef != 0.0:
                d = ref - logp
                exp_d = torch.exp(d)
                kl, d_kl = exp_d - d - 1.0, 1.0 - exp_d
                if self.kl_ratio and ratio is not None:  # ∂(ρ·k3)/∂logp = ρ·(k3 + ∂k3/∂logp)
                    kl, d_kl = ratio * kl, ratio * (kl + d_kl)
                elif self.kl_ratio:  # ρ = 1
                    d_kl = kl + d_kl
                if kl_mask is not None:
                    kl, d_kl = torch.where(kl_mask, kl, zero), torch.where(kl_mask, d_kl, zero)
                policy = policy + self.kl_coef * kl
                d_policy = d_policy + self.kl_coef * d_kl
            loss = weights * policy + ptd_scale * jsd
            d_entropy = None
            if self.entropy_coef != 0.0:
                loss = loss - self.entropy_coef * entropy_weights * entropy
                d_entropy = -self.entropy_coef * entropy_weights
            d_jsd = (torch.full_like(jsd, ptd_scale) if not isinstance(ptd_scale, torch.Tensor)
                     else ptd_scale.expand_as(jsd))
            return loss, weights * d_policy, d_entropy, d_jsd

    def parts(self, logp, entropy, jsd) -> dict[str, torch.Tensor]:
        """The loss's parts over all rows (detached sums, for logging): ``policy`` Σ w·ℓ, ``kl`` Σ w·k3 (over
        the kept rows, without kl_coef), ``ptd`` Σ D / ptd_tokens (without λ), ``entropy`` Σ u·H and
        ``clip_fraction`` Σ w·[clipped branch active]."""
        with torch.no_grad():
            advantages, weights, old, ref, kl_mask, entropy_weights = self._row_data(None, logp.dtype, logp.device)
            logp, entropy, jsd = (t.detach() if t.requires_grad else t for t in (logp, entropy, jsd))
            if old is None:  # ρ = exp(logp − logp) = 1 inside [1 − ε_low, 1 + ε_high]: ℓ = −A, never clipped
                pg = torch.where(torch.isfinite(logp), -advantages, math.nan)  # (ρ is NaN at an infinite logp)
                clipped = torch.zeros_like(advantages, dtype=torch.bool)
            else:
                pg, clipped = clipped_objective(logp, old, advantages, self.epsilon_low, self.epsilon_high)
            zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
            kl = zero
            if ref is not None:
                kl_rows = k3(logp, ref)
                if self.kl_ratio:
                    kl_rows = kl_rows * torch.exp(logp - (logp if old is None else old))
                if kl_mask is not None:
                    kl_rows = torch.where(kl_mask, kl_rows, zero)
                kl = (weights * kl_rows).sum()
            ptd = jsd.sum() * self._per_token(1.0, logp.dtype)
            return {"policy": (weights * pg).sum(), "kl": kl, "ptd": ptd, "entropy": (entropy_weights * entropy).sum(),
                    "clip_fraction": (weights * clipped.to(weights.dtype)).sum()}
