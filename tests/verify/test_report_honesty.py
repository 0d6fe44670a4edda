"""Reports that never overstate: the tolerance actually used, random weights in the banner, the
specs' numbers, provenance and plan shown, a legend for every column, an approximate fold that
never looks like an exact pass, and an error histogram without a fake spike at 1e-12.

Real conversions through the command line (CIFAR ResNet-20: seconds), read back from the files
they wrote.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bbadapt.verify.report import _COLUMNS, LEGEND, render_html, render_markdown, tolerance_text

MODEL = "cifar_resnet20_v1"


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def strict(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Random weights checked at --tolerance 1e-9: finer than float32 can show, so the tolerance is raised."""
    out = tmp_path_factory.mktemp("strict") / "c20"
    result = cli("convert", MODEL, "--weights", "random", "--tolerance", "1e-9", "--sizes", "32x32", "--out", out)
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.fixture(scope="module")
def approximate(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("approx") / "c20"
    result = cli("convert", MODEL, "--weights", "random", "--fold", "conv", "--out", out)
    return out, result


def test_the_summary_states_the_tolerance_actually_used_and_why(strict):
    out, result = strict
    report = json.loads((out / "report.json").read_text())
    raised = report["tolerance"]["raised"]
    assert raised and report["tolerance"]["max_rel"] == 1e-9
    used = max(raised.values())
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("check PASSED"))
    m = re.search(r"\(tolerance 1\.00e-09 asked, raised to (\S+) at ([a-z0-9, ]+): float32 cannot show agreement "
                  r"finer than the two nets' own float32 rounding there \(see notes\)\)", line)
    assert m, line
    assert float(m.group(1)) == pytest.approx(used, rel=0.01) and m.group(2).split(", ") == list(raised)
    assert float(m.group(1)) >= report["worst_max_rel"]  # what passed is within what it says it used
    assert tolerance_text(report) in (out / "report.md").read_text().splitlines()[-1]


def test_random_weights_specs_provenance_and_plan_are_in_the_report(strict):
    out, _ = strict
    manifest = json.loads((out / "manifest.json").read_text())
    page = (out / "report.html").read_text()
    banner = re.search(r'<div class="banner weights" id="weights">([^<]*)</div>', page)
    assert banner and "seeded random (seed 0" in banner.group(1) and "NOT pretrained" in banner.group(1)
    assert "mean 0.4914/0.4822/0.4465, std 0.2023/0.1994/0.201" in page  # cifar, the numbers
    assert "order rgb, scale 1, mean 0/0/0, std 1/1/1" in page  # rgb255
    assert manifest["weights"]["sha256"] in page and manifest["params_sha256"] in page
    assert f"Plan ({len(manifest['plan'])} steps)" in page
    for step in manifest["plan"]:
        assert ", ".join(f"{k}={v}" for k, v in step.items()) in page
    md = (out / "report.md").read_text()
    assert "NOT pretrained" in md and "Provenance:" in md


def test_every_table_column_has_a_legend(strict):
    out, _ = strict
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert set(LEGEND) == set(_COLUMNS)
    for column in _COLUMNS:
        assert f"<dt>{column}</dt>" in page and f'<th title="{html.escape(LEGEND[column])}">{column}</th>' in page
        assert f"- {column}: {LEGEND[column]}" in md
    assert "fp64 ratio" in LEGEND and "border max abs" in LEGEND


def test_an_approximate_fold_gets_its_own_verdict_and_says_what_was_not_judged(approximate):
    out, result = approximate
    report = json.loads((out / "report.json").read_text())
    assert report["exact"] is False
    page = (out / "report.html").read_text()
    banner = re.search(r'<div class="banner (\w+)" id="verdict">([^<]*)</div>', page)
    assert banner.group(1) == ("approx" if report["passed"] else "fail")  # never the exact-pass green
    assert "banner pass" not in page
    text = banner.group(2)
    output = report["probes"][-1]
    assert "APPROXIMATE fold: judged only the interiors of" in text and "not judged: the borders" in text
    assert f"final output max rel {output['max_rel']:.2e}" in text and "not the same function near the image border" in text
    assert "not judged: the borders" in result.stdout and "APPROXIMATE" in result.stderr


def test_the_histogram_counts_exact_zeros_apart_instead_of_a_spike_at_1e_12(strict):
    out, _ = strict
    report = json.loads((out / "report.json").read_text())
    hist = report["histogram"]
    output_values = int(np.prod(report["probes"][-1]["shape"])) * len(report["inputs"])
    assert sum(hist["counts"]) + hist["zeros"] == output_values
    assert hist["edges"][0] > -12  # nothing clamped to 1e-12


def test_an_all_zero_error_histogram_says_so():
    """The same network on both sides: every error is exactly 0, and the report says that in words."""
    from bbadapt.verify.equivalence import CheckOptions, check
    from tests.conftest import calibrated

    net = calibrated(MODEL)
    report = check(net, "cifar", net, "cifar", CheckOptions(sizes=[(32, 32)], cifar=True))
    assert report["histogram"]["zeros"] == int(np.prod(report["probes"][-1]["shape"])) * len(report["inputs"])
    assert report["histogram"]["counts"] == []
    page = render_html(report)
    assert f"All {report['histogram']['zeros']} errors at output are exactly 0." in page
    assert render_markdown(report).splitlines()[-1].startswith("PASSED")
