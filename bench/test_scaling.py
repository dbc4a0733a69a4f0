"""Memory scaling on CPU (one MemTracker call + one timed call per point, small H so it stays cheap):
N ∈ {1k, 2k, 4k, 8k} at H=64, V=8192 for every method, and V ∈ {8k, 32k, 128k} at N=1024 for ours.
Our working memory (peak − input gradients) should grow with N only, not with V; the
materializing peers grow with N·V; TRL's fused kernels hold tiles of up to 4096 rows × 32768
vocabulary entries, so theirs grows with N up to 4096 rows (and with V up to 32768). On CUDA the
main shape set already spans N, so this suite is off there (PTD_BENCH_SCALING=1 forces it)."""

import pytest
from conftest import measure, zero_grads
from test_jsd import BETA, eager_jsd

import ptd_kernels as ptd

K = 64


def _scale(benchmark, step, sinp, **kw):
    measure(benchmark, step, sinp, suite="scaling", rounds=1, grads=(sinp.hidden, sinp.weight), **kw)


@pytest.mark.vsweep
def test_scaling_ptd_logprobs_entropy(benchmark, sinp):
    hidden, weight, targets = sinp.student

    def step():
        zero_grads(hidden, weight)
        logp, entropy = ptd.linear_logprobs(hidden, weight, targets, with_entropy=True)
        (logp.sum() + entropy.sum()).backward()

    _scale(benchmark, step, sinp, op="logprobs+entropy", method="ptd linear_logprobs", ours=True)


def test_scaling_eager_logprobs_entropy(benchmark, sinp):
    import torch

    hidden, weight, targets = sinp.student

    def step():
        zero_grads(hidden, weight)
        log_probs = torch.log_softmax(hidden @ weight.T, dim=-1)
        logp = log_probs.gather(1, targets[:, None]).squeeze(1)
        (logp.sum() - (log_probs.exp() * log_probs).sum()).backward()

    _scale(benchmark, step, sinp, op="logprobs+entropy", method="eager (log_softmax+gather+entropy)", nv_buffers=6)


@pytest.mark.vsweep
def test_scaling_ptd_jsd_loss(benchmark, sinp):
    hidden, weight, _, teacher_hidden, teacher_weight = sinp.all

    def step():
        zero_grads(hidden, weight)
        ptd.linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, beta=BETA).backward()

    _scale(benchmark, step, sinp, op="jsd", method="ptd linear_jsd_loss", ours=True)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_scaling_liger_chunked_jsd(benchmark, sinp, compiled):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, targets, teacher_hidden, teacher_weight = sinp.all
    loss_fn = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, compiled=compiled)

    def step():
        zero_grads(hidden, weight)
        loss_fn(hidden, weight, teacher_hidden, teacher_weight, targets).backward()

    _scale(benchmark, step, sinp, op="jsd",
           method=f"liger LigerFusedLinearJSDLoss (chunked, {'compiled' if compiled else 'eager'})",
           compiled=compiled)


def test_scaling_eager_jsd(benchmark, sinp):
    hidden, weight, _, teacher_hidden, teacher_weight = sinp.all

    def step():
        zero_grads(hidden, weight)
        eager_jsd(hidden, weight, teacher_hidden, teacher_weight).backward()

    _scale(benchmark, step, sinp, op="jsd", method="eager (TRL formula)", nv_buffers=12)


@pytest.mark.vsweep
def test_scaling_ptd_topk_jsd_loss(benchmark, sinp):
    hidden, weight, _, teacher_hidden, teacher_weight = sinp.all

    def step():
        zero_grads(hidden, weight)
        ptd.linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, K, beta=BETA).backward()

    _scale(benchmark, step, sinp, op=f"topk_jsd K={K}", method="ptd linear_topk_jsd_loss", ours=True)


def test_scaling_trl_logprobs_entropy(benchmark, sinp):
    import trl_peers

    trl_peers.load()
    hidden, weight, targets = sinp.student

    def step():
        zero_grads(hidden, weight)
        logp, entropy = trl_peers.trl_logprobs(hidden, weight, targets, with_entropy=True)
        (logp.sum() + entropy.sum()).backward()

    _scale(benchmark, step, sinp, op="logprobs+entropy", method="TRL ChunkedLogProbFunction (entropy)")


def test_scaling_trl_chunked_divergence(benchmark, sinp):
    import trl_peers

    trl_peers.load()
    hidden, weight, _, teacher_hidden, teacher_weight = sinp.all

    def step():
        zero_grads(hidden, weight)
        trl_peers.trl_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=BETA).mean().backward()

    _scale(benchmark, step, sinp, op="jsd", method="TRL ChunkedDivergenceFunction")
