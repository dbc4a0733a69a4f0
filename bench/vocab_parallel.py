"""Vocabulary-parallel output layers on CPU: time and communicated bytes per row vs one process.

    python bench/vocab_parallel.py                      # N=1024, H=1024, V=32000, fp32
    python bench/vocab_parallel.py --shape 256,64,2048 --rounds 1 --out /tmp/vp   # a quick try

Runs the main fused functions (fwd+bwd; ``linear_topk`` fwd only) on one shape in four set-ups, one
after the other: one process with one thread, one process with two threads (the whole 2-core
machine), and 2 and 3 gloo processes with one thread each, every rank holding an even contiguous
slice of the vocabulary (``process_group=``). Per set-up and function: the time of a call (each
round's slowest rank, median over the rounds; a barrier starts every round), the bytes each rank
contributes to collectives per row, forward and backward apart (counted by wrapping
``torch.distributed.all_reduce`` / ``all_gather``, the only collectives ptd calls), the number of
collectives per call, and each rank's peak live bytes beyond its inputs (MemTracker, on the untimed
warm-up call). Writes ``<out>/vocab_parallel.json`` and ``.md``.

What this measures: the algorithm — how much work each rank keeps, what the combining costs, how many
bytes cross — with gloo between processes that share one 2-core CPU. It is not a measurement of NCCL
or of GPUs: there, the collectives are far faster and the ranks do not share cores. Correctness (every
output equal to the one-process result) is tests/distributed/test_vocab_parallel.py's job.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from report_data import cpu_model, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
K_JSD, K_HEAD = 64, 100
BETA = 0.5
# (label, processes, torch threads per process)
SETUPS = [("1 process × 1 thread", 1, 1), ("1 process × 2 threads", 1, 2), ("2 processes × 1 thread", 2, 1),
          ("3 processes × 1 thread", 3, 1)]
BASE = SETUPS[0][0]


def functions():
    """name → fn(problem, process_group) returning the scalar to differentiate (None: forward only)."""
    import ptd_kernels as ptd

    def pair(x):
        return x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"]

    def logprobs(x, pg):
        logp, entropy = ptd.linear_logprobs(x["hidden"], x["weight"], x["targets"], with_entropy=True,
                                            process_group=pg)
        return logp.sum() + entropy.sum()

    def teacher_topk(x, pg):
        ptd.linear_topk(x["teacher_hidden"], x["teacher_weight"], K_HEAD, process_group=pg)
        return None  # no gradient

    def ptd_terms(x, pg):
        t = ptd.linear_ptd_terms(x["hidden"], x["weight"], x["targets"], x["teacher_hidden"], x["teacher_weight"],
                                 K_HEAD, beta=BETA, process_group=pg)
        return t.logp.sum() + t.entropy.sum() + t.jsd.sum()

    return {
        "linear_logprobs (with entropy)": logprobs,
        f"linear_topk K={K_HEAD} (fwd only)": teacher_topk,
        "linear_jsd": lambda x, pg: ptd.linear_jsd(*pair(x), beta=BETA, process_group=pg).mean(),
        "linear_jsd_loss": lambda x, pg: ptd.linear_jsd_loss(*pair(x), beta=BETA, process_group=pg),
        f"linear_topk_jsd K={K_JSD}": lambda x, pg: ptd.linear_topk_jsd(*pair(x), K_JSD, beta=BETA,
                                                                        process_group=pg).mean(),
        f"linear_ptd_terms K={K_HEAD}": ptd_terms,
    }


# ----------------------------------------------------------------------------- one rank


def problem(shape, rank, world):
    """This rank's view: the same rows everywhere (one seed), an even contiguous slice of both layers."""
    import torch

    n, h, v = shape
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen) * 0.5
    weight = torch.randn(v, h, generator=gen) * h**-0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    teacher_hidden = hidden + torch.randn(n, h, generator=gen) * 0.25
    teacher_weight = weight + torch.randn(v, h, generator=gen) * 0.5 * h**-0.5
    lo, hi = v * rank // world, v * (rank + 1) // world
    return dict(hidden=hidden.requires_grad_(), weight=weight[lo:hi].clone().requires_grad_(), targets=targets,
                teacher_hidden=teacher_hidden, teacher_weight=teacher_weight[lo:hi].clone())


