"""``bbadapt train`` and ``bbadapt evaluate`` on a real bbadapt detector bundle and real photos.

The bundle: ``resnet18_v1b`` with seeded random weights whose BatchNorm statistics are
calibrated on real photos, adapted from ``imagenet`` to raw ``rgb255`` input (BN ``affine``),
with a C4 Faster R-CNN made by ``add_detector`` (RPN/ROI counts scaled down for 128-px
images). The data: 4 training and 2 validation photos of the raccoon VOC set. Training runs
the real command line in a subprocess; the few in-process calls are the ones that need to
break something on purpose.

Random weights give mAP near 0, so evaluation is pinned down separately: ground truth fed
through the same scoring code gives mAP 1.0, and partial recall gives the VOC07 and VOC12
values that follow from their definitions (11-point vs area).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from bbadapt.bundle.manifest import staged_output, write_manifest
from bbadapt.core import zoo
from bbadapt.core.rewrite import adapt
from bbadapt.core.spec import PRESETS
from bbadapt.core.weights import randomize
from bbadapt.engines.gluon.datasets import open_dataset
from bbadapt.engines.gluon.detector_bundle import add_detector, load_detector
from bbadapt.engines.gluon.evaluate import EvaluateOptions, score
from bbadapt.engines.gluon.train import TrainConfig, train
from bbadapt.platform.errors import DeviceError, OptionError, OutputError
from bbadapt.verify import images
from tests.engines.gluon.test_datasets import RACCOON, coco_from_voc, voc_subset

MODEL = "resnet18_v1b"
# 128-px images give an 8x8..8x12 stride-16 map: 960+ anchors, so proposals must stay below that
SMALL = dict(rpn_channel=256, roi_size=(7, 7), rpn_train_pre_nms=3000, rpn_train_post_nms=300,
             rpn_test_pre_nms=1000, rpn_test_post_nms=100, num_sample=32)
TRAIN = ["--cpu", "--lr", "0.0002", "--warmup", "0", "--short-side", "128", "--max-size", "192", "--log-interval", "1"]
SMALL_RUN = dict(lr=0.0002, warmup_iters=0, short_side=128, max_size=192)  # TRAIN, in Python
EPOCHS = 3
LEFTOVERS = (".partial-", ".old-")


def make_bundle(out: Path, classes: list[str]) -> Path:
    """A detector bundle the way convert writes one: adapted backbone manifest + add_detector section."""
    net = zoo.build(MODEL)
    raw, _ = images.photos((96, 96), limit=4)
    randomize(net, 0, PRESETS["imagenet"].normalize(raw))
    adapted = adapt(net, "imagenet", "rgb255", bn="affine")
    info = zoo.model_info(MODEL)
    with staged_output(out) as stage:
        section = add_detector(stage, adapted, info, classes, "c4", freeze_at=2, overrides=SMALL, seed=0)
        write_manifest(stage, {"kind": "detector", "model": MODEL, "family": info.family,
                               "source": adapted.source.to_dict(), "target": adapted.target.to_dict(),
                               "plan": adapted.plan, "detector": section})
    return out


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", *map(str, args)], capture_output=True, text=True)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``bbadapt: error:`` line (progress lines aside), and no traceback."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("... ")]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("bbadapt: error: "), result.stderr
    return lines[0]


def log_records(directory: Path, event: str) -> list[dict]:
    lines = (directory / "train.log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def params_of(path: Path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return voc_subset(tmp_path_factory.mktemp("voc"), train=[1, 2, 3, 4], val=[9, 10])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "frcnn", ["raccoon"])


@pytest.fixture(scope="module")
def trained(bundle, data, tmp_path_factory):
    """The bundle trained for 3 epochs (12 iterations) by the real command line."""
    out = tmp_path_factory.mktemp("trained") / "frcnn"
    shutil.copytree(bundle, out)
    result = cli("train", out, "--dataset", f"voc:{data}", "--epochs", EPOCHS, *TRAIN)
    assert result.returncode == 0, result.stderr
    return out, result


# --------------------------------------------------------------------------- training


def test_loss_falls_and_every_iteration_is_logged(trained):
    out, result = trained
    iters = log_records(out, "iter")
    assert [r["iteration"] for r in iters] == list(range(1, 4 * EPOCHS + 1))
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in iters)
    for r in iters:
        assert r["loss"] == pytest.approx(sum(r[k] for k in ("rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box")))
    # windows of one epoch: the same 4 images each time, so the means are comparable
    assert [r["epoch"] for r in iters] == [e for e in range(1, EPOCHS + 1) for _ in range(4)]  # counted from 1
    def epoch_means(key: str) -> list[float]:
        return [float(np.mean([r[key] for r in iters if r["epoch"] == e])) for e in range(1, EPOCHS + 1)]
    # the total is noisy (ROI sampling draws new boxes each step; measured 2.01, 1.85, 1.87), so it
    # must only end lower; the RPN's objectness loss averages 256 anchors per image and falls every
    # epoch (measured 0.684, 0.676, 0.661; without learning it stays at ln 2 = 0.693 - noise)
    total, objectness = epoch_means("loss"), epoch_means("rpn_cls")
    assert total[-1] < total[0], total
    assert all(later < earlier for earlier, later in zip(objectness, objectness[1:])), objectness
    # stderr is not a terminal: plain progress lines, one per logged iteration and one per epoch
    assert result.stderr.count("samples/s") == len(iters) + EPOCHS
    assert [r["epoch"] for r in log_records(out, "epoch")] == list(range(1, EPOCHS + 1))
    assert f"epoch 1/{EPOCHS} batch 1/4: " in result.stderr and f"epoch {EPOCHS}/{EPOCHS} batch 4/4: " in result.stderr
    assert f"trained epochs 1..{EPOCHS} ({len(iters)} iterations in all, lr 0.0002, warmup 0)" in result.stdout
    assert f"(last -> epoch-{EPOCHS:04d}, best -> epoch-" in result.stdout


def test_checkpoints_are_loadable_bundles_with_their_position(trained):
    out, _ = trained
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["best", *[f"epoch-{e:04d}" for e in range(1, EPOCHS + 1)], "last"]
    for directory in root.iterdir():
        assert sorted(p.name for p in directory.iterdir()) == ["detector.params", "manifest.json", "trainer.states"]
    section = json.loads((root / "last" / "manifest.json").read_text())["checkpoint"]
    assert (section["epoch"], section["iteration"]) == (EPOCHS, 4 * EPOCHS)
    assert section["config"]["short_side"] == 128 and section["dataset"].startswith("voc:")
    assert tree_digest(root / "last") == tree_digest(root / f"epoch-{EPOCHS:04d}")
    net = load_detector(root / "last")  # strict load: nothing missing, nothing extra
    assert net.classes == ["raccoon"]


def test_last_and_best_are_relative_links_naming_an_epoch_not_copies(trained):
    """A checkpoint is ~100 MB: ``last`` and ``best`` name an epoch directory instead of copying it,
    relatively, so the run directory can be moved or copied whole."""
    out, _ = trained
    root = out / "checkpoints"
    assert os.readlink(root / "last") == f"epoch-{EPOCHS:04d}"
    best = json.loads((root / "best" / "manifest.json").read_text())["checkpoint"]["epoch"]
    assert os.readlink(root / "best") == f"epoch-{best:04d}"
    real = sorted(p.name for p in root.iterdir() if not p.is_symlink())
    assert real == [f"epoch-{e:04d}" for e in range(1, EPOCHS + 1)]  # three epochs on disk, no copies
    moved = out.parent / "moved"
    shutil.copytree(out, moved, symlinks=True)  # the links travel with the run
    assert load_detector(moved / "checkpoints" / "best").classes == ["raccoon"]
    from bbadapt.engines.gluon.detector_bundle import export_symbol

    deployed = export_symbol(moved / "checkpoints" / "best", moved.parent / "deploy" / "frcnn", short=128)
    assert deployed["passed"] and Path(deployed["params"]).is_file()


def test_best_is_the_checkpoint_with_the_highest_validation_map(trained):
    out, _ = trained
    vals = log_records(out, "val")
    assert [v["epoch"] for v in vals] == list(range(1, EPOCHS + 1)) and all(v["metric"] == "voc07" for v in vals)
    best_epoch = 1 + max(range(len(vals)), key=lambda i: (vals[i]["map"], -i))  # first epoch reaching the max
    best = json.loads((out / "checkpoints" / "best" / "manifest.json").read_text())["checkpoint"]
    assert best["val_map"] == max(v["map"] for v in vals) and best["epoch"] == best_epoch
    assert (params_of(out / "checkpoints" / "best" / "detector.params").keys()
            == params_of(out / "checkpoints" / f"epoch-{best_epoch:04d}" / "detector.params").keys())


def test_only_the_bundles_trainable_parameters_change(trained, bundle):
    out, _ = trained
    before = params_of(bundle / "detector.params")
    after = params_of(out / "checkpoints" / "last" / "detector.params")
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    trainable = set(json.loads((bundle / "manifest.json").read_text())["detector"]["trainable"])
    constants = {k for k, p in load_detector(bundle)._collect_params_with_prefix().items()
                 if isinstance(p, mx.gluon.Constant)}  # the RPN anchors: data, never trained
    assert changed == trainable - constants
    assert not any(".bn" in k or "affine" in k.lower() for k in changed)  # frozen BN stays frozen


def test_resume_continues_exactly_where_the_last_checkpoint_stopped(trained, bundle, data, tmp_path):
    """Resuming from epoch 2's checkpoint reproduces the uninterrupted run's epoch 3 bit for bit:
    parameters, optimizer momentum, lr schedule position and data order are all restored."""
    out, _ = trained
    resumed = tmp_path / "frcnn"
    shutil.copytree(bundle, resumed)
    shutil.copytree(out / "checkpoints" / "epoch-0002", resumed / "checkpoints" / "last")
    result = cli("train", resumed, "--dataset", f"voc:{data}", "--epochs", EPOCHS, "--resume", *TRAIN)
    assert result.returncode == 0, result.stderr
    assert [(r["epoch"], r["iteration"]) for r in log_records(resumed, "iter")] == [(3, i) for i in range(9, 13)]
    section = json.loads((resumed / "checkpoints" / "epoch-0003" / "manifest.json").read_text())["checkpoint"]
    assert (section["epoch"], section["iteration"]) == (3, 12)
    ours = params_of(resumed / "checkpoints" / "epoch-0003" / "detector.params")
    reference = params_of(out / "checkpoints" / "epoch-0003" / "detector.params")
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
    # and it can fail: epoch 2's parameters are not epoch 3's
    epoch2 = params_of(out / "checkpoints" / "epoch-0002" / "detector.params")
    assert any(not np.array_equal(epoch2[k], reference[k]) for k in reference)


def test_a_failed_run_leaves_existing_checkpoints_untouched(trained, data, tmp_path, monkeypatch):
    out, _ = trained
    work = tmp_path / "frcnn"
    shutil.copytree(out, work)
    before = tree_digest(work / "checkpoints")

    def disk_full(self, fname):
        Path(fname).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx.gluon.Trainer, "save_states", disk_full)
    with pytest.raises(OutputError, match="cannot write checkpoint .*epoch-0004: No space left on device; "
                                          "the checkpoints written before are intact"):
        train(work, f"voc:{data}", TrainConfig(epochs=EPOCHS + 1, **SMALL_RUN), resume=True)
    assert tree_digest(work / "checkpoints") == before
    assert not [p for p in work.rglob("*") if any(m in p.name for m in LEFTOVERS)]
    assert log_records(work, "iter")[-1]["epoch"] == EPOCHS + 1  # it did train epoch 4 before failing


def test_a_new_run_never_overwrites_checkpoints_and_resume_needs_one(trained, bundle, data):
    out, _ = trained
    before = tree_digest(out / "checkpoints")
    line = error_line(cli("train", out, "--dataset", f"voc:{data}", *TRAIN))
    assert "holds checkpoints of an earlier run; pass --resume" in line
    assert tree_digest(out / "checkpoints") == before
    assert "nothing to resume" in error_line(cli("train", bundle, "--dataset", f"voc:{data}", "--resume", *TRAIN))
    with pytest.raises(OutputError, match="is a training checkpoint; continue its run with .* --resume"):
        train(out / "checkpoints" / "best", f"voc:{data}")
    assert tree_digest(out / "checkpoints") == before
    assert not (bundle / "checkpoints").exists()


def test_check_on_a_checkpoint_says_what_a_checkpoint_is(trained):
    out, _ = trained
    line = error_line(cli("check", out / "checkpoints" / "best"))
    assert "is a training checkpoint" in line and "check the bundle it was trained from" in line


def test_resume_refuses_settings_that_would_silently_change_the_run(trained, data):
    out, _ = trained
    before = tree_digest(out / "checkpoints")
    with pytest.raises(OptionError, match=r"settings differ from it: lr 0.01 \(the run used 0.0002\)"):
        train(out, f"voc:{data}", TrainConfig(epochs=EPOCHS + 1, lr=0.01, short_side=128, max_size=192), resume=True)
    assert tree_digest(out / "checkpoints") == before


# --------------------------------------------------------------------------- evaluation


def test_evaluate_reproduces_the_validation_map_recorded_in_the_checkpoint(trained, data, tmp_path):
    out, _ = trained
    result = cli("evaluate", out / "checkpoints" / "best", "--dataset", f"voc:{data}")
    assert result.returncode == 0, result.stderr
    *per_class, mean = result.stdout.strip().splitlines()
    recorded = json.loads((out / "checkpoints" / "best" / "manifest.json").read_text())["checkpoint"]["val_map"]
    assert per_class[0].split()[0] == "raccoon"
    assert mean.startswith("voc07 mAP ") and float(mean.split()[2]) == pytest.approx(recorded, abs=5e-5)
    assert "on 2 images (short side 128)" in mean
    # the same photos as a COCO file: same mAP
    ann = coco_from_voc(data, ["raccoon-9", "raccoon-10"], tmp_path / "val.json")
    as_coco = ["evaluate", out / "checkpoints" / "best", "--dataset", f"coco:{ann}:{data / 'JPEGImages'}"]
    coco = cli(*as_coco, "--metric", "voc07")
    assert coco.returncode == 0, coco.stderr
    assert coco.stdout.strip().splitlines()[-1] == mean
    # no --metric on COCO data: COCO AP (the default metric is auto), or one line saying what it needs
    auto = cli(*as_coco)
    if importlib.util.find_spec("pycocotools") is None:
        assert auto.returncode == 1 and "COCO data is scored with COCO AP by default, which needs pycocotools" \
            in auto.stderr, auto.stderr
        return
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout.strip().splitlines()[-1].startswith("coco mAP ")


def test_the_default_metric_is_coco_ap_on_coco_data_and_voc07_on_voc_data(tmp_path):
    """``EvaluateOptions().metric`` is ``auto``: what the data's own community scores it with."""
    assert EvaluateOptions().metric == "auto"
    voc = open_dataset(f"voc:{RACCOON}", ["raccoon"], "val")
    assert score(voc, _ground_truth(voc), "auto")["metric"] == "voc07"
    names = (RACCOON / "VOC2017/ImageSets/Main/val.txt").read_text().split()[:4]
    ann = coco_from_voc(RACCOON / "VOC2017", names, tmp_path / "val.json")
    coco = open_dataset(f"coco:{ann}:{RACCOON / 'VOC2017' / 'JPEGImages'}", ["raccoon"])
    if importlib.util.find_spec("pycocotools") is None:
        with pytest.raises(OptionError, match=r"COCO data is scored with COCO AP by default, which needs pycocotools"):
            score(coco, _ground_truth(coco), "auto")
        return
    result = score(coco, _ground_truth(coco), "auto")
    assert result["metric"] == "coco" and result["map"] == pytest.approx(1.0) and "map50" in result


