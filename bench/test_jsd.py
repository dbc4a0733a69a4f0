"""Full JSD and Top-K JSD fused with the output layer, fwd+bwd (β = 0.5).

- ``jsd``: ours (loss-level entry point, which forms the gradient in the forward sweep, and the
  per-row function) vs eager (TRL's generalized-JSD formula on materialized logits), vs Liger's
  chunked ``LigerFusedLinearJSDLoss`` (soft loss only), TRL's fused ``ChunkedDivergenceFunction``
  (test_trl_peers.py) and, on CUDA, Liger's Triton ``LigerFusedLinearJSD``.
- The loss-level rows also run with a soft-cap and with a logit scale (logit_transforms.TRANSFORMS).
- ``topk_jsd K=64`` / ``K=100`` (union support + tail atom): ours vs the eager reference
  (``ptd_kernels.reference``, which materializes both sides' logits).

Priorities (``tier`` marks, see conftest): the per-row entry points and the K=100 reference are
extras, run last and cut first by the session's time budget.
"""

import math

import pytest
import torch
from conftest import DEVICE, FLOOR_4, measure, zero_grads
from logit_transforms import TRANSFORMS, transform_args, transform_inputs, transform_row

import ptd_kernels as ptd

BETA = 0.5


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_ptd_jsd_loss(benchmark, inp, transform):
    x = transform_inputs(inp, transform)
    hidden, weight, _, teacher_hidden, teacher_weight = x.all
    kw = transform_args(transform, teacher=True)

    def step():
        zero_grads(hidden, weight)
        ptd.linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, beta=BETA, **kw).backward()

    method, extra = transform_row(transform, "ptd linear_jsd_loss")
    measure(benchmark, step, x, op="jsd", method=method, ours=True, floor=FLOOR_4, grads=(hidden, weight),
            extra=extra)


@pytest.mark.tier(3)
def test_ptd_jsd_per_row(benchmark, inp):
    hidden, weight, _, teacher_hidden, teacher_weight = inp.all

    def step():
        zero_grads(hidden, weight)
        ptd.linear_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=BETA).mean().backward()

    measure(benchmark, step, inp, op="jsd", method="ptd linear_jsd (per row)", ours=True, floor=FLOOR_4,
            grads=(hidden, weight))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_liger_chunked_jsd(benchmark, inp, compiled):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, targets, teacher_hidden, teacher_weight = inp.all
    # Soft loss only (weight_hard_loss=0): the same quantity as linear_jsd(...).mean(). Liger's
    # default compiles its chunk function with torch.compile (inductor; on CPU too); without it
    # the chunks run eagerly. Compiled code cannot run under MemTracker: its CPU peak is peak RSS.
    loss_fn = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, compiled=compiled)

    def step():
        zero_grads(hidden, weight)
        loss_fn(hidden, weight, teacher_hidden, teacher_weight, targets).backward()

    mode = "compiled" if compiled else "eager"
    measure(benchmark, step, inp, op="jsd", method=f"liger LigerFusedLinearJSDLoss (chunked, {mode})", floor=FLOOR_4,
            grads=(hidden, weight), compiled=compiled)


def test_liger_triton_jsd(benchmark, inp):
    if DEVICE != "cuda":
        pytest.skip("Liger's LigerFusedLinearJSD is Triton-only: needs a GPU (the CPU interpreter would time the "
                    "interpreter)")
    liger = pytest.importorskip("liger_kernel.transformers")
    hidden, weight, _, teacher_hidden, teacher_weight = inp.all
    loss_fn = liger.LigerFusedLinearJSD(jsd_beta=BETA)

    def step():
        zero_grads(hidden, weight)
        loss_fn(hidden, weight, teacher_hidden, teacher_weight, None).backward()

    measure(benchmark, step, inp, op="jsd", method="liger LigerFusedLinearJSD (triton)", floor=FLOOR_4,
            grads=(hidden, weight))


def eager_jsd(hidden, weight, teacher_hidden, teacher_weight):
    """TRL's generalized JSD (GKD trainer) on materialized logits, mean over rows."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    with torch.no_grad():
        logq = torch.log_softmax((teacher_hidden @ teacher_weight.T).float(), dim=-1)
    log_mix = torch.logsumexp(torch.stack([logp + math.log(1 - BETA), logq + math.log(BETA)]), dim=0)
    kl_q = torch.nn.functional.kl_div(log_mix, logq, reduction="none", log_target=True).sum(-1)
    kl_p = torch.nn.functional.kl_div(log_mix, logp, reduction="none", log_target=True).sum(-1)
    return (BETA * kl_q + (1 - BETA) * kl_p).mean()


def test_eager_jsd(benchmark, inp):
    hidden, weight, _, teacher_hidden, teacher_weight = inp.all

    def step():
        zero_grads(hidden, weight)
        eager_jsd(hidden, weight, teacher_hidden, teacher_weight).backward()

    measure(benchmark, step, inp, op="jsd", method="eager (TRL formula)", floor=FLOOR_4, grads=(hidden, weight),
            nv_buffers=12)


@pytest.mark.parametrize("k,transform", [(64, t) for t in TRANSFORMS]
                         + [pytest.param(100, "plain", marks=pytest.mark.tier(2))])
def test_ptd_topk_jsd_loss(benchmark, inp, k, transform):
    x = transform_inputs(inp, transform)
    hidden, weight, _, teacher_hidden, teacher_weight = x.all
    kw = transform_args(transform, teacher=True)

    def step():
        zero_grads(hidden, weight)
        ptd.linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, k, beta=BETA, **kw).backward()

    method, extra = transform_row(transform, "ptd linear_topk_jsd_loss")
    measure(benchmark, step, x, op=f"topk_jsd K={k}", method=method, ours=True, floor=FLOOR_4,
            grads=(hidden, weight), extra=extra)


@pytest.mark.tier(3)
@pytest.mark.parametrize("k", [64])
def test_ptd_topk_jsd_per_row(benchmark, inp, k):
    hidden, weight, _, teacher_hidden, teacher_weight = inp.all

    def step():
        zero_grads(hidden, weight)
        ptd.linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, beta=BETA).mean().backward()

    measure(benchmark, step, inp, op=f"topk_jsd K={k}", method="ptd linear_topk_jsd (per row)", ours=True,
            floor=FLOOR_4, grads=(hidden, weight))


@pytest.mark.parametrize("k", [64, pytest.param(100, marks=pytest.mark.tier(3))])
def test_eager_topk_jsd(benchmark, inp, k):
    hidden, weight, _, teacher_hidden, teacher_weight = inp.all

    def step():
        zero_grads(hidden, weight)
        ptd.reference.linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, beta=BETA).mean().backward()

    measure(benchmark, step, inp, op=f"topk_jsd K={k}", method="eager reference (ptd_kernels.reference)",
            floor=FLOOR_4, grads=(hidden, weight), nv_buffers=8)
