"""The command line on MXNet symbolic-zoo checkpoints and Gluon export/bare files: success and refusals.

Refusals follow tests/cli/test_cli_errors.py's contract: exit code, exactly one stderr line, no
traceback, no output directory or staging leftovers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from tests.cli.test_cli_errors import DATA, assert_refused, run_cli
from tests.converters.test_mxnet_symbol import write_checkpoint

SIZES = "64x64,57x71"


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("r18"), "resnet-18")


@pytest.fixture
def cli(tmp_path, tmp_path_factory):
    home = tmp_path_factory.mktemp("mxnet-home")
    return lambda *args: run_cli(*args, cwd=tmp_path, mxnet_home=home)


def test_a_symbolic_zoo_checkpoint_converts_and_rechecks(r18, cli, tmp_path):
    out = tmp_path / "out" / "r18"
    result = cli("convert", "--weights", r18[0], "--to", "imagenet", "--out", out, "--sizes", SIZES)
    assert result.returncode == 0, result.stderr
    assert "check PASSED" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"]["builder"] == "mxnet-symbolic-resnet"
    assert manifest["weights"]["format"] == "mxnet-symbol" and manifest["source"]["scale"] == 1.0
    result = cli("check", out, "--sizes", "64x64")
    assert result.returncode == 0, result.stderr
    assert "check PASSED" in result.stdout


def test_a_gluon_export_pair_is_identified_from_its_graph(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("convert", "--weights", DATA / "cifar_resnet20_v2-symbol.json", "--out", out, "--sizes", "32x32")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == {"zoo": "cifar_resnet20_v2"} and manifest["weights"]["format"] == "gluon-export"


def test_formats_lists_the_mxnet_formats(cli):
    result = cli("formats")
    assert result.returncode == 0
    for name in ("mxnet-symbol", "gluon-export", "gluon-params"):
        assert name in result.stdout


# --- refusals ---------------------------------------------------------------------------------

def _copy_pair(r18, directory: Path, change=None) -> Path:
    json_path = directory / r18[0].name
    shutil.copy(r18[0], json_path)
    if change is not None:
        arrays = mx.nd.load(str(r18[1]))
        change(arrays)
        mx.nd.save(str(directory / r18[1].name), arrays)
    return json_path


def _drop_and_add(arrays):
    del arrays["aux:bn1_moving_mean"]
    arrays["arg:stage1_unit3_conv1_weight"] = mx.nd.ones((64, 64, 3, 3))


def _nan(arrays):
    arrays["arg:conv0_weight"][0, 0, 0, 0] = np.nan


@pytest.mark.parametrize("change,mentions", [
    (None, ("no parameters next to", "resnet-18-0000.params")),
    (_drop_and_add, ("bn1_moving_mean", "stage1_unit3_conv1_weight")),
    (lambda a: a.update({"arg:fc1_bias": a["arg:fc1_bias"].astype("int32")}), ("tensor arg:fc1_bias is int32",)),
    (_nan, ("NaN/Inf", "conv0_weight")),
], ids=["missing-params", "extra-and-missing-tensors", "int32", "nan"])
def test_bad_symbolic_checkpoints_are_refused(r18, cli, tmp_path, change, mentions):
    json_path = _copy_pair(r18, tmp_path, change)
    out = tmp_path / "out"
    assert_refused(cli("convert", "--weights", json_path, "--out", out), 1, tmp_path=tmp_path, out=out,
                   mentions=mentions)


def test_truncated_graph_and_params_are_refused(r18, cli, tmp_path):
    out = tmp_path / "out"
    json_path = _copy_pair(r18, tmp_path, lambda a: None)
    params = tmp_path / r18[1].name
    params.write_bytes(params.read_bytes()[:100_000])
    assert_refused(cli("convert", "--weights", json_path, "--out", out), 1, tmp_path=tmp_path, out=out,
                   mentions=("truncated",))
    json_path.write_text(r18[0].read_text()[:3000])
    for fmt in (("--format", "mxnet-symbol"), ("--format", "gluon-export"), ()):
        assert_refused(cli("convert", "--weights", json_path, *fmt, "--out", out), 1,
                       tmp_path=tmp_path, out=out, mentions=("not valid JSON", "truncated?"))


def test_a_format_flag_that_does_not_match_is_refused(r18, cli, tmp_path):
    out = tmp_path / "out"
    assert_refused(cli("convert", "--weights", r18[0], "--format", "gluon-export", "--out", out), 1,
                   tmp_path=tmp_path, out=out, mentions=("does not look like gluon-export", "detected: mxnet-symbol"))


def test_a_bare_params_file_needs_its_model_and_an_arch_must_fit_the_graph(cli, tmp_path):
    bare = tmp_path / "cifar_resnet20_v1-0000.params"
    shutil.copy(DATA / bare.name, bare)  # no graph beside it
    out = tmp_path / "out"
    assert_refused(cli("convert", "--weights", bare, "--out", out), 2, tmp_path=tmp_path, out=out,
                   mentions=("does not say its architecture", "could be cifar_resnet20_v1"))
    assert_refused(cli("convert", "cifar_resnet20_v2", "--weights", DATA / "cifar_resnet20_v1-symbol.json",
                       "--out", out), 2, tmp_path=tmp_path, out=out, mentions=("contradicts",))
    result = cli("convert", "cifar_resnet20_v1", "--weights", bare, "--out", out, "--sizes", "32x32")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["weights"]["format"] == "gluon-params"


def test_check_refuses_when_the_graph_now_pairs_with_a_newer_epoch(r18, cli, tmp_path):
    """A -symbol.json reads the newest -EEEE.params beside it: a re-check must not silently compare with another epoch."""

    work = tmp_path / "ckpt"
    work.mkdir()
    json_path = Path(shutil.copy(r18[0], work))
    shutil.copy(r18[1], work)
    out = tmp_path / "out"
    assert cli("convert", "--weights", json_path, "--out", out, "--sizes", "64x64").returncode == 0
    shutil.copy(r18[1], work / r18[1].name.replace("-0000.params", "-0001.params"))  # a later epoch appears
    result = cli("check", out, "--sizes", "64x64")
    assert_refused(result, 1, tmp_path=tmp_path, mentions=("now reads", "0001.params"))
