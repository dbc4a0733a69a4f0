"""The PTD head, fwd+bwd (K=100, union + tail, β=0.5): ``linear_ptd_terms`` (logp, entropy,
Top-K JSD and overlap from one sweep per side) vs the same terms from separate calls
(``linear_logprobs`` + ``linear_topk_jsd`` + two ``linear_topk`` for the overlap) vs the eager
reference; the one-sweep head also with a soft-cap and with a logit scale (logit_transforms.TRANSFORMS)."""

import pytest
from conftest import FLOOR_4, measure, zero_grads
from logit_transforms import TRANSFORM_PARAMS, transform_args, transform_inputs, transform_row

import ptd_kernels as ptd

K = 100
BETA = 0.5
pytestmark = pytest.mark.tier(2)


@pytest.mark.parametrize("transform", TRANSFORM_PARAMS)
def test_ptd_terms_one_sweep(benchmark, inp, transform, backend):
    x = transform_inputs(inp, transform)
    hidden, weight, targets, teacher_hidden, teacher_weight = x.all
    kw = transform_args(transform, teacher=True)

    def run(backend):
        t = ptd.linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, K, beta=BETA,
                                 backend=backend, **kw)
        (t.logp.sum() + t.entropy.sum() + t.jsd.sum()).backward()

    def step():
        zero_grads(hidden, weight)
        run(backend)

    method, extra = transform_row(transform, f"ptd linear_ptd_terms (one sweep) ({backend})")
    measure(benchmark, step, x, op=f"ptd head K={K}", method=method, ours=True, floor=FLOOR_4,
            grads=(hidden, weight), extra=extra, model=("linear_ptd_terms", backend), auto_call=run)


def test_ptd_separate_calls(benchmark, inp, backend):
    hidden, weight, targets, teacher_hidden, teacher_weight = inp.all

    def step():
        zero_grads(hidden, weight)
        logp, entropy = ptd.linear_logprobs(hidden, weight, targets, with_entropy=True, backend=backend)
        jsd = ptd.linear_topk_jsd(hidden, weight, teacher_hidden, teacher_weight, K, beta=BETA, backend=backend)
        ptd.topk_overlap(ptd.linear_topk(hidden.detach(), weight.detach(), K, backend=backend).indices,
                         ptd.linear_topk(teacher_hidden, teacher_weight, K, backend=backend).indices)
        (logp.sum() + entropy.sum() + jsd.sum()).backward()

    measure(benchmark, step, inp, op=f"ptd head K={K}",
            method=f"ptd separate calls (logprobs + topk_jsd + 2 topk) ({backend})", floor=FLOOR_4,
            grads=(hidden, weight))


@pytest.mark.tier(3)
def test_eager_reference(benchmark, inp):
    hidden, weight, targets, teacher_hidden, teacher_weight = inp.all

    def step():
        zero_grads(hidden, weight)
        t = ptd.reference.linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, K, beta=BETA)
        (t.logp.sum() + t.entropy.sum() + t.jsd.sum()).backward()

    measure(benchmark, step, inp, op=f"ptd head K={K}", method="eager reference (ptd_kernels.reference)",
            floor=FLOOR_4, grads=(hidden, weight), nv_buffers=10)
