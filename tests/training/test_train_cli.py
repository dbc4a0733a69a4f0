"""The trainer's and the study's command lines as a user meets them: --help (fast, complete),
one-line errors with exit code 2 for every mistake, before any work and without leaving a folder,
the phase lines and the summary, resuming, passing a trained model back, and the shared warm-start
cache."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch

from ptd_train import compare, run, trainer, warmstart
from ptd_train.config import FLAG_TEXT, SECTIONS, TrainConfig, UsageError

pytestmark = pytest.mark.slow  # runs the command line end to end

ROOT = os.path.abspath(os.path.join(__file__, "..", "..", ".."))
TINY = ["--warmstart_max_steps", "0", "--eval_size", "4", "--prompts_per_step", "2", "--group_size", "2",
        "--max_new_tokens", "2", "--no_progress"]  # fmt: skip
# a warm start of two steps on two dev prompts: what the cache tests need, in a second
TINY_WARM = ["--warmstart_max_steps", "2", "--warmstart_batch", "4", "--warmstart_eval_every", "2"]


def _python(*args, env=None):
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


# ---------------------------------------------------------------------------- --help


def _option_blocks(text: str) -> dict[str, str]:
    """--help's text per option: its first word → the whole entry, whitespace collapsed."""
    blocks = {}
    for block in re.split(r"\n(?=  -)", text):
        words = block.split()
        if words and words[0].startswith("--"):
            blocks[words[0]] = " ".join(words)
    return blocks


def test_help_imports_neither_torch_nor_transformers():
    """--help answers before the heavy imports (that is what makes it fast)."""
    code = ("import sys\nfrom ptd_train import run, compare\nfor main in (run.main, compare.main):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")  # fmt: skip
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def test_help_describes_every_option_and_its_default():
    done = _python("-m", "ptd_train.run", "--help", env={"COLUMNS": "200"})
    assert done.returncode == 0 and done.stderr == ""
    text = done.stdout
    assert text.startswith("usage: python -m ptd_train.run [options]") and "GRPO plus PTD-PO" in text
    blocks = _option_blocks(text)
    squeezed = {flag: "".join(block.split()) for flag, block in blocks.items()}  # wrapping aside (even at hyphens)

    def shows(flag: str, words: str) -> bool:
        return "".join(words.split()) in squeezed[flag]

    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help") and shows(f"--{f.name}", f.metadata["help"]), f.name
        assert "(default: " in blocks[f"--{f.name}"], f.name
        if f.default is True:  # the --no_ form is worded as the negation, not the positive text again
            no_help = FLAG_TEXT[f.name]["no_help"]
            assert shows(f"--no_{f.name}", no_help) and no_help != f.metadata["help"]
        if f.default is None:  # what None means, in words
            assert shows(f"--{f.name}", FLAG_TEXT[f.name]["default_text"]), f.name
    assert blocks["--no_progress"] == "--no_progress Hide the progress bar (the phase lines and the summary stay)."
    for field_name in ("reward=", "ptd=", "jsd=", "held_out="):  # the progress bar's fields
        assert f"  {field_name}" in text
    assert "~/.cache/ptd/warmstart" in text and "PTD_DEBUG" in text
    placed = [n for _, names in SECTIONS for n in names]
    assert sorted(placed) == sorted(f.name for f in dataclasses.fields(TrainConfig))  # every field in one section


def test_compare_help_separates_its_flags_from_the_forwarded_ones():
    done = _python("-m", "ptd_train.compare", "--help", env={"COLUMNS": "200"})
    assert done.returncode == 0
    text = done.stdout
    study = text[text.index("study options:"):text.index("trainer options, applied to every run")]
    assert "--output_dir DIR" in study and "(default: runs/compare)" in study
    for flag in ("--seeds", "--steps", "--methods", "--jobs", "--quick", "--replot", "--spread"):
        assert flag in study
    forwarded = text[text.index("trainer options, applied to every run"):]
    assert "--ptd_k" in forwarded and "--output_dir" not in forwarded
    for flag in compare.NOT_FORWARDED:  # compare sets these per run
        assert f"--{flag} " not in text
    assert "--quick" in text and "MEAN NOTHING" in text
    assert f"(default: {compare.STUDY_HINT_MIX})" in text


# ---------------------------------------------------------------------------- one-line errors


