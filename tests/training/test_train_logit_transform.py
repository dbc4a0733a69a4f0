"""The trainer applies a checkpoint's own logit transform (here Gemma-2's soft-cap) in every
output-layer call: its student pass, teacher-forced log-probs and sampling logits equal the
model's own logits."""

from __future__ import annotations

import pytest
import torch
from _tiny_hf import save_tiny_gemma2
from transformers import AutoModelForCausalLM

from ptd_train.model import ModelWithFusedHead

pytestmark = pytest.mark.usefixtures("one_thread")


def test_soft_capped_checkpoint_through_the_trainer_head(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_gemma2(tmp_path, softcap=2.0), dtype=torch.float32,
                                                 attn_implementation="eager")
    lm = ModelWithFusedHead(model)
    assert lm.logit_transform == dict(logit_scale=1.0, softcap=2.0)
    ids = torch.randint(3, 30, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits.log_softmax(-1)
        hidden = model.model(input_ids=ids).last_hidden_state
    W, b = lm.output_layer()
    import ptd_kernels as ptd

    got = ptd.linear_logprobs(hidden[:, :-1].reshape(-1, hidden.shape[-1]), W, ids[:, 1:].reshape(-1), bias=b,
                              backend="torch", **lm.logit_transform)
    torch.testing.assert_close(got.view(2, 8), want[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), rtol=1e-5,
                               atol=1e-5)
    raw = torch.nn.functional.linear(hidden[:, -1], W, b)
    assert raw.abs().max() > 4.0  # the cap (2.0) bends these logits
    capped = lm.logit_transform["softcap"] * torch.tanh(raw / lm.logit_transform["softcap"])
    torch.testing.assert_close(capped.log_softmax(-1), want[:, -1], rtol=1e-5, atol=1e-5)


def test_sampling_logits_apply_the_scale_and_cap(tmp_path):
    """``next_token_logits`` (what sampling draws from) is z = c·tanh(s·a/c): the model's own logits with the
    checkpoint's cap, and the reference's log-probs with a scale and cap together, after the prompt and after
    one more token fed through the cache."""
    import contextlib
    import types

    import ptd_kernels as ptd
    from ptd_train.model import encode_prefix

    model = AutoModelForCausalLM.from_pretrained(save_tiny_gemma2(tmp_path, softcap=2.0), dtype=torch.float32,
                                                 attn_implementation="eager")
    lm = ModelWithFusedHead(model)
    env = types.SimpleNamespace(amp=contextlib.nullcontext)
    ids = torch.randint(3, 30, (2, 7))
    W, b = lm.output_layer()
    with torch.no_grad():
        own = lm.next_token_logits(env, encode_prefix(model, ids, torch.ones_like(ids), None))
        torch.testing.assert_close(own, model(input_ids=ids).logits[:, -1], rtol=1e-5, atol=1e-5)

        lm.logit_transform = dict(logit_scale=3.0, softcap=2.0)  # as a scaled and capped checkpoint reads
        prefix = encode_prefix(model, ids, torch.ones_like(ids), None)
        got = [lm.next_token_logits(env, prefix)]
        nxt = got[0].argmax(-1)
        got.append(lm.next_token_logits(env, prefix, nxt[:, None]))
        hidden = model.model(input_ids=torch.cat([ids, nxt[:, None]], 1)).last_hidden_state
        vocab = W.shape[0]
        for position, logits in zip((-2, -1), got):
            raw = torch.nn.functional.linear(hidden[:, position], W, b)
            assert (3.0 * raw).abs().max() > 4.0  # the cap (2.0) bends these logits
            torch.testing.assert_close(logits, 2.0 * torch.tanh(3.0 * raw / 2.0), rtol=1e-5, atol=1e-5)
            rows = hidden[:, position].repeat_interleave(vocab, 0)
            want = ptd.reference.linear_logprobs(rows, W, torch.arange(vocab).repeat(2), bias=b, logit_scale=3.0,
                                                 softcap=2.0).view(2, vocab)
            torch.testing.assert_close(logits.log_softmax(-1), want, rtol=1e-5, atol=1e-5)
