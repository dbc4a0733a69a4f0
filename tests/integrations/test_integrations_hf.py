"""ptd_kernels.integrations.hf on tiny Qwen3, Qwen3-VL and soft-capped Gemma-2 (fp32, CPU).

The fused head must give the model's own next-token log-probs and entropy, the same gradients
as the materialized-logits path, and PTD-PO's Top-K JSD equal to ptd_kernels.reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _tiny_hf import random_image, save_tiny_gemma2, save_tiny_qwen3, save_tiny_qwen3_vl
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, CohereConfig, GraniteConfig, MptConfig

import ptd_kernels as ptd
from ptd_kernels.integrations import hf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    return save_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3vl"))


def _logits_reference(model, labels, **inputs):
    """(log-probs, entropy) of the labels from the model's own logits, and the logits."""
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    logp = logits.log_softmax(-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    live = targets != -100
    return picked * live, entropy * live


def _check_head_against_logits(model, **inputs):
    input_ids = inputs["input_ids"]
    labels = input_ids.clone()
    labels[:, :3] = -100  # a prompt: skipped positions give 0
    want_logp, want_entropy = _logits_reference(model, labels, **inputs)
    want = (want_logp.sum() + 0.3 * want_entropy.sum())
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)

    hf.add_fused_head(model)
    try:
        out = model(**inputs, labels=labels, fused_head=True)
    finally:
        hf.remove_fused_head(model)
    assert out.log_probs.shape == labels[:, 1:].shape and out.log_probs.dtype == torch.float32
    assert torch.equal(out.label_mask, labels[:, 1:] != -100)
    torch.testing.assert_close(out.log_probs, want_logp, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out.entropy, want_entropy, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss, -want_logp.sum() / out.label_mask.sum())
    got = out.log_probs.sum() + 0.3 * out.entropy.sum()
    got_grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    reached = 0
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
            reached += bool(g.abs().sum() > 0)
    assert reached > 10  # the gradient reached the backbone, not only the output layer


