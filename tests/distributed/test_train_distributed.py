"""ptd_train under torchrun, on CPU with gloo: 2 processes (spawned here, with the environment
torchrun sets) against 1. One RL step on 2 ranks equals one process on the concatenated batch,
with DDP and with FSDP2 (PTD active, a rank without reference-KL rows, clipping on the global
norm); a run checkpointed on 2 ranks resumes on 1 and the reverse; bad setups fail clearly."""

import copy
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _tiny_checkpoints import make_checkpoint, make_dataset

from ptd_train import checkpoint, distributed, run, trainer
from ptd_train.config import TrainConfig
from ptd_train.model import ModelWithFusedHead, TinyVLSpec, build_tiny_model
from ptd_train.prompts import Env, build_tokenizer
from ptd_train.rollout import completion_ids, evaluate
from ptd_train.tasks import GridCountTask
from ptd_train.vision import VisionGeometry

pytestmark = pytest.mark.slow  # torchrun-style multi-process training

SPEC = TinyVLSpec(
    hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, vision_hidden=16, vision_heads=1
)
STEP = dict(warmstart_max_steps=0, prompts_per_step=4, group_size=4, max_new_tokens=3, progress=False)
# per prompt: which of its 4 rollouts are correct. Prompt 0 is all correct (no PTD, reference KL
# on), the others are PTD groups (reference KL dropped): rank 1 (prompts 2, 3) has no KL rows.
CORRECT = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)


def _step_setup(fsdp: bool):
    """The same models, optimizer, prompts and rollouts on every process."""
    cfg = TrainConfig(output_dir="unused", fsdp=fsdp, **STEP).resolved()
    task = GridCountTask(eval_size=6, dev_size=2)
    tok = build_tokenizer(task.words)
    model = build_tiny_model(tok, SPEC, seed=0)
    env = Env(cfg, tok, VisionGeometry.of(model), torch.device("cpu"), "torch")
    examples = task.sample(np.random.default_rng(5), cfg.prompts_per_step)
    resp = torch.full((16, 3), tok.pad_token_id)
    mask = torch.zeros(16, 3, dtype=torch.bool)
    for r in range(16):
        ex, right = examples[r // 4], CORRECT[r // 4][r % 4]
        n = int(ex.answer) if right else (int(ex.answer) + 1 + r % 3) % 17
        ids = completion_ids(tok, f"total {n}")[: 2 + r % 2]  # some responses end without EOS
        resp[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = True
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the policy a little away from the reference: a nonzero KL term and gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return cfg, env, task, model, ref, examples, (resp, mask)


def _one_step(d: distributed.Dist):
    """rl_step on this process's share, then the held-out evaluation; (metrics, eval, full weights)."""
    cfg, env, task, model, ref, examples, (resp, mask) = _step_setup(d.fsdp)
    policy = distributed.parallelize(ModelWithFusedHead(model), d, trainable=True)
    ref = distributed.parallelize(ModelWithFusedHead(ref), d, trainable=False)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)  # the update is the (clipped) gradient itself
    mine = d.share(list(range(len(examples))))
    rows = [r for r in range(16) if r // 4 in mine]
    m = trainer.rl_step(
        policy,
        ref,
        opt,
        env,
        [examples[i] for i in mine],
        teacher_head=distributed.full_output_layer(ref),
        dist=d,
        rollouts=(resp[rows], mask[rows]),
    )
    ev = evaluate(distributed.unwrap(policy), env, task.test, dist=d)
    state = distributed.full_model_state(distributed.unwrap(policy), d) or model.state_dict()
    return m, ev, {k: v.detach().clone() for k, v in state.items()}


def _two_rank_step_worker(rank: int, port: int, out: str):
    _as_rank(rank, 2, port)
    cfg = TrainConfig(output_dir="unused", **STEP).resolved()
    with distributed.started(cfg, torch.device("cpu")) as d:
        results = {}
        for fsdp in (False, True):
            results["fsdp" if fsdp else "ddp"] = _one_step(distributed.Dist(d.rank, d.world, fsdp, d.device))
        if d.main:
            torch.save(results, out)


def test_two_ranks_one_step_equals_one_process(tmp_path):
    out = str(tmp_path / "two_ranks.pt")
    mp.start_processes(_two_rank_step_worker, args=(_free_port(), out), nprocs=2, start_method="spawn")
    two = torch.load(out)
    m1, ev1, w1 = _one_step(distributed.SINGLE)
    w0 = _step_setup(False)[3].state_dict()
    assert m1["ptd_rollouts"] == 9 and m1["jsd"] > 0 and m1["kl"] > 0 and m1["grad_norm"] > 1.0  # PTD on, clipped
    for mode, (m2, ev2, w2) in two.items():
        for key in ("ptd_rollouts", "all_fail_groups", "reward_mean", "accuracy", "response_len"):
            assert m2[key] == m1[key], (mode, key)
        for key in ("loss", "pg_loss", "kl", "ptd_loss", "entropy", "neg_logp", "jsd", "overlap", "grad_norm"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), (mode, key)
        assert ev2["accuracy"] == ev1["accuracy"], mode
        assert ev2["p_correct"] == pytest.approx(ev1["p_correct"], rel=1e-4), mode
        assert w2.keys() == w1.keys()
        for k in w1:  # the update of every parameter, not only the parameters (the update is small)
            step1, step2 = w1[k] - w0[k], w2[k] - w0[k]
            torch.testing.assert_close(step2, step1, rtol=1e-3, atol=1e-4 * step1.abs().max().item() + 1e-9)


# ---------------------------------------------------------------------------- resume across world sizes

RUN = ["--eval_size", "4", "--eval_steps", "0", "--save_steps", "2", "--prompts_per_step", "2", "--group_size", "2"]
RUN += ["--warmstart_max_steps", "0", "--progress", "false", "--plot", "false"]


def _steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _weights(out, folder="final"):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, folder, "model.safetensors"))


