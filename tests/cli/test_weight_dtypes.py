"""The command line on weights of every dtype: a float16 file converts with one note; integers are one line.

The files are the packaged CIFAR ResNet-20 weights, cast and written by ``mx.nd.save``; the real
CLI runs in a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CIFAR_PARAMS = REPO / "bbadapt" / "data" / "cifar_resnet20_v1-0000.params"


def cast_weights(path: Path, dtype: str) -> Path:
    import mxnet as mx

    mx.nd.save(str(path), {k: v.astype(dtype) for k, v in mx.nd.load(str(CIFAR_PARAMS)).items()})
    return path


def convert(weights: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", "convert", "cifar_resnet20_v1", "--weights", str(weights),
                           "--sizes", "32x32", "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_integer_or_boolean_weights_are_one_line_exit_1_before_any_check_and_nothing_is_written(tmp_path, dtype):
    result = convert(cast_weights(tmp_path / f"{dtype}.params", dtype), tmp_path / "out")
    errors = [line for line in result.stderr.splitlines() if line.startswith("bbadapt: error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert f" is {dtype} (and 106 more tensors); weights must be floating point" in errors[0]
    assert "checking" not in result.stderr and "Warning" not in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{dtype}.params"]


def test_float16_weights_convert_and_the_note_says_how_they_were_stored(tmp_path):
    result = convert(cast_weights(tmp_path / "half.params", "float16"), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    note = "weights stored as float16 (107 tensors) in half.params: converted to float32 exactly"
    assert f"bbadapt: note: {note}" in result.stderr and "Warning" not in result.stderr
    assert any(n.startswith(note) for n in json.loads((tmp_path / "out" / "report.json").read_text())["notes"])
