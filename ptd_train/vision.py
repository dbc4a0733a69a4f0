"""Images as the Qwen-VL vision towers take them: flat patches plus a (t, h, w) grid per image.

The tower takes ``pixel_values`` as flat patches ``[Σ t·h·w, C·T·P·P]`` and ``image_grid_thw``
``[n_images, 3]``; every ``merge²`` patches become one LLM token, placed where the image
placeholder token stands in ``input_ids``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

# Qwen3-VL normalizes pixels with mean = std = 0.5 per channel.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class VisionGeometry:
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple = IMAGE_MEAN
    image_std: tuple = IMAGE_STD

    @classmethod
    def of(cls, model, path: str | None = None) -> VisionGeometry:
        vc = model.config.vision_config
        mean, std = IMAGE_MEAN, IMAGE_STD
        if path is not None and os.path.exists(os.path.join(path, "preprocessor_config.json")):
            with open(os.path.join(path, "preprocessor_config.json")) as f:
                pc = json.load(f)
            mean = tuple(pc.get("image_mean", mean))
            std = tuple(pc.get("image_std", std))
        return cls(vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size, mean, std)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def patchify(image: np.ndarray, geo: VisionGeometry) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One RGB image ``[H, W, 3]`` (uint8 or float in [0, 1]) → (patches, (t, h, w)).

    The Qwen2-VL/Qwen3-VL layout: patches ordered by merge window (row-major over windows,
    row-major inside a window), each flattened as ``[C, T, P, P]`` with the single frame
    repeated ``temporal_patch_size`` times. H and W must be multiples of patch·merge.
    Returns float32 patches ``[h·w, C·T·P·P]`` and the grid (1, h, w) in patches.
    """
    img = np.asarray(image, dtype=np.float32)
    if image.dtype == np.uint8:
        img = img / 255.0
    H, W, C = img.shape
    P, M, T = geo.patch_size, geo.merge_size, geo.temporal_patch_size
    if H % (P * M) or W % (P * M):
        raise ValueError(f"image: size {H}x{W} is not a multiple of patch·merge = {P * M}")
    img = (img - np.asarray(geo.image_mean, np.float32)) / np.asarray(geo.image_std, np.float32)
    gh, gw = H // P, W // P
    x = img.transpose(2, 0, 1).reshape(C, gh // M, M, P, gw // M, M, P)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/M, gw/M, M, M, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], T, P, P))
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, C * T * P * P)), (1, gh, gw)


def resize_for_model(image: np.ndarray, geo: VisionGeometry, max_pixels: int = 512 * 512) -> np.ndarray:
    """Resize an RGB uint8 image so both sides are multiples of patch·merge (at most max_pixels)."""
    from PIL import Image

    H, W = image.shape[:2]
    f = geo.factor
    scale = min(1.0, math.sqrt(max_pixels / (H * W)))
    h = max(f, round(H * scale / f) * f)
    w = max(f, round(W * scale / f) * f)
    if (h, w) == (H, W):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


@dataclass
class VisionBatch:
    """The images of a batch of sequences, one image per sequence.

    ``pixel_values``/``grids`` hold each distinct image once; ``rows[i]`` names the image of
    sequence i (None: image i for sequence i). The G rollouts of a prompt share one image, so
    the vision tower runs once per prompt in teacher-forced passes (see ``response_hidden``).
    """

    pixel_values: torch.Tensor  # [Σ patches of the distinct images, C·T·P·P]
    grids: torch.Tensor  # [n_images, 3]
    rows: list[int] | None = None

    @property
    def image_rows(self) -> list[int]:
        return list(range(len(self.grids))) if self.rows is None else self.rows

    @property
    def image_grid_thw(self) -> torch.Tensor:
        """Per-sequence grid [B, 3]."""
        return self.grids if self.rows is None else self.grids[self.rows]

    def select(self, rows: list[int]) -> VisionBatch:
        """The batch of sequences ``rows`` (sharing, not copying, the pixels)."""
        return VisionBatch(self.pixel_values, self.grids, [self.image_rows[r] for r in rows])

    def dense(self) -> VisionBatch:
        """Pixels repeated per sequence (what ``generate`` takes)."""
        if self.rows is None:
            return self
        starts = np.cumsum([0] + self.grids.prod(-1).tolist())
        parts = [self.pixel_values[starts[r] : starts[r + 1]] for r in self.rows]
        return VisionBatch(torch.cat(parts), self.grids[self.rows])

    def to(self, device) -> VisionBatch:
        return VisionBatch(self.pixel_values.to(device), self.grids.to(device), self.rows)


def stack_images(patches: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> VisionBatch:
    return VisionBatch(torch.cat(patches), torch.tensor(grids, dtype=torch.long))
