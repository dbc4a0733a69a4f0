"""Nothing the trainer reads from disk runs code: a crafted pickle placed where the warm-start
cache or a checkpoint lives is refused with a clear error, and its payload never runs."""

import io
import json
import os
import pickle

import pytest
import torch

from ptd_train import checkpoint, run, warmstart
from ptd_train.checkpoint import SafeLoadPlanner, UnsafeFileError
from ptd_train.config import TrainConfig, UsageError
from ptd_train.model import ModelWithFusedHead, build_tiny_model
from ptd_train.prompts import Env, build_tokenizer
from ptd_train.tasks import GridCountTask
from ptd_train.vision import VisionGeometry

TINY = ["--warmstart_max_steps", "0", "--eval_size", "2", "--prompts_per_step", "2", "--group_size", "2",
        "--max_new_tokens", "2", "--no_progress", "--no_plot"]  # fmt: skip


class Payload:
    """Unpickled, it creates the file ``marker``: proof that loading ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_payload_runs_when_unpickled(tmp_path):  # the test's own premise
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(str(marker)))).close()
    assert marker.exists()


def _warm_env(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), warmstart_dir=str(tmp_path / "cache"), warmstart_max_steps=1,
                      warmstart_batch=2, warmstart_eval_every=1, eval_size=2, max_new_tokens=2).resolved()  # fmt: skip
    task = GridCountTask(eval_size=2, dev_size=2)
    tok = build_tokenizer(task.words)
    model = build_tiny_model(tok, seed=0)
    return model, Env(cfg, tok, VisionGeometry.of(model), torch.device("cpu"), "torch"), task


def test_crafted_warm_start_cache_is_refused(tmp_path):
    model, env, task = _warm_env(tmp_path)
    key, spec = warmstart.cache_key(env.cfg, task, env.device, env.backend)
    entry = tmp_path / "cache" / key
    entry.mkdir(parents=True)
    marker = tmp_path / "ran"
    (entry / "model.safetensors").write_bytes(pickle.dumps({"model": Payload(str(marker))}))
    (entry / "info.json").write_text(json.dumps({"info": {"steps": 1}, "spec": spec}))
    with pytest.raises(UsageError, match=f"warm-start cache {entry}: cannot be used .* delete"):
        warmstart.warm_start(model, env, task, log=lambda *a: None)
    assert not marker.exists()


def test_a_pickle_under_the_old_cache_name_is_never_read(tmp_path):
    model, env, task = _warm_env(tmp_path)
    key, _ = warmstart.cache_key(env.cfg, task, env.device, env.backend)
    marker = tmp_path / "ran"
    (tmp_path / "cache").mkdir()
    torch.save({"model": Payload(str(marker))}, tmp_path / "cache" / f"warmstart-{key}.pt")
    info = warmstart.warm_start(model, env, task, log=lambda *a: None)  # trains and caches its own entry
    assert not info["cached"] and not marker.exists()


def _checkpointed_run(tmp_path) -> str:
    out = str(tmp_path / "run")
    run.main(["--output_dir", out, "--max_steps", "1", *TINY])
    return out


def test_crafted_checkpoint_metadata_is_refused(tmp_path, capsys):
    out = _checkpointed_run(tmp_path)
    path = checkpoint.latest(os.path.join(out, "checkpoints"))
    marker = tmp_path / "ran"
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    model = build_tiny_model(build_tokenizer(GridCountTask.words), seed=0)
    lm = ModelWithFusedHead(model)
    opt = torch.optim.AdamW(lm.parameters())
    with pytest.raises(UnsafeFileError, match=r"\.metadata: refused to load, it asks for (builtins|io)\.open"):
        checkpoint.load(os.path.join(out, "checkpoints"), lm, opt)
    assert not marker.exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # the command line: one line, exit code 2
        run.main(["--output_dir", out, "--max_steps", "2", "--resume", "true", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "refused to load" in err[-1] and sum("error:" in line for line in err) == 1
    assert not any(line.startswith("[") for line in err)  # refused before the set-up
    assert not marker.exists()


def test_crafted_checkpoint_value_is_refused(tmp_path):
    marker = tmp_path / "ran"
    data = io.BytesIO()
    torch.save(Payload(str(marker)), data)
    data.seek(0)

    class Item:  # what the planner is told about the value it loads
        class dest_index:
            fqn = "optimizer.param_groups.0.lr"

    with pytest.raises(UnsafeFileError, match="optimizer.param_groups.0.lr: refused to load"):
        SafeLoadPlanner().load_bytes(Item, data)
    assert not marker.exists()