class CollectiveCounter:
    """Wraps torch.distributed.all_reduce / all_gather: bytes this rank contributes, and the calls."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.bytes, self.calls = dist, 0, 0
        self.real = dist.all_reduce, dist.all_gather

    def __enter__(self):
        real_reduce, real_gather = self.real

        def all_reduce(tensor, *a, **kw):
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return real_reduce(tensor, *a, **kw)

        def all_gather(out, tensor, *a, **kw):
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return real_gather(out, tensor, *a, **kw)

        self.dist.all_reduce, self.dist.all_gather = all_reduce, all_gather
        return self

    def take(self):
        out = (self.bytes, self.calls)
        self.bytes = self.calls = 0
        return out

    def __exit__(self, *exc):
        self.dist.all_reduce, self.dist.all_gather = self.real


def peak_bytes(fn, inputs):
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*inputs)
    with tracker:
        fn()
    total = sum(stats.get("Total", 0) for stats in tracker.get_tracker_snapshot("peak").values())
    return max(0, total - sum(t.numel() * t.element_size() for t in inputs))


def worker(rank, world, port, threads, shape, rounds, out_path):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    pg = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        pg = dist.group.WORLD

    def barrier():
        if pg is not None:
            dist.barrier()

    x = problem(shape, rank, world)
    inputs = [t for t in x.values() if t.is_floating_point()]
    result = {}
    try:
        for name, fn in functions().items():
            def call(fn=fn):
                x["hidden"].grad = x["weight"].grad = None
                loss = fn(x, pg)
                if loss is not None:
                    loss.backward()
                return loss

            barrier()
            memory = peak_bytes(call, inputs)  # the untimed warm-up call
            times, fwd, bwd = [], (0, 0), (0, 0)
            for _ in range(rounds):
                barrier()
                start = time.perf_counter()
                if pg is None:
                    call()
                else:
                    with CollectiveCounter() as counter:
                        x["hidden"].grad = x["weight"].grad = None
                        loss = fn(x, pg)
                        fwd = counter.take()
                        if loss is not None:
                            loss.backward()
                        bwd = counter.take()
                times.append(time.perf_counter() - start)
            result[name] = dict(times=times, peak_bytes=memory, fwd_bytes=fwd[0], fwd_calls=fwd[1],
                                bwd_bytes=bwd[0], bwd_calls=bwd[1])
        with open(out_path, "w") as f:
            json.dump(result, f)
    finally:
        if pg is not None:
            barrier()
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- launcher


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setup(world, threads, shape, rounds, tmp):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(threads)}
    outs = [os.path.join(tmp, f"w{world}t{threads}r{r}.json") for r in range(world)]
    shape_arg = ",".join(map(str, shape))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(r), str(world), str(port),
                               str(threads), shape_arg, str(rounds), outs[r]], env=env) for r in range(world)]
    codes = [p.wait(timeout=3600) for p in procs]
    if any(codes):
        raise SystemExit(f"world {world}: a rank failed (exit codes {codes})")
    ranks = []
    for path in outs:
        with open(path) as f:
            ranks.append(json.load(f))
    return ranks


def summarize(ranks, n):
    """Per function: the median over rounds of the slowest rank's time; rank 0's bytes and calls (every rank
    contributes the same amounts); the largest per-rank peak."""
    out = {}
    for name in ranks[0]:
        per_round = [max(r[name]["times"][i] for r in ranks) for i in range(len(ranks[0][name]["times"]))]
        r0 = ranks[0][name]
        out[name] = dict(time_s=statistics.median(per_round), rounds=per_round,
                         fwd_bytes_per_row=r0["fwd_bytes"] / n, bwd_bytes_per_row=r0["bwd_bytes"] / n,
                         collectives=r0["fwd_calls"] + r0["bwd_calls"],
                         peak_bytes=max(r[name]["peak_bytes"] for r in ranks))
    return out


def _fmt_time(s):
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.0f} ms"


def _fmt_bytes(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def markdown(data):
    n, h, v = data["shape"]
    setups = [s for s, *_ in SETUPS if s in data["setups"]]
    base = BASE
    lines = [
        "# Vocabulary-parallel output layers on CPU (gloo)",
        "",
        f"- shape N={n}, H={h}, V={v}, float32, fwd+bwd (`linear_topk` fwd only); β={BETA}; even vocabulary "
        f"slices; {data['rounds']} timed rounds after an untimed warm-up (MemTracker) call; a round's time is "
        "its slowest rank's.",
        f"- {data['cpu']} ({data['cpus']} CPUs); torch {data['torch']}; 1-min load average "
        f"{data['load_start'][0]} at the start, {data['load_end'][0]} at the end; {data['wall_s']} s in all.",
        "- **What this measures:** the algorithm (the work each rank keeps, what combining the slices costs, "
        "the bytes that cross), with gloo between processes that share one 2-core CPU. It says nothing about "
        "NCCL or GPUs, where collectives are far faster and ranks do not share cores. 3 processes on 2 cores "
        "are oversubscribed.",
        "- bytes: what each rank contributes to all-reduce / all-gather per row (all-gather receivers get "
        "world × that); collectives: calls per fwd+bwd; peak: live bytes beyond the inputs on the largest rank, "
        f"in the order {' / '.join(setups)}. Times in parentheses: × the time of {base}.",
        "",
        "| function | " + " | ".join(setups) + " | bytes/row fwd + bwd (2 / 3 processes) | collectives per call "
        "(2 / 3) | peak per rank |",
        "| --- | " + " | ".join("---:" for _ in setups) + " | ---: | ---: | ---: |",
    ]
    for name in data["setups"][setups[0]]:
        ref = data["setups"].get(base, {}).get(name)
        cells = []
        for s in setups:
            r = data["setups"][s][name]
            rel = f" ({r['time_s'] / ref['time_s']:.2f}×)" if ref and s != base else ""
            cells.append(f"{_fmt_time(r['time_s'])}{rel}")
        vp = [data["setups"][s][name] for s, world, _ in SETUPS if world > 1 and s in data["setups"]]
        traffic = " / ".join(f"{r['fwd_bytes_per_row']:.0f} + {r['bwd_bytes_per_row']:.0f} B" for r in vp)
        calls = " / ".join(str(r["collectives"]) for r in vp)
        peaks = " / ".join(_fmt_bytes(data["setups"][s][name]["peak_bytes"]) for s in setups)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {traffic} | {calls} | {peaks} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1024,1024,32000", help="N,H,V")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per function and set-up")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder of vocab_parallel.{json,md}")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rank, world, port, threads, shape, rounds, out = args.worker
        worker(int(rank), int(world), int(port), int(threads), tuple(map(int, shape.split(","))), int(rounds), out)
        return
    import torch

    shape = tuple(int(x) for x in args.shape.split(","))
    start, load_start = time.time(), os.getloadavg()
    data = dict(shape=shape, rounds=args.rounds, cpu=cpu_model(), cpus=os.cpu_count(), torch=torch.__version__,
                load_start=[round(x, 2) for x in load_start], setups={})
    with tempfile.TemporaryDirectory() as tmp:
        for label, world, threads in SETUPS:
            print(f"[{time.time() - start:.0f}s] {label} …", flush=True)
            data["setups"][label] = summarize(run_setup(world, threads, shape, args.rounds, tmp), shape[0])
    data["load_end"] = [round(x, 2) for x in os.getloadavg()]
    data["wall_s"] = round(time.time() - start, 1)
    md = markdown(data)
    write_results(args.out, "vocab_parallel", data, md)
    print(md)


if __name__ == "__main__":
    main()
