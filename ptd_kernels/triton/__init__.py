"""Triton kernels (one kernel per file, launcher beside it). See the launchers' docstrings."""
