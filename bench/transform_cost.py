"""What soft-capping and a logit scale cost over the plain call, per op: paired, interleaved timings.

    python bench/transform_cost.py                   # N=2048, H=1024, V=32000 fp32 (the CPU main shape)
    python bench/transform_cost.py --shape 256,64,2048 --rounds 1 --out /tmp/tc    # a quick try

The benchmark suite has a row per op and transform (logit_transforms.TRANSFORMS), each the median of two
rounds taken minutes apart; on a shared 2-core machine their ratios move by ±20 %, more than the cost
being measured. Here every round times the plain call and each transform back to back (one warm-up
round first, not counted), so load drift hits all of a round alike, and the cost is the median over
rounds of each round's ratio to its own plain call — in wall time and in this process's CPU time.
The calls are the suite's: fwd+bwd (the teacher top-K fwd only), a soft-cap of 30 and a logit scale of
0.125 on both sides where there is a teacher, the logit-scale calls on hidden states × 8 so that every
variant computes the same logits. Writes ``<out>/transform_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BETA = 0.5


def operations():
    """op → fn(inputs, transform keyword arguments) doing one call (fwd+bwd where there is a gradient)."""
    from conftest import zero_grads

    import ptd_kernels as ptd

    def student(x):
        zero_grads(x.hidden, x.weight)
        return x.hidden, x.weight

    def logprobs(x, kw, tkw):
        logp, entropy = ptd.linear_logprobs(*student(x), x.targets, with_entropy=True, **kw)
        (logp.sum() + entropy.sum()).backward()

    def jsd_loss(x, kw, tkw):
        ptd.linear_jsd_loss(*student(x), x.teacher_hidden, x.teacher_weight, beta=BETA, **kw, **tkw).backward()

    def topk_jsd_loss(x, kw, tkw):
        ptd.linear_topk_jsd_loss(*student(x), x.teacher_hidden, x.teacher_weight, 64, beta=BETA, **kw,
                                 **tkw).backward()

    def ptd_terms(x, kw, tkw):
        t = ptd.linear_ptd_terms(*student(x), x.targets, x.teacher_hidden, x.teacher_weight, 100, beta=BETA, **kw,
                                 **tkw)
        (t.logp.sum() + t.entropy.sum() + t.jsd.sum()).backward()

    def teacher_topk(x, kw, tkw):
        ptd.linear_topk(x.teacher_hidden, x.teacher_weight, 100, **kw)

    return {"logprobs+entropy (linear_logprobs)": logprobs, "jsd (linear_jsd_loss)": jsd_loss,
            "topk_jsd K=64 (linear_topk_jsd_loss)": topk_jsd_loss, "ptd head K=100 (linear_ptd_terms)": ptd_terms,
            "teacher top-K K=100 (linear_topk, fwd)": teacher_topk}


def measure(shape, rounds):
    from conftest import Inputs
    from logit_transforms import TRANSFORMS, transform_args, transform_inputs

    inp = Inputs(shape)
    names = list(TRANSFORMS)
    out = {}
    for op, fn in operations().items():
        wall = {name: [] for name in names}
        cpu = {name: [] for name in names}
        for r in range(rounds + 1):  # round 0: warm-up
            for name in names:
                x = transform_inputs(inp, name)
                kw, both = transform_args(name), transform_args(name, teacher=True)
                tkw = {k: v for k, v in both.items() if k.startswith("teacher_")}
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(x, kw, tkw)
                if r:
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
        out[op] = {name: dict(wall_s=wall[name], cpu_s=cpu[name], median_wall_s=statistics.median(wall[name]),
                              wall_ratio=statistics.median(a / b for a, b in zip(wall[name], wall["plain"])),
                              cpu_ratio=statistics.median(a / b for a, b in zip(cpu[name], cpu["plain"])))
                   for name in names}
        print(op, {k: round(v["wall_ratio"], 3) for k, v in out[op].items()}, flush=True)
    return out


def markdown(data) -> str:
    n, h, v = data["shape"]
    names = [x for x in data["transforms"] if x != "plain"]
    labels = {name: ", ".join(f"{k} {val:g}" for k, val in data["transforms"][name].items()) for name in names}
    lines = [f"Paired, interleaved: each of {data['rounds']} rounds times the plain call and each transform back to "
             f"back (after a warm-up round); cost = median over rounds of the per-round ratio to the plain call. "
             f"N={n}, H={h}, V={v}, fp32, {data['threads']} torch threads; {data['cpu']}; 1-min load average "
             f"{data['load_start']} → {data['load_end']}; {data['wall_s']} s in all.", "",
             "| op | plain | " + " | ".join(f"+ {labels[x]}: × plain, wall (CPU time)" for x in names) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for op, rows in data["ops"].items():
        cells = [f"{rows[x]['wall_ratio']:.3f}× ({rows[x]['cpu_ratio']:.3f}×)" for x in names]
        lines.append(f"| {op} | {rows['plain']['median_wall_s']:.2f} s | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048,1024,32000", help="N,H,V")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    opts = parser.parse_args(argv)
    import torch
    from logit_transforms import TRANSFORMS
    from report_data import cpu_model, write_results

    shape = tuple(int(x) for x in opts.shape.split(","))
    load_start, start = os.getloadavg()[0], time.time()
    ops = measure(shape, opts.rounds)
    data = dict(shape=shape, rounds=opts.rounds, transforms=TRANSFORMS, threads=torch.get_num_threads(),
                cpu=cpu_model(), torch=torch.__version__, load_start=round(load_start, 2),
                load_end=round(os.getloadavg()[0], 2), wall_s=round(time.time() - start, 1), ops=ops)
    md = markdown(data)
    print(md)
    write_results(opts.out, "transform_cost", data, md)


if __name__ == "__main__":
    main()
