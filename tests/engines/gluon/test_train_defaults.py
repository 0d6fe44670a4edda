"""A newcomer's first hour with a detector: the README's own flow trains with the defaults,
epochs are counted one way, a diverging run stops with one honest line, and a detector
bundle's backbone can be exported.

The bundle is made exactly as the README says (``bbadapt convert resnet18_v1b --weights random
--detector faster-rcnn --classes raccoon``: GluonCV's default RPN/ROI settings, 2000 training
proposals), only with a small check size. Training uses 6 of the raccoon photos at short side
192 (12x12 stride-16 positions x 15 anchors = 2160 anchors, just above the 2000 proposals) so that
an epoch takes minutes, not an hour; before this was fixed, that run diverged at iteration 3
with the default lr, and at short side 192 exploding values crashed mxnet's proposal op.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest

from bbadapt.engines.gluon.options import LR_PER_IMAGE, RANDOM_LR_FACTOR, RANDOM_WARMUP_ITERS, WARMUP_ITERS, TrainConfig
from bbadapt.engines.gluon.train import LOSS_LIMIT, Diverged, resolve_schedule, train
from tests.engines.gluon.test_datasets import voc_subset
from tests.engines.gluon.test_train import LEFTOVERS, cli, error_line, log_records, make_bundle, tree_digest

README_TRAIN = ["--epochs", "1", "--cpu", "--short-side", "192", "--max-size", "320", "--log-interval", "1"]


@pytest.fixture(scope="module")
def readme_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("readme") / "frcnn"
    result = cli("convert", "resnet18_v1b", "--weights", "random", "--detector", "faster-rcnn", "--classes", "raccoon",
                 "--sizes", "64x64", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def six_photos(tmp_path_factory) -> Path:
    return voc_subset(tmp_path_factory.mktemp("voc6"), train=[1, 2, 3, 4, 9, 10], val=[11])


def test_the_readme_flow_trains_with_the_defaults(readme_bundle, six_photos, tmp_path):
    out = tmp_path / "frcnn"
    shutil.copytree(readme_bundle, out)
    result = cli("train", out, "--dataset", f"voc:{six_photos}", *README_TRAIN)
    assert result.returncode == 0, result.stderr
    lr = LR_PER_IMAGE * RANDOM_LR_FACTOR
    assert (f"training epochs 1..1 on 6 images: lr {lr:g}, warmup {RANDOM_WARMUP_ITERS} iterations (defaults: lr {lr:g} "
            f"({RANDOM_LR_FACTOR:g} x GluonCV's {LR_PER_IMAGE:g} per image: the bundle's weights are random)") in result.stderr
    iters = log_records(out, "iter")
    assert [r["batch"] for r in iters] == list(range(6))
    assert all(math.isfinite(r["loss"]) and r["loss"] < LOSS_LIMIT for r in iters), [r["loss"] for r in iters]
    # one epoch numbering: progress, log, summary and folder all say 1
    assert {r["epoch"] for r in iters} == {1} and "epoch 1/1 batch 6/6: " in result.stderr
    assert "epoch 0" not in result.stderr
    assert log_records(out, "val")[0]["epoch"] == 1
    assert f"trained epochs 1..1 (6 iterations in all, lr {lr:g}, warmup {RANDOM_WARMUP_ITERS})" in result.stdout
    assert os.readlink(out / "checkpoints" / "last") == "epoch-0001"
    # the reference is what evaluate reads; evaluate takes --cpu like train
    evaluated = cli("evaluate", out / "checkpoints" / "last", "--dataset", f"voc:{six_photos}", "--cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.strip().splitlines()[-1].startswith("voc07 mAP ") and "(short side 192)" in evaluated.stdout


def test_an_exploding_run_stops_with_one_line_before_the_native_ops(readme_bundle, six_photos, tmp_path):
    """lr 0.5 without warmup explodes within a few steps (at batch 2 here; lr 0.05 did only in some
    data orders). The guard sits before each step (losses) and after it (weights), so mxnet's proposal
    and ROI ops never see the values: one line, exit 1, the value it saw, and no claim about
    checkpoints that do not exist."""
    out = tmp_path / "frcnn"
    shutil.copytree(readme_bundle, out)
    result = cli("train", out, "--dataset", f"voc:{six_photos}", *README_TRAIN, "--lr", "0.5", "--warmup", "0")
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])  # not -11: no segfault
    assert "Traceback" not in result.stderr
    *progress, line = result.stderr.strip().splitlines()  # the progress lines so far, then one error line
    assert not [ln for ln in progress if ln.startswith("bbadapt: error")] and line.startswith("bbadapt: error: "), result.stderr
    m = re.search(r"training diverged at epoch 1/1, batch \d/6: (?:loss (\S+) \(rpn_cls .*\) (?:is not finite|exceeds "
                  r"10000)|the trainable weights' norm went from \S+ to (\S+)); lr was 0\.5 \(--lr 0\.5, --warmup 0\): "
                  r"lower --lr \(e\.g\. --lr 0\.05\) or raise --warmup; no checkpoint was written$", line)
    assert m, line
    seen = float(m.group(1) or m.group(2))
    assert not math.isfinite(seen) or seen > LOSS_LIMIT or m.group(2)
    assert "intact" not in line
    assert not list((out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else True
    assert not [p for p in out.rglob("*") if any(mark in p.name for mark in LEFTOVERS)]


def test_divergence_after_a_checkpoint_names_the_checkpoint_that_is_intact(tmp_path):
    """Epoch 1 trains (lr 2e-4); an lr step multiplies it by 1e5 for epoch 2, which explodes."""
    data = voc_subset(tmp_path / "voc", train=[1, 2, 3, 4], val=[9])
    bundle = make_bundle(tmp_path / "frcnn", ["raccoon"])
    config = TrainConfig(epochs=2, lr=2e-4, warmup_iters=0, lr_steps=(1,), lr_decay=1e5, short_side=128, max_size=192,
                         log_interval=1, val_interval=5)
    root = bundle / "checkpoints"
    with pytest.raises(Diverged) as caught:
        train(bundle, f"voc:{data}", config)
    message = str(caught.value)
    assert re.match(r"training diverged at epoch 2/2, batch \d/4: ", message), message
    assert message.endswith(f"{root / 'epoch-0001'} and the checkpoints before it are intact")
    assert "lr was 20 (--lr 0.0002, --warmup 0)" in message
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001", "last"] and os.readlink(root / "last") == "epoch-0001"
    section = json.loads((root / "last" / "manifest.json").read_text())["checkpoint"]
    assert section["epoch"] == 1 and section["iteration"] == 4
    assert not [p for p in bundle.rglob("*") if any(mark in p.name for mark in LEFTOVERS)]
    before = tree_digest(root)
    with pytest.raises(Diverged):  # resuming the same run diverges the same way, and still touches nothing
        train(bundle, f"voc:{data}", TrainConfig(epochs=2, lr_steps=(1,), lr_decay=1e5, short_side=128, max_size=192,
                                                 log_interval=1, val_interval=5, warmup_iters=0), resume=True)
    assert tree_digest(root) == before


@pytest.mark.parametrize("weights, batch, lr, warmup", [
    ("pretrained", 1, LR_PER_IMAGE, WARMUP_ITERS),
    ("pretrained", 8, 8 * LR_PER_IMAGE, WARMUP_ITERS),  # GluonCV: 0.01 for 8 images per step
    ("random", 1, LR_PER_IMAGE * RANDOM_LR_FACTOR, RANDOM_WARMUP_ITERS),
    ("file", 2, 2 * LR_PER_IMAGE, WARMUP_ITERS),
])
def test_default_schedule_follows_gluoncvs_recipe_and_is_gentler_for_random_weights(weights, batch, lr, warmup):
    resolved, note = resolve_schedule(TrainConfig(batch_size=batch), weights == "random")
    assert (resolved.lr, resolved.warmup_iters) == (pytest.approx(lr), warmup)
    assert f"lr {lr:g}" in note and f"warmup {warmup} iterations" in note


def test_given_and_resumed_values_win_over_the_defaults():
    random_weights = True
    given, note = resolve_schedule(TrainConfig(lr=0.02, warmup_iters=5), random_weights)
    assert (given.lr, given.warmup_iters, note) == (0.02, 5, "")
    resumed, note = resolve_schedule(TrainConfig(), random_weights, stored={"lr": 0.0002, "warmup_iters": 0})
    assert (resumed.lr, resumed.warmup_iters) == (0.0002, 0) and "as the resumed run" in note


def test_a_detector_bundles_backbone_exports_with_backbone(readme_bundle, tmp_path):
    refused = cli("export", readme_bundle, "--torchvision", tmp_path / "r18.safetensors")
    assert refused.returncode == 1
    assert "holds a detector; export its backbone with --backbone, or the whole detector" in error_line(refused)
    result = cli("export", readme_bundle, "--backbone", "--torchvision", tmp_path / "r18.safetensors")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r18.safetensors").is_file()
    lines = result.stdout.splitlines()
    assert "check passed: yes" in lines and "input spec it expects: imagenet" in lines
    assert not [line for line in lines if re.match(r"^[a-z0-9]+_[a-z0-9_]+: ", line)], lines  # no bare keys
