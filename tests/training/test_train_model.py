"""ptd_train.model, .prompts, .vision and the embedded task: tokenizer, patchify, prompts, the tiny Qwen3-VL."""

import numpy as np
import pytest
import torch

from ptd_train.model import TinyVLSpec, backbone, build_tiny_model, distinct_prompts, model_inputs, response_hidden
from ptd_train.prompts import IMAGE_PAD, build_tokenizer, encode_prompt, left_pad, placeholder_ids
from ptd_train.tasks import GridCountTask, reward
from ptd_train.tasks.grid_count import IMAGE_SIZE
from ptd_train.vision import VisionGeometry, patchify, stack_images

SMALL = TinyVLSpec(
    hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, vision_hidden=16, vision_heads=1
)


@pytest.fixture(scope="module")
def task():
    return GridCountTask(eval_size=8, dev_size=4)


@pytest.fixture(scope="module")
def tok(task):
    return build_tokenizer(task.words)


def test_tokenizer_round_trips_through_save_pretrained(tok, tmp_path):
    from transformers import AutoTokenizer

    text = "how many red cells ? hint : look only at cells a1 b3 and ignore the blue cells . answer : total 7"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.get_vocab() == tok.get_vocab()
    assert tok2.encode(text, add_special_tokens=False) == ids
    assert (tok2.pad_token_id, tok2.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    seq = [tok.convert_tokens_to_ids("<|vision_start|>")] + [tok.convert_tokens_to_ids(IMAGE_PAD)] * 3
    assert tok2.convert_ids_to_tokens(seq) == ["<|vision_start|>"] + [IMAGE_PAD] * 3
    assert set(placeholder_ids(tok2)) == set(placeholder_ids(tok)) and len(placeholder_ids(tok)) == 4


def test_patchify_matches_qwen_processor_layout():
    """Our patchify against transformers' Qwen2-VL (PIL) image processor patchify, and against
    the documented layout written out by hand."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8)
    geo = VisionGeometry(patch_size=7, merge_size=2, temporal_patch_size=2)
    ours, thw = patchify(img, geo)
    assert thw == (1, 8, 12) and ours.shape == (96, 3 * 2 * 7 * 7)
    normed = ((img / 255.0 - 0.5) / 0.5).astype(np.float32).transpose(2, 0, 1)  # C, H, W
    proc = Qwen2VLImageProcessorPil.__new__(Qwen2VLImageProcessorPil)
    theirs, gh, gw = proc.patchify(normed, patch_size=7, merge_size=2, temporal_patch_size=2)
    assert (gh, gw) == (8, 12)
    torch.testing.assert_close(ours, torch.from_numpy(np.ascontiguousarray(theirs)), rtol=1e-6, atol=1e-6)
    # by hand: token j of merge window (wy, wx), sub-position (my, mx), channel c, frame t, pixel (py, px)
    P, M = 7, 2
    wy, wx, my, mx, c, t, py, px = 1, 4, 1, 0, 2, 1, 3, 5
    row = (wy * (12 // M) + wx) * M * M + my * M + mx
    col = ((c * 2 + t) * P + py) * P + px
    y, x = (wy * M + my) * P + py, (wx * M + mx) * P + px
    assert ours[row, col].item() == pytest.approx(normed[c, y, x], abs=1e-6)


def test_patchify_rejects_bad_sizes():
    with pytest.raises(ValueError, match="image"):
        patchify(np.zeros((50, 56, 3), np.uint8), VisionGeometry(7, 2, 2))


def test_grid_task_one_token_per_cell_and_disjoint_splits(task, tok):
    ex = task.test[0]
    assert ex.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    p, thw = patchify(ex.image, VisionGeometry(7, 2, 2))
    assert thw[1] * thw[2] // 4 == 16  # one LLM image token per grid cell
    assert reward(ex.completion, ex.answer) == 1.0
    assert reward("total 3 4", "4") == 1.0 and reward("total 4 3", "4") == 0.0 and reward("total", "4") == 0.0
    train = task.sample(np.random.default_rng(0), 300)
    assert all(0 <= int(e.answer) <= 16 for e in train)
    # no training grid is a held-out or dev grid (the grid is recovered from the spatial hint)
    from ptd_train.tasks.grid_count import _grid_key

    def grid_of(e):
        g = np.zeros((4, 4), bool)
        for w in e.hints["spatial"].split():
            if len(w) == 2 and w[0] in "abcd" and w[1] in "1234":
                g["abcd".index(w[0]), int(w[1]) - 1] = True
        assert g.sum() == int(e.answer)
        return g

    assert {_grid_key(grid_of(e)) for e in task.test + task.dev} <= task._held_keys
    assert not any(_grid_key(grid_of(e)) in task._held_keys for e in train)


def test_prompt_has_hint_only_when_asked(task, tok):
    ex = task.test[0]
    hint_id = tok.convert_tokens_to_ids("hint")
    x = encode_prompt(tok, ex.question, 16, None)
    xh = encode_prompt(tok, ex.question, 16, ex.hints["spatial"])
    assert hint_id not in x and hint_id in xh
    assert x.count(tok.convert_tokens_to_ids(IMAGE_PAD)) == 16 == xh.count(tok.convert_tokens_to_ids(IMAGE_PAD))
    assert tok.unk_token_id not in xh


def test_tiny_model_generates_and_gives_response_hidden(task, tok):
    model = build_tiny_model(tok, SMALL, seed=0).eval()
    geo = VisionGeometry.of(model)
    exs = task.test[:3]
    prompts = [encode_prompt(tok, e.question, 16, None) for e in exs]
    prompts[1] = encode_prompt(tok, exs[1].question, 16, exs[1].hints["spatial"])  # a longer one: left padding
    ids, att = left_pad(prompts, tok.pad_token_id)
    pv = [patchify(e.image, geo) for e in exs]
    vision = stack_images([p for p, _ in pv], [g for _, g in pv])
    blocked = placeholder_ids(tok)
    out = model.generate(
        **model_inputs(model, ids, att, vision),
        max_new_tokens=3,
        do_sample=True,
        top_k=0,
        suppress_tokens=blocked,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    resp = out[:, ids.shape[1] :]
    assert not torch.isin(resp, torch.tensor(blocked)).any()
    rmask = torch.ones_like(resp, dtype=torch.bool)
    with torch.no_grad():
        h = response_hidden(model, ids, att, vision, resp, rmask)
        full = model(**model_inputs(model, torch.cat([ids, resp], 1), torch.cat([att, rmask.long()], 1), vision))
    P, T = ids.shape[1], resp.shape[1]
    assert h.shape == (3, T, SMALL.hidden_size)
    # the hidden state at row t scores response token t: same as the model's own logits there
    torch.testing.assert_close(model.lm_head(h), full.logits[:, P - 1 : P - 1 + T], rtol=1e-4, atol=1e-4)


def test_shared_images_match_repeated_pixels(task, tok):
    """Rollouts of one prompt share its image: the vision tower runs once per distinct image,
    with the same hidden states and gradients as repeating the pixels per sequence."""
    model = build_tiny_model(tok, SMALL, seed=0)
    geo = VisionGeometry.of(model)
    exs = task.test[:2]
    pv = [patchify(e.image, geo) for e in exs]
    vision = stack_images([p for p, _ in pv], [g for _, g in pv])
    owner = [0, 0, 1, 1, 1]
    ids, att = left_pad([encode_prompt(tok, exs[i].question, 16, None) for i in owner], tok.pad_token_id)
    resp = torch.tensor([[tok.convert_tokens_to_ids("total"), tok.convert_tokens_to_ids(str(i))] for i in range(5)])
    rmask = torch.ones_like(resp, dtype=torch.bool)
    shared = vision.select(owner)
    assert shared.rows == owner and shared.pixel_values is vision.pixel_values
    h1 = response_hidden(model, ids, att, shared, resp, rmask)
    g1 = torch.autograd.grad(h1.square().sum(), model.model.visual.patch_embed.proj.weight)[0]
    h2 = response_hidden(model, ids, att, shared.dense(), resp, rmask)
    g2 = torch.autograd.grad(h2.square().sum(), model.model.visual.patch_embed.proj.weight)[0]
    torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-5)
    # float32 sums in another order (the G rows of a prompt share one prompt pass): ~1e-4 of the scale
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-4 * g2.abs().max().item())


def _full_forward_hidden(model, ids, att, vision, resp, rmask):
    """The reference: one forward pass over [prompt ; response] per row, no cache, no sharing."""
    P, T = ids.shape[1], resp.shape[1]
    backbone(model).rope_deltas = None
    x, a = torch.cat([ids, resp], 1), torch.cat([att, rmask.long()], 1)
    out = backbone(model)(**model_inputs(model, x, a, vision.dense()), use_cache=False)
    return out.last_hidden_state[:, P - 1 : P - 1 + T]


def test_prompt_cache_matches_full_forward(task, tok):
    """response_hidden encodes each distinct prompt once and continues its KV cache per row:
    values and gradients equal one full forward pass per row (left-padded prompts of different
    lengths, a hinted one among them, and right-padded responses)."""
    model = build_tiny_model(tok, SMALL, seed=0)
    geo = VisionGeometry.of(model)
    exs = task.test[:3]
    pv = [patchify(e.image, geo) for e in exs]
    vision = stack_images([p for p, _ in pv], [g for _, g in pv])
    owner = [0, 0, 1, 1, 1, 2]
    prompts = [encode_prompt(tok, exs[i].question, 16, exs[i].hints["spatial"] if i == 1 else None) for i in owner]
    ids, att = left_pad(prompts, tok.pad_token_id)
    words = ["total", "3", "a1", "blue", "7", tok.eos_token]
    resp = torch.tensor([[tok.convert_tokens_to_ids(words[(r + t) % 6]) for t in range(4)] for r in range(6)])
    rmask = torch.ones_like(resp, dtype=torch.bool)
    rmask[1, 2:] = False
    rmask[4, 1:] = False
    shared = vision.select(owner)
    assert distinct_prompts(ids, att, shared) == ([0, 2, 5], owner)
    m = rmask[..., None]
    params = [model.model.visual.patch_embed.proj.weight, model.model.language_model.layers[0].self_attn.q_proj.weight]
    h1 = response_hidden(model, ids, att, shared, resp, rmask)
    g1 = torch.autograd.grad((h1 * m).square().sum(), params)
    h2 = _full_forward_hidden(model, ids, att, shared, resp, rmask)
    g2 = torch.autograd.grad((h2 * m).square().sum(), params)
    torch.testing.assert_close(h1 * m, h2 * m, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def test_an_image_prompt_needs_the_vision_tokens():
    """encode_prompt reads three token ids; a tokenizer without them is refused (an unknown token would
    otherwise come back as the <unk> id and the image would have no placeholders)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "how": 1, "many": 2, "answer": 3, ":": 4},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    assert encode_prompt(tok, "how many", None) == [1, 2, 3, 4]  # text only: no vision token read
    with pytest.raises(ValueError, match="needs all three"):
        encode_prompt(tok, "how many", 4)
