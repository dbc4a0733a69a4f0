"""ptd_kernels.integrations.verl against verl's fused linear-for-PPO semantics.

Always: against a transcription of verl 0.7.0's PyTorch reference semantics (materialized
logits, autograd). When verl is installed (``pip install --no-deps verl==0.7.0`` suffices), also
against verl's own ``FusedLinearForPPO``, loaded from its file: verl's package ``__init__``
imports ray and more, which this test does not need.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from ptd_kernels.integrations.verl import VERL_VERSION, FusedLinearForPPO, fused_linear_for_ppo

pytestmark = pytest.mark.usefixtures("one_thread")


def verl_semantics(hidden_states, vocab_weights, input_ids, temperature=1.0):
    """verl's definition: logits in the inputs' dtype, then float32 log-softmax / entropy, cast back."""
    logits = (hidden_states @ vocab_weights.t()) / temperature
    dtype = logits.dtype
    logits = logits.float()
    log_probs = logits.log_softmax(-1).gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)
    entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
    return log_probs.to(dtype), entropy.to(dtype)


def _installed_verl_module():
    spec = importlib.util.find_spec("verl")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "utils", "experimental", "torch_functional.py")
    if not os.path.exists(path):
        return None
    module_spec = importlib.util.spec_from_file_location("_verl_torch_functional", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _inputs(shape, dtype=torch.float32, vocab=300, hidden=24):
    h = torch.randn(*shape, hidden, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.3).to(dtype).requires_grad_()
    ids = torch.randint(0, vocab, shape)
    return h, w, ids


def _run(fn, h, w, ids, temperature):
    log_probs, entropy = fn(h, w, ids, temperature)
    (log_probs.float().sum() * 0.7 + entropy.float().sum() * 1.3).backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    return log_probs, entropy, grads


@pytest.mark.parametrize("shape", [(11,), (2, 7)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_verl_semantics_fp32(shape, temperature):
    h, w, ids = _inputs(shape)
    got = _run(fused_linear_for_ppo, h, w, ids, temperature)
    want = _run(verl_semantics, h, w, ids, temperature)
    assert got[0].shape == ids.shape and got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=1e-5)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)


def test_bf16_keeps_dtypes_and_rounds_once():
    h, w, ids = _inputs((2, 9), torch.bfloat16)
    got = _run(fused_linear_for_ppo, h, w, ids, 1.0)
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    assert got[2][0].dtype == got[2][1].dtype == torch.bfloat16
    # computed in float32 from the bf16 inputs, rounded to bf16 once at the end (within half a bf16 ulp)
    exact = verl_semantics(h.detach().double(), w.detach().double(), ids)
    for value, want in zip(got[:2], exact):
        torch.testing.assert_close(value.double(), want, rtol=2.0 ** -8, atol=1e-6)


def test_module_is_called_as_verl_calls_it():
    h, w, ids = _inputs((1, 10))
    rolled = torch.roll(ids, shifts=-1, dims=-1)
    log_probs, entropy = FusedLinearForPPO().forward(hidden_states=h, vocab_weights=w, input_ids=rolled,
                                                     temperature=0.9)
    want = verl_semantics(h, w, rolled, 0.9)
    torch.testing.assert_close(log_probs, want[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(entropy, want[1], atol=2e-6, rtol=1e-5)
    assert FusedLinearForPPO(chunk_size=64).chunk_size == 64


def test_bad_shapes_are_refused():
    h, w, ids = _inputs((2, 5))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        fused_linear_for_ppo(h, w, ids.reshape(-1))
    with pytest.raises(ValueError, match="hidden_states must be"):
        fused_linear_for_ppo(h.reshape(-1), w, ids.reshape(-1))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_for_ppo(h, w, ids, chunk_size=0)


def test_matches_installed_verl():
    verl = _installed_verl_module()
    if verl is None:
        pytest.skip(f"verl not installed (pip install --no-deps verl=={VERL_VERSION} to run this check)")
    for shape, temperature in (((13,), 1.0), ((2, 6), 0.6)):
        h, w, ids = _inputs(shape)
        got = _run(lambda *a: FusedLinearForPPO(chunk_size=4)(*a), h, w, ids, temperature)
        want = _run(lambda *a: verl.FusedLinearForPPO(chunk_size=4)(*a), h, w, ids, temperature)
        for a, b in zip(got[:2], want[:2]):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
        for a, b in zip(got[2], want[2]):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)
