"""The command line on torchvision and Detectron files, and exports to torchvision and ONNX.

Success paths (convert, check, export) and refusals, with tests/cli/test_cli_errors.py's
contract for refusals: exit code, exactly one stderr line, no traceback, nothing written.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.readers import safetensors_io
from tests import py2pickle
from tests.cli.test_cli_errors import assert_refused, run_cli
from tests.conftest import calibrated
from tests.converters.test_detectron import blobs_from_gluon
from tests.converters.test_torchvision import torchvision_state

SIZES = "64x64"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    tv = root / "resnet18.safetensors"
    safetensors_io.save(tv, torchvision_state(calibrated("resnet18_v1b")), {"format": "pt"})
    det = root / "R-18.pkl"
    det.write_bytes(py2pickle.dumps({"blobs": blobs_from_gluon(calibrated("resnet18_v1"), 18)}))
    return {"torchvision": tv, "detectron": det}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("mxnet-home")


@pytest.fixture(scope="module")
def bundles(files, home, tmp_path_factory):
    """One converted bundle per format, made through the CLI (and checked to have succeeded)."""
    root = tmp_path_factory.mktemp("bundles")
    made = {}
    for name, path in files.items():
        result = run_cli("convert", "--weights", path, "--out", root / name, "--sizes", SIZES, cwd=root, mxnet_home=home)
        assert result.returncode == 0, result.stderr
        assert "check PASSED" in result.stdout
        made[name] = root / name
    return made


@pytest.fixture
def cli(tmp_path, home):
    return lambda *args: run_cli(*args, cwd=tmp_path, mxnet_home=home)


def test_converted_bundles_record_format_arch_and_spec_and_recheck(bundles, cli):
    tv = json.loads((bundles["torchvision"] / "manifest.json").read_text())
    assert tv["arch"] == {"zoo": "resnet18_v1b"} and tv["weights"]["format"] == "torchvision"
    assert tv["source"]["name"] == "imagenet"
    det = json.loads((bundles["detectron"] / "manifest.json").read_text())
    assert det["arch"] == {"builder": "gluon-resnet-v1", "kwargs": {"depth": 18, "classes": 1000}}
    assert det["weights"]["format"] == "detectron" and det["source"]["order"] == "bgr"
    assert det["source"]["mean"] == [102.9801, 115.9465, 122.7717]
    for bundle in bundles.values():
        result = cli("check", bundle, "--sizes", SIZES)
        assert result.returncode == 0, result.stderr


def test_formats_lists_torchvision_and_detectron(cli):
    result = cli("formats")
    assert result.returncode == 0 and "torchvision" in result.stdout and "detectron" in result.stdout


def test_export_to_torchvision_safetensors_then_convert_it_back(bundles, cli, tmp_path):
    result = cli("export", bundles["torchvision"], "--torchvision", "r18.safetensors")
    assert result.returncode == 0, result.stderr
    assert "input spec it expects: imagenet" in result.stdout and "check passed: yes" in result.stdout
    tensors, metadata = safetensors_io.load(tmp_path / "r18.safetensors")
    assert metadata["bbadapt.input_spec"] == "imagenet" and "layer4.1.bn2.running_var" in tensors
    result = cli("convert", "--weights", "r18.safetensors", "--out", "again", "--sizes", SIZES)
    assert result.returncode == 0, result.stderr


def test_export_to_onnx_from_the_cli(bundles, cli, tmp_path):
    result = cli("export", bundles["detectron"], "--onnx", "r18.onnx")
    assert result.returncode == 0, result.stderr
    assert "checked with: onnxruntime" in result.stdout and "ONNX opset: 13" in result.stdout
    assert (tmp_path / "r18.onnx").stat().st_size > 40_000_000


# ------------------------------------------------------------------ refusals


def test_a_malicious_pickle_is_refused_and_never_runs(cli, tmp_path):
    marker = tmp_path / "pwned"
    command = f"touch {marker}".encode()
    evil = tmp_path / "R-50.pkl"
    evil.write_bytes(b"\x80\x02}(U\x07conv1_wcposix\nsystem\nU" + bytes([len(command)]) + command + b"\x85Ru.")
    result = cli("convert", "--weights", evil, "--out", tmp_path / "out")
    assert_refused(result, 1, tmp_path=tmp_path, out=tmp_path / "out", mentions=("posix.system", "refused"))
    assert not marker.exists()


def test_damaged_and_mismatched_files_are_one_line_refusals(files, cli, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(files["torchvision"].read_bytes()[:200_000])
    assert_refused(cli("convert", "--weights", cut, "--out", tmp_path / "o1"), 1, tmp_path=tmp_path,
                   out=tmp_path / "o1", mentions=("truncated",))
    assert_refused(cli("convert", "--weights", files["torchvision"], "--format", "detectron", "--out", tmp_path / "o2"),
                   1, tmp_path=tmp_path, out=tmp_path / "o2", mentions=("does not look like detectron",))
    assert_refused(cli("convert", "resnet50_v1b", "--weights", files["torchvision"], "--out", tmp_path / "o3"),
                   2, tmp_path=tmp_path, out=tmp_path / "o3", mentions=("contradicts the file",))
    cut_pkl = tmp_path / "cut.pkl"
    cut_pkl.write_bytes(files["detectron"].read_bytes()[:5000])
    assert_refused(cli("convert", "--weights", cut_pkl, "--out", tmp_path / "o4"), 1, tmp_path=tmp_path,
                   out=tmp_path / "o4", mentions=("truncated/corrupt",))


def test_integer_tensors_nan_and_missing_tensors_are_named(cli, tmp_path):
    state = torchvision_state(calibrated("resnet18_v1b"))
    for name, change, mention in (("int", lambda s: s.update({"fc.weight": s["fc.weight"].astype(np.int32)}),
                                   "tensor fc.weight is int32"),
                                  ("nan", lambda s: s["layer3.0.bn1.running_var"].__setitem__(0, np.nan), "NaN/Inf"),
                                  ("missing", lambda s: s.pop("layer3.0.conv2.weight"), "layer3.0.conv2.weight")):
        copy = {k: v.copy() for k, v in state.items()}
        change(copy)
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(safetensors_io.dumps(copy))
        assert_refused(cli("convert", "--weights", path, "--out", tmp_path / name), 1, tmp_path=tmp_path,
                       out=tmp_path / name, mentions=(mention,))


def test_exports_refuse_existing_files_and_incompatible_bundles(bundles, cli, tmp_path):
    existing = tmp_path / "r.safetensors"
    existing.write_bytes(b"mine")
    assert_refused(cli("export", bundles["torchvision"], "--torchvision", existing), 1, tmp_path=tmp_path,
                   mentions=("already exists",))
    assert existing.read_bytes() == b"mine"
    line = assert_refused(cli("export", bundles["detectron"], "--torchvision", "x.safetensors"), 2, tmp_path=tmp_path,
                          mentions=("not torchvision-compatible",))
    assert "detectron_R-18 is not torchvision-compatible" in line
    assert not (tmp_path / "x.safetensors").exists()
    existing_onnx = tmp_path / "r.onnx"
    existing_onnx.write_bytes(b"mine")
    assert_refused(cli("export", bundles["torchvision"], "--onnx", existing_onnx), 1, tmp_path=tmp_path,
                   mentions=("already exists",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.onnx", "r.safetensors"]
