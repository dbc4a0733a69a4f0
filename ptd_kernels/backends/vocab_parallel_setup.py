"""Setting up a vocabulary-parallel call: DTensor output layers, the process group, and the one exchange
in which every rank checks that it agrees with the others.

With a process group, ``weight``/``bias``/``teacher_weight``/``teacher_bias`` hold this rank's contiguous
slice of the vocabulary rows (rank order, sizes may differ) and every other argument is the same on
every rank. Before any collective whose sizes depend on the arguments, each rank sends one fixed-size
float64 record (``exchange``) and every rank reads every record once:

- whether the rank's own argument checks passed, and if not, its error (type and message);
- which function it called, and every argument that must be equal on every rank: numbers (β, τ, logit
  scales, soft-caps, k, ignore_index), strings (support, backend), flags (tail, with_entropy), the
  presence, dtype and shape of each tensor, and a fingerprint of each replicated tensor (hidden states,
  targets, masks, row weights, sparse-teacher ids and log-probs);
- its vocabulary slice size, and the few device values the call reads anyway (live-row counts, id ranges).

Then every rank raises the same error — the failing rank's own, or one naming the argument and the ranks
that differ — or every rank proceeds. (What no exchange can catch: a rank that passes no process group at
all while the others pass one never joins them.) A mistake (an FSDP2 shard passed as a tensor-parallel slice, rows
that differ by rank, β or k set per rank) is a clear error on every rank rather than a hang, an abort in
the collective library, or a silently wrong value.

The fingerprint of a replicated tensor is two float64 numbers computed on its device without copying it:
each row is projected on fixed weights 1..7 (one matrix-vector product in the tensor's own dtype), and
the row projections are summed with two sets of weights. It catches rows that differ by rank (other
samples, another order, a shifted or scaled row, another dtype or shape), and any change of a row larger
than the rounding of its projection in that dtype; it cannot catch a change that the projection cancels
(e.g. two entries of one row with the same weight swapped) or one below that rounding (about 1 part in
256 of a bfloat16 row's projection). Integer and small tensors are summed exactly in float64.
"""

from __future__ import annotations

import math
import numbers
import zlib

import torch
import torch.distributed as dist

FSDP_HINT = (
    "A weight sharded by FSDP2 is sharded for storage, not for compute: call ptd inside the forward of the "
    "module that owns the weight (FSDP2 un-shards it there) and pass no process_group")

LAYER_NAMES = ("hidden", "weight", "bias", "teacher_hidden", "teacher_weight", "teacher_bias")


# ----------------------------------------------------------------------------- DTensors


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    if t is None or type(t) in (torch.Tensor, torch.nn.Parameter):  # the common case, without the import
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _local_shard(name: str, t, mesh):
    """A DTensor sharded on dim 0 over ``mesh`` as this rank's local tensor (differentiable)."""
    if not is_dtensor(t):
        raise TypeError(f"{name} must be a DTensor on the weight's mesh like weight, got {type(t).__name__}")
    if t.device_mesh != mesh or len(t.placements) != 1 or not t.placements[0].is_shard(0):
        raise ValueError(f"{name} must be sharded on dim 0 over the weight's 1-D mesh, got {t.placements}")
    return t.to_local()


def _local_replica(name: str, t):
    if not is_dtensor(t):
        return t
    if not all(p.is_replicate() for p in t.placements):
        raise ValueError(f"{name} is a DTensor with placements {t.placements}: ptd's vocabulary-parallel path needs "
                         f"the same rows on every rank (Replicate). {FSDP_HINT}")
    return t.to_local()


def group_of(process_group, layers: dict):
    """The process group of a call, as far as it can be told without checking the layers (None: one process)."""
    if process_group is not None:
        return process_group
    weight = layers.get("weight")
    if is_dtensor(weight) and weight.device_mesh.ndim == 1:
        return weight.device_mesh.get_group()
    return None