def _ground_truth(data, keep=lambda i: True):
    for i in range(len(data)):
        label = data.label(i) if keep(i) else np.zeros((0, 6), np.float32)
        yield i, label[:, 4], np.ones(len(label), np.float32), label[:, :4]


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
def test_ground_truth_as_predictions_scores_a_perfect_map(metric):
    data = open_dataset(f"voc:{RACCOON}", ["raccoon"], "val")
    result = score(data, _ground_truth(data), metric)
    assert result["map"] == pytest.approx(1.0) and result["per_class"] == {"raccoon": pytest.approx(1.0)}


def test_partial_recall_separates_voc07_from_voc12():
    """Half the images predicted perfectly, the rest not at all: precision is 1 up to recall r.
    VOC12 (area under the curve) is r; VOC07 samples 11 recall points, (floor(10 r) + 1) / 11."""
    data = open_dataset(f"voc:{RACCOON}", ["raccoon"], "val")
    kept = [i for i in range(len(data)) if i % 2 == 0]
    r = sum(len(data.label(i)) for i in kept) / sum(len(data.label(i)) for i in range(len(data)))
    voc12 = score(data, _ground_truth(data, lambda i: i in kept), "voc12")["map"]
    voc07 = score(data, _ground_truth(data, lambda i: i in kept), "voc07")["map"]
    assert voc12 == pytest.approx(r)
    assert voc07 == pytest.approx((math.floor(10 * r) + 1) / 11)
    assert abs(voc07 - voc12) > 0.01


