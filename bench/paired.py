"""Paired timings of the public ops in two source trees of ptd_kernels: is the new tree slower?

    python bench/paired.py --old /tmp/ptd-old --new .                 # N=2048, H=1024, V=32000 fp32
    python bench/paired.py --old /tmp/ptd-old --new . --shape 256,64,2048 --rounds 2   # a quick try

Each tree runs in its own worker process (``PYTHONPATH`` = the tree), on inputs made alike from one seed
(``bench/conftest.Inputs``). One process computes at a time: every round runs each op once in the old
tree, then once in the new one (their order alternating by round), after a warm-up round that is not
counted, so that load drift on a shared machine hits both sides of a pair alike. The result per op is the
median over rounds of new/old, in wall time and in the worker's CPU time, beside each side's median time.
Writes ``<out>/paired.{json,md}`` when ``--out`` is given. Run it alone on the machine (e.g. under
``flock /tmp/ptd-cpu.lock``) and report the load average beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

OPS = ("linear_logprobs+entropy", "linear_ptd_terms K=100", "linear_topk_jsd_loss K=64", "linear_jsd_loss",
       "PTD-PO loss K=100", "GRPO loss")
SEQUENCES = 16  # the rows as [SEQUENCES, N / SEQUENCES] rollouts for the trainer's losses
BETA = 0.5


def _operations():
    """op → fn(inputs) running one call forward and backward, in whichever ptd_kernels is importable."""
    import ptd_kernels as ptd

    def zero(x):
        x.hidden.grad = x.weight.grad = None
        return x.hidden, x.weight

    def logprobs(x):
        logp, entropy = ptd.linear_logprobs(*zero(x), x.targets, with_entropy=True)
        (logp.sum() + entropy.sum()).backward()

    def ptd_terms(x):
        t = ptd.linear_ptd_terms(*zero(x), x.targets, x.teacher_hidden, x.teacher_weight, 100, beta=BETA)
        (t.logp.sum() + t.entropy.sum() + t.jsd.sum()).backward()

    def topk_jsd_loss(x):
        ptd.linear_topk_jsd_loss(*zero(x), x.teacher_hidden, x.teacher_weight, 64, beta=BETA).backward()

    def jsd_loss(x):
        ptd.linear_jsd_loss(*zero(x), x.teacher_hidden, x.teacher_weight, beta=BETA).backward()

    def trainer_loss(x, with_teacher):
        """The trainer's PTD-PO (or GRPO) loss: ``linear_policy_loss`` in one sweep where the tree has it, else
        the per-row terms (``linear_ptd_terms`` / ``linear_logprobs``) and ``ptd_train.grpo.ptd_po_loss``."""
        import torch

        from ptd_train import grpo

        hidden, weight = zero(x)
        rows = SEQUENCES
        length = hidden.shape[0] // rows
        g = torch.Generator().manual_seed(0)
        advantages = torch.randn(rows, generator=g)
        mask = torch.ones(rows, length, dtype=torch.bool)
        logp_ref = -3.0 + 0.1 * torch.randn(rows, length, generator=g)
        in_f = (torch.arange(rows) % 2 == 0) & with_teacher
        options = dict(kl_coef=0.01, ptd_coef=0.05 if with_teacher else 0.0)
        teacher = (x.teacher_hidden, x.teacher_weight, 100) if with_teacher else ()
        jsd_mask = dict(jsd_mask=in_f[:, None].expand(rows, length).reshape(-1), beta=BETA) if with_teacher else {}
        if hasattr(ptd, "linear_policy_loss"):
            loss_fn = grpo.policy_loss(advantages, mask, logp_ref, ~in_f, in_ptd_set=in_f, **options)
            ptd.linear_policy_loss(hidden, weight, x.targets, *teacher, row_loss=loss_fn, **jsd_mask).backward()
            return
        if with_teacher:
            terms = ptd.linear_ptd_terms(hidden, weight, x.targets, *teacher, **jsd_mask)
            logp, jsd = terms.logp, terms.jsd
        else:
            logp, _ = ptd.linear_logprobs(hidden, weight, x.targets, with_entropy=True)
            jsd = torch.zeros_like(logp)
        logp = logp.view(rows, length)
        grpo.ptd_po_loss(logp, logp.detach(), logp_ref, advantages, mask, jsd.view(rows, length), in_f, ~in_f,
                         **options).loss.backward()

    return dict(zip(OPS, (logprobs, ptd_terms, topk_jsd_loss, jsd_loss, lambda x: trainer_loss(x, True),
                          lambda x: trainer_loss(x, False))))


def worker(shape, threads: int) -> None:
    """Read op names from stdin, run each once, answer {"wall": s, "cpu": s} per line."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, HERE)
    from conftest import Inputs

    import ptd_kernels

    x = Inputs(shape)
    ops = _operations()
    print(json.dumps({"ready": os.path.dirname(ptd_kernels.__file__)}), flush=True)
    for line in sys.stdin:
        op = line.strip()
        if not op:
            break
        wall, cpu = time.perf_counter(), time.process_time()
        ops[op](x)
        print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}), flush=True)


