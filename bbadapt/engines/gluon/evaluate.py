"""Detection mAP of a bundle or checkpoint on a dataset: VOC07 (11-point), VOC12 (area), COCO.

Predictions and scoring are separate steps on purpose: :func:`predictions` runs the
detector over a dataset, :func:`score` turns any stream of per-image detections into mAP
through the shared scoring of :mod:`bbadapt.engines.common.metrics` (gluoncv's VOC metrics
restated in numpy) or pycocotools. The
tests feed ground truth through :func:`score` to pin the metric path down independently of
a (randomly initialised) detector.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Optional

import numpy as np

from bbadapt.core.zoo import import_gluoncv
from bbadapt.engines.gluon.options import (  # noqa: F401 - importable from here too
    METRICS,
    EvaluateOptions,
    check_metric,
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
    """:func:`score` for a metric already validated (an :class:`EvaluateOptions`'s): the scoring both engines share
    (:mod:`bbadapt.engines.common.metrics`; ``auto`` is COCO AP on COCO data, VOC07 on VOC)."""
    from bbadapt.engines.common.metrics import default_metric
    from bbadapt.engines.common.metrics import score as shared_score

    return shared_score(data, preds, default_metric(metric, data))


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
