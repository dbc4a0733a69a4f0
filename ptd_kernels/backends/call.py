"""Opening a call on the backends: the public layer hands over its output-layer tensors and a check of its
arguments, and gets back the backend that runs the call, the vocabulary size and the values it reads
from the device, read once.

One process: the check runs (its errors are raised as they are), and the call's summary (the few device
values it needs on the host: live-row counts, id ranges) is read in one transfer, unless
``ptd_kernels.config.SYNC_FREE`` is set. With a process group (given, or brought by a DTensor weight), the
output layer is vocabulary-parallel: the DTensors become local tensors, the check runs on them, and
every rank — also one whose check failed — takes part in the one exchange of ``vocab_parallel_setup``,
which compares what must agree, carries the summary, and gives the slice sizes; the selected backend
then runs inside ``VocabParallelBackend``. The public layer never branches on the process group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import config
from .base import Backend
from .registry import backend_names
from .vocab_parallel import VocabParallelBackend
from .vocab_parallel_setup import Agreement, exchange, group_of, resolve_layers


@dataclass
class Checked:
    """What a call's check returns: the checked arguments (as the public layer wants them), the backend
    selected for the call's tensors, the vocabulary size the check saw, the summary (name, device scalar) the
    call reads once, and ``agreement()``: what the call must agree on across ranks (built only for a
    vocabulary-parallel call)."""

    arguments: dict
    backend: Backend | None
    vocab: int
    summary: list
    agreement: Callable[[], Agreement]


@dataclass
class OpenedCall:
    """A call ready to run: ``backend`` (None for the logits-level functions), the full vocabulary size,
    the checked arguments, and the summary as host numbers by name (None: not read, on the sync-free path)."""

    backend: Backend | None
    vocab: int
    arguments: dict
    summary: dict[str, float] | None


def open_call(function: str, backend: str, process_group, layers: dict, check: Callable[[dict], Checked],
              words: tuple[str, ...] = ()) -> OpenedCall:
    """Resolve the layers, run ``check`` on them, and agree with the other ranks (see the module docstring).
    ``words``: the strings an argument may hold (for messages naming other ranks' values)."""
    group = failure = checked = agreement = None
    try:
        group, layers = resolve_layers(process_group, layers)
        checked = check(layers)
        if group is not None:
            agreement = checked.agreement()
    except Exception as exc:  # with a process group, the other ranks must hear of it (no hang)
        group = group if group is not None else group_of(process_group, layers)
        if group is None:
            raise
        failure = exc
    if group is None:
        summary = None
        if checked.summary and not config.SYNC_FREE:
            values = torch.stack([value.to(torch.float64) for _, value in checked.summary]).tolist()  # one read
            summary = {name: v for (name, _), v in zip(checked.summary, values)}
        return OpenedCall(checked.backend, checked.vocab, checked.arguments, summary)
    sizes, values = exchange(group, function, agreement, failure,
                             layers.get("weight"), words=(*words, *backend_names()))
    summary = {name: v for (name, _), v in zip(checked.summary, values)}
    return OpenedCall(VocabParallelBackend(checked.backend, group, sizes), sum(sizes), checked.arguments, summary)
