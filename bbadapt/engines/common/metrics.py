"""Detection scoring shared by both engines: VOC07 (11-point) and VOC12 (area) mAP in numpy, COCO AP with pycocotools.

The VOC metrics are GluonCV's ``VOCMApMetric``/``VOC07MApMetric`` (gluoncv 0.10.5
``utils/metrics/voc_detection.py``) restated in numpy, call for call (the same sorts, the
same ``+1`` on the corners, the same NaN rules), so both engines score the same detections
to the same number without importing gluoncv.

A prediction is ``(index, class ids (N,), scores (N,), boxes (N, 4))`` with boxes in
original-image pixels (gluoncv's convention) and class ids indexing the detector's classes
(-1: padding). ``data`` is a dataset of :mod:`bbadapt.engines.common.datasets`: ``label(i)``
rows ``[x1, y1, x2, y2, class, difficult]``, ``classes``, and for COCO ``annotations`` and
``image_ids``.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from bbadapt.platform.errors import OptionError

Prediction = tuple[int, np.ndarray, np.ndarray, np.ndarray]
METRICS = ("voc07", "voc12", "coco")


def bbox_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    tl = np.maximum(a[:, None, :2], b[:, :2])
    br = np.minimum(a[:, None, 2:4], b[:, 2:4])
    area_i = np.prod(br - tl, axis=2) * (tl < br).all(axis=2)
    area_a = np.prod(a[:, 2:4] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:4] - b[:, :2], axis=1)
    return area_i / (area_a[:, None] + area_b - area_i)


class VOCScorer:
    """Accumulates detections against ground truth; :meth:`result` gives per-class AP and the mean."""

    def __init__(self, classes: Iterable[str], iou_thresh: float = 0.5, voc07: bool = True) -> None:
        self.classes, self.iou_thresh, self.voc07 = list(classes), iou_thresh, voc07
        self._n_pos: dict = defaultdict(int)
        self._score: dict = defaultdict(list)
        self._match: dict = defaultdict(list)

    def update(self, pred_bbox, pred_label, pred_score, gt_bbox, gt_label, gt_difficult=None) -> None:
        pred_bbox, pred_label, pred_score = (np.asarray(v) for v in (pred_bbox, pred_label, pred_score))
        gt_bbox, gt_label = np.asarray(gt_bbox), np.asarray(gt_label)
        valid_pred = np.where(pred_label.flat >= 0)[0]
        pred_bbox = pred_bbox[valid_pred, :]
        pred_label = pred_label.flat[valid_pred].astype(int)
        pred_score = pred_score.flat[valid_pred]
        valid_gt = np.where(gt_label.flat >= 0)[0]
        gt_bbox = gt_bbox[valid_gt, :]
        gt_label = gt_label.flat[valid_gt].astype(int)
        gt_difficult = np.zeros(gt_bbox.shape[0]) if gt_difficult is None else np.asarray(gt_difficult).flat[valid_gt]
        for cls in np.unique(np.concatenate((pred_label, gt_label)).astype(int)):
            mask = pred_label == cls
            boxes, scores = pred_bbox[mask], pred_score[mask]
            order = scores.argsort()[::-1]
            boxes, scores = boxes[order], scores[order]
            gmask = gt_label == cls
            gboxes, gdiff = gt_bbox[gmask], gt_difficult[gmask]
            self._n_pos[cls] += np.logical_not(gdiff).sum()
            self._score[cls].extend(scores)
            if len(boxes) == 0:
                continue
            if len(gboxes) == 0:
                self._match[cls].extend((0,) * boxes.shape[0])
                continue
            boxes, gboxes = boxes.copy(), gboxes.copy()
            boxes[:, 2:] += 1  # VOC's integer (inclusive) corners, as gluoncv
            gboxes[:, 2:] += 1
            iou = bbox_iou(boxes, gboxes)
            gt_index = iou.argmax(axis=1)
            gt_index[iou.max(axis=1) < self.iou_thresh] = -1
            taken = np.zeros(gboxes.shape[0], dtype=bool)
            for g in gt_index:
                if g >= 0:
                    self._match[cls].append(-1 if gdiff[g] else (0 if taken[g] else 1))
                    taken[g] = True
                else:
                    self._match[cls].append(0)

    def _ap(self, rec, prec) -> float:
        if rec is None or prec is None:
            return np.nan
        if self.voc07:
            ap = 0.0
            for t in np.arange(0.0, 1.1, 0.1):
                p = 0 if np.sum(rec >= t) == 0 else np.max(np.nan_to_num(prec)[rec >= t])
                ap += p / 11.0
            return ap
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], np.nan_to_num(prec), [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])

    def result(self) -> tuple[dict[str, float], float]:
        n_fg = max(self._n_pos.keys()) + 1 if self._n_pos else 0
        aps = []
        per_class = {name: float("nan") for name in self.classes}
        for cls in range(n_fg):
            rec = prec = None
            if cls in self._n_pos:
                score = np.array(self._score[cls])
                match = np.array(self._match[cls], dtype=np.int32)[score.argsort()[::-1]]
                tp, fp = np.cumsum(match == 1), np.cumsum(match == 0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    prec = tp / (fp + tp)
                if self._n_pos[cls] > 0:
                    rec = tp / self._n_pos[cls]
            ap = self._ap(rec, prec)
            aps.append(ap)
            if cls < len(self.classes):
                per_class[self.classes[cls]] = float(ap)
        with np.errstate(all="ignore"), _quiet_nanmean():
            mean = float(np.nanmean(aps)) if aps else float("nan")
        return per_class, mean


@contextlib.contextmanager
def _quiet_nanmean():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise OptionError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    return metric


def score(data, preds: Iterable[Prediction], metric: str = "voc07") -> dict:
    """mAP of ``preds`` against ``data``'s labels: ``{"metric", "map", "per_class": {name: AP}, "images"}``."""
    if check_metric(metric) == "coco":
        return score_coco(data, preds)
    scorer = VOCScorer(data.classes, 0.5, voc07=metric == "voc07")
    for i, ids, scores, boxes in preds:
        gt = data.label(i)
        scorer.update(boxes, ids, scores, gt[:, :4], gt[:, 4], gt[:, 5])
    per_class, mean = scorer.result()
    return {"metric": metric, "map": mean, "per_class": per_class, "images": len(data)}


