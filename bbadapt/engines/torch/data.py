"""The shared VOC/COCO records (:mod:`bbadapt.engines.common.datasets`) as torch datasets for an export.

An item is ``(image, target)``: a float CHW RGB tensor in the export's input range (``config.json``
``input.range``: ``01`` or ``255``; the model's transform normalizes and resizes it) and
``{"boxes": (N, 4) float32 x1 y1 x2 y2 in pixels, "labels": (N,) int64 class id + 1}``
(torchvision's labels: 0 is the background). Training flips horizontally with probability
``flip_p``, drawn from (seed, epoch, index), so any worker, any rank and a resumed run draw
the same flips.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from bbadapt.platform.errors import DatasetError


def read_image(path) -> np.ndarray:
    """RGB HWC uint8; a file that stops decoding mid-run is still one line."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except OSError as exc:
        raise DatasetError(f"image {path} cannot be decoded ({exc})") from None


class DetectionSet(torch.utils.data.Dataset):
    def __init__(self, records, input_range: str, *, flip_p: float = 0.0, seed: int = 0) -> None:
        self.records, self.scale = records, (1.0 / 255.0 if input_range == "01" else 1.0)
        self.flip_p, self.seed, self.epoch = flip_p, seed, 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, idx: int):
        pixels = read_image(self.records.image_path(idx))
        label = self.records.label(idx)
        boxes = label[:, :4].copy()
        if self.flip_p and np.random.default_rng([self.seed, self.epoch, idx]).random() < self.flip_p:
            pixels = pixels[:, ::-1]
            width = pixels.shape[1]
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]  # gluoncv's flip_bbox: x -> width - x
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).to(torch.float32) * self.scale
        target = {"boxes": torch.from_numpy(boxes).to(torch.float32),
                  "labels": torch.from_numpy(label[:, 4].astype(np.int64) + 1)}
        return image, target


def collate(batch):
    return tuple(zip(*batch, strict=True))
