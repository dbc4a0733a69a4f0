"""ptd_train.compare on tiny shapes (2 methods × 1 seed × 2 steps), the method switches it adds to
the trainer: the ptd-leak hint (explicit bypass of the zero-spoiler check, only for that method),
the ptd-coarse hint and the ptd-released surrogate (the authors' zero-gradient JSD), the study's
warm-start hint mix, and the spread table across settings."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from ptd_train import compare, grpo, run, warmstart
from ptd_train.config import TrainConfig
from ptd_train.hints import HintLeakError, leak_reason
from ptd_train.model import build_tiny_model
from ptd_train.prompts import Env, build_tokenizer
from ptd_train.tasks import GridCountTask
from ptd_train.vision import VisionGeometry

pytestmark = pytest.mark.slow  # trains the miniature study

TINY = dict(warmstart_max_steps=0, eval_size=8, eval_steps=1, prompts_per_step=2, group_size=4)
FLAGS = sum([[f"--{k}", str(v)] for k, v in TINY.items()], [])


def test_compare_two_methods_one_seed(tmp_path):
    out = str(tmp_path / "study")
    args = ["--output_dir", out, "--seeds", "1", "--steps", "2", "--methods", "grpo,ptd", *FLAGS]
    res = compare.main([*args, "--jobs", "2"])  # two worker processes
    assert {(r["method"], r["seed"]) for r in res["results"]} == {("grpo", 0), ("ptd", 0)}

    md = open(os.path.join(out, "summary.md")).read()
    assert "| grpo | 1 |" in md and "| ptd | 1 |" in md and "| ptd − grpo |" in md
    table = [line for line in md.splitlines() if line.startswith("| grpo | 1 |")][0]
    assert table.count("|") == len(compare.MEASURES) + 3  # one cell per measure
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    with open(os.path.join(out, "runs.jsonl")) as f:
        runs = [json.loads(line) for line in f]
    assert [r["method"] for r in runs] == ["grpo", "ptd"]
    for r in runs:
        assert [s for s, _ in r["acc_curve"]] == [0, 1, 2]  # before, eval at step 1, final
        assert 0 <= r["acc_auc"] <= 1 and 0 <= r["p_correct_auc"] <= 1 and r["entropy"] > 0
        with open(os.path.join(out, "runs", r["method"], "seed0", "metrics.jsonl")) as f:
            assert [json.loads(line)["step"] for line in f] == [1, 2]  # raw JSONL per run
    grpo_run, ptd_run = runs
    assert grpo_run["ptd_rollouts"] == 0 and grpo_run["overlap"] is None
    assert ptd_run["ptd_rollouts"] > 0 and 0 <= ptd_run["overlap"] <= 1 and ptd_run["jsd"] > 0
    # same seed: the same prompts at step 1, so the same before-accuracy and all-fail count at step 1
    assert grpo_run["acc_before"] == ptd_run["acc_before"]

    # finished runs with the same config are reused, in-process with --jobs 1
    again = compare.main([*args, "--jobs", "1"])
    assert [r["acc_final"] for r in again["results"]] == [r["acc_final"] for r in runs]
    assert "0 runs trained, 2 reused" in open(os.path.join(out, "summary.md")).read()
    # ... and identical, timing aside, to what was trained (the spread table counts them)
    assert "| runs identical to a (every measure and curve) | 2/2 |" in compare.spread_markdown(
        {"a": runs, "b": again["results"]}
    )
    # another thread count sums in another order: those runs are trained again, not reused
    compare.main([*args, "--jobs", "1", "--num_threads", "2"])
    assert "2 runs trained, 0 reused" in open(os.path.join(out, "summary.md")).read()


def test_compare_rejects_unknown_method(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        compare.main(["--output_dir", str(tmp_path / "study"), "--methods", "grpo,ppo"])
    assert exit_.value.code == 2 and "--methods grpo,ppo: unknown ppo" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "study")


def test_leak_hint_only_with_the_explicit_flag(tmp_path):
    with pytest.raises(ValueError, match="allow_answer_leak"):
        TrainConfig(teacher_hint="leak").resolved()
    task = GridCountTask(eval_size=2, dev_size=2)
    ex = task.test[0]
    tok = build_tokenizer(task.words)
    geo = VisionGeometry.of(build_tiny_model(tok, seed=0))
    ok = TrainConfig(output_dir=str(tmp_path), teacher_hint="leak", allow_answer_leak=True).resolved()
    env = Env(ok, tok, geo, torch.device("cpu"), "torch")
    hint = env.hint(ex, "leak")
    assert ex.answer in hint.split() and leak_reason(hint, ex.answer) is not None  # it does state the answer
    assert env.hint(ex, "spatial") == ex.hints["spatial"]  # other kinds are still checked and pass
    strict = Env(TrainConfig(output_dir=str(tmp_path)).resolved(), tok, geo, torch.device("cpu"), "torch")
    with pytest.raises(HintLeakError):
        strict.hint(ex, "leak")  # without the flag, even a direct call is refused


def _surrogate(z, zt, beta):
    """The released code's JSD on logits: student weight stop-gradded, mixture differentiated."""
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(zt, -1)
    p, q = logp.exp(), logq.exp()
    m = beta * q + (1 - beta) * p
    return (beta * q * (logq - m.log())).sum(-1) + ((1 - beta) * p.detach() * (logp.detach() - m.log())).sum(-1)


