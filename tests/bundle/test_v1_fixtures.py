"""Version-1 outputs written by bbadapt at b5bd205 (tests/data/v1_bundles, see its README) still work.

Each one loads, re-checks, trains, evaluates and exports through today's public API and
command line: the schema may change how bbadapt reads a manifest, never which files it reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bbadapt
from bbadapt.bundle.schema import CHECKPOINTS, EXPORT_FILES, MANIFEST, TRAIN_LOG, BundleManifest, TorchvisionExport
from bbadapt.engines.gluon.options import TrainConfig
from bbadapt.verify import images

REPO = Path(__file__).resolve().parents[2]
V1 = REPO / "tests" / "data" / "v1_bundles"
RACCOON = REPO / "tests" / "data" / "raccoon_voc"
GENERATED_AT = "/tmp/schema-b5bd205/tests/data/raccoon_voc"  # the dataset path the fixture's run recorded
SMALL = TrainConfig(epochs=1, short_side=192, max_size=320, log_interval=1, hybridize=False)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def v1(tmp_path) -> Path:
    """A copy of the fixtures; the training run's dataset path points at this checkout's raccoon set."""
    copy = tmp_path / "v1"
    shutil.copytree(V1, copy, symlinks=True)
    for manifest in (copy / "detector" / CHECKPOINTS).glob(f"epoch-*/{MANIFEST}"):
        manifest.write_text(manifest.read_text().replace(GENERATED_AT, str(RACCOON)))
    return copy


@pytest.fixture
def one_image(tmp_path) -> str:
    """A VOC set of one training and one validation photo: a run of one step."""
    from tests.engines.gluon.raccoon import raccoon_voc

    return f"voc:{raccoon_voc(tmp_path / 'voc', train=[1], val=[12])}"


def bundle_only(v1: Path) -> Path:
    """The detector bundle as convert wrote it (the training run's checkpoints and log moved away)."""
    detector = v1 / "detector"
    shutil.rmtree(detector / CHECKPOINTS)
    (detector / TRAIN_LOG).unlink()
    return detector


# ---------------------------------------------------------------- the backbone bundle


def test_the_v1_backbone_loads_and_classifies_cifar_tiles(v1):
    import mxnet as mx

    net = bbadapt.load_backbone(v1 / "backbone")
    tiles = np.load(images.data_dir() / "cifar10-tiles" / "cifar10_grid_tiles.npy")[:20]
    labels = np.load(images.data_dir() / "cifar10-tiles" / "cifar10_grid_labels.npy")[:20]
    logits = net(mx.nd.array(tiles.transpose(0, 3, 1, 2) * 255.0)).asnumpy()  # the bundle takes rgb255
    assert logits.shape == (20, 10) and (logits.argmax(1) == labels).mean() >= 0.9


def test_the_v1_backbone_rechecks_with_the_cli(v1):
    weights = images.data_dir() / "cifar_resnet20_v1-symbol.json"  # the file converted, moved (sha256-verified)
    result = cli("check", v1 / "backbone", "--weights", weights)
    assert result.returncode == 0, result.stderr
    assert "check PASSED" in result.stdout + result.stderr
    assert json.loads((v1 / "backbone" / "report.json").read_text())["passed"] is True


def test_the_v1_backbone_exports_to_onnx(v1, tmp_path):
    result = cli("export", v1 / "backbone", "--onnx", tmp_path / "cifar.onnx")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cifar.onnx").stat().st_size > 1_000_000


# ---------------------------------------------------------------- the detector bundle


def test_the_v1_detector_loads_and_detects(v1):
    import mxnet as mx

    net = bbadapt.load_detector(v1 / "detector", ctx=mx.cpu())
    raw, _ = images.photos((192, 240), limit=1)
    ids, scores, boxes = net(mx.nd.array(raw))
    assert np.all(np.isfinite(scores.asnumpy())) and boxes.shape[-1] == 4


def test_the_v1_detector_rechecks_with_the_cli(v1):
    result = cli("check", v1 / "detector", "--weights", v1 / "weights" / "resnet-18-symbol.json")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "check PASSED" in out and "training check PASSED" in out


def test_the_v1_detector_trains_one_step(v1, one_image):
    from bbadapt.engines.gluon.train import train

    bundle = bundle_only(v1)
    summary = train(bundle, one_image, SMALL)
    assert (summary["epochs"], summary["iterations"]) == (1, 1)
    assert all(np.isfinite(v) for v in summary["losses"].values())
    written = BundleManifest.from_json(bundle / CHECKPOINTS / "last" / MANIFEST)
    assert written.checkpoint.epoch == 1 and written.detector == BundleManifest.from_json(bundle / MANIFEST).detector


def test_the_v1_detector_evaluates(v1, one_image):
    from bbadapt.engines.gluon.evaluate import evaluate

    result = evaluate(v1 / "detector", one_image)
    assert result["metric"] == "voc07" and 0.0 <= result["map"] <= 1.0 and result["epoch"] is None
    assert result["short_side"] == 192  # the detector's own setting (the bundle was never trained)


def test_the_v1_detector_exports_an_mxnet_symbol(v1, tmp_path):
    """The thin body has no torchvision counterpart (its widths are not 64..512): the symbol export it is."""
    result = cli("export", v1 / "detector", "--symbol", tmp_path / "frcnn")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "frcnn-symbol.json").is_file() and (tmp_path / "frcnn-0000.params").is_file()


