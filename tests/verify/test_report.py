import copy
import importlib.util
import json
import math
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "bbadapt" / "verify" / "report.py"
_spec = importlib.util.spec_from_file_location("bbadapt_report_under_test", _PATH)
report_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report_mod)


def _probe(name, shape, max_rel, spatial=True, passed=True):
    region = {"max_abs": max_rel * 10, "max_rel": max_rel, "mean_abs": max_rel}
    return {
        "name": name, "path": f"features.{len(name)}", "shape": shape,
        "ref_max_abs": 10.0, "max_abs": max_rel * 10, "max_rel": max_rel,
        "mean_abs": max_rel, "median_abs": max_rel / 2, "p99_abs": max_rel * 5,
        "cosine": 0.9999999,
        "ring": 2 if spatial else None,
        "border": dict(region) if spatial else None,
        "interior": ({**region, "max_rel": max_rel / 4} if spatial else None),
        "fp64": {"original": 2e-6, "adapted": 3e-6, "ratio": 1.5},
        "passed": passed,
    }


@pytest.fixture
def passed_report():
    return {
        "schema_version": 1, "passed": True, "verdict": "PASSED", "reasons": [],
        "exact": True, "notes": ["all probes within float32 rounding"],
        "worst_max_rel": 3.1e-07, "tolerance": {"max_rel": 1e-05, "fp64_factor": 2.0},
        "model": "resnet50_v2", "source": "imagenet", "target": "rgb255",
        "fold": "bn", "bn": "fused",
        "inputs": [{"kind": "photo", "name": "raccoon-1.jpg", "size": [224, 224]}],
        "probes": [
            _probe("stem", [1, 64, 56, 56], 3.1e-07),
            _probe("stage1", [1, 256, 56, 56], 0.0),  # zero error must not break log scale
            _probe("stage2", [1, 512, 28, 28], 1e-07),
            _probe("output", [1, 1000], 2e-08, spatial=False),
        ],
        "classification": {"n": 12, "top1_agreement": 1.0, "top5_agreement": 1.0},
        "heatmap": {"probe": "stem",
                    "values": [[(i + j) * 1e-8 for j in range(8)] for i in range(8)]},
        "histogram": {"probe": "output", "edges": [-12, -11, -10, -9, -8, -7],
                      "counts": [3, 10, 40, 100, 7]},
    }


@pytest.fixture
def failed_report(passed_report):
    r = copy.deepcopy(passed_report)
    r.update(passed=False, verdict="FAILED", exact=False, worst_max_rel=0.02,
             reasons=["stem: max rel 2.00e-02 > 1.00e-05"],
             notes=["fold=conv is approximate: border error is expected"])
    r["probes"][0] = _probe("stem", [1, 64, 56, 56], 0.02, passed=False)
    r["heatmap"] = None
    r["histogram"] = None
    r["classification"] = None
    return r


def _last_line(text):
    return text.strip().splitlines()[-1]


def test_markdown_passed(passed_report):
    md = report_mod.render_markdown(passed_report)
    for p in passed_report["probes"]:
        assert f"| {p['name']} |" in md
    assert "resnet50_v2" in md and "imagenet -> rgb255" in md
    assert "top-1 100.0%" in md and "0.99999990" in md
    assert "n/a" in md  # output probe has no border/interior
    last = _last_line(md)
    assert last.startswith("PASSED")
    assert "3.10e-07" in last and "1.00e-05" in last
    assert "approximate" not in last


def test_markdown_failed(failed_report):
    md = report_mod.render_markdown(failed_report)
    for p in failed_report["probes"]:
        assert p["name"] in md
    assert "Reasons:" in md and failed_report["reasons"][0] in md
    last = _last_line(md)
    assert last.startswith("FAILED")
    assert "APPROXIMATE" in last
    assert "FAIL |" in md


def test_html_self_contained(passed_report):
    page = report_mod.render_html(passed_report)
    assert page.startswith("<!DOCTYPE html>")
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    assert page.count("data:image/png;base64,") == 3
    for p in passed_report["probes"]:
        assert p["name"] in page
    assert "banner pass" in page


def test_html_omits_missing_plots(failed_report):
    page = report_mod.render_html(failed_report)
    assert page.count("data:image/png;base64,") == 1
    assert "No spatial heatmap" in page and "No error histogram" in page
    assert "banner fail" in page


def test_html_escapes_text(passed_report):
    passed_report["notes"].append("<script>alert(1)</script>")
    page = report_mod.render_html(passed_report)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page


def test_write_reports_roundtrip(tmp_path, passed_report):
    passed_report["probes"][1]["cosine"] = float("nan")
    passed_report["worst_max_rel"] = float("inf")
    out = tmp_path / "out"
    report_mod.write_reports(passed_report, out)
    for name in ("report.json", "report.md", "report.html"):
        assert (out / name).is_file()
    raw = (out / "report.json").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    loaded = json.loads(raw)
    assert loaded["probes"][1]["cosine"] is None
    assert loaded["worst_max_rel"] is None
    expected = copy.deepcopy(passed_report)
    expected["probes"][1]["cosine"] = None
    expected["worst_max_rel"] = None
    assert loaded == expected
    assert _last_line((out / "report.md").read_text()).startswith("PASSED")


def test_numpy_values_are_converted(tmp_path, passed_report):
    np = pytest.importorskip("numpy")
    passed_report["probes"][0]["max_abs"] = np.float32(1e-6)
    passed_report["probes"][0]["mean_abs"] = np.float64("nan")
    report_mod.write_reports(passed_report, tmp_path)
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert math.isclose(loaded["probes"][0]["max_abs"], 1e-6, rel_tol=1e-6)
    assert loaded["probes"][0]["mean_abs"] is None
