"""Keras weights through the command line: convert, re-check, and every refusal as one line."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests import keras_reference as kr
from tests.cli.test_cli_errors import assert_refused, run_cli
from tests.converters.test_keras import R50, dummy_weights, keras_weights, write


@pytest.fixture
def cli(tmp_path, tmp_path_factory):
    home = tmp_path_factory.mktemp("mxnet-home")
    return lambda *args: run_cli(*args, cwd=tmp_path, mxnet_home=home)


def test_convert_a_keras_v2_file_to_rgb255_then_recheck_the_bundle(tmp_path, cli):
    """V2 needs bbadapt's own Keras-layout network: the recheck rebuilds it from the manifest."""
    weights = write(tmp_path / "weights.h5", "keras3-names", 2, keras_weights(2))
    out = tmp_path / "out"
    result = cli("convert", "--weights", weights, "--to", "rgb255", "--sizes", "48x48", "-o", out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"]["builder"] == "keras-resnet-v2"
    assert manifest["weights"]["format"] == "keras" and manifest["weights"]["keras_model"] == "ResNet50V2"
    assert manifest["source"]["name"] == "tf" and manifest["exact"] and manifest["check"]["passed"]
    recheck = cli("check", out, "--sizes", "37x41")  # rebuilt from the manifest's arch record
    assert recheck.returncode == 0, recheck.stderr


def test_a_keras_v2_backbone_is_refused_as_a_detector_before_the_check(tmp_path, cli):
    """Keras V2 strides sit at the end of each stage (8/16/32/32): no C4 cut; said before minutes of work."""
    weights = write(tmp_path / "weights.h5", "keras3-names", 2, keras_weights(2))
    result = cli("convert", "--weights", weights, "--detector", "faster-rcnn", "--classes", "raccoon",
                 "-o", tmp_path / "out")
    assert_refused(result, 2, tmp_path=tmp_path, out=tmp_path / "out", mentions=("strides",))
    assert "check" not in result.stderr.lower().replace("checkpoint", "")


def test_formats_lists_keras(cli):
    result = cli("formats")
    assert result.returncode == 0 and "keras" in result.stdout and ".weights.h5" in result.stdout


def _file(tmp_path, name: str, version: int = 1, **change) -> str:
    weights = dummy_weights(version, **change)
    return write(tmp_path / name, "legacy-weights", version, weights)


def test_a_truncated_file(tmp_path, cli):
    full = _file(tmp_path, "full.h5")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(Path(full).read_bytes()[:4096])
    result = cli("convert", "--weights", cut, "--format", "keras", "-o", tmp_path / "out")
    assert_refused(result, 1, tmp_path=tmp_path, out=tmp_path / "out", mentions=("truncated",))


def test_a_truncated_file_is_called_damaged_even_without_format(tmp_path, cli):
    full = _file(tmp_path, "full.h5")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(Path(full).read_bytes()[:4096])  # the HDF5 signature survives; h5py cannot open it
    result = cli("convert", "--weights", cut, "-o", tmp_path / "out")
    assert_refused(result, 1, tmp_path=tmp_path, out=tmp_path / "out", mentions=("truncated",))


def test_an_hdf5_file_that_is_not_keras(tmp_path, cli):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3, np.float32)
    result = cli("convert", "--weights", path, "-o", tmp_path / "out")
    assert_refused(result, 1, tmp_path=tmp_path, out=tmp_path / "out", mentions=("cannot tell the format",))
    result = cli("convert", "--weights", path, "--format", "keras", "-o", tmp_path / "out")
    assert_refused(result, 1, tmp_path=tmp_path, out=tmp_path / "out", mentions=("does not look like keras",))


def test_a_keras_file_given_another_format(tmp_path, cli):
    path = _file(tmp_path, "k.h5")
    result = cli("convert", "--weights", path, "--format", "gluon-params", "-o", tmp_path / "out")
    assert_refused(result, 1, tmp_path=tmp_path, out=tmp_path / "out", mentions=("detected: keras",))


def test_unknown_and_missing_layers_are_listed(tmp_path, cli):
    weights = dict(dummy_weights(2), my_head=[np.zeros((1, 1), np.float32), np.zeros(1, np.float32)])
    weights.pop("conv4_block2_1_bn")
    specs = [s for s in kr.layer_specs(2, R50, 10) if s.name in weights] + [kr.Layer("Dense", "my_head", [(1, 1), (1,)])]
    kr.write_keras3(tmp_path / "odd.weights.h5", specs, weights)
    result = cli("convert", "--weights", tmp_path / "odd.weights.h5", "-o", tmp_path / "out")
    assert_refused(result, 1, tmp_path=tmp_path, out=tmp_path / "out", mentions=("my_head",))
    weights.pop("my_head")
    kr.write_keras3(tmp_path / "hole.weights.h5", specs[:-1], weights)
    result = cli("convert", "--weights", tmp_path / "hole.weights.h5", "-o", tmp_path / "out")
    assert_refused(result, 1, tmp_path=tmp_path, out=tmp_path / "out", mentions=("conv4_block2_1_bn",))


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_integer_and_boolean_tensors(tmp_path, cli, dtype):
    path = _file(tmp_path, "d.h5", dtype=dtype)
    result = cli("convert", "--weights", path, "-o", tmp_path / "out")
    assert_refused(result, 1, tmp_path=tmp_path, out=tmp_path / "out", mentions=(f" is {np.dtype(dtype).name} (and ",))


def test_nan(tmp_path, cli):
    weights = dummy_weights(1)
    weights["conv5_block3_3_bn"][1] = np.array([np.inf], np.float32)
    path = write(tmp_path / "nan.h5", "legacy-full-model", 1, weights)
    result = cli("convert", "--weights", path, "-o", tmp_path / "out")
    assert_refused(result, 1, tmp_path=tmp_path, out=tmp_path / "out", mentions=("NaN/Inf", "conv5_block3_3_bn"))


def test_an_architecture_that_contradicts_the_file(tmp_path, cli):
    path = _file(tmp_path, "k.h5", version=2)
    result = cli("convert", "resnet101", "--weights", path, "-o", tmp_path / "out")
    assert_refused(result, 2, tmp_path=tmp_path, out=tmp_path / "out", mentions=("ResNet50V2", "candidates"))
