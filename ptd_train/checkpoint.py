"""Checkpoints: model and optimizer through ``torch.distributed.checkpoint`` (DCP), so a run saved
by N processes — sharded by FSDP2 or replicated by DDP — resumes on any number of processes, plus
``trainer_state.json`` (step, evaluations, config). The prompt and sampling streams are functions
of (seed, step), so the step is all a resumed run needs to continue them.

Layout: ``<output_dir>/checkpoints/step-000050/`` (DCP files + trainer_state.json) and
``<output_dir>/checkpoints/latest`` (the name of the newest complete one, written last).

Loading runs no code from disk. DCP's own reader unpickles its ``.metadata`` file and loads
non-tensor values (the optimizer's hyper-parameters) with ``torch.load(weights_only=False)``,
either of which runs whatever a crafted file asks. :class:`SafeReader` unpickles the metadata with
an allow-list of DCP's own record types, and :class:`SafeLoadPlanner` accepts only values that
``torch.load(weights_only=True)`` accepts; anything else is an :class:`UnsafeFileError`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import warnings

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from .config import UsageError
from .distributed import Dist


class UnsafeFileError(UsageError):
    """A file that would run code (or is not what ptd writes) was refused, unread."""


def atomic_write_text(text: str, path: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- loading without pickle's code

# What DCP's metadata is made of (torch 2.5-2.13): its own records, sizes, dtypes, layouts, paths.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},  # a name → torch.strided etc.
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise UnsafeFileError(
                f"{self.path}: refused to load, it asks for {module}.{name}, which a checkpoint written by ptd never "
                "holds (a file that runs code?); delete it or resume from another checkpoint"
            )
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file reader, its metadata unpickled with :data:`_METADATA_GLOBALS` only."""

    def read_metadata(self, *args, **kwargs):
        if hasattr(self, "_get_metadata_path"):  # torch ≥ 2.7 (per-rank metadata files)
            path = self._get_metadata_path(kwargs.get("rank"))
        else:
            path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data), str(path)).load()
        except UnsafeFileError:
            raise
        except Exception as e:  # a truncated or foreign file: say which
            raise UnsafeFileError(f"{path}: not a checkpoint's metadata ({e}); delete the checkpoint") from None
        # what the parent's read_metadata does after unpickling
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner whose non-tensor values pass ``torch.load(weights_only=True)`` first."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as e:
            raise UnsafeFileError(
                f"checkpoint value {read_item.dest_index.fqn}: refused to load ({str(e).splitlines()[0]}); "
                "delete the checkpoint"
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)


# ---------------------------------------------------------------------------- save, find, load


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


def trainer_state(root: str) -> dict | None:
    """The trainer state (step, evaluations, config) of the latest checkpoint, or None; JSON only."""
    path = latest(root)
    if path is None:
        return None
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: the checkpoint has no readable trainer_state.json ({e}); delete {path} and "
                         f"{os.path.join(root, 'latest')} to resume from nothing") from None


def load(root: str, lm: torch.nn.Module, opt: torch.optim.Optimizer) -> dict | None:
    """Load the latest checkpoint into ``lm`` and ``opt`` (any sharding: DCP reshards) and return
    its trainer state; None when there is none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = trainer_state(root)
    if state is None:
        return None
    path = latest(root)
    SafeReader(path).read_metadata()  # refused here, the error is this one line (inside dcp.load, a wrapped one)
    with _one_process_is_fine(), _one_line_errors(path):
        model_sd, optim_sd = get_state_dict(lm, opt)
        dcp.load({"model": model_sd}, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
        # parameters that never had a gradient (e.g. a vision tower on a text task) have no optimizer state
        dcp.load({"optimizer": optim_sd}, storage_reader=SafeReader(path),
                 planner=SafeLoadPlanner(allow_partial_load=True))  # fmt: skip
        set_state_dict(lm, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return state


@contextlib.contextmanager
def _one_line_errors(path: str):
    """DCP reports a failure as a CheckpointException holding every rank's traceback; a refused or
    unreadable file is the user's to fix: its own message, one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        causes = [failure[0] for failure in e.failures.values()]
        refused = next((c for c in causes if isinstance(c, UsageError)), None)
        if refused is not None:
            raise refused from None
        first = str(causes[0]).strip().splitlines()[0] if causes and str(causes[0]).strip() else "unreadable"
        raise UsageError(f"{path}: cannot load the checkpoint ({first}); delete it to resume from an earlier one, or "
                         "start a new run") from None


# environment variables that change which float kernels run (instruction set, BLAS code path)
NUMERIC_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def build_fingerprint() -> dict:
    """What besides the config decides the numbers on a CPU, so that a saved result is reused only
    where it would be recomputed bit for bit: the torch build, the vector instruction set its kernels
    dispatch to, the NUMERIC_ENV variables that are set, and the thread count (sums in another order)."""
    env = {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ}
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), **env}
