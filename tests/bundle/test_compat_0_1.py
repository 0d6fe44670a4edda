"""Bundles written by bbadapt 0.1.0 still load and re-check after the layout changed.

0.1.0 stored architecture builders as module paths ("converters.mxnet_symbol:symbolic_resnet");
those modules moved, so the registry maps the old names to today's stable ones. The fixture is a
real 0.1.0 output: the packaged pretrained CIFAR ResNet-20 v1 converted with ``--bn affine``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bbadapt.bundle.backbone import load_backbone
from bbadapt.core.architectures import arch_problem, rebuild
from bbadapt.core.registry import ALIASES_0_1, stable_name
from bbadapt.core.trace import block_paths
from bbadapt.verify import images

BUNDLES = Path(__file__).resolve().parents[1] / "data" / "bundles"
OLD = BUNDLES / "cifar_resnet20_v1-affine-0.1.0"


@pytest.fixture
def old_bundle(tmp_path) -> Path:
    """A copy of the 0.1.0 bundle whose weights path points at this checkout's copy of the same file."""
    copy = tmp_path / "old"
    shutil.copytree(OLD, copy)
    text = (copy / "manifest.json").read_text()
    manifest = json.loads(text)
    assert manifest["versions"]["bbadapt"] == "0.1.0"
    converted_from = str(Path(manifest["weights"]["path"]).parent)  # the folder it was converted from, then
    (copy / "manifest.json").write_text(text.replace(converted_from, str(images.data_dir())))
    return copy


def test_a_0_1_0_bundle_loads_and_classifies_like_the_original(old_bundle):
    net = load_backbone(old_bundle)
    tiles = np.load(images.data_dir() / "cifar10-tiles" / "cifar10_grid_tiles.npy")[:20]
    import mxnet as mx

    x = mx.nd.array(tiles.transpose(0, 3, 1, 2) * 255.0)  # the bundle's target spec is rgb255
    assert net(x).shape == (20, 10)
    assert any(type(b).__name__ == "FrozenAffine" for b in block_paths(net).values())


def test_a_0_1_0_bundle_rechecks_with_the_current_cli(old_bundle):
    result = subprocess.run([sys.executable, "-m", "bbadapt.cli", "check", str(old_bundle)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "check PASSED" in result.stdout + result.stderr
    assert json.loads((old_bundle / "report.json").read_text())["passed"] is True


@pytest.mark.parametrize("old_name", sorted(ALIASES_0_1))
def test_every_0_1_0_builder_name_maps_to_a_registered_builder(old_name):
    assert arch_problem({"builder": old_name, "kwargs": {}}) is None
    assert stable_name(old_name) != old_name


def test_a_0_1_0_symbolic_arch_record_rebuilds_the_same_network():
    record = json.loads((BUNDLES / "symbolic-resnet18-arch-0.1.0.json").read_text())
    assert record["builder"] == "converters.mxnet_symbol:symbolic_resnet"
    old = rebuild(record)
    new = rebuild({**record, "builder": "mxnet-symbolic-resnet"})
    assert {k: p.shape for k, p in old.collect_params().items()} == {k: p.shape for k, p in new.collect_params().items()}


def test_a_module_path_that_was_never_a_builder_is_still_refused():
    assert "names no architecture builder" in arch_problem({"builder": "converters.mxnet_symbol:read"})
    assert "names no architecture builder" in arch_problem({"builder": "os:system"})