def test_qwen3_head_matches_logits(qwen3):
    model = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32)
    ids = torch.randint(3, 30, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    _check_head_against_logits(model, input_ids=ids, attention_mask=mask)


def test_qwen3_vl_head_matches_logits(qwen3_vl):
    path, processor = qwen3_vl
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it"}]}]] * 2
    inputs = processor(images=[random_image(0), random_image(1)],
                       text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt", padding=True)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 8  # the images are really read
    _check_head_against_logits(model, **inputs)
    assert hf.check_against_logits(model, **inputs) < 1e-5


def test_teacher_terms_equal_reference(qwen3, tmp_path):
    """PTD-PO's Top-K JSD through the head equals the reference on the two models' hidden states."""
    student = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(save_tiny_qwen3(tmp_path, hidden=48, seed=3), dtype=torch.float32)
    ids = torch.randint(3, 30, (3, 10))
    n_completion = 4
    labels = ids.clone()
    labels[:, :-n_completion] = -100
    teacher_ids = torch.cat([torch.randint(3, 30, (3, 4)), ids[:, -n_completion:]], dim=1)  # another prompt
    with torch.no_grad():
        teacher_hidden = hf.last_hidden_states(teacher, input_ids=teacher_ids)[:, -n_completion - 1:-1]
    rows = torch.tensor([True, False, True])
    spec = hf.PTDTeacher(hidden=teacher_hidden, layer=hf.output_layer(teacher), rows=rows, k=5)
    out = hf.fused_lm_forward(student, input_ids=ids, labels=labels, teacher=spec)

    student_hidden = hf.last_hidden_states(student, input_ids=ids)[:, -n_completion - 1:-1]
    want = ptd.reference.linear_topk_jsd(student_hidden.reshape(-1, 32).double(),
                                         student.lm_head.weight.double(),
                                         teacher_hidden.reshape(-1, 48).double(), teacher.lm_head.weight.double(), 5)
    want = want.view(3, n_completion).float() * rows[:, None]
    got = out.jsd[:, -n_completion:]
    assert bool((got[rows] > 0).all()) and bool((out.jsd[:, :-n_completion] == 0).all())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # overlap |TopK(p) ∩ TopK(q)| / K and the teacher mass Σ_S q on S = TopK(p) ∪ TopK(q), from the logits
    top_p = (student_hidden @ student.lm_head.weight.T).topk(5, dim=-1).indices
    top_q = (teacher_hidden @ teacher.lm_head.weight.T).topk(5, dim=-1).indices
    q = (teacher_hidden @ teacher.lm_head.weight.T).softmax(-1)
    in_support = torch.zeros_like(q, dtype=torch.bool).scatter(-1, top_p, True).scatter(-1, top_q, True)
    overlap = (top_p.unsqueeze(-1) == top_q.unsqueeze(-2)).any(-1).float().mean(-1)
    torch.testing.assert_close(out.overlap[:, -n_completion:], overlap * rows[:, None])
    torch.testing.assert_close(out.teacher_mass[:, -n_completion:], (q * in_support).sum(-1) * rows[:, None])


def test_generate_and_plain_forward_unchanged(qwen3):
    model = AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32)
    ids = torch.randint(3, 30, (1, 5))
    before = model(input_ids=ids).logits
    hf.add_fused_head(model, flag="fused_lm_head")
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    assert model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.shape == (1, 4)
    for stray in ("fused_techer", "ptd_policy_loss"):  # the model's forward would drop it: refused instead
        with pytest.raises(TypeError, match=f"unknown keyword '{stray}'; the fused head takes fused_teacher="):
            model(input_ids=ids, labels=ids, fused_lm_head=True, **{stray: None})
    other = AutoModelForCausalLM.from_pretrained(qwen3)
    assert "forward" not in other.__dict__  # instance-scoped: another instance keeps the class forward
    hf.remove_fused_head(model)
    assert "forward" not in model.__dict__
    with pytest.raises(ValueError, match="no fused head"):
        hf.remove_fused_head(model)


def test_only_the_methods_own_names_say_ptd():
    """"PTD" names only what is specific to the method (the teacher side of its Top-K JSD with tail); the
    generic fused head and its parts — log-probs, entropy, a served teacher, a policy loss — are named for
    what they are."""
    import inspect

    import ptd_train.model

    assert [name for name in hf.__all__ if "ptd" in name.lower()] == ["PTDTeacher"]
    defined_here = [name for name, value in vars(ptd_train.model).items()
                    if inspect.isclass(value) and value.__module__ == ptd_train.model.__name__]
    assert "ModelWithFusedHead" in defined_here and not [name for name in defined_here if "ptd" in name.lower()]
    assert inspect.signature(hf.add_fused_head).parameters["flag"].default == "fused_head"


def test_logit_transform_from_configs():
    def read(config):
        scale, softcap, _ = hf.logit_transform(config)
        return scale, softcap

    assert read(CohereConfig(logit_scale=0.0625)) == (0.0625, None)
    assert read(GraniteConfig(logits_scaling=8.0)) == (0.125, None)
    assert read(MptConfig(logit_scale=3.0)) == (1.0, None)  # transformers' MPT ignores it
    from transformers import Gemma2Config

    scale, softcap, source = hf.logit_transform(Gemma2Config(final_logit_softcapping=30.0))
    assert (scale, softcap) == (1.0, 30.0) and "final_logit_softcapping=30" in source
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hf.logit_transform(Gemma2Config(final_logit_softcapping=-1.0))


def test_softcapped_gemma2_head_matches_logits(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_gemma2(tmp_path), dtype=torch.float32,
                                                 attn_implementation="eager")
    ids = torch.randint(3, 30, (2, 8))
    with torch.no_grad():
        raw = model.lm_head(hf.last_hidden_states(model, input_ids=ids))
    assert raw.abs().max() > 4.0  # the cap (2.0) bends these logits
    _check_head_against_logits(model, input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.slow
def test_fsdp2_two_processes(qwen3, tmp_path):
    """Under FSDP2 (2 CPU processes, gloo) the head gives the unsharded values and gradients, with the
    output layer in the root unit (un-sharded for the forward) and in a unit of its own (a DTensor)."""
    root = os.path.abspath(os.path.join(__file__, "..", "..", ".."))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(root, "tests", "_fsdp2_hf.py"), qwen3, str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(2):
        for case in json.load(open(tmp_path / f"rank{rank}.json")).values():
            assert case["value_gap"] < 1e-5
            assert case["grad_scale"] > 0 and case["grad_gap"] < 1e-5 * case["grad_scale"]
