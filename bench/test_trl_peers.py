"""TRL 1.16's fused kernels (see trl_peers.py) as peers, fwd+bwd, in the ops they serve:

- ``logprobs+entropy``: ``ChunkedLogProbFunction`` with the entropy output (GRPO's fused LM head);
- ``logprobs``: the same without the entropy;
- ``jsd`` (β = 0.5): ``ChunkedDivergenceFunction`` (the distillation trainer's), mean over rows, as
  ``linear_jsd_loss`` computes.

Before its first timed row, each device checks once that TRL's values and input gradients equal
ptd's (plain, and with a logit scale and soft-cap); the row records that check. The rows skip
without TRL (the ``trl`` extra).
"""

import pytest
import trl_peers
from conftest import DEVICE, FLOOR_3, FLOOR_4, measure, zero_grads
from test_jsd import BETA

BACKEND = "triton" if DEVICE == "cuda" else "torch"


def _tile_buffers(n, v, per_side):
    """How many N×V float32 buffers TRL's tiles (4096 rows × 32768 vocabulary entries, fp32) and their
    temporaries amount to: the CPU memory budget's estimate."""
    return per_side * min(n, 4096) * min(v, 32768) * 4 / (n * v * 4)


@pytest.fixture
def checked():
    trl_peers.load()
    return trl_peers.check_against_ptd(DEVICE, BACKEND, beta=BETA)


def test_trl_logprobs_entropy(benchmark, inp, checked):
    hidden, weight, targets = inp.student
    n, _, v = inp.shape

    def step():
        zero_grads(hidden, weight)
        logp, entropy = trl_peers.trl_logprobs(hidden, weight, targets, with_entropy=True)
        (logp.sum() + entropy.sum()).backward()

    measure(benchmark, step, inp, op="logprobs+entropy", method="TRL ChunkedLogProbFunction (entropy)",
            floor=FLOOR_3, grads=(hidden, weight), nv_buffers=_tile_buffers(n, v, 6), extra={"check": checked})


@pytest.mark.tier(2)
def test_trl_logprobs(benchmark, inp, checked):
    hidden, weight, targets = inp.student
    n, _, v = inp.shape

    def step():
        zero_grads(hidden, weight)
        trl_peers.trl_logprobs(hidden, weight, targets, with_entropy=False).sum().backward()

    measure(benchmark, step, inp, op="logprobs", method="TRL ChunkedLogProbFunction", floor=FLOOR_3,
            grads=(hidden, weight), nv_buffers=_tile_buffers(n, v, 4), extra={"check": checked})


def test_trl_chunked_divergence(benchmark, inp, checked):
    hidden, weight, _, teacher_hidden, teacher_weight = inp.all
    n, _, v = inp.shape

    def step():
        zero_grads(hidden, weight)
        trl_peers.trl_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=BETA).mean().backward()

    measure(benchmark, step, inp, op="jsd", method="TRL ChunkedDivergenceFunction", floor=FLOOR_4,
            grads=(hidden, weight), nv_buffers=_tile_buffers(n, v, 14), extra={"check": checked})