def test_coco_map_of_ground_truth_or_a_clear_line_without_pycocotools(tmp_path):
    names = (RACCOON / "VOC2017/ImageSets/Main/val.txt").read_text().split()[:10]
    ann = coco_from_voc(RACCOON / "VOC2017", names, tmp_path / "val.json")
    data = open_dataset(f"coco:{ann}:{RACCOON / 'VOC2017' / 'JPEGImages'}", ["raccoon"])
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        with pytest.raises(OptionError, match=r"needs pycocotools: pip install 'bbadapt\[coco\]'"):
            score(data, _ground_truth(data), "coco")
        return
    result = score(data, _ground_truth(data), "coco")
    assert result["map"] == pytest.approx(1.0) and result["map50"] == pytest.approx(1.0)
    assert score(data, _ground_truth(data, lambda i: i < 5), "coco")["map"] < 0.9


# --------------------------------------------------------------------------- bad input: one line, nothing written


def _broken(data: Path, tmp_path: Path, tag: str, value: str) -> Path:
    """A copy of the data whose raccoon-2.xml has ``<tag>`` set to ``value``."""
    import xml.etree.ElementTree as ET

    root = tmp_path / "broken"
    shutil.copytree(data, root)
    path = root / "Annotations" / "raccoon-2.xml"
    tree = ET.parse(path)
    tree.getroot().find(tag).text = value
    tree.write(path)
    return root


