"""Vocabulary-parallel calls: DTensor output layers, the process group, and the checks that every rank
holds what it must (its own vocabulary slice; the same rows as every other rank).

With a process group, ``weight``/``bias``/``teacher_weight``/``teacher_bias`` hold this rank's
contiguous slice of the vocabulary rows (rank order, sizes may differ) and every other argument is
the same on every rank. One all-gather of a few numbers per rank and call carries the slice sizes
and a fingerprint of every argument that must be replicated, so that a mistake (an FSDP2 shard
passed as a tensor-parallel slice, rows that differ by rank) is a clear error on every rank rather
than a hang or a silently wrong value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_FSDP_HINT = (
    "A weight sharded by FSDP2 is sharded for storage, not for compute: call ptd inside the forward of the "
    "module that owns the weight (FSDP2 un-shards it there) and pass no process_group")


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _local_shard(name: str, t, mesh):
    """A DTensor sharded on dim 0 over ``mesh`` as this rank's local tensor (differentiable)."""
    if not _is_dtensor(t):
        raise TypeError(f"{name} must be a DTensor on the weight's mesh like weight, got {type(t).__name__}")
    if t.device_mesh != mesh or len(t.placements) != 1 or not t.placements[0].is_shard(0):
        raise ValueError(f"{name} must be sharded on dim 0 over the weight's 1-D mesh, got {t.placements}")
    return t.to_local()


def _local_replica(name: str, t):
    if not _is_dtensor(t):
        return t
    if not all(p.is_replicate() for p in t.placements):
        raise ValueError(f"{name} is a DTensor with placements {t.placements}: ptd's vocabulary-parallel path needs "
                         f"the same rows on every rank (Replicate). {_FSDP_HINT}")
    return t.to_local()


def resolve(process_group, hidden, weight, bias=None, teacher_hidden=None, teacher_weight=None, teacher_bias=None):
    """DTensor arguments as local tensors, and the process group of a vocabulary-parallel call (None: one
    process). A ``weight`` that is a DTensor sharded on dim 0 over a 1-D mesh brings its group; its
    ``bias`` and the teacher's layer, when DTensors too, must be sharded alike, and a DTensor ``hidden``
    must be replicated."""
    if not _is_dtensor(weight):
        for name, t in (("hidden", hidden), ("bias", bias), ("teacher_hidden", teacher_hidden),
                        ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
            if _is_dtensor(t):
                raise TypeError(f"{name} is a DTensor but weight is not: pass the output layer as DTensors "
                                "(weight sharded on dim 0) or as this rank's local slices with process_group")
        return process_group, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias
    mesh = weight.device_mesh
    if mesh.ndim != 1 or len(weight.placements) != 1 or not weight.placements[0].is_shard(0):
        raise ValueError(f"weight is a DTensor with placements {weight.placements} on a {mesh.ndim}-D mesh: ptd takes "
                         "an output layer sharded on dim 0 (the vocabulary) over a 1-D mesh")
    group = mesh.get_group()
    if process_group is not None and process_group != group:
        raise ValueError("process_group differs from the group of weight's device mesh: pass one of them")
    local = [_local_shard("weight", weight, mesh), None if bias is None else _local_shard("bias", bias, mesh)]
    if teacher_weight is not None:
        local += [_local_shard("teacher_weight", teacher_weight, mesh) if _is_dtensor(teacher_weight)
                  else teacher_weight,
                  _local_shard("teacher_bias", teacher_bias, mesh) if _is_dtensor(teacher_bias) else teacher_bias]
    else:
        local += [None, None]
    return (group, _local_replica("hidden", hidden), local[0], local[1],
            _local_replica("teacher_hidden", teacher_hidden), local[2], local[3])


def _fingerprint(t) -> list[float]:
    """Numbers that differ, in practice, between two different tensors (and are equal for equal ones)."""
    if t is None:
        return [-1.0, 0.0, 0.0, 0.0]
    if not isinstance(t, torch.Tensor):
        return [-3.0, 0.0, 0.0, 0.0]
    x = torch.nan_to_num(t.detach().to(torch.float64).reshape(-1), nan=0.5, posinf=7.0, neginf=-7.0)
    weights = torch.arange(x.numel(), device=x.device, dtype=torch.float64).remainder_(9973).add_(1)
    return [float(x.numel()), float(x.sum()), float((x * x).sum()), float((x * weights).sum())]


def slice_sizes(group, weight, bias=None, teacher_weight=None, teacher_bias=None, **replicated) -> tuple[int, ...]:
    """The vocabulary slice sizes of every rank, after checking (on every rank alike) that the slices are
    consistent and that each ``replicated`` argument is the same on every rank."""
    def rows(t):
        if not isinstance(t, torch.Tensor):
            return -1.0 if t is None else -3.0
        return float(t.shape[0]) if t.dim() else -2.0

    device = weight.device
    names = list(replicated)
    local = [rows(weight), rows(bias), rows(teacher_weight), rows(teacher_bias)]
    for name in names:
        local += _fingerprint(replicated[name])
    mine = torch.tensor(local, dtype=torch.float64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    table = torch.stack(table).cpu()
    sizes = tuple(int(v) for v in table[:, 0])
    if min(sizes) < 1:
        raise ValueError(f"every rank's weight must hold at least one vocabulary row; slice sizes by rank: {sizes}")
    for column, name in ((1, "bias"), (2, "teacher_weight"), (3, "teacher_bias")):
        values = tuple(int(v) for v in table[:, column])
        if values[0] != -1 or len(set(values)) > 1:
            if values != sizes:
                raise ValueError(f"{name} must hold the same vocabulary slice as weight on every rank: weight's "
                                 f"slice sizes by rank {sizes}, {name}'s {values}")
    for i, name in enumerate(names):
        block = table[:, 4 + 4 * i: 8 + 4 * i]
        if bool((block != block[0]).any()):
            hint = f" {_FSDP_HINT}." if name in ("hidden", "teacher_hidden") else ""
            raise ValueError(f"{name} differs across the ranks of the process group: in a vocabulary-parallel call "
                             f"every rank passes the same {name} (only the output layer is sliced).{hint}")
    return sizes
