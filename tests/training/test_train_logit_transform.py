"""The trainer applies a checkpoint's own logit transform (here Gemma-2's soft-cap) in every
output-layer call: its student pass, teacher-forced log-probs and sampling logits equal the
model's own logits."""

from __future__ import annotations

import pytest
import torch
from _tiny_hf import save_tiny_gemma2
from transformers import AutoModelForCausalLM

from ptd_train.model import ModelWithPTDHead

pytestmark = pytest.mark.usefixtures("one_thread")


def test_soft_capped_checkpoint_through_the_trainer_head(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_gemma2(tmp_path, softcap=2.0), dtype=torch.float32,
                                                 attn_implementation="eager")
    lm = ModelWithPTDHead(model)
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
