"""engines/common: one reader, one schedule, one scorer for both engines, and none of it needs mxnet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bbadapt.engines.common.metrics import VOCScorer, default_metric, score
from bbadapt.engines.common.schedule import LR_PER_IMAGE, default_schedule, learning_rate

REPO = Path(__file__).resolve().parents[3]
RACCOON = REPO / "tests" / "data" / "raccoon_voc"


def test_the_common_room_imports_and_reads_data_without_mxnet():
    code = ("import sys; sys.modules['mxnet'] = None; sys.modules['gluoncv'] = None\n"
            "from bbadapt.engines.common import checkpoints, datasets, metrics, progress, schedule\n"
            f"d = datasets.open_dataset('voc:{RACCOON}', ['raccoon'], 'val')\n"
            "print(len(d), d.label(0).shape[1])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    n, cols = map(int, result.stdout.split())
    assert n > 0 and cols == 6


def test_the_default_lr_is_both_recipes_per_image():
    assert LR_PER_IMAGE == pytest.approx(0.02 / 16) == pytest.approx(0.01 / 8)  # torchvision's and GluonCV's
    assert default_schedule(8, False)[:2] == (pytest.approx(0.01), 100)
    assert default_schedule(8, True)[:2] == (pytest.approx(0.0025), 200)


def test_the_schedule_is_a_pure_function_of_the_position():
    from bbadapt.engines.gluon.options import TrainConfig

    config = TrainConfig(lr=0.01, warmup_iters=10, lr_steps=(2,))
    assert learning_rate(config, 0, 0) == pytest.approx(0.01 / 3)
    assert learning_rate(config, 0, 10) == pytest.approx(0.01)
    assert learning_rate(config, 2, 0) == pytest.approx(0.001)


@pytest.mark.parametrize("voc07", [True, False])
def test_the_numpy_voc_scorer_is_gluoncvs_metric(voc07):
    """Random detections against random ground truth (with difficult boxes), 3 classes: the same per-class AP and mAP
    as gluoncv's own VOC07MApMetric / VOCMApMetric."""
    from bbadapt.core.zoo import import_gluoncv

    import_gluoncv()
    from gluoncv.utils.metrics.voc_detection import VOC07MApMetric, VOCMApMetric

    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    ours = VOCScorer(names, 0.5, voc07=voc07)
    theirs = (VOC07MApMetric if voc07 else VOCMApMetric)(iou_thresh=0.5, class_names=names)
    for _ in range(20):
        gt = rng.uniform(0, 80, (5, 2))
        gt_boxes = np.concatenate([gt, gt + rng.uniform(5, 40, (5, 2))], axis=1)
        pred = np.concatenate([gt_boxes + rng.normal(0, 4, gt_boxes.shape), rng.uniform(0, 100, (4, 4)).cumsum(1)])
        pred_ids, gt_ids = rng.integers(-1, 3, len(pred)).astype(np.float32), rng.integers(0, 3, 5).astype(np.float32)
        scores, diff = rng.random(len(pred)).astype(np.float32), (rng.random(5) < 0.2).astype(np.float32)
        ours.update(pred, pred_ids, scores, gt_boxes, gt_ids, diff)
        theirs.update(pred[None], pred_ids[None], scores[None], gt_boxes[None], gt_ids[None], diff[None])
    per_class, mean = ours.result()
    their_names, their_values = theirs.get()
    assert mean == pytest.approx(their_values[-1], abs=1e-12)
    assert [per_class[n] for n in names] == pytest.approx(their_values[:-1], abs=1e-12)


def test_auto_is_coco_ap_on_coco_data_and_voc07_on_voc(tmp_path):
    from bbadapt.engines.common.datasets import open_dataset

    voc = open_dataset(f"voc:{RACCOON}", ["raccoon"], "val")
    assert default_metric("auto", voc) == "voc07" and default_metric("voc12", voc) == "voc12"
    truth = ((i, voc.label(i)[:, 4], np.ones(len(voc.label(i))), voc.label(i)[:, :4]) for i in range(len(voc)))
    assert score(voc, truth, "voc07")["map"] == pytest.approx(1.0)
