"""Teacher top-K (no gradient, K=100): ours (streaming over vocabulary tiles) vs ``torch.topk``
on materialized logits (plus the logsumexp a caller needs for the log-probs)."""

import pytest
import torch
from conftest import DEVICE, FLOOR_1, measure

import ptd_kernels as ptd

K = 100
pytestmark = pytest.mark.tier(2)
BACKEND = "triton" if DEVICE == "cuda" else "torch"


def test_ptd_linear_topk(benchmark, inp):
    hidden, weight = inp.teacher
    measure(benchmark, lambda: ptd.linear_topk(hidden, weight, K), inp, op=f"teacher top-K K={K}",
            method=f"ptd linear_topk ({BACKEND})", ours=True, floor=FLOOR_1)


def test_torch_topk(benchmark, inp):
    hidden, weight = inp.teacher

    @torch.no_grad()
    def step():
        logits = (hidden @ weight.T).float()
        values, indices = torch.topk(logits, K, dim=-1)
        return values - torch.logsumexp(logits, dim=-1, keepdim=True), indices

    measure(benchmark, step, inp, op=f"teacher top-K K={K}", method="torch.topk on materialized logits",
            floor=FLOOR_1, nv_buffers=2)