def resolve_layers(process_group, layers: dict):
    """(process group or None, the output-layer tensors as local tensors). A ``weight`` that is a DTensor
    sharded on dim 0 over a 1-D mesh brings its group; its ``bias`` and the teacher's layer, when DTensors
    too, must be sharded alike, and a DTensor ``hidden`` must be replicated."""
    weight = layers.get("weight")
    if not is_dtensor(weight):
        for name in LAYER_NAMES:
            if is_dtensor(layers.get(name)):
                raise TypeError(f"{name} is a DTensor but weight is not: pass the output layer as DTensors "
                                "(weight sharded on dim 0) or as this rank's local slices with process_group")
        return process_group, dict(layers)
    mesh = weight.device_mesh
    if mesh.ndim != 1 or len(weight.placements) != 1 or not weight.placements[0].is_shard(0):
        raise ValueError(f"weight is a DTensor with placements {weight.placements} on a {mesh.ndim}-D mesh: ptd takes "
                         "an output layer sharded on dim 0 (the vocabulary) over a 1-D mesh")
    group = mesh.get_group()
    if process_group is not None and process_group != group:
        raise ValueError("process_group differs from the group of weight's device mesh: pass one of them")
    local = dict(layers)
    local["weight"] = _local_shard("weight", weight, mesh)
    if layers.get("bias") is not None:
        local["bias"] = _local_shard("bias", layers["bias"], mesh)
    for name in ("teacher_weight", "teacher_bias"):
        if is_dtensor(layers.get(name)):
            local[name] = _local_shard(name, layers[name], mesh)
    for name in ("hidden", "teacher_hidden"):
        if name in layers:
            local[name] = _local_replica(name, layers[name])
    return group, local


# ----------------------------------------------------------------------------- fingerprints


def _pattern(length: int, dtype, device, scale: float = 1.0) -> torch.Tensor:
    """Fixed weights 1..7 (a multiplicative hash of the index) times ``scale``, made on the device: a
    shift of a whole row, a swap of two entries of unequal weight or a scaled row all change the projection."""
    index = torch.arange(length, device=device, dtype=torch.int64)
    return ((index * 40503) % 7 + 1).to(dtype).mul_(scale)


def fingerprint(t) -> torch.Tensor:
    """Two float64 numbers on ``t``'s device that differ, in practice, between two different tensors and
    are equal for equal ones (see the module docstring). No host read, no copy of a large tensor."""
    x = t.detach()
    rows = x.reshape(x.shape[0] if x.dim() else 1, -1)
    if x.is_floating_point() and rows.shape[1] > 1 and x.dtype != torch.float64 and rows.numel() > (1 << 16):
        # in the tensor's own dtype, weights ≤ 7/(8·H): the projection stays within the entries' range
        pattern = _pattern(rows.shape[1], x.dtype, x.device, 1.0 / (8 * rows.shape[1]))
        projected = torch.mv(rows, pattern).to(torch.float64)
    else:
        wide = rows.to(torch.float64)
        projected = wide @ _pattern(wide.shape[1], torch.float64, x.device)
    projected = torch.nan_to_num(projected, nan=0.5, posinf=7.0, neginf=-7.0)
    weights = torch.arange(projected.numel(), device=x.device, dtype=torch.float64).remainder_(9973).add_(1)
    return torch.stack([projected @ weights, projected @ projected])


# ----------------------------------------------------------------------------- the exchange

# Slots of one rank's record (float64): a header, 2 slots per agreed field, the error message (4 bytes per
# slot), then the values computed on the device (fingerprints and the call's summary).
_HEADER, _FIELD_SLOTS, _MESSAGE_SLOTS, _DEVICE_SLOTS = 6, 192, 96, 48
_HOST_SLOTS = _HEADER + _FIELD_SLOTS + _MESSAGE_SLOTS
_ERRORS = (ValueError, TypeError, RuntimeError)
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
_NONE, _BOOL, _NUMBER, _STRING, _DTYPE, _OTHER = range(6)


def _code(text: str) -> int:
    return zlib.crc32(text.encode())


