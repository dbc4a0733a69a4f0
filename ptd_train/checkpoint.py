"""Checkpoints: model and optimizer through ``torch.distributed.checkpoint`` (DCP), so a run saved
by N processes — sharded by FSDP2 or replicated by DDP — resumes on any number of processes, plus
``trainer_state.json`` (step, evaluations, config). The prompt and sampling streams are functions
of (seed, step), so the step is all a resumed run needs to continue them.

Layout: ``<output_dir>/checkpoints/step-000050/`` (DCP files + trainer_state.json) and
``<output_dir>/checkpoints/latest`` (the name of the newest complete one, written last)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings

import torch

from .distributed import Dist


def atomic_save(obj, path: str):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns when it runs without a process group; one process is an intended case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def save(root: str, lm: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, d: Dist) -> str:
    """Write checkpoint ``step-<state['step']>`` under ``root`` (every rank calls this) and make it
    the latest; the previous one is removed once the new one is complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = os.path.join(root, f"step-{state['step']:06d}")
    previous = latest(root)
    with _one_process_is_fine():
        model_sd, optim_sd = get_state_dict(lm, opt)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)
    if d.main:
        atomic_write_text(json.dumps(state, indent=2) + "\n", os.path.join(path, "trainer_state.json"))
        atomic_write_text(os.path.basename(path) + "\n", os.path.join(root, "latest"))
        if previous is not None and previous != path:
            shutil.rmtree(previous, ignore_errors=True)
    d.barrier()
    return path


def latest(root: str) -> str | None:
    """The newest complete checkpoint under ``root``, or None."""
    marker = os.path.join(root, "latest")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return os.path.join(root, f.read().strip())


def load(root: str, lm: torch.nn.Module, opt: torch.optim.Optimizer) -> dict | None:
    """Load the latest checkpoint into ``lm`` and ``opt`` (any sharding: DCP reshards) and return
    its trainer state; None when there is none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = latest(root)
    if path is None:
        return None
    with _one_process_is_fine():
        model_sd, optim_sd = get_state_dict(lm, opt)
        dcp.load({"model": model_sd}, checkpoint_id=path)
        # parameters that never had a gradient (e.g. a vision tower on a text task) have no optimizer state
        dcp.load({"optimizer": optim_sd}, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(lm, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


# environment variables that change which float kernels run (instruction set, BLAS code path)
NUMERIC_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def build_fingerprint() -> dict:
    """What besides the config decides the numbers on a CPU, so that a saved result is reused only
    where it would be recomputed bit for bit: the torch build, the vector instruction set its kernels
    dispatch to, the NUMERIC_ENV variables that are set, and the thread count (sums in another order)."""
    env = {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ}
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), **env}
