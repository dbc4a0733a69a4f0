"""ptd_train — a small, readable GRPO / PTD-PO trainer on top of ``ptd_kernels`` (docs/method.md §1, §3).

Entry points: ``python -m ptd_train.run`` (see ``ptd_train/run.py``), data parallel with
``torchrun --nproc_per_node N -m ptd_train.run [--fsdp true]``, and ``python -m ptd_train.compare``.
"""
