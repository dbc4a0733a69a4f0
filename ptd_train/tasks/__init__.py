"""Tasks with verifiable rewards: the embedded grid-count task and JSONL datasets."""

from .base import Example, load_jsonl, reward
from .grid_count import GridCountTask

__all__ = ["Example", "GridCountTask", "load_jsonl", "reward"]
