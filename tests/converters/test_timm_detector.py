"""A detector on a timm-read backbone goes the whole way, as any other (issue 27, item 4).

timm ``resnet18`` (the smallest depth; ``pretrained=False``, statistics measured on photos), saved by timm's own
``save_for_hf`` as a folder whose ``config.json`` gives the normalization. Then the real command line, each step
checked by the proof it already has: ``convert --detector faster-rcnn`` (the folder's mean/std as source spec;
the backbone check), ``train`` with the MXNet engine, ``export --torchvision`` of that checkpoint (proven against
the GluonCV detector before it is written), and ``train`` + ``evaluate`` of the export with the torch engine in a
process where mxnet and gluoncv cannot be imported.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.engines.torch.test_torch_engine import bbadapt as bbadapt_without_mxnet
from tests.engines.torch.test_torch_engine import records, voc
from tests.timm_models import save_all, timm_model

pytest.importorskip("timm")
pytest.importorskip("safetensors")

# 320 px: a 20x30 stride-16 map, 9000 anchors, above the default 2000 RPN proposals (128 px gives 960)
SIZES = ["--short-side", "320", "--max-size", "480", "--cpu", "--log-interval", "1"]


def bbadapt(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=1200)


def test_a_timm_folder_becomes_a_detector_that_trains_in_both_engines_and_exports_to_torchvision(tmp_path):
    # calibrated: statistics measured with the affine parameters in place, so C4 features keep a trained
    # net's scale (tests/timm_models.py); the default fixture's grow to ~1e2 and the first RoI loss is ~240
    folder = save_all(timm_model("resnet18", calibrated=True), tmp_path, "resnet18")["folder"]
    data = voc(tmp_path / "voc", train=[1, 2], val=[9])

    det = tmp_path / "det"
    made = bbadapt("convert", "resnet18_v1b", "--weights", folder, "--detector", "faster-rcnn",
                   "--classes", "raccoon", "--out", det)
    assert made.returncode == 0, made.stderr[-3000:]
    manifest = json.loads((det / "manifest.json").read_text())
    assert manifest["kind"] == "detector" and manifest["check"]["passed"]
    weights = manifest["weights"]
    assert (weights["format"], weights["timm_arch"], weights["gluoncv_twin"]) == ("timm", "resnet18", "resnet18_v1b")
    assert manifest["source"]["name"] == "imagenet" and "pretrained_cfg" in weights["input_spec_note"]

    trained = bbadapt("train", det, "--dataset", f"voc:{data}", "--epochs", 1, "--batch-size", 1, *SIZES)
    assert trained.returncode == 0, trained.stderr[-3000:]
    losses = [r["loss"] for r in records(det, "iter")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses

    exported = tmp_path / "tv"
    written = bbadapt("export", det / "checkpoints" / "last", "--torchvision", exported)
    assert written.returncode == 0, written.stderr[-3000:]
    assert "check passed: yes" in written.stdout and json.loads((exported / "check.json").read_text())["passed"]

    torch_trained = bbadapt_without_mxnet("train", exported, "--dataset", f"voc:{data}", "--epochs", 1,
                                          "--batch-size", 1, *SIZES, timeout=900)
    assert torch_trained.returncode == 0, torch_trained.stderr[-3000:]
    assert (exported / "checkpoints" / "last" / "model.safetensors").exists()
    scored = bbadapt_without_mxnet("evaluate", exported / "checkpoints" / "last", "--dataset", f"voc:{data}",
                                   "--short-side", "320", "--max-size", "480", "--cpu")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "voc07 mAP" in scored.stdout

