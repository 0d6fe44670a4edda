"""The typed check report: one verdict, decided once, shown alike by report.json, report.md, report.html and the CLI.

Synthetic reports fail one section at a time (a probe, the approximate fold's interiors, non-finite
outputs, the training check, the yardstick's conclusiveness); reports written by main b5bd205
(tests/data/v1_reports) must read back to the same dict and render the same verdict line.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path

import pytest

from bbadapt import cli
from bbadapt.bundle import describe
from bbadapt.bundle.schema import BundleManifest
from bbadapt.verify.check_report import CheckReport, Probe, Training, decide
from bbadapt.verify.equivalence import _forward_reasons
from bbadapt.verify.report import render_html, render_markdown, write_reports

V1 = Path(__file__).resolve().parents[1] / "data" / "v1_reports"


def _probe(name: str, ratio: float | None = 0.4, spatial: bool = True, passed: bool | None = True,
           max_abs: float = 1e-6) -> dict:
    twin = None if ratio is None else {
        "twin": {"max_abs": 1e-9, "max_rel": 1e-10 * max(ratio, 1.0), "rms": 1e-10},
        "yardstick": {"max_abs": 1e-9, "max_rel": 1e-10, "rms": 1e-10, "draws": 2},
        "rms_ratio": ratio, "max_ratio": ratio, "ratio": ratio, "within": ratio <= 1.0}
    region = {"max_abs": max_abs, "max_rel": max_abs / 10, "mean_abs": max_abs / 2}
    return {"name": name, "path": f"features.{len(name)}", "shape": [1, 8, 4, 4] if spatial else [1, 10],
            "ref_max_abs": 10.0, "max_abs": max_abs, "max_rel": max_abs / 10, "mean_abs": max_abs / 2,
            "median_abs": max_abs / 4, "p99_abs": max_abs, "cosine": 0.99999999, "ring": 1 if spatial else None,
            "border": region if spatial else None, "interior": region if spatial else None,
            "fp64": {"original": 1e-6, "adapted": 1e-6, "original_rms": 1e-7, "adapted_rms": 1e-7, "ratio": 1.0},
            "float32_floor": 2e-7, "tolerance": 1e-5, "float64_twin": twin, "passed": passed}


def _report(probes: list[dict], exact: bool = True, conclusive: bool = True, raised: dict | None = None,
            training: Training | None = None) -> CheckReport:
    """A report as equivalence.check builds it: the forward reasons come from the probe records."""
    tolerance = {"max_rel": 1e-5, "fp64_factor": 2.0, "yardstick": "one ulp", "yardstick_limit": 1.0}
    if raised:
        tolerance["raised"] = raised
    ratios = [p["float64_twin"]["ratio"] for p in probes if p["float64_twin"]]
    return CheckReport(
        exact=exact, probes=tuple(Probe.from_dict(p) for p in probes),
        forward_reasons=tuple(_forward_reasons(probes, exact)), tolerance=tolerance, notes=("a note",),
        worst_max_rel=max(p["max_rel"] for p in probes), worst_yardstick_ratio=max(ratios) if ratios else None,
        decided_by="float64 twin against the one-ulp yardstick", conclusive=conclusive, source="cifar",
        target="rgb255", fold="bn" if exact else "conv", bn="affine",
        inputs=({"kind": "photo", "name": "a.jpg", "size": [32, 32]},), model="cifar_resnet20_v1", training=training)


def _training(bn: str = "affine", exact: bool = True, failing: int = 0) -> Training:
    params = [{"name": f"w{i}", "original": f"w{i}", "mapping": "same", "shape": [2], "max_rel": 1e-3 if i < failing
               else 1e-7, "tolerance": 1e-5, "passed": i >= failing} for i in range(3)]
    return Training.from_dict({
        "bn": bn, "exact": exact, "input": {"kind": "photo", "name": "a.jpg", "size": [32, 32]}, "loss": "sum",
        "reference": "frozen", "tolerance": {"max_rel": 1e-5, "fp64_factor": 2.0}, "parameters": params,
        "excluded": [], "notes": [], "reasons": [f"dL/dw{i}: max rel 1.00e-03 > tolerance 1.0e-05" for i in range(failing)],
        "float32_worst_max_rel": 1e-3, "worst_max_rel": 1e-3, "conclusive": True})


PASSING = [_probe("stem"), _probe("stage1"), _probe("output", spatial=False)]
CASES = {  # name: (report, passed, kind, what the banner must say)
    "pass": (_report(PASSING), True, "pass", "PASSED  worst max rel"),
    "probe fails": (_report([_probe("stem"), _probe("stage1", ratio=7.0, passed=False), _probe("output", spatial=False)]),
                    False, "fail", "FAILED  worst max rel"),
    "non-finite": (_report([_probe("stem", max_abs=float("inf")), *PASSING[1:]]), False, "fail", "FAILED"),
    "approximate, interiors pass": (_report([_probe("stem"), _probe("stage1"), _probe("output", None, False, None)],
                                            exact=False), True, "approx", "PASSED (APPROXIMATE fold"),
    "approximate, an interior fails": (_report([_probe("stem", ratio=3.0, passed=False), _probe("stage1"),
                                                _probe("output", None, False, None)], exact=False),
                                       False, "fail", "FAILED (APPROXIMATE fold"),
    "approximate, nothing to judge": (_report([_probe("stem", None, passed=None), _probe("output", None, False, None)],
                                              exact=False), False, "fail", "judged only the interiors of no probe"),
    "inconclusive": (_report(PASSING, conclusive=False), True, "inconclusive", "INCONCLUSIVE"),
    "inconclusive and failing": (_report([_probe("stem", ratio=2.5, passed=False), *PASSING[1:]], conclusive=False),
                                 False, "fail", "INCONCLUSIVE"),
    "tolerance raised": (_report(PASSING, raised={"stage1": 2e-5}), True, "pass", "raised to 2.00e-05 at stage1"),
    "training fails": (_report(PASSING, training=_training(failing=2)), False, "fail",
                       "but the training check FAILED: the gradients of 2 trainable weights"),
    "training and a probe fail": (_report([_probe("stem", ratio=9.0, passed=False), *PASSING[1:]],
                                          training=_training(failing=1)), False, "fail", "training check FAILED too"),
    "training passes": (_report(PASSING, training=_training()), True, "pass", "PASSED  worst max rel"),
    "training fused: stated, not judged": (_report(PASSING, training=_training(bn="fused", failing=1)), True, "pass",
                                           "PASSED"),
    "training after an approximate fold": (_report([_probe("stem"), _probe("output", None, False, None)], exact=False,
                                                   training=_training(exact=False, failing=1)), True, "approx", "PASSED"),
}


def _cli_summary(report: CheckReport, out: Path) -> list[str]:
    with cli.out_console.capture() as captured, cli.err_console.capture():
        cli._summary(report, out)
    return captured.get().splitlines()


@pytest.mark.parametrize("name", CASES)
def test_the_verdict_and_banner_agree_in_json_markdown_html_and_the_cli(name, tmp_path):
    report, passed, kind, says = CASES[name]
    verdict = report.verdict
    assert (verdict.passed, verdict.kind) == (passed, kind) and verdict == decide(report)
    assert says in verdict.banner and verdict.banner.startswith(verdict.word)
    assert bool(verdict.reasons) == (not passed)
    write_reports(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert (data["passed"], data["verdict"], data["reasons"]) == (passed, verdict.word, list(verdict.reasons))
    # The files show the report as written (NaN and inf become null, shown n/a): read back, decided the same.
    written = CheckReport.from_dict(data).verdict
    assert (written.passed, written.kind, written.reasons) == (passed, kind, verdict.reasons)
    assert written.banner == verdict.banner or name == "non-finite"
    md = (tmp_path / "report.md").read_text()
    assert md.rstrip().splitlines()[-1] == written.banner
    assert ("Reasons:" in md) == (not passed) and all(f"- {r}" in md for r in verdict.reasons)
    banner = re.search(r'<div class="banner (\w+)" id="verdict">([^<]*)</div>', (tmp_path / "report.html").read_text())
    assert banner.group(1) == kind and html.unescape(banner.group(2)) == written.banner
    lines = _cli_summary(report, tmp_path)
    assert lines[0].startswith(f"check {verdict.word}")
    assert [ln[4:] for ln in lines if ln.startswith("  - ")] == list(verdict.reasons)
    if report.training is not None:
        assert any(ln.startswith(f"training check {report.training.word}") for ln in lines)
        assert data["training"]["passed"] == report.training.passed


def test_a_failing_training_check_is_a_reason_of_the_report_and_no_section_sets_passed():
    report = CASES["training fails"][0]
    assert report.forward_reasons == () and all(p.passed for p in report.probes)
    assert report.verdict.reasons == tuple(f"training: {r}" for r in report.training.reasons)
    assert "passed" not in report.training.record and report.training.word == "FAILED"
    assert not any(f.name in ("passed", "verdict", "reasons") for f in dataclasses.fields(CheckReport))


def test_the_report_reads_like_the_old_dict():
    """Callers of bbadapt.check/convert read report["passed"], report["probes"][0]["max_rel"], ...: still there."""
    report = CASES["probe fails"][0]
    assert report["passed"] is False and report["verdict"] == "FAILED" and report["reasons"] == list(report.verdict.reasons)
    assert report["probes"][1]["float64_twin"]["ratio"] == 7.0 and report.get("training") is None
    assert "model" in report and dict(report) == report.to_dict()
    assert report.to_dict() is not report.to_dict()  # a fresh dict each time: editing it changes nothing here


def test_a_stored_verdict_its_sections_contradict_is_refused():
    data = CASES["probe fails"][0].to_dict()
    data["passed"], data["verdict"] = True, "PASSED"
    with pytest.raises(ValueError, match="passed=True but its sections give False"):
        CheckReport.from_dict(data)


@pytest.mark.parametrize("name", ["cifar", "frcnn", "approx", "fail"])
def test_reports_written_by_main_b5bd205_read_back_unchanged(name, tmp_path):
    """from_dict(old).to_dict() is the old dict, same keys in the same order; the renderers give the same lines."""
    where = V1 / name
    old_text = (where / "report.json").read_text()
    old = json.loads(old_text)
    report = CheckReport.from_dict(old)
    assert report.to_dict() == old and list(report.to_dict()) == list(old)
    if report.training:
        assert list(report.training.to_dict()) == list(old["training"])
    manifest = BundleManifest.from_json(where / "manifest.json") if (where / "manifest.json").exists() else None
    write_reports(report, tmp_path, describe.context(manifest), describe.weights_text(manifest))
    assert (tmp_path / "report.json").read_text() == old_text
    assert (tmp_path / "report.md").read_text() == (where / "report.md").read_text()
    assert render_markdown(old).splitlines()[-1] == report.verdict.banner
    assert (where / "banner.html").read_text().strip() in render_html(report)
    if (where / "summary.txt").exists():
        assert _cli_summary(report, tmp_path)[:-1] == (where / "summary.txt").read_text().splitlines()
