"""Memory of the student side of TRL's served-teacher loss: stock (full log-softmax, then gather) vs ptd.

``python bench/served_teacher_memory.py [--rows N] [--vocab V] [--hidden H]`` measures, with
``MemTracker`` (CPU, float32), the peak bytes one forward + backward adds beyond its inputs, for the
student's log-probs at C candidate ids per row (C = 2: TRL's β > 0 support, the teacher's top-1 and
the actual token; C = 9: the async trainer's default top-8 plus the actual token) followed by TRL's
divergence on those atoms: ``server`` — ServerDistillationTrainer's way (``log_softmax`` of the
[N, V] logits, gathered); ``async`` — AsyncDistillationTrainer's ``_chunked_jsd_loss`` itself (256-row
float32 chunks under activation checkpointing); ``ptd`` —
``ptd_kernels.integrations.trl_served.candidate_logprobs`` (the chunked torch backend). Writes
``bench/results/served_teacher_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from ptd_kernels.integrations.trl_served import candidate_logprobs, served_divergence_terms

MiB = 1 << 20


def peak_extra_bytes(fn, *inputs) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*inputs)
    with tracker:
        fn()
    total = sum(stats.get("Total", 0) for stats in tracker.get_tracker_snapshot("peak").values())
    return total - sum(t.numel() * t.element_size() for t in inputs)


def case(rows: int, vocab: int, hidden: int, width: int, path: str) -> int:
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(rows, hidden, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).requires_grad_()
    ids = torch.stack([torch.randperm(vocab, generator=g)[:width] for _ in range(rows)])
    teacher = torch.log_softmax(torch.randn(rows, width, generator=g), -1) - 0.5
    valid = torch.ones(rows, width, dtype=torch.bool)

    beta = 0.5 if width == 2 else 0.0

    def run():
        if path == "async":
            from trl.experimental.async_distillation.async_distillation_trainer import _chunked_jsd_loss

            _chunked_jsd_loss(h, w, None, 1.0, None, ids, teacher, valid, beta, 1.0, True, None, 1, 256)[0].backward()
            return
        if path == "server":
            student = torch.log_softmax(h @ w.T, -1).gather(1, ids)
        else:
            student, _ = candidate_logprobs(h, w, ids)
        terms, _, _ = served_divergence_terms(student, teacher, valid, beta=beta, tail=True)
        terms.sum().backward()

    return peak_extra_bytes(run, h, w, ids, teacher, valid)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    os.environ["TRITON_INTERPRET"] = "0"  # ptd's auto backend on CPU: the chunked torch path
    torch.set_num_threads(2)
    results = []
    for width in (2, 9):
        for path in ("server", "async", "ptd"):
            extra = case(args.rows, args.vocab, args.hidden, width, path)
            results.append(dict(path=path, candidates=width, peak_extra_bytes=extra))
            print(f"{path:6s} C={width}: {extra / MiB:8.1f} MiB beyond the inputs", flush=True)
    shape = dict(rows=args.rows, vocab=args.vocab, hidden=args.hidden, dtype="float32")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "served_teacher_memory")
    with open(out + ".json", "w") as f:
        json.dump(dict(shape=shape, results=results), f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(f"Measured (MemTracker, CPU, float32): N={args.rows}, V={args.vocab}, H={args.hidden}; peak bytes "
                "one forward + backward adds beyond its inputs.\n\n| path | C | MiB |\n|---|---|---|\n")
        for r in results:
            f.write(f"| {r['path']} | {r['candidates']} | {r['peak_extra_bytes'] / MiB:.1f} |\n")


if __name__ == "__main__":
    main()
