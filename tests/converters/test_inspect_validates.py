"""``bbadapt inspect`` reads every format completely: unsafe or damaged files exit 1, never "no problems found".

The CLI runs in a subprocess where mxnet cannot be imported (inspect promises to work
without it); every file is built here.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.readers import safetensors_io, torchvision

NO_MXNET = ("import sys; sys.modules['mxnet'] = None; from bbadapt.cli import main; "
            "sys.argv = ['bbadapt'] + sys.argv[1:]; sys.exit(main())")


def inspect(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BBADAPT_DEBUG"}
    env.update(COLUMNS="200", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", NO_MXNET, "inspect", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bbadapt: error: "), result.stderr
    assert "no problems found" not in result.stdout and "internal error" not in lines[0]
    return lines[0]


def resnet18_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    arrays = {}
    for name, shape in torchvision.expected_shapes(18).items():
        if name.endswith("num_batches_tracked"):
            arrays[name] = np.array(7, dtype=np.int64)
        elif name.endswith("running_var"):
            arrays[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            arrays[name] = rng.normal(0, 0.05, shape).astype(np.float32)
    return arrays


@pytest.fixture
def safetensors_file(tmp_path) -> tuple[Path, dict]:
    arrays = resnet18_state_dict()
    path = tmp_path / "resnet18.safetensors"
    path.write_bytes(safetensors_io.dumps(arrays))
    return path, arrays


class Shell:
    """Unpickling this runs a shell command: what a hostile 'weights' pickle does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("wrap", ["bare", "detectron-blobs"])
def test_a_pickle_that_would_run_os_system_is_refused_and_not_run(tmp_path, wrap):
    marker = tmp_path / "pwned"
    evil = Shell(f"touch {marker}")
    payload = evil if wrap == "bare" else {"blobs": {"conv1_w": evil, "res2_0_branch2a_w": evil}}
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    line = one_error_line(inspect(path, cwd=tmp_path))
    assert "calls posix.system" in line and "refused" in line
    assert not marker.exists()


def test_a_valid_safetensors_state_dict_shows_tensors_architecture_and_bn_health(tmp_path, safetensors_file):
    path, arrays = safetensors_file
    result = inspect(path, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "torchvision" and info["status"] == "ok" and info["problems"] == []
    assert info["tensors"]["count"] == len(arrays) - 20  # num_batches_tracked counters are not weights
    assert info["architecture"]["depth"] == 18 and info["architecture"]["classes"] == 1000
    assert info["batchnorm"]["count"] == 20
    text = inspect(path, cwd=tmp_path)
    assert text.returncode == 0 and "torchvision resnet18" in text.stdout and "no problems found" in text.stdout


def test_batchnorm_trouble_in_safetensors_is_reported_and_negative_variance_is_damage(tmp_path):
    arrays = resnet18_state_dict()
    arrays["layer2.0.bn1.running_var"][:3] = 1e-9
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(safetensors_io.dumps(arrays))
    result = inspect(path, cwd=tmp_path)
    assert result.returncode == 0 and "3 channels in 1 BatchNorms with running_var < 1e-06" in result.stdout
    arrays["layer3.1.bn2.running_var"][0] = -1.0
    path.write_bytes(safetensors_io.dumps(arrays))
    result = inspect(path, cwd=tmp_path)
    assert result.returncode == 1 and "negative running_var" in result.stdout


def test_a_truncated_safetensors_file_is_damaged(tmp_path, safetensors_file):
    path, _ = safetensors_file
    path.write_bytes(path.read_bytes()[:-1000])
    assert "truncated" in one_error_line(inspect(path, cwd=tmp_path))


def test_a_safetensors_header_that_lies_about_a_shape_is_damaged(tmp_path, safetensors_file):
    path, _ = safetensors_file
    data = path.read_bytes()
    (n,) = np.frombuffer(data[:8], dtype="<u8")
    header = json.loads(data[8:8 + int(n)])
    header["conv1.weight"]["shape"] = [64, 3, 7, 6]  # the span still holds 64x3x7x7 floats
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (int(n) - len(text))
    path.write_bytes(data[:8] + text + data[8 + int(n):])
    line = one_error_line(inspect(path, cwd=tmp_path))
    assert "conv1.weight" in line and "corrupt file" in line


def test_safetensors_of_another_network_is_still_read_and_described(tmp_path):
    path = tmp_path / "other.safetensors"
    path.write_bytes(safetensors_io.dumps({"encoder.weight": np.ones((4, 4), np.float32)}))
    result = inspect(path, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "safetensors" and info["tensors"]["count"] == 1
    assert any("not a torchvision ResNet" in p for p in info["problems"])
