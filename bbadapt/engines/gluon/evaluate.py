"""Detection mAP of a bundle or checkpoint on a dataset: VOC07 (11-point), VOC12 (area), COCO.

Predictions and scoring are separate steps on purpose: :func:`predictions` runs the
detector over a dataset, :func:`score` turns any stream of per-image detections into mAP
through gluoncv's own metrics (``VOC07MApMetric``, ``VOCMApMetric``) or pycocotools. The
tests feed ground truth through :func:`score` to pin the metric path down independently of
a (randomly initialised) detector.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Optional

import numpy as np

from bbadapt.core.zoo import import_gluoncv
from bbadapt.engines.gluon.options import (  # noqa: F401 - importable from here too
    METRICS,
    EvaluateOptions,
    check_metric,
    resolve_metric,
)
from bbadapt.platform.errors import OptionError

import_gluoncv()  # gluoncv is imported lazily below; this makes it work beside torch >= 2

Prediction = tuple[int, np.ndarray, np.ndarray, np.ndarray]  # (index, class ids (N,), scores (N,), boxes (N,4))


def predictions(net, data, ctx, spec, short: int, max_size: int, *,
                progress: Optional[Callable[[int, int], None]] = None) -> Iterator[Prediction]:
    """Run ``net`` (inference mode) over ``data``; boxes come back in original-image pixels.

    Images go through gluoncv's ``FasterRCNNDefaultValTransform`` set up for the detector's
    input ``spec``; boxes are clipped to the resized image, then scaled back, as gluoncv's
    own validation does.
    """
    from gluoncv.nn.bbox import BBoxClipToImage

    from bbadapt.engines.gluon.datasets import spec_transforms

    transform = spec_transforms(spec, short, max_size, train=False)
    clip = BBoxClipToImage()
    for i in range(len(data)):
        img, label = data[i]
        x, _, im_scale = transform(img, label)
        x = x.expand_dims(0).as_in_context(ctx)
        with warnings.catch_warnings():  # after training, gluoncv's target generator sits idle in inference
            warnings.filterwarnings("ignore", message=".*is not used by any computation")
            ids, scores, boxes = net(x)
        boxes = clip(boxes, x) * float(im_scale.asscalar())
        yield i, ids[0, :, 0].asnumpy(), scores[0, :, 0].asnumpy(), boxes[0].asnumpy()
        if progress:
            progress(i + 1, len(data))


def score(data, preds: Iterable[Prediction], metric: str = "voc07") -> dict:
    """mAP of ``preds`` against ``data``'s labels: ``{"metric", "map", "per_class": {name: AP}}``.

    ``metric="auto"``: COCO AP on a COCO dataset, VOC07 mAP on VOC data.
    """
    return _score(data, preds, check_metric(metric))


def _score(data, preds: Iterable[Prediction], metric: str) -> dict:
    """:func:`score` for a metric already validated (an :class:`EvaluateOptions`'s)."""
    from bbadapt.engines.gluon.datasets import COCOSet

    metric = resolve_metric(metric, isinstance(data, COCOSet))
    if metric == "coco":
        return _score_coco(data, preds)
    from gluoncv.utils.metrics.voc_detection import VOC07MApMetric, VOCMApMetric

    scorer = (VOC07MApMetric if metric == "voc07" else VOCMApMetric)(iou_thresh=0.5, class_names=list(data.classes))
    for i, ids, scores, boxes in preds:
        gt = data.label(i)
        scorer.update(boxes[None], ids[None], scores[None], gt[None, :, :4], gt[None, :, 4], gt[None, :, 5])
    names, values = scorer.get()
    per_class = {n: float(v) for n, v in zip(names[:-1], values[:-1], strict=True)}
    return {"metric": metric, "map": float(values[-1]), "per_class": per_class, "images": len(data)}


def _score_coco(data, preds: Iterable[Prediction]) -> dict:
    """COCO AP@[.5:.95] with pycocotools, against the dataset's own annotation file."""
    from bbadapt.engines.gluon.datasets import COCOSet

    if not isinstance(data, COCOSet):
        raise OptionError("metric 'coco' needs a coco: dataset (its annotation file holds the category ids)")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    doc = json.loads(Path(data.annotations).read_text())
    cat_of = {str(c["name"]).strip(): c["id"] for c in doc["categories"]}
    results = []
    for i, ids, scores, boxes in preds:
        for cls, s, (x1, y1, x2, y2) in zip(ids, scores, boxes, strict=True):
            if cls < 0 or data.classes[int(cls)] not in cat_of:
                continue  # padding, or a bundle class this file has no category for (nothing to match)
            results.append({"image_id": data.image_ids[i], "category_id": cat_of[data.classes[int(cls)]],
                            "bbox": [float(x1), float(y1), float(x2 - x1 + 1), float(y2 - y1 + 1)], "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints; the CLI's output is ours
        truth = COCO(str(data.annotations))
        if not results:
            return {"metric": "coco", "map": 0.0, "map50": 0.0, "per_class": {}, "images": len(data)}
        found = truth.loadRes(results)
        ev = COCOeval(truth, found, "bbox")
        ev.params.imgIds = list(data.image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        precision = ev.eval["precision"][:, :, k, 0, -1]
        valid = precision[precision > -1]
        name = next(n for n, c in cat_of.items() if c == cat)
        per_class[name] = float(valid.mean()) if valid.size else float("nan")
    return {"metric": "coco", "map": float(ev.stats[0]), "map50": float(ev.stats[1]), "per_class": per_class,
            "images": len(data)}


def evaluate(directory: str | os.PathLike, dataset: str, options: Optional[EvaluateOptions] = None, *,
             gpus: Optional[str] = None, ctx=None, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """mAP of a bundle or checkpoint directory on ``dataset`` (``voc:DIR`` split ``options.split``, or ``coco:...``).

    The short side and max size default to those the checkpoint was trained with (else the
    detector's own). Devices as for training: ``gpus="0"`` (one GPU; evaluation runs on one
    device) or the CPU by default; ``ctx``, one mxnet context, instead.
    """
    from bbadapt.engines.gluon.datasets import open_dataset
    from bbadapt.engines.gluon.runtime import check_proposals, detector_manifest, load_quietly
    from bbadapt.platform.devices import contexts

    options = options or EvaluateOptions()  # validated when made: the metric is not checked again here
    if ctx is not None and gpus is not None:
        raise OptionError("give the device once: gpus=... or ctx=...")
    if ctx is None:
        devices = contexts(gpus)
        if len(devices) > 1:
            raise OptionError(f"evaluate runs on one device; give one GPU (--gpus {gpus.split(',')[0]}), got --gpus {gpus}")
        ctx = devices[0]
    manifest = detector_manifest(directory)  # read once: the loader below takes the parsed manifest
    data = open_dataset(dataset, manifest.classes, options.split)
    net = load_quietly(manifest, ctx)
    run = manifest.checkpoint
    short = options.short_side or (run.config_value("short_side") if run else None) or _first(net.short)
    longest = options.max_size or (run.config_value("max_size") if run else None) or net.max_size
    check_proposals(net, short, training=False)
    net.hybridize(static_alloc=True)
    preds = predictions(net, data, ctx, manifest.target_spec(), short, longest, progress=progress)
    result = _score(data, preds, options.metric)
    result.update(directory=str(directory), dataset=str(dataset), short_side=short, max_size=longest,
                  epoch=run.epoch if run else None)
    return result


def _first(short) -> int:
    return short[-1] if isinstance(short, (tuple, list)) else short