def _encode(value) -> tuple[float, float]:
    if value is None:
        return _NONE, 0.0
    if isinstance(value, bool):
        return _BOOL, float(value)
    if isinstance(value, numbers.Real):
        return _NUMBER, float(value)
    if isinstance(value, str):
        return _STRING, float(_code(value))
    if isinstance(value, torch.dtype):
        return _DTYPE, float(_DTYPES.index(value)) if value in _DTYPES else -1.0
    return _OTHER, float(_code(type(value).__name__))


def _decode(kind: float, value: float, words: tuple[str, ...]) -> str:
    kind = int(kind)
    if kind == _NONE:
        return "None"
    if kind == _BOOL:
        return str(bool(value))
    if kind == _NUMBER:
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if kind == _STRING:
        return next((repr(w) for w in words if _code(w) == int(value)), "another string")
    if kind == _DTYPE:
        return str(_DTYPES[int(value)]).replace("torch.", "") if 0 <= value < len(_DTYPES) else "another dtype"
    return "an object of another type"


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)


def _by_value(values: list, show) -> str:
    """"rank 0: 0.5; ranks 1, 2: 0.1" — the ranks grouped by value."""
    groups: list[tuple[object, list[int]]] = []
    for rank, value in enumerate(values):
        for seen, ranks in groups:
            if all(_same(a, b) for a, b in zip(seen, value)):
                ranks.append(rank)
                break
        else:
            groups.append((value, [rank]))
    return "; ".join(f"{_ranks(ranks)}: {show(value)}" for value, ranks in groups)


def _exchange_device(group, weight) -> torch.device:
    if isinstance(weight, torch.Tensor):
        return weight.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _message_slots(message: str) -> list[float]:
    data = message.encode()[: 4 * _MESSAGE_SLOTS]
    data += b"\0" * (4 * _MESSAGE_SLOTS - len(data))
    return [float(int.from_bytes(data[i:i + 4], "little")) for i in range(0, len(data), 4)]


def _message(slots: list[float]) -> str:
    data = b"".join(int(v).to_bytes(4, "little") for v in slots)
    return data.rstrip(b"\0").decode(errors="ignore")


class Agreement:
    """What one rank sends besides its error: its function, slice size, agreed fields, fingerprinted
    tensors and summary.

    ``fields``: (argument name, aspect or None, value): a value every rank must pass alike — a number, a
    bool, a string, a dtype or None; the aspect names what of a tensor argument it is ("dtype", "dim 1").
    ``sliced``: the argument names of the output-layer slices (they may differ in their rows only).
    ``replicated``: (argument name, tensor or None), fingerprinted. ``summary``: (name, device scalar):
    values the call reads once anyway, sent along so that reading the exchange reads them too.
    """

    def __init__(self, function: str, vocab: int, fields, sliced, replicated, summary):
        self.function, self.vocab, self.fields, self.sliced = function, vocab, list(fields), frozenset(sliced)
        self.replicated, self.summary = list(replicated), list(summary)


