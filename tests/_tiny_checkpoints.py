"""The tests' tiny checkpoints are the public ones (``ptd_train.tiny_checkpoint``), one folder per
family under the test's temporary folder."""

from ptd_train import tiny_checkpoint
from ptd_train.tiny_checkpoint import make_dataset

__all__ = ["make_checkpoint", "make_dataset"]


def make_checkpoint(root, family: str) -> str:
    """A tiny ``family`` checkpoint saved with its processor (text: its tokenizer) in ``root/family``."""
    return tiny_checkpoint.make_checkpoint(root / family, family)
