"""ptd_train — a small, readable GRPO / PTD-PO trainer on top of ``ptd_kernels`` (SPEC §1, §3).

Entry point: ``python -m ptd_train.run`` (see ``ptd_train/run.py``).
"""
