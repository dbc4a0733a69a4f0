"""Real-checkpoint families through the Auto classes: tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL
checkpoints saved with their processor (image processor + chat template, no video processor:
no torchvision here), and a text-only causal LM with a text task. Prompts come from the
checkpoint's own chat template and image processor; one RL step runs on each."""

import json
import os

import numpy as np
import pytest
import torch
from _tiny_checkpoints import make_checkpoint, make_dataset

from ptd_train import run, trainer
from ptd_train.config import TrainConfig
from ptd_train.model import image_processor_of, load_model_and_tokenizer
from ptd_train.prompts import ChatPrompts
from ptd_train.tasks import Example, load_jsonl
from ptd_train.tasks.grid_count import render

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["--max_steps", "1", "--eval_size", "2", "--prompts_per_step", "2", "--group_size", "2", "--progress", "false"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "text"])
def test_checkpoint_family_builds_prompts_with_its_processor_and_trains(tmp_path, family):
    path = make_checkpoint(tmp_path, family)
    data = make_dataset(tmp_path, text=family == "text")
    model, tok, processor = load_model_and_tokenizer(path)
    assert type(model).__name__ == {"qwen2_vl": "Qwen2VLForConditionalGeneration", "text": "Qwen3ForCausalLM",
                                    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                    "qwen3_vl": "Qwen3VLForConditionalGeneration"}[family]  # fmt: skip
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), model_name_or_path=path, dataset=data).resolved()
    _, _, _, env = trainer.load_model(cfg, torch.device("cpu"), "torch")
    assert isinstance(env.format, ChatPrompts)
    ex = trainer.load_data(cfg)[1][0]
    student, teacher = env.prompts([ex]), env.prompts([ex], ["default"])
    hint_id = tok.convert_tokens_to_ids("Hint:")
    s_tokens = tok.convert_ids_to_tokens(student.ids[0].tolist())
    assert s_tokens[:2] == ["<|im_start|>", "user"] and s_tokens[-2:] == ["<|im_start|>", "assistant"]  # its template
    assert hint_id not in student.ids and hint_id in teacher.ids  # the student never sees the hint
    if family == "text":
        assert processor is None and student.vision is None
    else:  # the checkpoint's image processor: its resizing (28×28 → 2×2 tokens) and normalization
        base = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
        assert type(processor).__mro__[1].__name__ == base[family] and processor.chat_template
        assert getattr(processor, "video_processor", None) is None  # built without one: no torchvision needed
        expected = processor.image_processor(images=[ex.image], return_tensors="pt")
        torch.testing.assert_close(student.vision.pixel_values, expected["pixel_values"])
        assert student.vision.grids.tolist() == [[1, 4, 4]]
        assert (student.ids == model.config.image_token_id).sum() == 4

    evals = run.main(["--output_dir", str(tmp_path / "out"), "--model_name_or_path", path, "--dataset", data, *FLAGS])
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        (m,) = [json.loads(line) for line in f]
    assert np.isfinite(m["loss"]) and m["ptd_rollouts"] > 0 and m["jsd"] > 0 and "accuracy_after" in evals
    reloaded, _, reprocessor = load_model_and_tokenizer(str(tmp_path / "out" / "final"))  # final/ is a checkpoint too
    assert type(reloaded) is type(model) and (reprocessor is None) == (family == "text")


def test_vision_checkpoint_with_a_chat_template_needs_its_image_processor(tmp_path, capsys):
    path = make_checkpoint(tmp_path, "qwen2_vl")
    for name in ("processor_config.json", "preprocessor_config.json"):
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    with pytest.raises(SystemExit) as exit_:
        run.main(["--output_dir", str(tmp_path / "out"), "--model_name_or_path", path, "--dataset",
                  make_dataset(tmp_path, text=False), *FLAGS])  # fmt: skip
    assert exit_.value.code == 2 and "image processor" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")  # a failed start leaves no folder


def test_max_pixels_caps_the_image_processor(tmp_path):
    path = make_checkpoint(tmp_path, "qwen3_vl")
    processor = image_processor_of(path, load_model_and_tokenizer(path)[0].config)
    image = render(np.ones((4, 4), bool))
    small = ChatPrompts(processor.tokenizer, processor, max_pixels=14 * 14)  # one 2×2 window
    ids, patches, grid = small.encode(Example(image, "how many red cells ?", "16"), None)
    assert grid == (1, 2, 2) and patches.shape[0] == 4


def test_jsonl_text_examples_and_no_mixing(tmp_path):
    text = load_jsonl(make_dataset(tmp_path, text=True))
    assert all(ex.image is None for ex in text) and text[0].hint("default") == "add the two numbers ."
    images = make_dataset(tmp_path, text=False)
    with open(images, "a") as f:
        f.write(json.dumps({"image": None, "question": "what is two plus two ?", "answer": 4}) + "\n")
    with pytest.raises(ValueError, match=r"images\.jsonl:7: has no image, unlike the first example"):
        load_jsonl(images)
