"""`bbadapt convert --detector`: the issue's first command, end to end through the real CLI.

The backbone part is the same conversion and check as without --detector; these tests pin what
the flag adds: a detector bundle that loads, runs on a real photo, re-checks, exports, and the
early refusals (before any weights are read).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.cli.test_cli_errors import assert_refused, run_cli

MODEL = "resnet18_v1b"


@pytest.fixture(scope="module")
def detector_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("detector")
    home = tmp_path_factory.mktemp("mxnet-home")
    result = run_cli("convert", MODEL, "--weights", "random", "--detector", "faster-rcnn", "--classes", "raccoon,dog",
                     "--sizes", "64x64,45x61", "-o", "frcnn", cwd=root, mxnet_home=home)
    return root, home, result


def test_convert_with_detector_writes_a_checked_backbone_and_a_detector(detector_bundle):
    root, _, result = detector_bundle
    assert result.returncode == 0, result.stderr
    manifest = json.loads((root / "frcnn" / "manifest.json").read_text())
    assert manifest["kind"] == "detector" and manifest["check"]["passed"]
    assert manifest["bn"] == "affine"  # the default for a detector: trains like a frozen BN
    section = manifest["detector"]
    assert section["classes"] == ["raccoon", "dog"] and section["layout"] == "c4"
    assert section["input"] == manifest["target"]  # the detector takes the bundle's target spec (rgb255)
    assert (root / "frcnn" / section["params_file"]).is_file()
    assert "Faster R-CNN" in result.stdout
    training = json.loads((root / "frcnn" / "report.json").read_text())["training"]  # the bundle will train
    assert training["passed"] is True and training["bn"] == "affine" and not training["excluded"]
    assert training["worst_max_rel"] < 1e-5
    assert "training check PASSED" in result.stdout
    assert "## Training (gradients)" in (root / "frcnn" / "report.md").read_text()


def test_the_detector_bundle_loads_and_detects_on_a_raw_photo(detector_bundle):
    import mxnet as mx

    import bbadapt
    from bbadapt.verify import images

    root, _, result = detector_bundle
    assert result.returncode == 0, result.stderr
    net = bbadapt.load_detector(root / "frcnn", ctx=mx.cpu())
    raw, _ = images.photos((160, 208), limit=1)  # raw RGB 0..255, no normalization
    ids, scores, boxes = net(mx.nd.array(raw))
    assert ids.shape[-1] == 1 and boxes.shape[-1] == 4
    valid = ids.asnumpy().ravel() >= 0
    assert set(np.unique(ids.asnumpy().ravel()[valid])) <= {0.0, 1.0}  # two classes
    assert np.all(np.isfinite(boxes.asnumpy()))


def test_check_reruns_on_a_detector_bundle(detector_bundle):
    root, home, result = detector_bundle
    assert result.returncode == 0, result.stderr
    again = run_cli("check", "frcnn", "--sizes", "64x64", cwd=root, mxnet_home=home)
    assert again.returncode == 0, again.stderr
    assert "check PASSED" in again.stdout
    assert "training check PASSED" in again.stdout  # the rewritten report keeps its training section
    assert json.loads((root / "frcnn" / "report.json").read_text())["training"]["passed"] is True


def test_cifar_backbones_are_refused_for_detection_before_any_work(tmp_path):
    result = run_cli("convert", "cifar_resnet20_v1", "--weights", "random", "--detector", "faster-rcnn",
                     "--classes", "raccoon", "-o", "out", cwd=tmp_path, mxnet_home=tmp_path / "home")
    assert_refused(result, 2, tmp_path=tmp_path, out=tmp_path / "out", mentions=("CIFAR",))
    assert "random weights" not in result.stderr  # refused before the weights were made


def test_an_unknown_layout_is_a_usage_error(tmp_path):
    result = run_cli("convert", MODEL, "--weights", "random", "--detector", "faster-rcnn", "--classes", "a",
                     "--layout", "retina", "-o", "out", cwd=tmp_path, mxnet_home=tmp_path / "home")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_detector_on_weights_from_another_format_reloads_through_its_arch_record(tmp_path):
    """The seed's case: an original MXNet symbolic ResNet-18 (not a zoo net) as a detector backbone."""
    import mxnet as mx

    import bbadapt
    from bbadapt.verify import images
    from tests.converters.test_mxnet_symbol import write_checkpoint

    json_path, _ = write_checkpoint(tmp_path / "r18", "resnet-18")
    result = run_cli("convert", "--weights", json_path, "--detector", "faster-rcnn", "--classes", "raccoon",
                     "--sizes", "64x64", "-o", "frcnn", cwd=tmp_path, mxnet_home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "frcnn" / "manifest.json").read_text())
    assert manifest["arch"]["builder"] == "mxnet-symbolic-resnet"
    net = bbadapt.load_detector(tmp_path / "frcnn", ctx=mx.cpu())
    raw, _ = images.photos((128, 160), limit=1)
    ids, scores, boxes = net(mx.nd.array(raw))
    assert np.all(np.isfinite(scores.asnumpy())) and boxes.shape[-1] == 4
