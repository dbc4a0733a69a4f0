"""Teacher top-K (no gradient, K=100): ours (streaming over vocabulary tiles) vs ``torch.topk``
on materialized logits (plus the logsumexp a caller needs for the log-probs); ours also with a soft-cap
and with a logit scale (logit_transforms.TRANSFORMS; extras, tier 3)."""

import pytest
import torch
from conftest import FLOOR_1, measure
from logit_transforms import TRANSFORMS, transform_args, transform_inputs, transform_row

import ptd_kernels as ptd

K = 100
pytestmark = pytest.mark.tier(2)


@pytest.mark.parametrize("transform", ["plain", *(pytest.param(t, marks=pytest.mark.tier(3)) for t in TRANSFORMS
                                                  if t != "plain")])
def test_ptd_linear_topk(benchmark, inp, transform, backend):
    x = transform_inputs(inp, transform)
    hidden, weight = x.teacher
    kw = transform_args(transform)

    def run(backend):
        return ptd.linear_topk(hidden, weight, K, backend=backend, **kw)

    method, extra = transform_row(transform, f"ptd linear_topk ({backend})")
    measure(benchmark, lambda: run(backend), x, op=f"teacher top-K K={K}", method=method, ours=True, floor=FLOOR_1,
            extra=extra, model=("linear_topk", backend), auto_call=run)


def test_torch_topk(benchmark, inp):
    hidden, weight = inp.teacher

    @torch.no_grad()
    def step():
        logits = (hidden @ weight.T).float()
        values, indices = torch.topk(logits, K, dim=-1)
        return values - torch.logsumexp(logits, dim=-1, keepdim=True), indices

    measure(benchmark, step, inp, op=f"teacher top-K K={K}", method="torch.topk on materialized logits",
            floor=FLOOR_1, nv_buffers=2)
