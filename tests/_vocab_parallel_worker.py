"""One rank of the vocabulary-parallel tests (tests/distributed/test_vocab_parallel.py): every fused function on
this rank's slice of the output layer, written to ``out_dir/rank{r}.pt`` for the test to compare
with the single-process results. The problems are built here and in the test from the same seeds."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

N, H, TH, V, K = 7, 12, 10, 37, 5
SPLITS = {2: (15, 22), 3: (10, 14, 13)}  # uneven slices; V = 37 is not divisible by 2 or 3
TAU = 0.8


def grid(*shape, seed, scale=1.0):
    """Values on a 1/8 grid: products and sums are exact in float32, so the logits do not depend on
    the GEMM's blocking and the top-k (ties included) is the same in every process."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, shape, generator=g).float() / 8 * scale


def problem(vocab=V):
    """hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, mask."""
    hidden, weight, bias = grid(N, H, seed=1), grid(vocab, H, seed=2, scale=0.125), grid(vocab, seed=3)
    teacher_hidden, teacher_weight = grid(N, TH, seed=4), grid(vocab, TH, seed=5, scale=0.125)
    teacher_bias = grid(vocab, seed=6)
    # Exactly tied ids at the top of every row (a·w + b = 3 > any other, |h·w + b| ≤ 1.5 + 1), a pair on
    # each side of a slice boundary (14 | 15 for world 2, 9 | 10 for world 3): the tie rule (smaller
    # id first) must hold across ranks.
    for a, b in ((14, 15), (9, 10)):
        for layer, layer_bias in ((weight, bias), (teacher_weight, teacher_bias)):
            layer[a] = layer[b] = 0.0
            layer_bias[a] = layer_bias[b] = 3.0
    targets = torch.tensor([0, 14, 15, -100, 36, 22, 9])
    mask = torch.tensor([True, True, True, True, False, True, True])
    return hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, mask


def cases(backend):
    """name → fn(layers, process_group) returning a tuple of outputs."""
    import ptd_kernels as ptd

    def pair(name, *args, **kw):
        return lambda x, pg: (getattr(ptd, name)(
            x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], *args, bias=x["bias"],
            teacher_bias=x["teacher_bias"], temperature=TAU, mask=x["mask"], process_group=pg, backend=backend,
            **kw),)

    out = {
        "logprobs": lambda x, pg: ptd.linear_logprobs(x["hidden"], x["weight"], x["targets"], bias=x["bias"],
                                                      temperature=TAU, with_entropy=True, process_group=pg,
                                                      backend=backend),
        "topk": lambda x, pg: tuple(ptd.linear_topk(x["hidden"], x["weight"], K, bias=x["bias"], temperature=TAU,
                                                    targets=x["targets"], process_group=pg, backend=backend)),
        "jsd_beta0": pair("linear_jsd", beta=0.0),
        "jsd_beta05_cap": pair("linear_jsd", beta=0.5, softcap=2.0, teacher_logit_scale=0.5),
        "jsd_beta1": pair("linear_jsd", beta=1.0),
        "topk_jsd_k_ge_v": pair("linear_topk_jsd", V + 3),
        "sparse_jsd": lambda x, pg: (ptd.linear_sparse_jsd(
            x["hidden"], x["weight"], torch.tensor([[14, 15, 0, 36]] * N),
            torch.log(torch.tensor([[0.3, 0.3, 0.1, 0.1]] * N)), bias=x["bias"], temperature=TAU, mask=x["mask"],
            process_group=pg, backend=backend),),
        "ptd_terms": lambda x, pg: tuple(ptd.linear_ptd_terms(
            x["hidden"], x["weight"], x["targets"], x["teacher_hidden"], x["teacher_weight"], K, bias=x["bias"],
            teacher_bias=x["teacher_bias"], temperature=TAU, mask=x["mask"],
            jsd_mask=torch.tensor([True, True, False, True, True, True, True]), softcap=3.0, process_group=pg,
            backend=backend)),
        "jsd_loss": pair("linear_jsd_loss", beta=0.3, weights=torch.linspace(0.5, 2.0, N)),
        "topk_jsd_loss": pair("linear_topk_jsd_loss", K),
        "module_ptd_terms": lambda x, pg: tuple(ptd.LinearPTDTerms(
            K, temperature=TAU, process_group=pg, backend=backend)(
            x["hidden"], x["weight"], x["targets"], x["teacher_hidden"], x["teacher_weight"], bias=x["bias"],
            teacher_bias=x["teacher_bias"], mask=x["mask"])),
    }
    policy = ptd.PolicyLoss(advantages=torch.linspace(-1.0, 1.0, N), weights=torch.linspace(0.5, 1.5, N),
                            old_logprobs=torch.full((N,), -3.0), ref_logprobs=torch.full((N,), -3.5), kl_coef=0.1,
                            kl_mask=torch.tensor([True, False, True, True, True, True, False]), ptd_coef=0.3,
                            entropy_coef=0.01)
    out["policy_loss"] = lambda x, pg: (ptd.linear_policy_loss(
        x["hidden"], x["weight"], x["targets"], x["teacher_hidden"], x["teacher_weight"], K, row_loss=policy,
        bias=x["bias"], teacher_bias=x["teacher_bias"], temperature=TAU, mask=x["mask"],
        jsd_mask=torch.tensor([True, True, False, True, True, True, True]), process_group=pg, backend=backend),)
    out["policy_loss_alone"] = lambda x, pg: (ptd.linear_policy_loss(
        x["hidden"], x["weight"], x["targets"], row_loss=lambda logp, entropy, jsd: -logp * (1 + entropy.detach()),
        bias=x["bias"], temperature=TAU, mask=x["mask"], process_group=pg, backend=backend),)
    out["logprobs_at"] = lambda x, pg: ptd.linear_logprobs_at(
        x["hidden"], x["weight"], torch.tensor([[14, 15, 0, 36, 14]] * N), bias=x["bias"], temperature=TAU,
        mask=x["mask"], with_entropy=True, process_group=pg, backend=backend)
    for support, tail, beta in (("union", True, 0.5), ("union", False, 0.0), ("teacher", True, 1.0),
                                ("teacher", False, 0.5), ("student", True, 0.0), ("student", False, 1.0)):
        out[f"topk_jsd_{support}_{tail}_{beta}"] = pair("linear_topk_jsd", K, support=support, tail=tail, beta=beta)
    return out


