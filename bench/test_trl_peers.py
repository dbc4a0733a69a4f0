"""TRL 1.16's fused kernels (see trl_peers.py) as peers, fwd+bwd, in the ops they serve:

- ``logprobs+entropy``: ``ChunkedLogProbFunction`` with the entropy output (GRPO's fused LM head);
- ``logprobs``: the same without the entropy;
- ``jsd`` (β = 0.5): ``ChunkedDivergenceFunction`` (the distillation trainer's), mean over rows, as
  ``linear_jsd_loss`` computes.

Each as TRL's trainers call it (vocabulary chunk 32768) and, as an extra, with the tuned 2048-wide
chunk (trl_peers.TUNED_CHUNK; the log-prob-only row, an extra, at the trainers' chunk alone).

Before its first timed row, each device checks once that TRL's values and input gradients equal
ptd's (plain, and with a logit scale and soft-cap); the row records that check. The rows skip
without TRL (the ``trl`` extra).
"""

import pytest
import trl_peers
from conftest import BACKENDS, DEVICE, FLOOR_3, FLOOR_4, measure, zero_grads
from test_jsd import BETA


def _tile_buffers(n, v, per_side):
    """How many N×V float32 buffers TRL's tiles (4096 rows × 32768 vocabulary entries, fp32) and their
    temporaries amount to: the CPU memory budget's estimate."""
    return per_side * min(n, 4096) * min(v, 32768) * 4 / (n * v * 4)


@pytest.fixture
def checked():
    trl_peers.load()
    return trl_peers.check_against_ptd(DEVICE, BACKENDS[0], beta=BETA)


# The vocabulary chunk: None = TRL's trainers' (main rows), the tuned width as an extra (tier 2).
CHUNKS = [pytest.param(None, id="trainer_chunk"),
          pytest.param(trl_peers.TUNED_CHUNK, id=f"chunk{trl_peers.TUNED_CHUNK}", marks=pytest.mark.tier(2))]


def _label(chunk, default):
    return f"vocab chunk {chunk or default}" + ("" if chunk else ", as its trainers call it")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_trl_logprobs_entropy(benchmark, inp, checked, chunk):
    hidden, weight, targets = inp.student
    n, _, v = inp.shape

    def step():
        zero_grads(hidden, weight)
        logp, entropy = trl_peers.trl_logprobs(hidden, weight, targets, with_entropy=True, vocab_chunk=chunk)
        (logp.sum() + entropy.sum()).backward()

    measure(benchmark, step, inp, op="logprobs+entropy",
            method=f"TRL ChunkedLogProbFunction (entropy; {_label(chunk, trl_peers.load()[2])})", floor=FLOOR_3,
            grads=(hidden, weight), nv_buffers=_tile_buffers(n, v, 10), extra={"check": checked},
            model=None if chunk else ("trl_chunked_logprob", None))


@pytest.mark.tier(3)  # the log-prob-only op: an extra (the entropy row is the one GRPO runs)
def test_trl_logprobs(benchmark, inp, checked):
    hidden, weight, targets = inp.student
    n, _, v = inp.shape

    def step():
        zero_grads(hidden, weight)
        trl_peers.trl_logprobs(hidden, weight, targets, with_entropy=False).sum().backward()

    measure(benchmark, step, inp, op="logprobs",
            method=f"TRL ChunkedLogProbFunction ({_label(None, trl_peers.load()[2])})", floor=FLOOR_3,
            grads=(hidden, weight), nv_buffers=_tile_buffers(n, v, 10), extra={"check": checked})


@pytest.mark.parametrize("chunk", CHUNKS)
def test_trl_chunked_divergence(benchmark, inp, checked, chunk):
    hidden, weight, _, teacher_hidden, teacher_weight = inp.all
    n, _, v = inp.shape

    def step():
        zero_grads(hidden, weight)
        with trl_peers.divergence_vocab_chunk(chunk):
            trl_peers.trl_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=BETA).mean().backward()

    method = f"TRL ChunkedDivergenceFunction ({_label(chunk, trl_peers.divergence_chunk())})"
    measure(benchmark, step, inp, op="jsd", method=method, floor=FLOOR_4, grads=(hidden, weight),
            nv_buffers=_tile_buffers(n, v, 14), extra={"check": checked},
            model=None if chunk else ("trl_chunked_divergence", None))
