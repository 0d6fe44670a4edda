"""``bbadapt evaluate EXPORT``: detection mAP of a torchvision export or a torch checkpoint.

Images are read by the shared readers, fed as float RGB in the export's input range, resized by
the model's own transform to the short side (default: the one the checkpoint trained at, else
the export's), and the detections (in original-image pixels) scored by the shared scoring:
VOC07/VOC12 in numpy, COCO AP with pycocotools; ``auto`` is COCO AP on COCO data, VOC07 on VOC.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bbadapt.engines.common.datasets import open_dataset
from bbadapt.engines.common.metrics import Prediction, default_metric, score
from bbadapt.engines.torch import export as tv
from bbadapt.engines.torch.data import DetectionSet
from bbadapt.engines.torch.devices import pick_device


@torch.no_grad()
def predictions(model, data, input_range: str, device, *, amp_dtype=None,
                progress: Optional[Callable[[int, int], None]] = None) -> Iterator[Prediction]:
    """Run ``model`` (eval mode, restored afterwards) over ``data``; class ids index the detector's classes."""
    was_training = model.training
    model.eval()
    images = DetectionSet(data, input_range)
    try:
        for i in range(len(images)):
            x, _ = images[i]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model([x.to(device)])[0]
            height, width = x.shape[-2:]
            boxes = out["boxes"].float().cpu().numpy().astype(np.float32)
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)  # as gluoncv's BBoxClipToImage (to the image's size)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
            yield (i, out["labels"].cpu().numpy().astype(np.float32) - 1, out["scores"].float().cpu().numpy(), boxes)
            if progress:
                progress(i + 1, len(images))
    finally:
        model.train(was_training)


def evaluate(directory: str | os.PathLike, dataset: str, options, *, gpus: Optional[str] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """mAP of an export or torch checkpoint at ``directory`` on ``dataset`` (an :class:`EvaluateOptions`)."""
    directory = Path(directory)
    export = tv.read_export(directory)
    run = tv.checkpoint_of(export, directory)
    data = open_dataset(dataset, export.classes, options.split)
    device = pick_device(gpus)
    model, _ = tv.load_model(directory, device)
    transform = export.section("transform")
    short = options.short_side or (run.config.get("short_side") if run else None) or transform["min_size"]
    longest = options.max_size or (run.config.get("max_size") if run else None) or transform["max_size"]
    model.transform.min_size = (int(short),)
    model.transform.max_size = int(longest)
    metric = default_metric(options.metric, data)
    preds = predictions(model, data, export.section("input").get("range", "01"), device, progress=progress)
    result = score(data, preds, metric)
    result.update(directory=str(directory), dataset=str(dataset), short_side=int(short), max_size=int(longest),
                  epoch=run.epoch if run else None, engine="torch")
    return result