def run_case(fn, layers, pg):
    """Outputs and the gradients of a fixed cotangent w.r.t. the student's hidden, weight and bias."""
    x = {k: (v.clone().requires_grad_() if k in ("hidden", "weight", "bias") else v) for k, v in layers.items()}
    outs = fn(x, pg)
    floats = [o for o in outs if o is not None and o.is_floating_point() and o.requires_grad]
    total = sum((o * (torch.arange(o.numel()).reshape(o.shape) % 5 + 1)).sum() for o in floats)
    if floats:
        total.backward()
    grads = [None if x[k].grad is None else x[k].grad.detach() for k in ("hidden", "weight", "bias")]
    return [None if o is None else o.detach() for o in outs], grads


def main(rank: int, world: int, port: int, out_dir: str, backends: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a hang is a failure: a collective that waits over a minute raises instead of blocking the test
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        import ptd_kernels as ptd

        local = local_layers(world, rank, sizes=SPLITS[world])
        results = {}
        for backend in backends.split(","):
            for name, fn in cases(backend).items():
                results[(backend, name)] = run_case(fn, local, dist.group.WORLD)
        results["dtensor"] = dtensor_case(world)
        results["errors"] = error_cases(local, world)
        results["agreement"] = agreement_cases(local, world)
        # the group still works after all those errors
        results["after_errors"] = ptd.linear_logprobs(local["hidden"], local["weight"], local["targets"],
                                                      bias=local["bias"], process_group=dist.group.WORLD)
        results["bytes"] = communication(world)
        results["memory"] = memory(world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def dtensor_case(world):
    """weight and bias as DTensors sharded on dim 0 (torch.chunk's uneven split of V = 37): gradients come
    back as DTensors with the same placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ptd_kernels as ptd

    mesh = init_device_mesh("cpu", (world,))
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, mask = problem()
    w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
    tw, tb = distribute_tensor(teacher_weight, mesh, [Shard(0)]), distribute_tensor(teacher_bias, mesh, [Shard(0)])
    h = hidden.clone().requires_grad_()
    terms = ptd.linear_ptd_terms(h, w, targets, teacher_hidden, tw, K, bias=b, teacher_bias=tb, temperature=TAU,
                                 backend="torch")
    (terms.logp.sum() + terms.jsd.sum() + 0.5 * terms.entropy.sum()).backward()
    return dict(logp=terms.logp.detach(), jsd=terms.jsd.detach(), entropy=terms.entropy.detach(),
                hidden_grad=h.grad, weight_grad_placements=str(w.grad.placements),
                weight_grad=w.grad.full_tensor(), bias_grad=b.grad.full_tensor())


def error_cases(local, world):
    """Each message on every rank (no rank may hang): rows that differ by rank, an FSDP2-like DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ptd_kernels as ptd

    rank = dist.get_rank()
    messages = {}
    different = local["hidden"] + rank
    try:
        ptd.linear_logprobs(different, local["weight"], local["targets"], process_group=dist.group.WORLD)
    except ValueError as exc:
        messages["hidden"] = str(exc)
    try:
        ptd.linear_logprobs(local["hidden"], local["weight"], local["targets"] * 0 + rank,
                            process_group=dist.group.WORLD)
    except ValueError as exc:
        messages["targets"] = str(exc)
    mesh = init_device_mesh("cpu", (world,))
    full = torch.cat([local["weight"]] * world)  # any weight: FSDP2 shards a parameter on dim 0 too
    fsdp_like = distribute_tensor(full, mesh, [Shard(0)])
    try:  # FSDP2: every rank holds its own batch rows
        ptd.linear_logprobs(different, fsdp_like, local["targets"])
    except ValueError as exc:
        messages["fsdp"] = str(exc)
    return messages


def agreement_cases(x, world):
    """Calls in which the last rank passes one argument unlike the others (or fails its own checks): name →
    (exception type, message) on this rank, ("none", "") when the call returned."""
    import ptd_kernels as ptd

    rank, pg = dist.get_rank(), dist.group.WORLD
    odd = rank == world - 1
    h, w, b, th, tw, tb = (x[k] for k in ("hidden", "weight", "bias", "teacher_hidden", "teacher_weight",
                                          "teacher_bias"))
    targets, mask = x["targets"], x["mask"]
    ids = torch.tensor([[14, 15, 0, 36]] * N)
    logprobs = torch.log(torch.tensor([[0.3, 0.3, 0.1, 0.1]] * N))
    jsd_mask = torch.tensor([True, False, True, True, True, True, True])

    def pair(fn, *args, teacher_hidden=th, **kw):
        return getattr(ptd, fn)(h, w, teacher_hidden, tw, *args, bias=b, teacher_bias=tb, process_group=pg,
                                backend="torch", **kw)

    cases = {
        # numbers, strings and flags
        "beta": lambda: pair("linear_topk_jsd", K, beta=0.1 if odd else 0.5),
        "temperature": lambda: pair("linear_jsd", temperature=0.9 if odd else 0.8),
        "softcap": lambda: pair("linear_jsd", softcap=3.0 if odd else None),
        "logit_scale": lambda: ptd.linear_logprobs(h, w, targets, logit_scale=2.0 if odd else 1.0, process_group=pg),
        "teacher_logit_scale": lambda: pair("linear_topk_jsd_loss", K, teacher_logit_scale=0.5 if odd else 1.0),
        "teacher_softcap": lambda: pair("linear_jsd_loss", teacher_softcap=2.0 if odd else 4.0),
        "support": lambda: pair("linear_topk_jsd", K, support="teacher" if odd else "union"),
        "k": lambda: pair("linear_topk_jsd", K - 1 if odd else K),
        "k_topk": lambda: ptd.linear_topk(h, w, K + 1 if odd else K, process_group=pg),
        "tail": lambda: ptd.linear_ptd_terms(h, w, targets, th, tw, K, tail=not odd, process_group=pg),
        "ignore_index": lambda: ptd.linear_logprobs(h, w, targets, ignore_index=-1 if odd else -100, process_group=pg),
        "with_entropy": lambda: ptd.linear_logprobs(h, w, targets, with_entropy=odd, process_group=pg),
        "backend": lambda: ptd.linear_logprobs(h, w, targets, process_group=pg, backend="triton" if odd else "torch"),
        # tensors: presence, values, dtype
        "mask_presence": lambda: pair("linear_jsd", mask=None if odd else mask),
        "mask_values": lambda: pair("linear_jsd", mask=~mask if odd else mask),
        "jsd_mask": lambda: ptd.linear_ptd_terms(h, w, targets, th, tw, K, jsd_mask=None if odd else jsd_mask,
                                                 process_group=pg),
        "weights": lambda: pair("linear_jsd_loss", weights=torch.full((N,), 2.0 if odd else 1.0)),
        "targets": lambda: ptd.linear_ptd_terms(h, w, targets.roll(1) if odd else targets, th, tw, K,
                                                process_group=pg),
        "teacher_hidden": lambda: pair("linear_jsd", teacher_hidden=th * 2 if odd else th),
        "teacher_indices": lambda: ptd.linear_sparse_jsd(h, w, ids.flip(-1) if odd else ids, logprobs,
                                                         process_group=pg),
        "teacher_logprobs": lambda: ptd.linear_sparse_jsd(h, w, ids, logprobs - 0.1 * odd, process_group=pg),
        "hidden_dtype": lambda: ptd.linear_logprobs(h.double() if odd else h, w.double() if odd else w, targets,
                                                    process_group=pg),
        "function": lambda: pair("linear_topk_jsd", K) if odd else pair("linear_jsd"),
        # one rank's own checks fail: every rank hears of it
        "local_dtype": lambda: ptd.linear_logprobs(h.double() if odd else h, w, targets, process_group=pg),
        "local_temperature": lambda: pair("linear_jsd", temperature=0.0 if odd else 1.0),
        "local_bias": lambda: ptd.linear_logprobs(h, w, targets, bias=b[:-1] if odd else b, process_group=pg),
        # module wrappers
        "module_k": lambda: ptd.LinearTopKJSDLoss(K + 1 if odd else K, process_group=pg)(h, w, th, tw),
        "module_beta": lambda: ptd.LinearPTDTerms(K, beta=1.0 if odd else 0.5, process_group=pg)(h, w, targets, th, tw),
        # agreed, and wrong on every rank alike: the same error everywhere, after the exchange
        "targets_out_of_range": lambda: ptd.linear_logprobs(h, w, torch.full((N,), V), process_group=pg),
    }
    out = {}
    for name, call in cases.items():
        try:
            call()
            out[name] = ("none", "")
        except Exception as exc:  # noqa: BLE001 - the test reads the type and message
            out[name] = (type(exc).__name__, str(exc))
    return out


def local_layers(world, rank, vocab=V, sizes=None):
    """This rank's view of ``problem(vocab)``: its slice of both output layers, everything else whole."""
    sizes = sizes or [vocab // world + (r < vocab % world) for r in range(world)]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, mask = problem(vocab)
    return dict(hidden=hidden, weight=weight[lo:hi], bias=bias[lo:hi], teacher_hidden=teacher_hidden,
                teacher_weight=teacher_weight[lo:hi], teacher_bias=teacher_bias[lo:hi], targets=targets, mask=mask)


def communication(world):
    """Bytes each rank sends through collectives per call (forward and backward), at V = 37 and V = 74."""
    sent = []
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def all_reduce(tensor, *a, **kw):
        sent.append(tensor.numel() * tensor.element_size())
        return real_reduce(tensor, *a, **kw)

    def all_gather(out, tensor, *a, **kw):
        sent.append(tensor.numel() * tensor.element_size())
        return real_gather(out, tensor, *a, **kw)

    result = {}
    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    try:
        for vocab in (V, 2 * V):
            local = local_layers(world, dist.get_rank(), vocab)
            for name, fn in cases("torch").items():
                if name in ("logprobs", "jsd_beta0", "topk_jsd_union_True_0.5", "topk", "sparse_jsd"):
                    sent.clear()
                    run_case(fn, local, dist.group.WORLD)
                    result[(name, vocab)] = sum(sent)
    finally:
        dist.all_reduce, dist.all_gather = real_reduce, real_gather
    return result


def memory(world):
    """Peak live bytes beyond the inputs (MemTracker) of a Top-K JSD loss, forward and backward, on this
    rank's slice of V = 2048·world, and of the same call on one process with that slice as its whole
    output layer (the single-process bound for V/world)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    import ptd_kernels as ptd

    n, h, local_vocab, k = 256, 16, 2048, 8
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(local_vocab, h, generator=g).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(n, h, generator=g), torch.randn(local_vocab, h, generator=g)

    def peak(process_group):
        tracker = MemTracker()
        tracker.track_external(hidden, weight, teacher_hidden, teacher_weight)
        with tracker:
            ptd.linear_topk_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, k,
                                     process_group=process_group, backend="torch").backward()
        snapshot = tracker.get_tracker_snapshot("peak")
        inputs = sum(t.numel() * t.element_size() for t in (hidden, weight, teacher_hidden, teacher_weight))
        return sum(stats.get("Total", 0) for stats in snapshot.values()) - inputs

    return dict(vocab_parallel=peak(dist.group.WORLD), one_process=peak(None), rows=n, k=k)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
