"""Data parallelism for the trainer: one process per device under ``torchrun``, DDP or FSDP2.

Every rank holds whole prompts — its share of the global batch and their G rollouts — so group
advantages stay per prompt; token means are taken over the global batch by all-reducing token
counts (see ``run.rl_step``). With ``--fsdp true`` the policy and the frozen reference are
sharded with FSDP2 (``fully_shard`` per transformer block and on the root); every forward then
all-gathers parameters, so all ranks must make the same forward calls: :meth:`Dist.lockstep_all`
and :meth:`Dist.lockstep_rows` keep them in step. Without it the policy is wrapped in DDP and
every rank keeps a full replica of the reference.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import check_world_size

# A rank waits in a collective while rank 0 trains the warm start alone.
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. The default is one process: every method is then the
    identity and no collective is ever called."""

    rank: int = 0
    world: int = 1
    fsdp: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's contiguous share of a global batch (its size divides by the world size,
        checked by :func:`started`)."""
        n = len(items) // self.world
        return items[self.rank * n : (self.rank + 1) * n]

    def eval_share(self, items: list) -> tuple[list, list[float]]:
        """This rank's share of an evaluation set and the weight of each item: equal-sized shares
        (so every rank makes the same forward calls), padded with copies of the first item that
        weigh 0."""
        n = -(-len(items) // self.world)
        mine = items[self.rank * n : (self.rank + 1) * n]
        pad = n - len(mine)
        return mine + items[:1] * pad, [1.0] * len(mine) + [0.0] * pad

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over ranks."""
        if self.world == 1:
            return x
        y = x.detach().to(self.device, copy=True)
        dist.all_reduce(y)
        return y.to(x.device)

    def lockstep_all(self, flag: bool) -> bool:
        """Under FSDP2 whether ``flag`` holds on every rank (a loop that calls the model stops on all
        ranks at once); otherwise this rank's own flag."""
        if not (self.fsdp and self.world > 1):
            return flag
        t = torch.tensor([0 if flag else 1], device=self.device)
        dist.all_reduce(t)
        return int(t.item()) == 0

    def lockstep_rows(self, rows: list[int]) -> list[int]:
        """The rows a frozen-model pass runs on. Under FSDP2, when any rank has rows, a rank with
        none runs its row 0 (its result unused) so that all ranks make the forward call."""
        if not (self.fsdp and self.world > 1) or self.lockstep_all(not rows):
            return rows
        return rows or [0]

    def broadcast_model(self, model: torch.nn.Module, info):
        """Rank 0's weights (and the picklable ``info``) on every rank."""
        if self.world == 1:
            return info
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
        box = [info]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


SINGLE = Dist()


@contextlib.contextmanager
def started(cfg, device: torch.device):
    """The :class:`Dist` of this process: one process, or a rank of a ``torchrun`` job (its
    process group joined — NCCL on CUDA, gloo on CPU — and left on exit)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Dist(device=device)
        return
    check_world_size(cfg.prompts_per_step, world)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield Dist(rank=rank, world=world, fsdp=cfg.fsdp, device=device)
    finally:
        dist.destroy_process_group()


def parallelize(lm: torch.nn.Module, d: Dist, *, trainable: bool, unused_params: bool = False) -> torch.nn.Module:
    """The module to call for ``lm`` (a ``ModelWithFusedHead``): itself on one process; under
    FSDP2 ``lm`` sharded in place — each transformer block (the model's ``_no_split_modules``:
    decoder layers, vision blocks) and the root, its forward methods registered; under DDP a
    ``DistributedDataParallel`` around the trainable policy, and the frozen reference unchanged
    (a full replica per rank). ``unused_params``: some parameters get no gradient (the vision
    tower of a vision-language model on a text task), which DDP must be told."""
    if d.world == 1:
        return lm
    if d.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(d.device.type, (d.world,))
        blocks = set(getattr(lm.model, "_no_split_modules", None) or ())
        for module in lm.model.modules():
            name = type(module).__name__
            if name in blocks or (not blocks and name.endswith("DecoderLayer")):
                fully_shard(module, mesh=mesh)
        fully_shard(lm, mesh=mesh)
        for method in lm.FORWARD_METHODS:
            register_fsdp_forward_method(lm, method)
        return lm
    if not trainable:
        return lm
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(lm, device_ids=device_ids, find_unused_parameters=unused_params)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The ``ModelWithFusedHead`` inside a DDP wrapper (its no-grad methods need no DDP forward)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_output_layer(lm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of a frozen model's output layer, whole on every rank: the teacher's output layer,
    applied in the student's kernel call (under FSDP2 gathered once; the reference is frozen)."""
    W, b = unwrap(lm).output_layer()
    return _full(W), _full(b)


def clip_grad_norm(module: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients on their global norm (DDP: gradients are already averaged; FSDP2: the
    norm of the sharded gradients is reduced over ranks); returns that norm."""
    return float(_full(torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)))


def full_model_state(lm: torch.nn.Module, d: Dist) -> dict | None:
    """The whole state dict of the wrapped Hugging Face model, for ``save_pretrained`` on rank 0
    (None: the model's own, unsharded)."""
    if not (d.fsdp and d.world > 1):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}
