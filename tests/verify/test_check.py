"""The check must be able to fail: small, realistic mistakes are caught."""

import numpy as np

import bbadapt
from bbadapt.core.blocks import FrozenAffine
from bbadapt.core.rewrite import clone
from bbadapt.core.trace import block_paths
from tests.conftest import SMALL_SIZES


def _adapted(net, bn="affine"):
    return bbadapt.adapt(net, "imagenet", "rgb255", bn=bn)


def test_a_correct_adaptation_passes_with_every_probe(net18v2):
    report = bbadapt.check(net18v2, "imagenet", _adapted(net18v2), options=bbadapt.CheckOptions(sizes=SMALL_SIZES, n_photos=2))
    assert report["passed"] and report["verdict"] == "PASSED"
    assert [p["name"] for p in report["probes"]] == ["stem", "stage1", "stage2", "stage3", "stage4", "output"]
    kinds = {i["kind"] for i in report["inputs"]}
    assert kinds == {"photo", "random", "flat"}
    assert {tuple(i["size"]) for i in report["inputs"]} == set(SMALL_SIZES)


def test_a_wrong_epsilon_is_caught(net18v2):
    adapted = _adapted(net18v2)
    frozen = [b for b in block_paths(adapted.net).values() if isinstance(b, FrozenAffine)][3]
    frozen.scale.set_data(frozen.scale.data() * (1 + 1e-3))  # what eps 1e-3 instead of 1e-5 does to var ~ 1
    report = bbadapt.check(net18v2, "imagenet", adapted, options=bbadapt.CheckOptions(sizes=SMALL_SIZES, n_photos=1))
    assert not report["passed"] and report["verdict"] == "FAILED"
    assert any("max rel" in r for r in report["reasons"])


def test_an_error_below_tolerance_but_above_fp32_rounding_is_caught_by_the_float64_reference(net18v2):
    adapted = _adapted(net18v2)
    frozen = [b for b in block_paths(adapted.net).values() if isinstance(b, FrozenAffine)][-1]
    frozen.scale.set_data(frozen.scale.data() * (1 + 4e-6))  # the final BN, off by 4 ppm
    report = bbadapt.check(net18v2, "imagenet", adapted, options=bbadapt.CheckOptions(sizes=SMALL_SIZES, n_photos=1))
    assert not report["passed"]
    assert report["worst_max_rel"] < 1e-5  # invisible to the tolerance alone
    assert any("float64" in r for r in report["reasons"])


def test_the_plain_network_with_its_normalization_dropped_fails(net18v2):
    twin = clone(net18v2)  # the forum thread's mistake: right weights, wrong input convention
    report = bbadapt.check(net18v2, "imagenet", twin, "rgb255", options=bbadapt.CheckOptions(sizes=SMALL_SIZES, n_photos=1))
    assert not report["passed"]
    assert report["probes"][0]["max_rel"] > 0.1


def test_reports_render_and_hold_the_schema_fields(net18v2, tmp_path):
    import dataclasses
    import json

    from bbadapt.verify.report import write_reports

    report = bbadapt.check(net18v2, "imagenet", _adapted(net18v2), options=bbadapt.CheckOptions(sizes=SMALL_SIZES, n_photos=1))
    report = dataclasses.replace(report, model="resnet18_v2")  # a CheckReport: frozen
    write_reports(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    for key in ("passed", "worst_max_rel", "probes", "tolerance", "exact", "inputs"):
        assert key in data
    assert (tmp_path / "report.md").read_text().rstrip().splitlines()[-1].startswith("PASSED")
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    stem = data["probes"][0]
    assert np.array(data["heatmap"]["values"]).shape == (12, 12)
    assert {"max_abs", "max_rel", "mean_abs", "median_abs", "p99_abs", "cosine", "border", "interior", "fp64"} <= set(stem)


def test_an_approximate_fold_still_fails_when_a_stage_is_wrong():
    """Away from the zero padding an approximate fold must be exact: every stage interior is judged."""
    from bbadapt.core import zoo
    from bbadapt.core.weights import load_into
    from bbadapt.verify import images

    net = zoo.build("cifar_resnet20_v1")
    load_into(net, images.data_dir() / "cifar_resnet20_v1-0000.params")
    adapted = bbadapt.adapt(net, "cifar", "rgb255", fold="conv")
    good = bbadapt.check(net, "cifar", adapted, options=bbadapt.CheckOptions(cifar=True))
    assert good["passed"] and [p["name"] for p in good["probes"] if p["passed"]] == ["stem", "stage1", "stage2", "stage3"]
    conv = block_paths(adapted.net)["features.3.1.body.0"]
    conv.weight.set_data(conv.weight.data() * 1.05)
    bad = bbadapt.check(net, "cifar", adapted, options=bbadapt.CheckOptions(cifar=True))
    assert not bad["passed"] and any(r.startswith("stage2: interior") for r in bad["reasons"])
