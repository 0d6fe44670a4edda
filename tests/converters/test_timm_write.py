"""Bundles out to timm: a folder timm loads as its own (strict), checked in timm before it is written.

Judges: timm's model built from the export (full and features_only) against the bundle (inside the export) and
against the original timm model the bundle was converted from (here), fed raw pixels through the export's
config.json mean/std.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import bbadapt
from bbadapt.core.spec import PRESETS
from bbadapt.platform.errors import ModelError, OutputError
from bbadapt.verify import images
from converters.writers import timm as timm_out
from tests.timm_models import forward, save_all, timm_model

pytest.importorskip("timm")

SIZE = (64, 64)
FORMS = {"fused": ("bn", "fused"), "global-stats": ("bn", "global-stats"), "convfold": ("conv", "affine")}


@pytest.fixture(scope="module")
def r50d(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm-out")
    model = timm_model("resnet50d", seed=3)
    files = save_all(model, root, "r50d")
    bundles = {}
    for form, (fold, bn) in FORMS.items():
        report, _ = bbadapt.convert(None, root / form, bbadapt.ConvertOptions(weights=str(files["folder"]), fold=fold,
                                                                              bn=bn, sizes=[SIZE]))
        assert report["passed"]
        bundles[form] = root / form
    return model, bundles


def _timm_from(out, **kwargs):
    import timm

    config = json.loads((out / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=True, **kwargs,
                              pretrained_cfg_overlay={"file": str(out / "model.safetensors")})
    return model.eval(), config


@pytest.mark.parametrize("form", FORMS)
def test_the_export_loads_strictly_in_timm_and_computes_the_original_of_raw_pixels(r50d, form, tmp_path):
    import timm
    import torch

    model, bundles = r50d
    out = tmp_path / "r50d-timm"
    summary = timm_out.export_bundle(bundles[form], out, sizes=[SIZE])
    assert summary["check_passed"] and summary["architecture"] == "resnet50d"
    assert summary["check"]["worst_max_rel"] < 1e-5 and all(s["top1_agree"] for s in summary["check"]["sizes"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    exported, config = _timm_from(out)  # strict: timm's load_pretrained raises on any missing/extra tensor
    cfg = config["pretrained_cfg"]
    if form == "convfold":  # the fold stays in conv1.0: timm's transform passes raw pixels through
        assert summary["input_spec"] == "rgb255" and cfg["mean"] == [0, 0, 0]
        assert np.allclose(cfg["std"], 1 / 255, rtol=1e-15)
    else:  # the fold undone: timm's transform normalizes as the weights were trained
        assert summary["input_spec"] == "imagenet" and np.allclose(cfg["std"], (0.229, 0.224, 0.225), rtol=1e-12)
    assert config["bbadapt"]["bn"].startswith("frozen constants") and config["bbadapt"]["bundle_bn"] == FORMS[form][1]
    local = timm.create_model(f"local-dir:{out}").eval()  # timm's own folder loader reads the same config
    assert list(timm.data.resolve_data_config(model=local)["std"]) == cfg["std"]
    raw, _ = images.photos(SIZE, limit=2)
    x = (raw / 255 - np.array(cfg["mean"]).reshape(1, 3, 1, 1)) / np.array(cfg["std"]).reshape(1, 3, 1, 1)
    ref = forward(model, PRESETS["imagenet"].normalize(raw, "float64"))
    got = forward(exported, x)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    if form == "convfold":  # the bundle itself is approximate at the border (6e-2 at 64x64): the export is judged
        assert rel < 0.2       # against the bundle, in its own check above (worst max rel < 1e-5)
    else:
        assert rel < 1e-5, rel
        features = timm.create_model("resnet50d", pretrained=True, features_only=True, out_indices=(1, 2, 3, 4),
                                     pretrained_cfg_overlay={"file": str(out / "model.safetensors")}).eval()
        original = timm.create_model("resnet50d", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4)).eval()
        original.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
        with torch.no_grad():
            for a, b in zip(features(torch.from_numpy(x.astype(np.float32))),
                            original(torch.from_numpy(PRESETS["imagenet"].normalize(raw))), strict=True):
                assert float((a - b).abs().max() / b.abs().max()) < 1e-5


def test_what_timm_cannot_hold_is_refused_and_nothing_is_written(r50d, tmp_path):
    _, bundles = r50d
    v1 = tmp_path / "v1"
    bbadapt.convert("resnet18_v1", v1, bbadapt.ConvertOptions(weights="random", sizes=[SIZE]))
    with pytest.raises(ModelError, match="resnet18_v1 has no timm twin"):
        timm_out.export_bundle(v1, tmp_path / "x")
    bgr = tmp_path / "bgr"
    bbadapt.convert("resnet18_v1b", bgr, bbadapt.ConvertOptions(weights="random", target="bgr255", fold="conv",
                                                                sizes=[SIZE]))
    with pytest.raises(ModelError, match="BGR input"):
        timm_out.export_bundle(bgr, tmp_path / "x")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        timm_out.export_bundle(bundles["fused"], mine)
    with pytest.raises(OutputError, match="not a bbadapt timm export"):
        timm_out.export_bundle(bundles["fused"], mine, force=True)
    assert (mine / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bgr", "mine", "v1"]


def test_an_export_timm_does_not_reproduce_is_not_written(r50d, tmp_path, monkeypatch):
    from converters.writers import torchvision as tv_out

    _, bundles = r50d
    real = tv_out.resnet_state

    def damaged(*args, **kwargs):
        state = real(*args, **kwargs)
        state["layer1.0.bn1.weight"] = state["layer1.0.bn1.weight"] * 1.5  # a wrong constant the check must see
        return state

    monkeypatch.setattr(tv_out, "resnet_state", damaged)
    with pytest.raises(OutputError, match="does not reproduce the bundle.*nothing written"):
        timm_out.export_bundle(bundles["fused"], tmp_path / "out", sizes=[SIZE])
    assert list(tmp_path.iterdir()) == []


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_export_timm_on_the_command_line(r50d, tmp_path):
    _, bundles = r50d
    ok = cli("export", bundles["global-stats"], "--timm", tmp_path / "out", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "architecture: resnet50d" in ok.stdout and "check passed: yes" in ok.stdout
    again = cli("export", bundles["global-stats"], "--timm", tmp_path / "out", cwd=tmp_path)
    errors = [ln for ln in again.stderr.splitlines() if ln.strip() and not ln.startswith("... ")]
    assert again.returncode == 1 and len(errors) == 1 and "already exists" in errors[0], again.stderr