def score_coco(data, preds: Iterable[Prediction]) -> dict:
    """COCO AP@[.5:.95] with pycocotools, against the dataset's own annotation file."""
    if getattr(data, "kind", None) != "coco":
        raise OptionError("metric 'coco' needs a coco: dataset (its annotation file holds the category ids)")
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise OptionError("metric 'coco' needs pycocotools: pip install 'bbadapt[coco]'") from None

    doc = json.loads(Path(data.annotations).read_text())
    cat_of = {str(c["name"]).strip(): c["id"] for c in doc["categories"]}
    results = []
    for i, ids, scores, boxes in preds:
        for cls, s, (x1, y1, x2, y2) in zip(ids, scores, boxes, strict=True):
            if cls < 0 or data.classes[int(cls)] not in cat_of:
                continue  # padding, or a detector class this file has no category for (nothing to match)
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


def default_metric(metric: str, data) -> str:
    """``auto``: COCO AP on COCO data, VOC07 mAP on VOC data; any other metric as given."""
    if metric != "auto":
        return metric
    if getattr(data, "kind", None) != "coco":
        return "voc07"
    import importlib.util

    if importlib.util.find_spec("pycocotools") is None:
        from bbadapt.platform.errors import OptionError

        raise OptionError("COCO data is scored with COCO AP by default, which needs pycocotools: "
                          "pip install 'bbadapt[coco]' (or pass --metric voc07)")
    return "coco"
