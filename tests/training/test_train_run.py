"""ptd_train.run end to end on tiny shapes: one-step runs (GRPO and PTD), resume, the JSONL +
checkpoint path, the student never seeing a hint, and no batch×length×vocab tensor."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ptd_train import rollout, run, trainer, warmstart
from ptd_train.config import TrainConfig
from ptd_train.hints import HintLeakError
from ptd_train.model import ModelWithFusedHead, TinyVLSpec, build_tiny_model
from ptd_train.prompts import Env, build_tokenizer
from ptd_train.tasks import GridCountTask
from ptd_train.tasks.grid_count import render
from ptd_train.vision import VisionGeometry

TINY = dict(warmstart_max_steps=0, eval_size=8, prompts_per_step=2, group_size=4, progress=False)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("ptd_coef", [0.0, 1.0])
def test_one_step_run(tmp_path, ptd_coef):
    out = str(tmp_path / "run")
    evals = run.main(
        [
            "--output_dir",
            out,
            "--max_steps",
            "1",
            "--ptd_coef",
            str(ptd_coef),
            *sum([[f"--{k}", str(v)] for k, v in TINY.items()], []),
        ]
    )
    (m,) = _metrics(out)
    for key in (
        "step",
        "reward_mean",
        "accuracy",
        "entropy",
        "neg_logp",
        "ptd_rollouts",
        "jsd",
        "overlap",
        "teacher_mass",
        "loss",
        "seconds",
    ):
        assert key in m, key
    assert m["step"] == 1 and np.isfinite(m["loss"]) and m["entropy"] > 0 and m["neg_logp"] > 0
    if ptd_coef == 0:
        assert m["ptd_rollouts"] == 0 and m["jsd"] == 0 and m["ptd_loss"] == 0
    else:  # random init: every group fails, every rollout is in F
        assert m["ptd_rollouts"] > 0 and m["jsd"] > 0 and 0 < m["teacher_mass"] <= 1 and 0 <= m["overlap"] <= 1
    with open(os.path.join(out, "eval.json")) as f:
        e = json.load(f)
    assert e == evals and {"accuracy_before", "accuracy_after"} <= set(e)
    assert os.path.exists(os.path.join(out, "curves.png"))
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step-000001"
    assert os.path.exists(os.path.join(out, "checkpoints", "step-000001", "trainer_state.json"))
    assert os.path.exists(os.path.join(out, "final", "config.json"))


def test_resume_gives_the_same_next_step_loss(tmp_path, monkeypatch):
    args = ["--max_steps", "3", "--save_steps", "1", *sum([[f"--{k}", str(v)] for k, v in TINY.items()], [])]
    full = str(tmp_path / "full")
    run.main(["--output_dir", full, *args])

    part = str(tmp_path / "part")
    real = trainer.sample_prompts
    calls = {"n": 0}

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during step 3, after step 2 was checkpointed
        return real(*a, **k)

    monkeypatch.setattr(trainer, "sample_prompts", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run.main(["--output_dir", part, *args])
    monkeypatch.setattr(trainer, "sample_prompts", real)
    assert [m["step"] for m in _metrics(part)] == [1, 2]
    run.main(["--output_dir", part, "--resume", "true", *args])
    a, b = _metrics(full), _metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3]
    for key in ("loss", "reward_mean", "entropy", "jsd", "grad_norm"):
        assert a[2][key] == b[2][key], key
    assert (
        json.load(open(os.path.join(full, "eval.json")))["accuracy_after"]
        == json.load(open(os.path.join(part, "eval.json")))["accuracy_after"]
    )


def _setup(tmp_path, spec=None, words=(), **overrides):
    overrides = {"warmstart_dir": str(tmp_path / "warmstart"), **overrides}
    cfg = TrainConfig(output_dir=str(tmp_path), **{**TINY, **overrides}).resolved()
    task = GridCountTask(eval_size=4, dev_size=2)
    tok = build_tokenizer(list(task.words) + list(words))
    policy = build_tiny_model(tok, spec, seed=0)
    env = Env(cfg, tok, VisionGeometry.of(policy), torch.device("cpu"), "torch")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    return cfg, task, tok, env, policy, ref, opt


@pytest.mark.parametrize("teacher", ["ref", "policy"])
def test_student_never_sees_the_hint(tmp_path, teacher):
    cfg, task, tok, env, policy, ref, opt = _setup(tmp_path, teacher=teacher)
    hint_id = tok.convert_tokens_to_ids("hint")
    seen = {"policy_with_grad": [], "policy_no_grad": [], "ref": []}

    def spy(name):
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                has = bool((ids == hint_id).any())
                key = name if name == "ref" else ("policy_with_grad" if torch.is_grad_enabled() else "policy_no_grad")
                seen[key].append(has)

        return hook

    policy.model.register_forward_pre_hook(spy("policy"), with_kwargs=True)
    ref.model.register_forward_pre_hook(spy("ref"), with_kwargs=True)
    examples = task.sample(np.random.default_rng(0), 2)
    m = trainer.rl_step(ModelWithFusedHead(policy), ModelWithFusedHead(ref), opt, env, examples)
    assert m["ptd_rollouts"] > 0  # a teacher pass happened
    assert seen["policy_with_grad"] and not any(seen["policy_with_grad"])  # the student's passes: no hint
    if teacher == "ref":
        assert not any(seen["policy_no_grad"])  # sampling: no hint
        assert any(seen["ref"])  # the teacher got it
    else:
        assert any(seen["policy_no_grad"])  # the teacher pass (no grad) got it ...
        assert not seen["policy_no_grad"][0]  # ... but not the rollouts (the first, generate, call)


def _student_step_memory(tmp_path, n_extra_words):
    """(bytes the student pass adds at its peak, largest tensor with a vocab axis, R·T, V, H)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils._python_dispatch import TorchDispatchMode

    spec = TinyVLSpec(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        vision_hidden=16,
        vision_heads=1,
    )
    extra = [f"w{i}" for i in range(n_extra_words)]
    cfg, task, tok, env, policy, ref, opt = _setup(tmp_path, spec, extra, prompts_per_step=8, group_size=8)
    V, H = policy.lm_head.weight.shape
    exs = task.sample(np.random.default_rng(0), 8)
    G = cfg.group_size
    owner = [i // G for i in range(len(exs) * G)]
    x = env.prompts(exs).select(owner)
    resp, mask = rollout.generate(ModelWithFusedHead(policy), env, x, greedy=False)
    R, T = resp.shape
    with torch.no_grad():
        th = ModelWithFusedHead(ref).hidden(env, env.prompts([exs[i] for i in owner], ["spatial"] * R), resp, mask)
        th = th.reshape(R * T, -1)
    jsd_mask = torch.ones(R * T, dtype=torch.bool)  # PTD on every rollout
    Wt = ref.lm_head.weight
    pid, pmask, vision = x.ids, x.mask, x.vision

    class Forward(torch.nn.Module):  # one parent module: the backbone runs twice per pass (the prompts,
        def forward(self):  # then the responses on their cache), which MemTracker refuses at top level
            out = ModelWithFusedHead(policy)(env, x, resp, mask, th, (Wt, None), jsd_mask)
            logp, ent, jsd = out[:3]
            return logp.sum() + ent.sum() + jsd.sum()

    def step():
        Forward()().backward()

    step()  # warm-up (lazy allocations)
    policy.zero_grad(set_to_none=True)

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and V in t.shape:  # anything logits-like
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    with Largest():
        step()
    policy.zero_grad(set_to_none=True)

    inputs = [th, pid, pmask, resp, mask, vision.pixel_values, vision.image_grid_thw]
    tracker = MemTracker()
    tracker.track_external(policy, *inputs)
    with tracker:
        step()
    peak = sum(stats.get("Total", 0) for stats in tracker.get_tracker_snapshot("peak").values())
    added = peak - sum(t.numel() * t.element_size() for t in [*policy.parameters(), *inputs])
    policy.zero_grad(set_to_none=True)
    return added, Largest.biggest, R * T, V, H


def test_student_step_allocates_no_batch_length_vocab_tensor(tmp_path, monkeypatch):
    """Vocab ≥ 8192: the student pass (forward + backward, PTD on every rollout) forms no
    [R, T, V] tensor. The kernels' logits tiles are bounded by byte budgets (32-88 MiB by default,
    more than [R·T, V] at test size), so they are shrunk to 1 MiB: the point is that the trainer
    itself never forms the logits. MemTracker compares the peak at V ≈ 8k with V ≈ 100 (the
    vision tower's activations, the same in both, dominate the absolute peak)."""
    import ptd_kernels.config

    for budget in ("CHUNK_BYTES", "FUSED_BLOCK_BYTES", "LOSS_BLOCK_BYTES"):
        monkeypatch.setattr(ptd_kernels.config, budget, 1 << 20)
    monkeypatch.setattr(ptd_kernels.config, "SUB_BLOCK_BYTES", 1 << 18)
    added_small, _, _, v_small, _ = _student_step_memory(tmp_path / "small", 0)
    added, biggest, rows, V, H = _student_step_memory(tmp_path / "big", 8192)
    rtv_bytes = rows * V * 4
    assert V >= 8192 and rows == 256 and 4 * V * H <= rows * V
    # nothing with a vocabulary axis is larger than the output layer (its gradient is [V, H])
    assert biggest <= V * H, (biggest, rows * V)
    # growing V by 8k costs the gradients of embedding + output layer (2·V·H floats) and a tile,
    # far below one [R·T, V] float32 tensor
    grown = added - added_small
    assert grown < rtv_bytes // 2, (grown, rtv_bytes)


def _write_dataset(root, n, bad_line=None):
    os.makedirs(root / "img", exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        grid = rng.random((4, 4)) < 0.5
        Image.fromarray(render(grid, rng)).save(root / "img" / f"{i}.png")
        lines.append(
            json.dumps(
                {
                    "image": f"img/{i}.png",
                    "question": "how many red cells ?",
                    "answer": int(grid.sum()),
                    "hint": "look only at cells a1 and ignore the blue cells .",
                }
            )
        )
    if bad_line is not None:
        lines[bad_line - 1] = '{"image": "img/0.png", "question": 3, "answer": 1}'
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "data.jsonl")


def test_jsonl_dataset_and_checkpoint_dir(tmp_path):
    task = GridCountTask(eval_size=2, dev_size=2)
    tok = build_tokenizer(task.words)
    model = build_tiny_model(tok, seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    data = _write_dataset(tmp_path, 8)
    out = str(tmp_path / "out")
    evals = run.main(
        [
            "--output_dir",
            out,
            "--model_name_or_path",
            str(tmp_path / "ckpt"),
            "--dataset",
            data,
            "--max_steps",
            "1",
            "--eval_size",
            "3",
            "--prompts_per_step",
            "2",
            "--group_size",
            "2",
            "--progress",
            "false",
        ]
    )
    (m,) = _metrics(out)
    assert m["step"] == 1 and np.isfinite(m["loss"])
    assert "accuracy_after" in evals


def test_jsonl_errors_name_the_line(tmp_path):
    from ptd_train.tasks import load_jsonl

    data = _write_dataset(tmp_path, 4, bad_line=3)
    with pytest.raises(ValueError, match=r"data\.jsonl:3: field 'question' must be a string"):
        load_jsonl(data)
    p = tmp_path / "broken.jsonl"
    p.write_text('{"image": "img/0.png", "question": "q", "answer": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        load_jsonl(str(p))
    p.write_text('{"image": "img/0.png", "question": "q", "answer": 1, "hint": "it is 1"}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: .*leaks the answer"):
        load_jsonl(str(p))
    p.write_text('{"image": "img/missing.png", "question": "q", "answer": 1}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: image 'img/missing.png' not found"):
        load_jsonl(str(p))
    p.write_text('{"question": "q", "answer": 1}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: missing field 'image'"):
        load_jsonl(str(p))


def test_warm_start_mixes_hints_and_is_cached(tmp_path):
    cfg, task, tok, env, policy, ref, opt = _setup(
        tmp_path, warmstart_max_steps=2, warmstart_eval_every=2, warmstart_batch=16
    )
    task.dev = task.dev[:2]
    hint_id, total_id = tok.convert_tokens_to_ids("hint"), tok.convert_tokens_to_ids("total")
    image_id = policy.config.image_token_id
    rows, leaks = [], []

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"]
        # the supervised steps' prompt passes (evaluations run without grad; response passes have no image)
        if torch.is_grad_enabled() and (ids == image_id).any():
            rows.extend((ids == hint_id).any(1).tolist())
            leaks.extend((ids == total_id).any(1).tolist())  # the leak hint is the completion "total N"

    assert "leak" in cfg.warmstart_hint_mix  # the default mix teaches copying a stated answer
    handle = policy.model.register_forward_pre_hook(hook, with_kwargs=True)
    info = warmstart.warm_start(policy, env, task, log=lambda *a: None)
    handle.remove()
    assert info["steps"] == 2 and len(rows) == 32 and not info["cached"]
    assert 0 < sum(rows) < 32  # hinted and hint-free prompts both present
    assert 0 < sum(leaks) < sum(rows)  # some hints state the answer, most do not
    assert 0 <= info["dev_accuracy_leak"] <= 1
    with pytest.raises(HintLeakError):  # the warm start's data path did not open the RL teacher's
        env.hint(task.test[0], "leak")
    trained = {k: v.clone() for k, v in policy.state_dict().items()}
    fresh = build_tiny_model(tok, seed=1)
    info2 = warmstart.warm_start(fresh, env, task, log=lambda *a: None)  # from the cache: no training
    assert info2["cached"] and {**info2, "cached": False} == info
    assert sorted(os.listdir(info["cache"])) == ["info.json", "model.safetensors"]  # no pickle
    assert all(torch.equal(trained[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize(
    "flags",
    [
        ["--ptd_full_vocab", "true"],  # full-vocabulary JSD ablation
        ["--teacher_hint", "none"],  # teacher without the hint (control)
        ["--teacher", "policy", "--ptd_support", "teacher", "--no_ptd_tail"],
        ["--scale_rewards", "none", "--no_ptd_drop_ref_kl", "--ptd_k", "200"],  # K ≥ V: capped
    ],
)
def test_switches_run_one_step(tmp_path, flags):
    out = str(tmp_path / "run")
    run.main(["--output_dir", out, "--max_steps", "1", *sum([[f"--{k}", str(v)] for k, v in TINY.items()], []), *flags])
    (m,) = _metrics(out)
    assert np.isfinite(m["loss"]) and m["ptd_rollouts"] > 0
    if "--teacher_hint" in flags:  # no hint: at the first step the teacher is the student itself
        assert abs(m["jsd"]) < 1e-6
    else:
        assert m["jsd"] > 1e-6
    if "--ptd_full_vocab" in flags:
        assert m["overlap"] == 0  # no Top-K support in the full-vocabulary path


def test_bad_switch_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run.main(["--output_dir", str(tmp_path / "out"), "--teacher_hint", "answer"])
    assert exit_.value.code == 2 and "--teacher_hint answer: expected one of" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("greedy", [False, True])
def test_cached_generate_matches_hf_generate(tmp_path, greedy):
    """rollout.generate (each prompt encoded once, KV cache repeated per rollout) draws exactly the
    rollouts that transformers' generate draws from the same RNG state on the repeated prompts."""
    from ptd_train.model import model_inputs

    cfg, task, tok, env, policy, ref, opt = _setup(tmp_path, max_new_tokens=4)
    exs = task.sample(np.random.default_rng(3), 2)
    G = cfg.group_size
    owner = [i // G for i in range(len(exs) * G)]
    x = env.prompts(exs).select(owner)
    pid, pmask, vision = x.ids, x.mask, x.vision
    torch.manual_seed(7)
    resp, mask = rollout.generate(ModelWithFusedHead(policy), env, x, greedy=greedy)
    torch.manual_seed(7)
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    with torch.no_grad():
        seqs = policy.eval().generate(
            **model_inputs(policy, pid, pmask, vision),
            max_new_tokens=4,
            suppress_tokens=env.blocked,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **kw,
        )
    hf = seqs[:, pid.shape[1] :]
    hf = torch.cat([hf, hf.new_full((hf.shape[0], 4 - hf.shape[1]), tok.pad_token_id)], 1)
    assert not greedy or len(set(map(tuple, resp.tolist()))) <= len(exs)  # greedy: one answer per prompt
    assert torch.equal(resp.masked_fill(~mask, tok.pad_token_id), hf.masked_fill(~mask, tok.pad_token_id))
    assert torch.equal(resp[~mask], torch.full_like(resp[~mask], tok.pad_token_id))


@pytest.mark.parametrize("leak_acc, stops_at", [(0.5, 3), (0.95, 1)])
def test_warm_start_waits_for_the_answer_conditioned_teacher(tmp_path, monkeypatch, leak_acc, stops_at):
    """With leak in the hint mix, the warm start stops only once both the spatial-hinted and the
    leak-hinted dev accuracies reach warmstart_hinted_min (the ptd-leak teacher must be competent)."""
    cfg, task, tok, env, policy, ref, opt = _setup(
        tmp_path, warmstart_max_steps=3, warmstart_eval_every=1, warmstart_batch=4
    )
    acc = {None: 0.2, "spatial": 0.95, "leak": leak_acc}
    monkeypatch.setattr(warmstart, "evaluate", lambda model, env, exs, hint_kind=None: {"accuracy": acc[hint_kind]})
    info = warmstart.warm_start(policy, env, task, log=lambda *a: None)
    assert info["steps"] == stops_at and info["dev_accuracy_leak"] == leak_acc


def test_warm_start_rejects_unknown_hint_kind(tmp_path):
    with pytest.raises(ValueError, match="hnt"):  # the configuration is refused before any work
        _setup(tmp_path, warmstart_max_steps=1, warmstart_hint_mix="none:1,hnt:1")
