"""Full JSD and Top-K JSD fused with the output layer, fwd+bwd (β = 0.5).

- ``jsd``: ours (loss-level entry point, which forms the gradient in the forward sweep, and the
  per-row function) vs eager (TRL's generalized-JSD formula on materialized logits), vs Liger's
  chunked ``LigerFusedLinearJSDLoss`` (soft loss only), TRL's fused ``ChunkedDivergenceFunction``
  (test_trl_peers.py) and, on CUDA, Liger's Triton ``LigerFusedLinearJSD``.
- The loss-level rows also run with a soft-cap and with a logit scale (logit_transforms.TRANSFORMS).
- ``topk_jsd K=64`` / ``K=100`` (union support + tail atom): ours vs the eager reference
  (``ptd_kernels.reference``, which materializes both sides' logits).

Ours on every backend of conftest.BACKENDS. The main Top-K is K=64 on a CPU and K=100 (PTD-PO's default,
the work model's) on CUDA, where the other K is an extra.

Priorities (``tier`` marks, see conftest): the per-row entry points and the K=100 reference are
extras, run last and cut first by the session's time budget; on CUDA the compiled Liger row is an extra
too (inductor's compile takes a large share of a GPU session's minutes).
"""

import math

import pytest
import torch
from conftest import DEVICE, FLOOR_4, measure, zero_grads
from logit_transforms import TRANSFORM_PARAMS, transform_args, transform_inputs, transform_row

import ptd_kernels as ptd

BETA = 0.5
MAIN_K, EXTRA_K = (100, 64) if DEVICE == "cuda" else (64, 100)


@pytest.mark.parametrize("transform", TRANSFORM_PARAMS)
def test_ptd_jsd_loss(benchmark, inp, transform, backend):
    x = transform_inputs(inp, transform)
    hidden, weight, _, teacher_hidden, teacher_weight = x.all
    kw = transform_args(transform, teacher=True)

    def run(backend):
        ptd.linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, beta=BETA, backend=backend, **kw).backward()

    def step():
        zero_grads(hidden, weight)
        run(backend)

    method, extra = transform_row(transform, f"ptd linear_jsd_loss ({backend})")
    measure(benchmark, step, x, op="jsd", method=method, ours=True, floor=FLOOR_4, grads=(hidden, weight),
            extra=extra, model=("linear_jsd_loss", backend), auto_call=run)


@pytest.mark.tier(3)
def test_ptd_jsd_per_row(benchmark, inp, backend):
    hidden, weight, _, teacher_hidden, teacher_weight = inp.all

    def run(backend):
        ptd.linear_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=BETA, backend=backend).mean().backward()

    def step():
        zero_grads(hidden, weight)
        run(backend)

    measure(benchmark, step, inp, op="jsd", method=f"ptd linear_jsd (per row) ({backend})", ours=True, floor=FLOOR_4,
            grads=(hidden, weight), model=("linear_jsd", backend), auto_call=run)


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=pytest.mark.tier(3 if DEVICE == "cuda" else 0)),
                                      pytest.param(False, marks=pytest.mark.tier(2 if DEVICE == "cuda" else 0))],
                         ids=["compiled", "eager"])
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
            grads=(hidden, weight), model=("liger_fused_linear_jsd", None))


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


@pytest.mark.parametrize("k,transform", [pytest.param(MAIN_K, *p.values, marks=p.marks) if hasattr(p, "values")
                                         else (MAIN_K, p) for p in TRANSFORM_PARAMS]
                         + [pytest.param(EXTRA_K, "plain", marks=pytest.mark.tier(2 if DEVICE == "cpu" else 3))])
def test_ptd_topk_jsd_loss(benchmark, inp, k, transform, backend):
    x = transform_inputs(inp, transform)
    hidden, weight, _, teacher_hidden, teacher_weight = x.all
    kw = transform_args(transform, teacher=True)

    def run(backend):
        ptd.linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, k, beta=BETA, backend=backend,
                                 **kw).backward()

    def step():
        zero_grads(hidden, weight)
        run(backend)

    method, extra = transform_row(transform, f"ptd linear_topk_jsd_loss ({backend})")
    measure(benchmark, step, x, op=f"topk_jsd K={k}", method=method, ours=True, floor=FLOOR_4,
            grads=(hidden, weight), extra=extra, model=("linear_topk_jsd_loss", backend) if k == 100 else None,
            auto_call=run)


@pytest.mark.tier(3)
@pytest.mark.parametrize("k", [MAIN_K])
def test_ptd_topk_jsd_per_row(benchmark, inp, k, backend):
    hidden, weight, _, teacher_hidden, teacher_weight = inp.all

    def run(backend):
        ptd.linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, beta=BETA,
                            backend=backend).mean().backward()

    def step():
        zero_grads(hidden, weight)
        run(backend)

    measure(benchmark, step, inp, op=f"topk_jsd K={k}", method=f"ptd linear_topk_jsd (per row) ({backend})", ours=True,
            floor=FLOOR_4, grads=(hidden, weight), model=("linear_topk_jsd", backend) if k == 100 else None,
            auto_call=run)


@pytest.mark.parametrize("k", [MAIN_K, pytest.param(EXTRA_K, marks=pytest.mark.tier(3))])
def test_eager_topk_jsd(benchmark, inp, k):
    hidden, weight, _, teacher_hidden, teacher_weight = inp.all

    def step():
        zero_grads(hidden, weight)
        ptd.reference.linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, beta=BETA).mean().backward()

    measure(benchmark, step, inp, op=f"topk_jsd K={k}", method="eager reference (ptd_kernels.reference)",
            floor=FLOOR_4, grads=(hidden, weight), nv_buffers=8)