class _Side:
    def __init__(self, name, tree, shape, threads):
        env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
        self.name = name
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", ",".join(map(str, shape)),
                                      "--threads", str(threads)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.package = json.loads(self.proc.stdout.readline())["ready"]
        if not self.package.startswith(os.path.abspath(tree) + os.sep):
            self.proc.kill()
            raise SystemExit(f"the {name} worker imported ptd_kernels from {self.package}, not from {tree}")

    def run(self, op) -> dict:
        self.proc.stdin.write(op + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", help="the tree whose ptd_kernels is the baseline")
    parser.add_argument("--new")
    parser.add_argument("--shape", default="2048,1024,32000", help="N,H,V")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default); "
                        "on a machine others load, 1 makes the CPU-time ratio the steadier figure")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(tuple(int(v) for v in args.worker.split(",")), args.threads)
        return 0
    if not (args.old and args.new):
        parser.error("--old and --new are required")
    shape = tuple(int(v) for v in args.shape.split(","))
    ops = args.ops.split(",")
    old, new = _Side("old", args.old, shape, args.threads), _Side("new", args.new, shape, args.threads)
    print(f"old: {old.package}\nnew: {new.package}\nshape N,H,V = {shape}, fp32, fwd+bwd; load before: "
          f"{os.getloadavg()}", flush=True)
    times = {op: {"old": [], "new": []} for op in ops}
    try:
        for round_ in range(args.rounds + 1):
            for op in ops:
                sides = (old, new) if round_ % 2 else (new, old)
                got = {side.name: side.run(op) for side in sides}
                if round_:  # round 0 warms up
                    for name in ("old", "new"):
                        times[op][name].append(got[name])
            if round_:
                last = {op: times[op]["new"][-1]["wall"] / times[op]["old"][-1]["wall"] for op in ops}
                print(f"round {round_}: " + ", ".join(f"{op} {ratio:.3f}" for op, ratio in last.items()), flush=True)
    finally:
        old.close()
        new.close()
    rows = []
    for op in ops:
        pairs = list(zip(times[op]["old"], times[op]["new"]))
        rows.append(dict(
            op=op, old_wall=statistics.median(o["wall"] for o, _ in pairs),
            new_wall=statistics.median(n["wall"] for _, n in pairs),
            ratio_wall=statistics.median(n["wall"] / o["wall"] for o, n in pairs),
            ratio_cpu=statistics.median(n["cpu"] / o["cpu"] for o, n in pairs),
            ratios=[n["wall"] / o["wall"] for o, n in pairs]))
    load = os.getloadavg()
    lines = [f"Paired timings (measured), N,H,V = {shape} fp32, fwd+bwd, {args.rounds} rounds after a warm-up, "
             f"torch threads {args.threads or 'default'}, load average after {load[0]:.2f} {load[1]:.2f} "
             f"{load[2]:.2f}", "",
             f"old: `{old.package}`  ", f"new: `{new.package}`", "",
             "| op | old (median s) | new (median s) | new/old wall (median of rounds) | new/old CPU |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['op']} | {r['old_wall']:.3f} | {r['new_wall']:.3f} | {r['ratio_wall']:.3f} | "
              f"{r['ratio_cpu']:.3f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        sys.path.insert(0, HERE)
        from report_data import write_results

        write_results(args.out, "paired", dict(shape=shape, rounds=args.rounds, load=load, rows=rows,
                                                old=old.package, new=new.package), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
