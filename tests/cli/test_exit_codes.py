"""Exit code 2 means invalid arguments, nothing else: a file or bundle whose content is wrong exits 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bbadapt.core.spec import parse_spec
from tests.py2pickle import dumps as py2_dumps


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BBADAPT_DEBUG"}
    env.update(COLUMNS="200", PYTHONDONTWRITEBYTECODE="1", MXNET_HOME=str(cwd / "mxnet-home"))
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("... ")]
    assert len(lines) == 1 and lines[0].startswith("bbadapt: error: "), result.stderr
    return lines[0]


def test_blobs_that_are_not_a_detectron_resnet_exit_1(tmp_path):
    pkl = tmp_path / "other.pkl"
    pkl.write_bytes(py2_dumps({"blobs": {"conv1_w": np.zeros((2, 3, 1, 1), np.float32)}}))
    result = run_cli("convert", "--weights", pkl, "-o", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 1 and "not a Detectron ResNet" in error_line(result)


def test_a_bundle_with_a_bogus_plan_step_exits_1(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = {"schema_version": 1, "kind": "backbone", "model": "cifar_resnet20_v1",
                "arch": {"zoo": "cifar_resnet20_v1"}, "plan": [{"op": "bogus"}],
                "source": parse_spec("cifar").to_dict(), "target": parse_spec("rgb255").to_dict()}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "backbone.params").write_bytes(b"")
    result = run_cli("export", bundle, "--torchvision", tmp_path / "x.safetensors", cwd=tmp_path)
    line = error_line(result)
    assert result.returncode == 1 and "unknown plan step 'bogus'" in line and "damaged plan" in line
    assert not (tmp_path / "x.safetensors").exists()


def test_an_unknown_model_name_is_still_an_invalid_argument(tmp_path):
    result = run_cli("convert", "resnet18_v9", "--weights", "random", cwd=tmp_path)
    assert result.returncode == 2 and "unknown model" in error_line(result)