def _resume_worker(rank: int, ports: list[int], a: str, b: str, b_flags: list[str]):
    _as_rank(rank, 2, ports[0])
    run.main(["--output_dir", a, "--max_steps", "2", "--fsdp", "true", *RUN])  # a fresh 2-rank run
    os.environ["MASTER_PORT"] = str(ports[1])
    real_step, kept = trainer.rl_step, []

    def keep_what_was_loaded(policy, *args, dist, **kwargs):  # the weights both ranks loaded, before step 3
        if not kept:
            kept.append(True)
            lm = distributed.unwrap(policy)
            state = distributed.full_model_state(lm, dist)  # every rank takes part under FSDP2
            if dist.main:
                lm.model.save_pretrained(os.path.join(b, "loaded"), state_dict=state)
            dist.barrier()
        return real_step(policy, *args, dist=dist, **kwargs)

    trainer.rl_step = keep_what_was_loaded
    run.main(["--output_dir", b, "--max_steps", "3", "--resume", "true", "--fsdp", "true", *RUN, *b_flags])


def test_resume_at_another_world_size(tmp_path):
    """2 → 1 on the embedded model (FSDP2 checkpoint); 1 → 2 on a Qwen2-VL checkpoint with a text
    JSONL task (DDP, whose vision tower gets no gradient and no optimizer state, then FSDP2)."""
    a, b = str(tmp_path / "two_then_one"), str(tmp_path / "one_then_two")
    b_flags = ["--model_name_or_path", make_checkpoint(tmp_path, "qwen2_vl"), "--dataset", make_dataset(tmp_path, True)]
    run.main(["--output_dir", b, "--max_steps", "2", *RUN, *b_flags])
    b_step2 = _weights(b)
    ports = [_free_port() for _ in range(3)]
    mp.start_processes(_resume_worker, args=(ports, a, b, b_flags), nprocs=2, start_method="spawn")

    # 1 → 2: both ranks loaded the step-2 weights (before any further step) and went on
    loaded, b_step3 = _weights(b, "loaded"), _weights(b)
    assert _steps(b) == [1, 2, 3]
    assert all(torch.equal(loaded[k], v) for k, v in b_step2.items())
    assert any(not torch.equal(b_step3[k], v) for k, v in b_step2.items())

    # 2 → 1: the FSDP2 checkpoint loads whole into one process (weights and optimizer state) ...
    a_step2 = _weights(a)
    cfg = TrainConfig(output_dir=a, **STEP).resolved()
    model = build_tiny_model(build_tokenizer(GridCountTask.words), seed=0)
    lm = ModelWithFusedHead(model)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr)
    state = checkpoint.load(os.path.join(a, "checkpoints"), lm, opt)
    assert state["step"] == 2 and state["world_size"] == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in a_step2.items())
    steps = {float(s["step"]) for s in opt.state_dict()["state"].values()}
    assert steps == {2.0}
    # ... and a one-process run continues it
    lines = open(os.path.join(a, "metrics.jsonl")).read().splitlines()
    run.main(["--output_dir", a, "--max_steps", "3", "--resume", "true", *RUN])
    assert _steps(a) == [1, 2, 3] and open(os.path.join(a, "metrics.jsonl")).read().splitlines()[:2] == lines
    assert any(not torch.equal(_weights(a)[k], v) for k, v in a_step2.items())


@pytest.mark.parametrize(
    "world, prompts, message",
    [(3, 4, "4 prompts do not divide evenly over 3 processes"), (8, 4, "4 prompts cannot be shared by 8 processes")],
)
def test_bad_world_size_is_a_clear_error(tmp_path, monkeypatch, capsys, world, prompts, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_:
        run.main(["--output_dir", str(tmp_path / "out"), "--prompts_per_step", str(prompts), "--progress", "false"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--prompts_per_step {prompts}: {message}" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")