def test_released_surrogate_is_the_value_with_zero_gradient():
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(6, 11, generator=g, dtype=torch.float64)).requires_grad_()
    zt = 3 * torch.randn(6, 11, generator=g, dtype=torch.float64)
    s = _surrogate(z, zt, 0.5)
    (gz,) = torch.autograd.grad(s.sum(), z)
    assert float(gz.abs().max()) < 1e-12  # the written-out surrogate: gradient cancels exactly
    jsd = s.detach().clone().requires_grad_()
    r = grpo.released_surrogate(jsd)
    torch.testing.assert_close(r, s.detach())
    assert not r.requires_grad  # ours: the same value, no gradient

    # at the loss level, ptd-released = GRPO whose PTD groups lost the reference KL
    R, T = 4, 3
    logp = (-torch.rand(R, T, generator=g, dtype=torch.float64)).requires_grad_()
    kw = dict(
        logp_old=logp.detach() + 0.01,
        logp_ref=logp.detach() - 0.2,
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64),
        mask=torch.ones(R, T, dtype=torch.bool),
        in_ptd_set=torch.tensor([False, True, False, True]),
        ref_kl_mask=torch.tensor([True, False, True, False]),
    )
    d = (logp.detach() ** 2).requires_grad_()
    released = grpo.ptd_po_loss(logp, jsd=grpo.released_surrogate(d), ptd_coef=1.0, **kw)
    no_ptd = grpo.ptd_po_loss(logp, jsd=d, ptd_coef=0.0, **kw)
    (g1,) = torch.autograd.grad(released.loss, logp)
    (g0,) = torch.autograd.grad(no_ptd.loss, logp)
    torch.testing.assert_close(g1, g0)
    assert released.ptd > 0  # the D_K value is still logged


@pytest.mark.parametrize("method", ["ptd-leak", "ptd-coarse", "ptd-released"])
def test_new_methods_run_one_step(tmp_path, method):
    cfg = compare.run_config(TrainConfig(**TINY, max_steps=1), str(tmp_path), method, seed=0)
    evals = run.train(cfg)
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        (m,) = [json.loads(line) for line in f]
    assert np.isfinite(m["loss"]) and m["ptd_rollouts"] > 0 and m["jsd"] > 0
    if method in ("ptd-leak", "ptd-coarse"):
        assert "accuracy_hinted_before" in evals  # the teacher's accuracy with its own hint is measured
    else:
        assert m["ptd_loss"] > 0  # logged, though it carries no gradient


def test_summary_states_the_warm_start_hint_mix():
    r = dict.fromkeys([k for k, _ in compare.MEASURES], 0.5) | {"method": "grpo", "seed": 0}
    md = compare.summary_markdown([r], ["grpo"], "# h", warm_mix="none:0.25,spatial:0.5,leak:0.25")
    assert "hint mix none:0.25,spatial:0.5,leak:0.25" in md and "leak = the hint states the answer" in md
    assert "hint mix" not in compare.summary_markdown([r], ["grpo"], "# h")  # no warm start, nothing claimed


