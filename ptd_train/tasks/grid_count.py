"""The embedded task: count the red cells of a 4×4 grid of red/blue cells.

A 56×56 image (14-pixel cells) holds a 4×4 grid; with 7-pixel patches and 2×2 merging every
cell is exactly one image token. The question is ``how many red cells ?``, the completion
``total N`` (N in 0..16); reward 1 when the last number of the response is N.

Splits come from seeds: the held-out split (``split="test"``) and a development split used only
to decide where the warm start stops (``split="dev"``) are fixed lists; the training stream
skips every grid that is in either of them, so held-out accuracy is measured on unseen images.
"""

from __future__ import annotations

import numpy as np

from ..hints import HINT_WORDS, make_hints
from .base import Example

GRID = 4
CELL = 14
IMAGE_SIZE = GRID * CELL
ROWS = "abcd"
COLOURS = {"red": (134, 120, 122), "blue": (122, 120, 134)}
CELL_JITTER = 3.0  # std of each cell's colour, per channel
PIXEL_NOISE = 8.0  # std of per-pixel noise
QUESTION = "how many red cells ?"
MAX_COUNT = GRID * GRID

SPLIT_SEEDS = {"test": 1_000_003, "dev": 2_000_003}

TASK_WORDS = QUESTION.split() + ["answer", ":", "total", "hint"] + [str(i) for i in range(MAX_COUNT + 1)] + HINT_WORDS


def cell_name(r: int, c: int) -> str:
    return f"{ROWS[r]}{c + 1}"


def render(grid: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """``grid`` [4, 4] bool (True = red) → uint8 RGB image [56, 56, 3].

    Low-contrast colours (reddish/bluish grey, ±6 on R and B) with a little per-cell and
    per-pixel noise: reading the image takes the tiny model a few hundred warm-start steps to
    learn, while the spatial hint is usable earlier — the regime where a hinted teacher is near
    perfect and the hint-free student is not.
    """
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    for r in range(GRID):
        for c in range(GRID):
            colour = np.asarray(COLOURS["red" if grid[r, c] else "blue"], dtype=np.float32)
            if rng is not None:
                colour = colour + rng.normal(0.0, CELL_JITTER, size=3)
            img[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = colour
    if rng is not None:
        img += rng.normal(0.0, PIXEL_NOISE, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_example(grid: np.ndarray, rng: np.random.Generator) -> Example:
    count = int(grid.sum())
    red_cells = [cell_name(r, c) for r in range(GRID) for c in range(GRID) if grid[r, c]]
    return Example(
        image=render(grid, rng),
        question=QUESTION,
        answer=str(count),
        completion=f"total {count}",
        hints=make_hints(red_cells, rows=list(ROWS)),
    )


def _grid_key(grid: np.ndarray) -> int:
    return int(np.packbits(grid.reshape(-1).astype(np.uint8), bitorder="little").view(np.uint16)[0])


def _random_grid(rng: np.random.Generator) -> np.ndarray:
    return rng.random((GRID, GRID)) < 0.5


def fixed_split(split: str, size: int) -> list[Example]:
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    return [make_example(_random_grid(rng), rng) for _ in range(size)]


class GridCountTask:
    """Training stream and fixed splits of the embedded task."""

    words = TASK_WORDS
    image_size = IMAGE_SIZE

    def __init__(self, eval_size: int = 200, dev_size: int = 100):
        self.test = fixed_split("test", eval_size)
        self.dev = fixed_split("dev", dev_size)
        keys = set()
        for split, size in (("test", eval_size), ("dev", dev_size)):
            held = np.random.default_rng(SPLIT_SEEDS[split])
            for _ in range(size):
                g = _random_grid(held)
                keys.add(_grid_key(g))
                make_example(g, held)  # keep the rng stream aligned with fixed_split
        self._held_keys = keys

    def sample(self, rng: np.random.Generator, n: int) -> list[Example]:
        """``n`` training examples (never a held-out or dev grid)."""
        out = []
        while len(out) < n:
            g = _random_grid(rng)
            if _grid_key(g) in self._held_keys:
                continue
            out.append(make_example(g, rng))
        return out
