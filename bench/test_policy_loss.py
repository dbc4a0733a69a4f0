"""The whole loss in one call, fwd+bwd: the clipped-ratio policy loss (GRPO's, with a k3 KL to reference
log-probs and an entropy bonus) alone, and with PTD-PO's λ·Top-K JSD term (K=100, union + tail, β=0.5).

- ``ptd linear_policy_loss``: the one-sweep loss entry point, which forms the gradients in the forward
  sweep (the policy loss alone needs 3 logits-GEMMs, the PTD-PO loss 4); timed when this checkout's
  ptd_kernels has it (the rows skip otherwise, with the reason);
- ``ptd per-row path``: the same loss composed by autograd over the per-row functions
  (``linear_logprobs`` / ``linear_ptd_terms``, then the loss in PyTorch), as a trainer without the
  one-sweep entry writes it;
- Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (chunked, eager: ``compiled=False``), the peer of the
  policy loss alone (it has no distillation term).

The loss: ℓ_n = −min(ρ_n·A_n, clip(ρ_n, 0.8, 1.3)·A_n) + 0.01·k3(ref_n − logp_n) − 0.001·H_n (+ 0.05·D_K,n on
the rows of the PTD set), ρ = exp(logp − old_logp), summed with token-mean weights.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import DEVICE, FLOOR_3, FLOOR_4, measure, zero_grads

import ptd_kernels as ptd

K = 100
KL_COEF, ENTROPY_COEF, PTD_COEF = 0.01, 0.001, 0.05
SEQUENCES = 8  # the N rows as [8, N/8] sequences (Liger's GRPO loss takes [B, T])
pytestmark = pytest.mark.tier(2 if DEVICE == "cpu" else 0)


class PolicyData:
    """Per-row inputs of the loss, made once per shape: old and reference log-probs, advantages (one per
    sequence, broadcast to its tokens), the PTD set (the sequences with a negative advantage) and the
    token-mean row weights."""

    def __init__(self, inp):
        n = inp.shape[0]
        gen = torch.Generator(device=inp.hidden.device).manual_seed(1)
        device = inp.hidden.device
        self.old = -torch.rand(n, generator=gen, device=device) * 3
        self.ref = self.old + 0.1 * torch.randn(n, generator=gen, device=device)
        per_sequence = torch.randn(SEQUENCES, generator=gen, device=device)
        self.sequence_advantages = per_sequence
        self.advantages = per_sequence.repeat_interleave(n // SEQUENCES)
        self.in_ptd_set = (self.advantages < 0).float()
        self.weights = torch.full((n,), 1.0 / n, device=device)

    def row_loss(self, logp, entropy, jsd):
        """ℓ per row (see the module docstring); ``jsd`` None for the policy loss alone."""
        ratio = torch.exp(logp - self.old)
        clipped = -torch.minimum(ratio * self.advantages, ratio.clamp(0.8, 1.3) * self.advantages)
        delta = self.ref - logp
        k3 = torch.exp(delta) - delta - 1
        loss = clipped + KL_COEF * k3 - ENTROPY_COEF * entropy
        if jsd is not None:
            loss = loss + PTD_COEF * self.in_ptd_set * jsd
        return loss * self.weights


def _data(inp) -> PolicyData:
    if "policy" not in inp.__dict__:
        inp.policy = PolicyData(inp)
    return inp.policy


def _one_sweep():
    """``ptd_kernels.linear_policy_loss`` when it takes a per-row loss as ``row_loss=``, else skip."""
    function = getattr(ptd, "linear_policy_loss", None)
    if function is None:
        pytest.skip("ptd_kernels has no linear_policy_loss in this checkout")
    if "row_loss" not in inspect.signature(function).parameters:
        pytest.skip("linear_policy_loss takes no row_loss= callable: bench/test_policy_loss.py needs its new form")
    return function


OPS = {False: ("policy loss", FLOOR_3), True: (f"PTD-PO loss K={K}", FLOOR_4)}
WITH_PTD = [pytest.param(False, id="policy"), pytest.param(True, id="ptd")]


@pytest.mark.parametrize("with_ptd", WITH_PTD)
def test_ptd_policy_loss(benchmark, inp, backend, with_ptd):
    function = _one_sweep()
    hidden, weight, targets, teacher_hidden, teacher_weight = inp.all
    data = _data(inp)
    teacher = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, k=K) if with_ptd else {}

    def run(backend):
        function(hidden, weight, targets, row_loss=data.row_loss, backend=backend, **teacher).backward()

    def step():
        zero_grads(hidden, weight)
        run(backend)

    op, floor = OPS[with_ptd]
    measure(benchmark, step, inp, op=op, method=f"ptd linear_policy_loss (one sweep) ({backend})", ours=True,
            floor=floor, grads=(hidden, weight), auto_call=run,
            model=("linear_policy_loss" if with_ptd else "linear_policy_loss (policy only)", backend),
            extra={"form": "row_loss callable"})


@pytest.mark.parametrize("with_ptd", WITH_PTD)
def test_ptd_per_row_path(benchmark, inp, backend, with_ptd):
    hidden, weight, targets, teacher_hidden, teacher_weight = inp.all
    data = _data(inp)

    def step():
        zero_grads(hidden, weight)
        if with_ptd:
            t = ptd.linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, K, backend=backend)
            data.row_loss(t.logp, t.entropy, t.jsd).sum().backward()
        else:
            logp, entropy = ptd.linear_logprobs(hidden, weight, targets, with_entropy=True, backend=backend)
            data.row_loss(logp, entropy, None).sum().backward()

    op, floor = OPS[with_ptd]
    entry = "linear_ptd_terms" if with_ptd else "linear_logprobs"
    measure(benchmark, step, inp, op=op, method=f"ptd per-row path ({entry} + the loss in PyTorch) ({backend})",
            ours=True, floor=floor, grads=(hidden, weight))


def test_liger_grpo_loss(benchmark, inp):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, targets = inp.student
    data = _data(inp)
    n, h, _ = inp.shape
    t = n // SEQUENCES
    loss_fn = liger.LigerFusedLinearGRPOLoss(beta=KL_COEF, compiled=False, use_ref_model=True,
                                             epsilon_low=0.2, epsilon_high=0.3)
    mask = torch.ones(SEQUENCES, t, dtype=torch.bool, device=hidden.device)

    def step():
        zero_grads(hidden, weight)
        loss, _metrics = loss_fn(hidden.view(SEQUENCES, t, h), weight, targets.view(SEQUENCES, t), mask,
                                 data.sequence_advantages, ref_per_token_logps=data.ref.view(SEQUENCES, t),
                                 old_per_token_logps=data.old.view(SEQUENCES, t))
        loss.backward()

    measure(benchmark, step, inp, op="policy loss", method="liger LigerFusedLinearGRPOLoss (chunked, eager)",
            floor=FLOOR_3, grads=(hidden, weight), model=("liger_fused_linear_grpo", None), nv_buffers=1)
