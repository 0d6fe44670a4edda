"""The command line end to end, on the real pretrained CIFAR ResNet (success paths and verdicts)."""

import json
import subprocess
import sys

import pytest

from bbadapt.verify.images import data_dir

WEIGHTS = str(data_dir() / "cifar_resnet20_v1-0000.params")


def bbadapt(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_list_shows_every_core_model_with_its_default_spec(tmp_path):
    result = bbadapt("list", cwd=tmp_path)
    assert result.returncode == 0
    assert "resnet152_v1s" in result.stdout and "cifar_resnet110_v2" in result.stdout and "se_resnet" not in result.stdout
    assert "se_resnet50_v1" in bbadapt("list", "--all", cwd=tmp_path).stdout


def test_a_bundle_changed_after_conversion_fails_its_check_with_exit_3_and_a_report_saying_why(tmp_path):
    import mxnet as mx

    assert bbadapt("convert", "cifar_resnet20_v1", "--weights", WEIGHTS, "-o", "out", cwd=tmp_path).returncode == 0
    params = tmp_path / "out" / "backbone.params"
    arrays = mx.nd.load(str(params))
    key = sorted(k for k in arrays if k.endswith("weight"))[5]
    arrays[key] *= 1.001  # e.g. fine-tuned afterwards: no longer the original function
    mx.nd.save(str(params), arrays)
    result = bbadapt("check", "out", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] is False and report["reasons"]
    assert "check FAILED" in result.stdout
    assert (tmp_path / "out" / "report.md").read_text().rstrip().splitlines()[-1].startswith("FAILED")


def test_a_stricter_tolerance_than_fp32_can_show_is_explained_not_silently_met(tmp_path):
    result = bbadapt("convert", "cifar_resnet20_v1", "--weights", WEIGHTS, "--tolerance", "1e-12", "-o", "out", cwd=tmp_path)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tolerance"]["raised"]
    # Float32 cannot agree finer than both runs' own rounding; the verdict rests on the float64 twin, which does not
    # depend on the CPU's kernels: an exact fold passes on every CPU.
    assert result.returncode == 0, result.stderr
    for p in report["probes"]:
        assert p["tolerance"] == report["tolerance"]["raised"][p["name"]] == p["float32_floor"] >= p["max_rel"]
        assert p["float64_twin"]["within"]
    assert "float32 cannot show agreement finer than the two nets' own float32 rounding there" in result.stdout
    assert "decided in float64: the adapted net's float64 twin is within the one-ulp yardstick" in result.stdout
    assert any("cannot be shown finer than float32 rounding" in n for n in report["notes"])


def test_the_approximate_fold_is_announced_on_stderr_and_in_the_report(tmp_path):
    result = bbadapt("convert", "cifar_resnet20_v1", "--weights", WEIGHTS, "--fold", "conv", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "APPROXIMATE" in result.stderr and "(APPROXIMATE)" in result.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["fold"] == "conv" and manifest["exact"] is False
    assert "APPROXIMATE" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("target", ["rgb255", "order=bgr,scale=1/255,mean=0.5,std=0.25"])
def test_convert_then_check_round_trip(tmp_path, target):
    assert bbadapt("convert", "cifar_resnet20_v1", "--weights", WEIGHTS, "--to", target, "-o", "out", cwd=tmp_path).returncode == 0
    again = bbadapt("check", "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "accuracy on 100 labelled tiles: original 98%, adapted 98%" in again.stdout


def test_check_judges_with_the_tolerance_the_conversion_was_made_with(tmp_path):
    assert bbadapt("convert", "cifar_resnet20_v1", "--weights", WEIGHTS, "--tolerance", "3e-5", "-o", "out",
                   cwd=tmp_path).returncode == 0
    assert bbadapt("check", "out", cwd=tmp_path).returncode == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tolerance"]["max_rel"] == 3e-5
