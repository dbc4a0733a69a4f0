"""Run by tests/integrations/test_integrations_hf.py under torch.distributed.run: the fused head under FSDP2
(2 CPU processes, gloo), with the output layer inside the root unit and in a unit of its own.

argv: tiny model directory, output directory. Each rank checks its log-probs / entropy and the
gradients of its sharded parameters against an unsharded copy (gradients averaged over the ranks
by hand) and writes rank{r}.json with the largest differences.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from ptd_kernels.integrations import hf


def _loss(out):
    return out.log_probs.sum() + 0.5 * out.entropy.sum()


def main(path: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # each rank its own batch
    ids = torch.randint(3, 30, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    result = {}
    for head_unit in (False, True):
        reference = hf.add_fused_head(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        want = reference(input_ids=ids, labels=labels, fused_head=True)
        _loss(want).backward()
        for p in reference.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        model = hf.add_fused_head(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        for layer in model.model.layers:
            fully_shard(layer)
        if head_unit:
            fully_shard(model.lm_head)
        fully_shard(model)
        got = model(input_ids=ids, labels=labels, fused_head=True)
        _loss(got).backward()
        value_gap = max((got.log_probs - want.log_probs).abs().max().item(),
                        (got.entropy - want.entropy).abs().max().item())
        grad_gap = max((p.grad.full_tensor() - q.grad).abs().max().item()
                       for p, q in zip(model.parameters(), reference.parameters()))
        grad_scale = max(q.grad.abs().max().item() for q in reference.parameters())
        result["head_unit" if head_unit else "root_unit"] = dict(value_gap=value_gap, grad_gap=grad_gap,
                                                                 grad_scale=grad_scale)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
