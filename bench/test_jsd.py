"""Full JSD and Top-K JSD fused with the output layer, fwd+bwd: ours vs Liger vs eager vs the GEMM floor."""

import math

import pytest
import torch
from conftest import DEVICE, gemm_floor, run_benchmark, zero_grads

import ptd_kernels as ptd

BETA = 0.5


def test_floor(benchmark, student):
    hidden, weight, _ = student
    run_benchmark(benchmark, lambda: gemm_floor(hidden, weight), method="gemm floor (3 GEMMs)", op="jsd",
                  memory=False)


def test_ptd_jsd_loss(benchmark, student, teacher):
    hidden, weight, _ = student
    teacher_hidden, teacher_weight = teacher

    def step():
        zero_grads(hidden, weight)
        ptd.linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, beta=BETA).backward()

    run_benchmark(benchmark, step, hidden, weight, teacher_hidden, teacher_weight, method="ptd linear_jsd_loss",
                  op="jsd")


def test_ptd_jsd_per_row(benchmark, student, teacher):
    hidden, weight, _ = student
    teacher_hidden, teacher_weight = teacher

    def step():
        zero_grads(hidden, weight)
        ptd.linear_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=BETA).mean().backward()

    run_benchmark(benchmark, step, hidden, weight, teacher_hidden, teacher_weight, method="ptd linear_jsd",
                  op="jsd")


def test_liger_fused_linear_jsd(benchmark, student, teacher):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, targets = student
    teacher_hidden, teacher_weight = teacher
    # Soft loss only (weight_hard_loss=0): the same quantity as linear_jsd(...).mean().
    loss_fn = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA,
                                            compiled=DEVICE == "cuda")

    def step():
        zero_grads(hidden, weight)
        loss_fn(hidden, weight, teacher_hidden, teacher_weight, targets).backward()

    run_benchmark(benchmark, step, hidden, weight, teacher_hidden, teacher_weight,
                  method="liger LigerFusedLinearJSDLoss (chunked)", op="jsd")


def test_eager_jsd(benchmark, student, teacher):
    hidden, weight, _ = student
    teacher_hidden, teacher_weight = teacher

    def step():
        zero_grads(hidden, weight)
        logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
        with torch.no_grad():
            logq = torch.log_softmax((teacher_hidden @ teacher_weight.T).float(), dim=-1)
        log_mix = torch.logsumexp(torch.stack([logp + math.log(1 - BETA), logq + math.log(BETA)]), dim=0)
        kl_q = torch.nn.functional.kl_div(log_mix, logq, reduction="none", log_target=True).sum(-1)
        kl_p = torch.nn.functional.kl_div(log_mix, logp, reduction="none", log_target=True).sum(-1)
        (BETA * kl_q + (1 - BETA) * kl_p).mean().backward()

    run_benchmark(benchmark, step, hidden, weight, teacher_hidden, teacher_weight, method="eager (TRL formula)",
                  op="jsd")


@pytest.mark.parametrize("k", [64])
def test_ptd_topk_jsd_loss(benchmark, student, teacher, k):
    hidden, weight, _ = student
    teacher_hidden, teacher_weight = teacher

    def step():
        zero_grads(hidden, weight)
        ptd.linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, k, beta=BETA).backward()

    run_benchmark(benchmark, step, hidden, weight, teacher_hidden, teacher_weight,
                  method=f"ptd linear_topk_jsd_loss K={k}", op="jsd")


@pytest.mark.parametrize("k", [64])
def test_ptd_topk_jsd_per_row(benchmark, student, teacher, k):
    hidden, weight, _ = student
    teacher_hidden, teacher_weight = teacher

    def step():
        zero_grads(hidden, weight)
        ptd.linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, k, beta=BETA).mean().backward()

    run_benchmark(benchmark, step, hidden, weight, teacher_hidden, teacher_weight,
                  method=f"ptd linear_topk_jsd K={k}", op="jsd")
