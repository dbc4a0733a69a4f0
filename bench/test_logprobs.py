"""log-prob + entropy of the sampled tokens, fwd+bwd: ours vs eager PyTorch vs the 3-GEMM floor."""

import torch
from conftest import DEVICE, gemm_floor, run_benchmark, zero_grads

import ptd_kernels as ptd

OP = "logprobs+entropy"


def test_floor(benchmark, student):
    hidden, weight, _ = student
    run_benchmark(benchmark, lambda: gemm_floor(hidden, weight), method="gemm floor (3 GEMMs)", op=OP,
                  memory=False)


def test_ptd(benchmark, student):
    hidden, weight, targets = student

    def step():
        zero_grads(hidden, weight)
        logp, entropy = ptd.linear_logprobs(hidden, weight, targets, with_entropy=True)
        (logp.sum() + entropy.sum()).backward()

    run_benchmark(benchmark, step, hidden, weight, targets, method=f"ptd ({'triton' if DEVICE == 'cuda' else 'torch'})",
                  op=OP)


def test_eager(benchmark, student):
    hidden, weight, targets = student

    def step():
        zero_grads(hidden, weight)
        log_probs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
        logp = log_probs.gather(1, targets[:, None]).squeeze(1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        (logp.sum() + entropy.sum()).backward()

    run_benchmark(benchmark, step, hidden, weight, targets, method="eager (log_softmax+gather+entropy)", op=OP)