def _fails(capsys, main, argv, alone: bool = True) -> str:
    """The one line ``main(argv)`` prints before exiting with code 2: the only line on stderr when
    the mistake is in the flags (``alone``), the last one, after the lines of the phases already
    begun, when it is in a file that the set-up reads."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2, captured
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and sum("error:" in line for line in lines) == 1, captured.err
    assert len(lines) == 1 or not alone, captured.err
    assert captured.out == ""
    return lines[-1]


def _dataset(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_stepz", "3"], "unknown flag --max_stepz; did you mean --max_steps?"),
        (["--no_progres"], "did you mean --no_progress?"),
        (["--lr", "-1e-4"], "--lr -0.0001: expected a number > 0"),  # a value, not a flag
        (["--lr", "-0.001"], "--lr -0.001: expected a number > 0"),
        (["--lr", "abc"], "argument --lr: 'abc' is not a number"),
        (["--max_steps", "-5"], "--max_steps -5: expected a whole number ≥ 0"),
        (["--max_new_tokens", "0"], "--max_new_tokens 0: expected a whole number ≥ 1"),
        (["--prompts_per_step", "0"], "--prompts_per_step 0: expected a whole number ≥ 1"),
        (["--group_size", "1"], "--group_size 1: GRPO compares the rollouts"),
        (["--eval_size", "-1"], "--eval_size -1"),
        (["--temperature", "nan"], "--temperature nan: expected a finite number"),
        (["--ptd_beta", "1.5"], "--ptd_beta 1.5: expected a number in [0, 1]"),
        (["--fsdp", "maybe"], "argument --fsdp: 'maybe' is not true or false"),
        (["--teacher_hint", "answer"], "--teacher_hint answer: expected one of"),
        (["--teacher_hint", "leak"], "--allow_answer_leak true"),
        (["--warmstart_hint_mix", "none:1,hnt:1"], "unknown hint kind 'hnt'"),
        (["5"], "unexpected argument '5'"),
        (["--model_name_or_path", "Qwen/Qwen2-VL-2B"], "no such folder (nothing is downloaded"),
        (["--dataset", "missing.jsonl"], "--dataset missing.jsonl: does not exist"),
    ],
)
def test_mistakes_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    line = _fails(capsys, run.main, ["--output_dir", "out", *argv])
    assert line.startswith("python -m ptd_train.run: error: ") and message in line, line
    assert not os.path.exists(tmp_path / "out")


def test_model_folder_and_dataset_file_mistakes(tmp_path, capsys):
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    line = _fails(capsys, run.main, ["--output_dir", out, "--model_name_or_path", str(tmp_path / "empty")])
    assert "the folder is empty" in line
    (tmp_path / "no_type").mkdir()
    (tmp_path / "no_type" / "config.json").write_text("{}")
    assert "config.json has no model_type" in _fails(capsys, run.main, ["--output_dir", out, "--model_name_or_path",
                                                                       str(tmp_path / "no_type")])  # fmt: skip
    bad = _dataset(tmp_path, ['{"image": null, "question": "q", "answer": 1}', "{not json"])
    assert "data.jsonl:2: not valid JSON" in _fails(capsys, run.main, ["--output_dir", out, "--dataset", bad, *TINY],
                                                    alone=False)  # fmt: skip
    bad = _dataset(tmp_path, ['{"image": "img/0.png", "question": "q", "answer": 1}'])
    line = _fails(capsys, run.main, ["--output_dir", out, "--dataset", bad, *TINY], alone=False)
    assert "data.jsonl:1: image 'img/0.png' not found" in line
    one = _dataset(tmp_path, ['{"image": null, "question": "what is one plus two ?", "answer": 3}'])
    assert "pass --eval_size 0" in _fails(capsys, run.main, ["--output_dir", out, "--dataset", one, *TINY], alone=False)
    assert not os.path.exists(out)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="--max_steps -5"):
        run.main(["--output_dir", str(tmp_path / "out"), "--max_steps", "-5", "--debug"])
    monkeypatch.setenv("PTD_DEBUG", "1")
    with pytest.raises(UsageError, match="unknown flag"):
        run.main(["--max_stepz", "3"])


def test_negative_numbers_parse_as_values():
    cfg = run.command().parse(["--warmstart_target", "-1e-4", "--epsilon_low", "-.5", "--seed", "-3"])[TrainConfig]
    assert (cfg.warmstart_target, cfg.epsilon_low, cfg.seed) == (-1e-4, -0.5, -3)
    with pytest.raises(UsageError, match="--seed -3: expected a whole number ≥ 0"):
        cfg.check()


def test_compare_mistakes(tmp_path, capsys):
    out = str(tmp_path / "study")
    assert "--seeds 0: expected a count ≥ 1" in _fails(capsys, compare.main, ["--output_dir", out, "--seeds", "0"])
    assert "unknown flag --seed; did you mean --seeds?" in _fails(capsys, compare.main, ["--seed", "1"])
    assert "did you mean --steps?" in _fails(capsys, compare.main, ["--step", "3"])
    assert "no runs.jsonl" in _fails(capsys, compare.main, ["--replot", str(tmp_path)])
    assert not os.path.exists(out)


def test_quick_form_fills_in_what_was_not_given():
    study, base = compare.parse_args(["--quick", "--steps", "5"])
    assert (study.seeds, study.steps, study.methods) == ("2", 5, "grpo,ptd")
    assert (base.eval_steps, base.output_dir) == (10, "runs/compare-quick")
    study, base = compare.parse_args([])
    assert (study.steps, base.output_dir) == (150, "runs/compare")


# ---------------------------------------------------------------------------- the run's output


def test_phases_on_stderr_results_on_stdout(tmp_path, capsys):
    out = str(tmp_path / "run")
    evals = run.main(["--output_dir", out, "--max_steps", "2", "--eval_steps", "1", *TINY])
    captured = capsys.readouterr()
    assert captured.err.startswith(f"ptd_train.run: a run in {out}; importing torch")
    phases = [line.split("]")[0] + "]" for line in captured.err.splitlines() if line.startswith("[")]
    assert phases == [f"[{i}/6]" for i in range(1, 7)]
    assert "[1/6] set-up: the embedded tiny Qwen3-VL" in captured.err
    assert "[2/6] warm start: none (turned off)" in captured.err
    assert "[" not in captured.out and "Held-out accuracy (greedy, 4 prompts)" in captured.out
    assert f"Results in {out}: eval.json" in captured.out.splitlines()[-1]
    assert evals == json.load(open(os.path.join(out, "eval.json")))
    assert [s for s, _, _ in evals["held_out"]] == [0, 1, 2]
    assert set(evals["seconds"]) >= {"set-up", "RL", "saving"}


def test_quiet_prints_only_the_summary(tmp_path, capsys):
    run.main(["--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--quiet", *TINY])
    captured = capsys.readouterr()
    assert captured.err == "" and "Held-out accuracy" in captured.out


def test_zero_steps_and_no_held_out_split(tmp_path, capsys):
    out = str(tmp_path / "run")
    evals = run.main(["--output_dir", out, *TINY, "--max_steps", "0"])  # evaluate and save, unchanged
    assert evals["steps"] == 0 and evals["accuracy_after"] == evals["accuracy_before"]
    assert os.path.exists(os.path.join(out, "final", "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "checkpoints"))
    capsys.readouterr()
    evals = run.main(["--output_dir", str(tmp_path / "run0"), "--max_steps", "1", *TINY, "--eval_size", "0"])
    assert evals.get("accuracy_before") is None
    assert "No held-out evaluation (--eval_size 0)." in capsys.readouterr().out
    lines = [json.dumps({"image": None, "question": f"q{i}", "answer": i}) for i in range(3)]
    cfg = TrainConfig(dataset=_dataset(tmp_path, lines), eval_size=0).resolved()
    _, train_set, test_set, _ = trainer.load_data(cfg)
    assert len(train_set) == 3 and test_set == []  # every line trains


def test_finished_run_says_how_to_continue_and_resumed_curves_keep_every_point(tmp_path, capsys):
    out = str(tmp_path / "run")
    run.main(["--output_dir", out, "--max_steps", "2", "--eval_steps", "1", *TINY])
    capsys.readouterr()
    line = _fails(capsys, run.main, ["--output_dir", out, "--max_steps", "2", "--eval_steps", "1", "--resume", "true",
                                     *TINY], alone=False)  # fmt: skip
    assert "already finished 2 RL steps" in line and "pass a larger --max_steps, e.g. --max_steps 4" in line
    line = _fails(capsys, run.main, ["--output_dir", out, "--max_steps", "4", "--resume", "true", "--seed", "1", *TINY],
                  alone=False)
    assert "was trained with --seed 0, not 1" in line
    evals = run.main(["--output_dir", out, "--max_steps", "3", "--eval_steps", "1", "--resume", "true", *TINY])
    # the point at step 2 (the first part's evaluation after RL) is kept
    assert [s for s, _, _ in evals["held_out"]] == [0, 1, 2, 3]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2, 3]


def test_a_resumed_run_has_the_warm_started_reference(tmp_path, monkeypatch):
    """The frozen reference (KL and teacher) of a resumed run is the warm-started model, as in the run
    that was not interrupted: the step after the checkpoint has the same loss."""
    monkeypatch.setenv("PTD_CACHE", str(tmp_path / "cache"))
    args = [*TINY, *TINY_WARM, "--eval_steps", "0"]
    run.main(["--output_dir", str(tmp_path / "whole"), "--max_steps", "2", *args])
    run.main(["--output_dir", str(tmp_path / "parts"), "--max_steps", "1", *args])
    run.main(["--output_dir", str(tmp_path / "parts"), "--max_steps", "2", "--resume", "true", *args])
    whole, parts = ([json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")] for d in ("whole", "parts"))
    assert [m["step"] for m in parts] == [1, 2]
    for key in ("loss", "kl", "jsd", "grad_norm"):
        assert whole[1][key] == parts[1][key], key


def test_a_trained_model_is_not_warm_started_again_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PTD_CACHE", str(tmp_path / "cache"))
    first = str(tmp_path / "first")
    evals = run.main(["--output_dir", first, *TINY, *TINY_WARM, "--max_steps", "1"])
    assert evals["warmstart"]["steps"] == 2
    marker = json.load(open(os.path.join(first, "final", "ptd_train.json")))
    assert marker["embedded"] and marker["warm_started"]
    calls = []
    real = trainer.warm_start
    monkeypatch.setattr(trainer, "warm_start", lambda *a, **k: calls.append(1) or real(*a, **k))
    capsys.readouterr()
    again = run.main(["--output_dir", str(tmp_path / "again"), "--model_name_or_path", os.path.join(first, "final"),
                      *TINY, *TINY_WARM, "--max_steps", "1"])  # fmt: skip
    assert calls == [] and "warmstart" not in again
    assert "a checkpoint is not warm-started again" in capsys.readouterr().err
    cfg = TrainConfig(model_name_or_path=os.path.join(first, "final")).resolved()
    assert (cfg.lr, cfg.ptd_coef, cfg.ptd_k) == (5e-4, 1.0, 8)  # still the embedded model's settings
    run.main(["--output_dir", str(tmp_path / "asked"), "--model_name_or_path", os.path.join(first, "final"),
              *TINY, *TINY_WARM, "--max_steps", "1", "--warmstart", "true"])  # fmt: skip
    assert calls == [1]


# ---------------------------------------------------------------------------- the shared warm-start cache


def test_one_warm_start_cache_for_every_output_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PTD_CACHE", str(tmp_path / "cache"))
    a = run.main(["--output_dir", str(tmp_path / "a"), *TINY, *TINY_WARM, "--max_steps", "1"])
    b = run.main(["--output_dir", str(tmp_path / "b"), *TINY, *TINY_WARM, "--max_steps", "1", "--seed", "3"])
    assert not a["warmstart"]["cached"] and b["warmstart"]["cached"]  # --seed is the RL stream's, not the warm start's
    assert a["warmstart"]["cache"] == b["warmstart"]["cache"]
    assert os.path.dirname(a["warmstart"]["cache"]) == str(tmp_path / "cache" / "warmstart")
    c = run.main(["--output_dir", str(tmp_path / "c"), *TINY, *TINY_WARM, "--max_steps", "1", "--warmstart_lr", "1e-3"])
    assert not c["warmstart"]["cached"] and c["warmstart"]["cache"] != a["warmstart"]["cache"]
    d = run.main(["--output_dir", str(tmp_path / "d"), *TINY, *TINY_WARM, "--max_steps", "1",
                  "--warmstart_dir", str(tmp_path / "moved")])  # fmt: skip
    assert os.path.dirname(d["warmstart"]["cache"]) == str(tmp_path / "moved")
    e = run.main(["--output_dir", str(tmp_path / "e"), *TINY, *TINY_WARM, "--max_steps", "1", "--no_warmstart_cache"])
    assert "cache" not in e["warmstart"] and e["warmstart"]["steps"] == 2


def _tiny_warm_setup(tmp_path):
    from ptd_train.model import build_tiny_model
    from ptd_train.prompts import Env, build_tokenizer
    from ptd_train.tasks import GridCountTask
    from ptd_train.vision import VisionGeometry

    cfg = TrainConfig(output_dir=str(tmp_path), warmstart_dir=str(tmp_path / "cache"), warmstart_max_steps=2,
                      warmstart_batch=4, warmstart_eval_every=2, eval_size=2, max_new_tokens=2).resolved()  # fmt: skip
    task = GridCountTask(eval_size=2, dev_size=2)
    tok = build_tokenizer(task.words)

    def fresh():
        model = build_tiny_model(tok, seed=0)
        return model, Env(cfg, tok, VisionGeometry.of(model), torch.device("cpu"), "torch")

    return task, fresh


def test_concurrent_runs_train_the_warm_start_once(tmp_path):
    task, fresh = _tiny_warm_setup(tmp_path)
    (m1, env1), (m2, env2) = fresh(), fresh()
    infos = {}

    def go(name, model, env):
        infos[name] = warmstart.warm_start(model, env, task, log=lambda *a: None)

    threads = [threading.Thread(target=go, args=("a", m1, env1)), threading.Thread(target=go, args=("b", m2, env2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(info["cached"] for info in infos.values()) == [False, True]  # one trained, the other waited
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m1.state_dict().items())
    entries = [n for n in os.listdir(tmp_path / "cache") if not n.endswith(".lock")]
    assert len(entries) == 1  # no temporary folder left behind


def test_an_entry_written_meanwhile_is_kept(tmp_path):
    task, fresh = _tiny_warm_setup(tmp_path)
    model, env = fresh()
    info = warmstart.warm_start(model, env, task, log=lambda *a: None)
    before = open(os.path.join(info["cache"], "info.json")).read()
    other, _ = fresh()
    key, spec = warmstart.cache_key(env.cfg, task, env.device, env.backend)
    warmstart._store_entry(info["cache"], other, {"steps": 0}, spec)  # the loser of a race: no error, no change
    assert open(os.path.join(info["cache"], "info.json")).read() == before


def test_curves_title_and_panels(tmp_path):
    from ptd_train.plots import plot_curves

    out = str(tmp_path / "run")
    run.main(["--output_dir", out, "--max_steps", "2", *TINY])
    assert os.path.getsize(os.path.join(out, "curves.png")) > 10_000
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    for row in rows:
        row.update(ptd_rollouts=0, jsd=0.0)
    (tmp_path / "grpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_curves(str(tmp_path / "grpo.jsonl"), str(tmp_path / "grpo.png"), {"held_out": [[0, 0.1, 0.1]]}, "GRPO")
    assert os.path.exists(tmp_path / "grpo.png")
    title = trainer.run_title(TrainConfig().resolved())
    assert title.startswith("PTD-PO (λ = 1, Top-8 JSD, spatial hint) · embedded tiny Qwen3-VL · grid-count task")


def test_study_figure_redrawn_from_runs_jsonl(tmp_path, capsys):
    import shutil

    shutil.copy(os.path.join(ROOT, "docs", "compare", "runs.jsonl"), tmp_path / "runs.jsonl")
    result = compare.main(["--replot", str(tmp_path)])
    assert result["replot"] == str(tmp_path / "curves.png") and os.path.getsize(tmp_path / "curves.png") > 20_000
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curves.png'}"


def test_transformers_parser_reads_the_config_too():
    """The fields' metadata is what argparse takes: HfArgumentParser still parses TrainConfig."""
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(TrainConfig).parse_args_into_dataclasses(args=["--max_steps", "3", "--no_progress"])
    assert cfg.max_steps == 3 and cfg.progress is False


def test_support_choices_are_the_library_supports():
    """The trainer's --ptd_support choices are spelled in its config (so that --help imports no torch):
    they must stay the library's supports."""
    from ptd_kernels import SUPPORTS
    from ptd_train.config import TrainConfig

    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "ptd_support")
    assert tuple(field.metadata["choices"]) == SUPPORTS
