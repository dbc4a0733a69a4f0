"""A vocabulary-parallel output layer: each rank holds a contiguous slice of the vocabulary rows,
and every output equals the one-process result on every rank.

    torchrun --nproc_per_node 2 examples/tensor_parallel.py
"""

import torch
import torch.distributed as dist

import ptd_kernels as ptd

dist.init_process_group("gloo")  # "nccl" on GPUs
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same rows on every rank
N, H, V = 8, 32, 1000
hidden = torch.randn(N, H, requires_grad=True)
teacher_hidden, targets = torch.randn(N, H), torch.randint(0, V, (N,))
full_weight, full_teacher_weight = torch.randn(V, H) * 0.1, torch.randn(V, H) * 0.1  # for the check below
bounds = [V * r // world for r in range(world + 1)]  # contiguous slices in rank order
weight = full_weight[bounds[rank]:bounds[rank + 1]].clone().requires_grad_()  # what a TP model holds
teacher_weight = full_teacher_weight[bounds[rank]:bounds[rank + 1]]

terms = ptd.linear_ptd_terms(hidden, weight, targets, teacher_hidden, teacher_weight, k=64,
                             process_group=dist.group.WORLD)
(-terms.logp.mean() + 0.05 * terms.jsd.mean()).backward()  # hidden.grad in full, weight.grad: this slice

one = ptd.linear_ptd_terms(hidden.detach(), full_weight, targets, teacher_hidden, full_teacher_weight, k=64)
assert torch.allclose(terms.jsd, one.jsd, atol=1e-6) and torch.allclose(terms.logp, one.logp, atol=1e-6)
print(f"rank {rank}/{world}: vocabulary rows {bounds[rank]}..{bounds[rank + 1] - 1}, weight.grad "
      f"{tuple(weight.grad.shape)}, hidden.grad {tuple(hidden.grad.shape)}")
dist.barrier()
if rank == 0:
    print("vocabulary-parallel Top-K JSD equals the one-process result:", [round(x, 5) for x in terms.jsd[:3].tolist()])
dist.barrier()
dist.destroy_process_group()
