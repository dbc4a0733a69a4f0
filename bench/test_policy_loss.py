"""The whole loss in one call, fwd+bwd: the clipped-ratio policy loss (GRPO's, with a k3 KL to reference
log-probs and an entropy bonus) alone, and with PTD-PO's λ·Top-K JSD term (K=100, union + tail, β=0.5).

- ``ptd linear_policy_loss``: the loss entry point, with PTD-PO's named token losses
  (``ptd_kernels.PolicyLoss``; a callable of the per-row terms where the library has no named form), as a
  trainer calls it; where the backend's budget allows it forms the gradients in the forward sweep (the policy
  loss alone needs 3 logits-GEMMs, the PTD-PO loss 4); timed when this checkout's ptd_kernels has it (the
  rows skip otherwise, with the reason). On cuBLAS also with the working-memory budget raised by the one
  sweep's float32 d weight accumulator, so that the GPU measures the trade-off the default budget decides;
- ``ptd per-row path``: the same loss composed by autograd over the per-row functions
  (``linear_logprobs`` / ``linear_ptd_terms``, then the loss in PyTorch), as a trainer without the
  one-sweep entry writes it;
- Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (chunked, eager: ``compiled=False``), the peer of the
  policy loss alone (it has no distillation term).

The loss: w_n·(ℓ_n + 0.01·k3_n) − 0.001·w_n·H_n (+ 0.05·D_K,n / |F| on the rows of the PTD set F, the
sequences with a negative advantage), ℓ_n = −min(ρ_n·A_n, clip(ρ_n, 0.8, 1.3)·A_n), ρ = exp(logp − old_logp),
k3 the KL estimator against reference log-probs, w_n = 1/N (DAPO's token mean).
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from conftest import DEVICE, FLOOR_3, FLOOR_4, measure, zero_grads

import ptd_kernels as ptd

K = 100
KL_COEF, ENTROPY_COEF, PTD_COEF = 0.01, 0.001, 0.05
SEQUENCES = 8  # the N rows as [8, N/8] sequences (Liger's GRPO loss takes [B, T])
# On CUDA the rows behind the rule of ``auto`` and the loss's targets (tier 0); on a CPU the one-sweep rows
# are tier 2 and the rest extras (tier 3: the per-row path takes tens of seconds a call at the CPU shape).
pytestmark = pytest.mark.tier(2 if DEVICE == "cpu" else 0)
CPU_EXTRA = pytest.mark.tier(3 if DEVICE == "cpu" else 0)


class PolicyData:
    """Per-row inputs of the loss, made once per shape: old and reference log-probs, advantages (one per
    sequence, broadcast to its tokens), the PTD set (the sequences with a negative advantage) and the
    token-mean row weights."""

    def __init__(self, inp):
        n = inp.shape[0]
        device = inp.hidden.device
        gen = torch.Generator(device=device).manual_seed(1)
        self.old = -torch.rand(n, generator=gen, device=device) * 3
        self.ref = self.old + 0.1 * torch.randn(n, generator=gen, device=device)
        self.sequence_advantages = torch.randn(SEQUENCES, generator=gen, device=device)
        self.advantages = self.sequence_advantages.repeat_interleave(n // SEQUENCES)
        self.in_ptd_set = self.advantages < 0
        self.ptd_tokens = max(float(self.in_ptd_set.sum()), 1.0)  # one read-back per shape, outside the rows
        self.weights = torch.full((n,), 1.0 / n, device=device)

    def loss(self, with_ptd: bool):
        """The loss as ``linear_policy_loss`` takes it: ``ptd_kernels.PolicyLoss`` where the library has it,
        else the same formula as a callable of (logp, entropy, jsd); and its name."""
        ptd_coef = PTD_COEF if with_ptd else 0.0
        if hasattr(ptd, "PolicyLoss"):
            return ptd.PolicyLoss(self.advantages, weights=self.weights, old_logprobs=self.old, epsilon_low=0.2,
                                  epsilon_high=0.3, ref_logprobs=self.ref, kl_coef=KL_COEF, ptd_coef=ptd_coef,
                                  ptd_tokens=self.ptd_tokens, entropy_coef=ENTROPY_COEF), "PolicyLoss"
        return (lambda logp, entropy, jsd: self.row_loss(logp, entropy, jsd, ptd_coef)), "row_loss callable"

    def row_loss(self, logp, entropy, jsd, ptd_coef):
        """The loss of every row (see the module docstring), for the per-row path and the callable form."""
        ratio = torch.exp(logp - self.old)
        clipped = -torch.minimum(ratio * self.advantages, ratio.clamp(0.8, 1.3) * self.advantages)
        delta = self.ref - logp
        k3 = torch.exp(delta) - delta - 1
        loss = self.weights * (clipped + KL_COEF * k3) - ENTROPY_COEF * self.weights * entropy
        return loss + ptd_coef * torch.where(self.in_ptd_set, jsd, torch.zeros_like(jsd)) / self.ptd_tokens


def _data(inp) -> PolicyData:
    if "policy" not in inp.__dict__:
        inp.policy = PolicyData(inp)
    return inp.policy


def _entry():
    """``ptd_kernels.linear_policy_loss`` when it takes ``row_loss=``, else skip."""
    function = getattr(ptd, "linear_policy_loss", None)
    if function is None:
        pytest.skip("ptd_kernels has no linear_policy_loss in this checkout")
    if "row_loss" not in inspect.signature(function).parameters:
        pytest.skip("linear_policy_loss takes no row_loss=: bench/test_policy_loss.py needs its new form")
    return function


OPS = {False: ("policy loss", FLOOR_3), True: (f"PTD-PO loss K={K}", FLOOR_4)}
MODEL_OPS = {False: "linear_policy_loss (no teacher)", True: "linear_policy_loss"}
WITH_PTD = [pytest.param(False, id="policy"), pytest.param(True, id="ptd")]


def _policy_row(benchmark, inp, backend, with_ptd, budget=None):
    function = _entry()
    hidden, weight, targets, teacher_hidden, teacher_weight = inp.all
    data = _data(inp)
    loss, form = data.loss(with_ptd)
    teacher = (teacher_hidden, teacher_weight, K) if with_ptd else ()
    jsd_mask = dict(jsd_mask=data.in_ptd_set) if with_ptd else {}

    def run(backend):
        with budget() if budget else contextlib.nullcontext():
            function(hidden, weight, targets, *teacher, row_loss=loss, backend=backend, **jsd_mask).backward()

    def step():
        zero_grads(hidden, weight)
        run(backend)

    op, floor = OPS[with_ptd]
    method = f"ptd linear_policy_loss ({backend})"
    model_op = MODEL_OPS[with_ptd]
    if budget:
        method = f"ptd linear_policy_loss, one sweep: budget + d weight accumulator ({backend})"
        model_op = "linear_policy_loss (one sweep, budget + accumulator)"
    measure(benchmark, step, inp, op=op, method=method, ours=True, floor=floor, grads=(hidden, weight),
            auto_call=None if budget else run, model=(model_op, backend), extra={"form": form})


@pytest.mark.parametrize("with_ptd", WITH_PTD)
def test_ptd_policy_loss(benchmark, inp, backend, with_ptd):
    _policy_row(benchmark, inp, backend, with_ptd)


class _OneSweepBudget:
    """cuBLAS's working-memory budget (``ptd_kernels.config.CUDA_BLOCK_BYTES``) raised by the one sweep's
    float32 d weight accumulator for the call, so that the one sweep runs where the default budget picks
    the per-row path."""

    def __init__(self, inp):
        from ptd_kernels.backends.base import Head
        from ptd_kernels.backends.cublas.fused_loss import accumulator_bytes

        self.value = ptd.config.CUDA_BLOCK_BYTES + accumulator_bytes(Head(inp.hidden, inp.weight, None))

    def __call__(self):
        return self

    def __enter__(self):
        self.saved, ptd.config.CUDA_BLOCK_BYTES = ptd.config.CUDA_BLOCK_BYTES, self.value

    def __exit__(self, *exc):
        ptd.config.CUDA_BLOCK_BYTES = self.saved


def test_ptd_policy_loss_one_sweep_budget(benchmark, inp, backend):
    if backend != "cublas":
        pytest.skip("the budget that decides between the one sweep and the per-row path is cuBLAS's")
    try:
        budget = _OneSweepBudget(inp)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"this checkout has no cuBLAS one-sweep budget to raise ({type(exc).__name__}: {exc})")
    _policy_row(benchmark, inp, backend, True, budget=budget)


@CPU_EXTRA
@pytest.mark.parametrize("with_ptd", WITH_PTD)
def test_ptd_per_row_path(benchmark, inp, backend, with_ptd):
    hidden, weight, targets, teacher_hidden, teacher_weight = inp.all
    data = _data(inp)

    def step():
        zero_grads(hidden, weight)
        if with_ptd:
            t = ptd.linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, K, backend=backend,
                                     jsd_mask=data.in_ptd_set)
            data.row_loss(t.logp, t.entropy, t.jsd, PTD_COEF).sum().backward()
        else:
            logp, entropy = ptd.linear_logprobs(hidden, weight, targets, with_entropy=True, backend=backend)
            data.row_loss(logp, entropy, torch.zeros_like(logp), 0.0).sum().backward()

    op, floor = OPS[with_ptd]
    entry = "linear_ptd_terms" if with_ptd else "linear_logprobs"
    measure(benchmark, step, inp, op=op, method=f"ptd per-row path ({entry} + the loss in PyTorch) ({backend})",
            ours=True, floor=floor, grads=(hidden, weight))


@CPU_EXTRA
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