@pytest.mark.parametrize("case, code, expected", [
    ("unknown-format", 2, "unknown dataset 'pascal:"),
    ("box-outside", 1, "raccoon-2.xml: box ["),
    ("class-not-in-bundle", 1, "raccoon-2.xml: class 'badger' is not one of the bundle's classes (raccoon)"),
    ("amp-on-cpu", 2, "--amp (mixed precision) needs GPUs"),
    ("not-a-detector", 1, "not a bbadapt output"),
    ("too-small-for-the-proposals", 2, "--short-side 64 gives a 4x4 feature map with 240 anchors, fewer than the "
                                       "detector's 300 RPN proposals per image"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, code, expected, bundle, data, tmp_path):
    target, dataset, extra = bundle, f"voc:{data}", []
    if case == "unknown-format":
        dataset = f"pascal:{data}"
    elif case == "box-outside":
        dataset = f"voc:{_broken(data, tmp_path, 'object/bndbox/xmax', '3000')}"
    elif case == "class-not-in-bundle":
        dataset = f"voc:{_broken(data, tmp_path, 'object/name', 'badger')}"
    elif case == "amp-on-cpu":
        extra = ["--amp"]
    elif case == "too-small-for-the-proposals":
        extra = ["--short-side", "64"]  # 64 / 16 = 4: 4 x 4 positions x 15 anchors
    elif case == "not-a-detector":
        target = tmp_path / "plain"
        target.mkdir()
    before = tree_digest(target)
    result = cli("train", target, "--dataset", dataset, *TRAIN, *extra)
    assert result.returncode == code
    assert expected in error_line(result)
    assert tree_digest(target) == before and not (target / "checkpoints").exists()


def test_a_bundle_made_for_other_classes_is_refused(data, tmp_path):
    other = make_bundle(tmp_path / "pets", ["cat", "dog"])
    result = cli("train", other, "--dataset", f"voc:{data}", *TRAIN)
    assert result.returncode == 1
    assert "class 'raccoon' is not one of the bundle's classes (cat, dog); was the bundle made for other classes?" \
        in error_line(result)
    assert not (other / "checkpoints").exists()


def test_a_gpu_mxnet_cannot_provide_is_one_line(bundle, data):
    """On this CPU-only mxnet: ``--gpus 0``. Where GPUs exist: one past the last."""
    n = mx.context.num_gpus()
    result = cli("train", bundle, "--dataset", f"voc:{data}", "--gpus", n, "--epochs", 1)
    assert result.returncode == 2
    line = error_line(result)
    assert ("this mxnet sees no GPU" in line) if n == 0 else (f"mxnet sees {n} GPU(s)" in line)


def test_horovod_missing_is_one_line(bundle, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod.mxnet", None)  # import fails as where horovod is not installed
    with pytest.raises(DeviceError, match="--horovod needs horovod built with MXNet support"):
        train(bundle, f"voc:{data}", horovod=True)


def test_data_parallel_over_two_contexts(bundle, data, tmp_path):
    """MXNet data parallel (images split per device, gradients summed by the kvstore), run on two
    CPU contexts: the code path of --gpus 0,1 without GPUs. 4 images per step = 2 per device,
    which a bundle built for 1 image per device must be switched to."""
    out = tmp_path / "frcnn"
    shutil.copytree(bundle, out)
    result = train(out, f"voc:{data}", TrainConfig(epochs=1, batch_size=4, log_interval=1, val_interval=2, **SMALL_RUN),
                   ctx=[mx.cpu(0), mx.cpu(1)])
    assert result["iterations"] == 1 and result["best_map"] is None  # one step of 4 images; not validated
    (record,) = log_records(out, "iter")
    assert record["batches"] == 1 and math.isfinite(record["loss"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "last"]
    after = params_of(out / "checkpoints" / "last" / "detector.params")
    before = params_of(bundle / "detector.params")
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert load_detector(out / "checkpoints" / "last").classes == ["raccoon"]
    with pytest.raises(OptionError, match="--batch-size 3 must be a multiple of the 2 devices"):
        train(out, f"voc:{data}", TrainConfig(batch_size=3), ctx=[mx.cpu(0), mx.cpu(1)], resume=True)


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    import io

    from rich.console import Console

    from bbadapt.engines.gluon.train import console_progress

    records = [{"event": "iter", "epoch": 1, "epochs": 3, "batch": b, "batches": 2, "iteration": b + 1, "lr": 0.01, "rpn_cls": 0.5,
                "rpn_box": 0.25, "rcnn_cls": 1.0, "rcnn_box": 0.125, "loss": 1.875, "samples_per_s": 3.5,
                "logged": b == 1} for b in range(2)]
    records.append({"event": "val", "epoch": 1, "epochs": 3, "metric": "voc07", "map": 0.25, "logged": True})
    plain = io.StringIO()
    with console_progress(Console(file=plain, force_terminal=False, width=200)) as progress:
        for r in records:
            progress(r)
    assert plain.getvalue().splitlines() == [
        "epoch 1/3 batch 2/2: loss=1.875 (rpn_cls=0.500 rpn_box=0.250 rcnn_cls=1.000 rcnn_box=0.125) lr=1.00e-02 3.50 samples/s",
        "epoch 1/3 validation: voc07 mAP 0.2500"]
    bar = io.StringIO()
    with console_progress(Console(file=bar, force_terminal=True, width=200)) as progress:
        for r in records:
            progress(r)
    assert "2/2" in bar.getvalue() and "rcnn_box=0.125" in bar.getvalue() and "\x1b[" in bar.getvalue()


def test_lr_schedule_warms_up_linearly_then_steps_down():
    from bbadapt.engines.gluon.train import TrainConfig, learning_rate

    config = TrainConfig(lr=0.04, warmup_iters=10, warmup_factor=0.25, lr_steps=(2, 4), lr_decay=0.1)
    warm = [learning_rate(config, 0, b) for b in range(12)]
    assert warm[0] == pytest.approx(0.01) and warm[10:] == [pytest.approx(0.04)] * 2
    assert np.allclose(np.diff(warm[:11]), 0.003)  # (0.04 - 0.01) / 10 per iteration
    assert [learning_rate(config, e, 0) for e in range(1, 6)] == pytest.approx([0.04, 0.004, 0.004, 0.0004, 0.0004])
    assert learning_rate(config, 1, 3) == pytest.approx(0.04)  # warmup happens in epoch 0 only


def test_training_on_the_same_photos_as_coco_gives_the_same_losses(trained, bundle, data, tmp_path):
    """The COCO path (JSON written from the VOC files) feeds the identical boxes in the identical
    order, so epoch 0 reproduces the VOC run's losses exactly."""
    out, _ = trained
    train_json = coco_from_voc(data, [f"raccoon-{i}" for i in (1, 2, 3, 4)], tmp_path / "train.json")
    work = tmp_path / "frcnn"
    shutil.copytree(bundle, work)
    train(work, f"coco:{train_json}:{data / 'JPEGImages'}",
          TrainConfig(epochs=1, log_interval=1, val_interval=2, **SMALL_RUN))
    coco = [r["loss"] for r in log_records(work, "iter")]
    voc = [r["loss"] for r in log_records(out, "iter") if r["epoch"] == 1]
    assert coco == voc


def test_evaluate_refuses_a_size_too_small_for_the_proposals(bundle, data):
    from bbadapt.engines.gluon.evaluate import evaluate

    with pytest.raises(OptionError, match="--short-side 32 gives a 2x2 feature map with 60 anchors, fewer than the "
                                          "detector's 100 RPN proposals"):
        evaluate(bundle, f"voc:{data}", EvaluateOptions(short_side=32))