# ---------------------------------------------------------------- the training checkpoint


def test_the_v1_checkpoint_evaluates_to_the_map_its_run_recorded(v1):
    from bbadapt.engines.gluon.evaluate import evaluate

    last = v1 / "detector" / CHECKPOINTS / "last"
    recorded = json.loads((last / MANIFEST).read_text())["checkpoint"]
    result = evaluate(last, f"voc:{RACCOON}")
    assert (result["epoch"], result["short_side"], result["max_size"]) == (1, 192, 320)  # as the run trained
    # the same weights on the same images: the run's own validation figure (a CPU with other vector units
    # may reorder near-tied boxes, hence not bit-for-bit)
    assert result["map"] == pytest.approx(recorded["val_map"], abs=1e-3)


def test_the_v1_checkpoint_resumes(v1):
    from bbadapt.engines.gluon.train import train

    bundle = v1 / "detector"
    summary = train(bundle, f"voc:{RACCOON}", TrainConfig(epochs=2, short_side=192, max_size=320), resume=True)
    assert (summary["started_at_epoch"], summary["epochs"], summary["iterations"]) == (1, 2, 60)
    last = BundleManifest.from_json(bundle / CHECKPOINTS / "last" / MANIFEST)
    assert last.checkpoint.epoch == 2 and last.checkpoint.config["lr"] == 0.00125  # the run's schedule, continued


def test_the_v1_checkpoint_is_a_start_point_for_a_new_run(v1, tmp_path, one_image):
    from bbadapt.engines.gluon.train import train

    start = tmp_path / "start"
    shutil.copytree(v1 / "detector" / CHECKPOINTS / "epoch-0001", start)
    summary = train(start, one_image, SMALL)
    assert (summary["started_at_epoch"], summary["iterations"]) == (0, 1)


def test_the_v1_checkpoint_exports_an_mxnet_symbol_and_is_no_recheck_target(v1, tmp_path):
    last = v1 / "detector" / CHECKPOINTS / "last"
    result = cli("export", last, "--symbol", tmp_path / "trained")
    assert result.returncode == 0, result.stderr
    refused = cli("check", last)
    assert refused.returncode == 1 and "is a training checkpoint" in refused.stderr


# ---------------------------------------------------------------- the torchvision export


def test_the_v1_torchvision_export_is_recognised_as_bbadapts_own(v1):
    """Its 45 MB weights are not committed (see the README): the config and the --force ownership test."""
    from converters.writers.torchvision_detector import export_ownership_problem

    export = v1 / "torchvision"
    config = TorchvisionExport.from_json(export / "config.json")
    assert config.classes == ("raccoon",) and config.runtime in {p.name for p in export.iterdir()}
    assert {p.name for p in export.iterdir()} <= EXPORT_FILES
    assert export_ownership_problem(export) is None  # --force may replace it
    (export / "notes.txt").write_text("mine")
    assert "files bbadapt did not write" in export_ownership_problem(export)


def test_the_v1_torchvision_export_config_builds_with_the_shipped_runtime(v1):
    """Today's runtime builds the model a version-1 config describes (its weights are not here to load).

    In a child process: this worker has MXNet loaded, and loading torch's native libraries beside it in a
    long-lived worker once crashed the worker on CI (a segfault inside the import)."""
    code = ("import sys; from converters.writers.torchvision_detector import import_runtime; "
            "from pathlib import Path; export = Path(sys.argv[1]); runtime = import_runtime(export); "
            "model = runtime.GluonFasterRCNN(runtime.read_config(export)); "
            "print(sum(p.numel() for p in model.parameters()))")
    result = subprocess.run([sys.executable, "-c", code, str(v1 / "torchvision")], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) > 11_000_000  # a ResNet-18 body and the heads