def test_coarse_teacher_gets_the_coarse_hint(tmp_path):
    cfg = compare.run_config(TrainConfig(**TINY), str(tmp_path), "ptd-coarse", seed=0).resolved()
    assert cfg.teacher_hint == "coarse" and not cfg.allow_answer_leak
    task = GridCountTask(eval_size=2, dev_size=2)
    tok = build_tokenizer(task.words)
    env = Env(cfg, tok, VisionGeometry.of(build_tiny_model(tok, seed=0)), torch.device("cpu"), "torch")
    ex = task.test[0]
    assert env.hint(ex, cfg.teacher_hint) == ex.hints["coarse"] != ex.hints["spatial"]
    ids = env.prompts([ex], [cfg.teacher_hint]).ids[0].tolist()
    assert tok.convert_tokens_to_ids("rows") in ids and tok.convert_tokens_to_ids("a1") not in ids  # rows, no cells


def test_study_warm_start_mix_holds_the_coarse_hint_and_a_flag_overrides_it(tmp_path, monkeypatch):
    _, base = compare.parse_args(["--output_dir", str(tmp_path)])
    assert base.warmstart_hint_mix == compare.STUDY_HINT_MIX != TrainConfig.warmstart_hint_mix
    kinds = dict(kv.split(":") for kv in compare.STUDY_HINT_MIX.split(","))
    trainer = dict(kv.split(":") for kv in TrainConfig.warmstart_hint_mix.split(","))
    # the trainer's mix with its procedure share given to the coarse hint, all other shares as they were
    assert kinds.pop("coarse") == trainer.pop("procedure") and kinds == trainer
    _, base = compare.parse_args(["--output_dir", str(tmp_path), "--warmstart_hint_mix", "none:1"])
    assert base.warmstart_hint_mix == "none:1"

    # the warm start trains on the study's mix (coarse prompts included) without complaint
    cfg = dataclasses.replace(compare.parse_args(["--output_dir", str(tmp_path)])[1], **TINY).resolved()
    cfg = dataclasses.replace(cfg, warmstart_max_steps=2, warmstart_batch=8, warmstart_eval_every=2)
    task = GridCountTask(eval_size=2, dev_size=2)
    tok = build_tokenizer(task.words)
    model = build_tiny_model(tok, seed=0)
    env = Env(cfg, tok, VisionGeometry.of(model), torch.device("cpu"), "torch")
    seen = []
    prompts = Env.prompts
    monkeypatch.setattr(
        Env, "prompts", lambda self, exs, kinds=None: (seen.extend(kinds or []), prompts(self, exs, kinds))[1]
    )
    info = warmstart.warm_start(model, env, task, log=lambda *a: None)
    assert info["steps"] == 2 and "coarse" in seen and "procedure" not in seen


def _result(method, seed, acc_auc, **kw):
    r = dict.fromkeys([k for k, _ in compare.MEASURES], 0.5)
    return r | {"method": method, "seed": seed, "acc_auc": acc_auc, "acc_before": 0.2, "seconds": 1.0} | kw


def test_spread_counts_identical_runs_and_checks_each_sign():
    a = [_result("grpo", s, 0.2) for s in (0, 1)] + [_result("ptd", s, 0.3 + 0.1 * s) for s in (0, 1)]
    b = [dict(r, seconds=9.0) for r in a]  # timing differs only: identical runs
    c = [dict(r, acc_auc=0.1) if r["method"] == "ptd" and r["seed"] == 1 else r for r in a]
    md = compare.spread_markdown({"a": a, "b": b, "c": c})
    assert "| runs identical to a (every measure and curve) | 4/4 | 4/4 | 3/4 |" in md
    line = next(x for x in md.splitlines() if x.startswith("| ptd − grpo, acc AUC |"))
    # a, b: +0.1 / +0.2 → mean +0.15 (2/2); c: +0.1 / −0.1 → mean 0 (1/2): the sign did not hold
    assert "0.150 ± 0.071 (2/2)" in line and "0.000 ± 0.141 (1/2)" in line and line.endswith("| **no** |")
    c2 = [dict(r, acc_auc=0.25) if r["method"] == "ptd" and r["seed"] == 1 else r for r in a]
    line = next(x for x in compare.spread_markdown({"a": a, "c": c2}).splitlines() if "ptd − grpo, acc AUC" in x)
    assert line.endswith("| yes |")