def exchange(group, function: str, agreement: Agreement | None, failure: BaseException | None, weight,
             words: tuple[str, ...] = ()) -> tuple[tuple[int, ...], list[float]]:
    """The one exchange of a vocabulary-parallel call (see the module docstring). Every rank calls it, also
    one whose own checks failed (``agreement`` None, ``failure`` its exception). Returns (the slice sizes by
    rank, this rank's summary values), or raises the same error on every rank."""
    device = _exchange_device(group, weight)
    host = [0.0] * _HOST_SLOTS
    host[1] = float(_code(function))
    device_parts = []
    if failure is not None:
        host[0] = float(1 + next((i for i, kind in enumerate(_ERRORS) if isinstance(failure, kind)), len(_ERRORS)))
        host[_HEADER + _FIELD_SLOTS:] = _message_slots(str(failure))
    else:
        if 2 * len(agreement.fields) > _FIELD_SLOTS:
            raise AssertionError(f"{function} agrees on {len(agreement.fields)} fields; the record holds "
                                 f"{_FIELD_SLOTS // 2}")
        host[2], host[3] = float(len(agreement.fields)), float(agreement.vocab)
        host[4], host[5] = float(len(agreement.replicated)), float(len(agreement.summary))
        for i, (*_, value) in enumerate(agreement.fields):
            host[_HEADER + 2 * i: _HEADER + 2 * i + 2] = _encode(value)
        device_parts = [fingerprint(t) if t is not None else torch.zeros(2, dtype=torch.float64, device=device)
                        for _, t in agreement.replicated]
        device_parts += [value.reshape(1).to(torch.float64) for _, value in agreement.summary]
    host_block = torch.tensor(host, dtype=torch.float64)
    if device.type == "cuda":  # a pinned, non-blocking copy: no wait for the device
        host_block = host_block.pin_memory().to(device, non_blocking=True)
    device_block = torch.zeros(_DEVICE_SLOTS, dtype=torch.float64, device=device)
    if device_parts:
        values = torch.cat(device_parts)
        if values.numel() > _DEVICE_SLOTS:
            raise AssertionError(f"{function} sends {values.numel()} device values; the record holds {_DEVICE_SLOTS}")
        device_block[: values.numel()] = values
    record = torch.cat([host_block, device_block.to(host_block.device)])
    gathered = [torch.empty_like(record) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, record, group=group)
    table = torch.stack(gathered).tolist()  # the call's one host read
    _raise_on_disagreement(table, dist.get_rank(group), function, agreement, failure, words)
    sizes = tuple(int(row[3]) for row in table)
    mine = table[dist.get_rank(group)]
    start = _HOST_SLOTS + 2 * len(agreement.replicated)
    return sizes, mine[start: start + len(agreement.summary)]


def _raise_on_disagreement(table, rank: int, function: str, agreement, failure, words) -> None:
    failed = [r for r, row in enumerate(table) if row[0] != 0]
    if failed:
        if failure is not None:
            raise failure
        first = table[failed[0]]
        kind = _ERRORS[int(first[0]) - 1] if int(first[0]) - 1 < len(_ERRORS) else RuntimeError
        message = _message(first[_HEADER + _FIELD_SLOTS: _HOST_SLOTS])
        raise kind(f"{_ranks(failed)} of the process group failed {'its' if len(failed) == 1 else 'their'} "
                   f"argument checks in this vocabulary-parallel call; {_ranks(failed[:1])}: {message}")
    if len({row[1] for row in table}) > 1:
        raise ValueError(f"the ranks of the process group called different functions in one vocabulary-parallel "
                         f"call (this rank, {rank}, called {function}): every rank must make the same call")
    for i, (name, aspect, _) in enumerate(agreement.fields):
        values = [tuple(row[_HEADER + 2 * i: _HEADER + 2 * i + 2]) for row in table]
        if not all(_same(a, b) for value in values[1:] for a, b in zip(values[0], value)):
            subject = name if aspect is None else f"the {aspect} of {name}"
            rule = (f"the slices of {name} differ only in their rows" if name in agreement.sliced else
                    f"every rank passes the same {name}" + (" (only the output layer is sliced)" if aspect else ""))
            raise ValueError(f"{subject} differs across the ranks of the process group "
                             f"({_by_value(values, lambda v: _decode(*v, words))}): in a vocabulary-parallel call "
                             f"{rule}")
    # Same function and same fields (a tensor's presence included): the same layout, unless ptd has a defect.
    if len({(row[2], row[4], row[5]) for row in table}) > 1:
        raise AssertionError(f"the ranks of the process group laid out their {function} records differently")
    for i, (name, _) in enumerate(agreement.replicated):
        values = [tuple(row[_HOST_SLOTS + 2 * i: _HOST_SLOTS + 2 * i + 2]) for row in table]
        if not all(_same(a, b) for value in values[1:] for a, b in zip(values[0], value)):
            groups = _by_value(values, lambda v: "one value").replace(": one value", "")
            hint = f" {FSDP_HINT}." if name in ("hidden", "teacher_hidden") else ""
            raise ValueError(f"{name} differs across the ranks of the process group ({groups} hold different "
                             f"values): in a vocabulary-parallel call every rank passes the same {name} (only the "
                             f"output layer is sliced).{hint}")

