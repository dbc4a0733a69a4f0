"""Log-prob (+ entropy) of the sampled tokens, fwd+bwd.

Ours on every backend of conftest.BACKENDS (on CUDA the Triton kernels and the cuBLAS path side by side).

- ``logprobs+entropy``: ours (plain, and with a soft-cap or a logit scale: logit_transforms.TRANSFORMS) vs
  eager ``log_softmax`` + gather + entropy and TRL's fused ``ChunkedLogProbFunction``
  (test_trl_peers.py); the floor is the other yardstick.
- ``logprobs`` (log-prob only, the cross-entropy kernels' job): ours vs eager, vs
  cut-cross-entropy (its torch.compile path on CPU, its Triton kernel on CUDA) and, on CUDA,
  Liger's ``LigerFusedLinearCrossEntropyLoss`` (Triton only).
"""

import pytest
import torch
from conftest import DEVICE, FLOOR_3, measure, zero_grads
from logit_transforms import TRANSFORM_PARAMS, transform_args, transform_inputs, transform_row

import ptd_kernels as ptd


@pytest.mark.parametrize("transform", TRANSFORM_PARAMS)
def test_ptd_logprobs_entropy(benchmark, inp, transform, backend):
    x = transform_inputs(inp, transform)
    hidden, weight, targets = x.student
    kw = transform_args(transform)

    def run(backend):
        logp, entropy = ptd.linear_logprobs(hidden, weight, targets, with_entropy=True, backend=backend, **kw)
        (logp.sum() + entropy.sum()).backward()

    def step():
        zero_grads(hidden, weight)
        run(backend)

    method, extra = transform_row(transform, f"ptd linear_logprobs ({backend})")
    measure(benchmark, step, x, op="logprobs+entropy", method=method, ours=True, floor=FLOOR_3,
            grads=(hidden, weight), extra=extra, model=("linear_logprobs", backend), auto_call=run)


def test_eager_logprobs_entropy(benchmark, inp):
    hidden, weight, targets = inp.student

    def step():
        zero_grads(hidden, weight)
        log_probs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
        logp = log_probs.gather(1, targets[:, None]).squeeze(1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        (logp.sum() + entropy.sum()).backward()

    measure(benchmark, step, inp, op="logprobs+entropy", method="eager (log_softmax+gather+entropy)", floor=FLOOR_3,
            grads=(hidden, weight), nv_buffers=6)


@pytest.mark.tier(2)
def test_ptd_logprobs(benchmark, inp, backend):
    hidden, weight, targets = inp.student

    def run(backend):
        ptd.linear_logprobs(hidden, weight, targets, backend=backend).sum().backward()

    def step():
        zero_grads(hidden, weight)
        run(backend)

    measure(benchmark, step, inp, op="logprobs", method=f"ptd linear_logprobs ({backend})", ours=True, floor=FLOOR_3,
            grads=(hidden, weight), auto_call=run)


@pytest.mark.tier(2)
def test_eager_logprobs(benchmark, inp):
    hidden, weight, targets = inp.student

    def step():
        zero_grads(hidden, weight)
        log_probs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
        log_probs.gather(1, targets[:, None]).sum().backward()

    measure(benchmark, step, inp, op="logprobs", method="eager (log_softmax+gather)", floor=FLOOR_3,
            grads=(hidden, weight), nv_buffers=4)


@pytest.mark.tier(2)
def test_cut_cross_entropy(benchmark, inp):
    cce = pytest.importorskip("cut_cross_entropy", reason="cut-cross-entropy not installed (the bench extra)")
    hidden, weight, targets = inp.student
    # On CPU only its torch.compile path runs (its CCE kernel is Triton); on CUDA its CCE kernel,
    # with its default gradient filtering (filter_eps="high": skips tiny-probability gradient terms).
    impl = "cce" if DEVICE == "cuda" else "torch_compile"

    def step():
        zero_grads(hidden, weight)
        # -log p summed: the gradient of Σ logp up to sign, the same work.
        cce.linear_cross_entropy(hidden, weight, targets, reduction="sum", impl=impl).backward()

    measure(benchmark, step, inp, op="logprobs", method=f"cut-cross-entropy ({impl})", floor=FLOOR_3,
            grads=(hidden, weight), nv_buffers=0 if impl == "cce" else 3, compiled=impl != "cce")


@pytest.mark.tier(2)
def test_liger_fused_linear_cross_entropy(benchmark, inp):
    if DEVICE != "cuda":
        pytest.skip("Liger's LigerFusedLinearCrossEntropyLoss is Triton-only: needs a GPU (the CPU interpreter "
                    "would time the interpreter)")
    liger = pytest.importorskip("liger_kernel.transformers")
    hidden, weight, targets = inp.student
    loss_fn = liger.LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def step():
        zero_grads(hidden, weight)
        loss_fn(weight, hidden, targets).backward()

    measure(benchmark, step, inp, op="logprobs", method="liger LigerFusedLinearCrossEntropyLoss (triton)",
            floor=FLOOR_3, grads=(hidden, weight), model=("liger_fused_linear_cross_entropy", None))
