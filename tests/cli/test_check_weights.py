"""``bbadapt check DIR --weights PATH``: re-check a bundle whose original weights moved.

The real pretrained GluonCV CIFAR ResNet-20 export pair (``-symbol.json`` + ``-0000.params``)
is converted from a copy, the copy is moved, and the check is pointed at the new place. The
files are verified by sha256 against the manifest: other files under the same names are refused.
The report also lists those files and their sha256 (provenance).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "bbadapt" / "data"


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", *map(str, args)], capture_output=True, text=True)


def one_error(result: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("... ")]
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("bbadapt: error: "), result.stderr
    return lines[0]


def copy_pair(version: str, to: Path, name: str = "c20") -> Path:
    to.mkdir(parents=True)
    shutil.copy(DATA / f"cifar_resnet20_{version}-symbol.json", to / f"{name}-symbol.json")
    shutil.copy(DATA / f"cifar_resnet20_{version}-0000.params", to / f"{name}-0000.params")
    return to / f"{name}-symbol.json"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("moved")
    weights = copy_pair("v1", root / "first")
    out = root / "out"
    result = cli("convert", "--weights", weights, "--sizes", "32x32", "--out", out)
    assert result.returncode == 0, result.stderr
    return root, out


def test_the_report_lists_each_weights_file_with_its_sha256(converted):
    _, out = converted
    manifest = json.loads((out / "manifest.json").read_text())
    page = (out / "report.html").read_text()
    files = manifest["weights"]["files"]
    assert len(files) == 2
    for path, digest in files.items():
        assert f"file {path}: sha256 {digest}" in page


def test_moved_weights_are_named_with_a_way_to_point_at_them(converted):
    root, out = converted
    moved = root / "moved-away"
    shutil.move(root / "first", moved)
    try:
        gone = cli("check", out, "--sizes", "32x32")
        assert gone.returncode == 1
        line = one_error(gone)
        assert f"the original weights {root / 'first'}" in line and "--weights PATH" in line
        again = cli("check", out, "--sizes", "32x32", "--weights", moved / "c20-symbol.json")
        assert again.returncode == 0, again.stderr
        assert "check PASSED" in again.stdout
    finally:
        shutil.move(moved, root / "first")


def test_other_files_under_the_same_names_are_refused_by_sha256(converted, tmp_path):
    _, out = converted
    impostor = copy_pair("v2", tmp_path / "elsewhere")  # the v2 net's files, named like the converted v1's
    before = (out / "report.json").read_bytes()
    result = cli("check", out, "--sizes", "32x32", "--weights", impostor)
    assert result.returncode == 1
    line = one_error(result)
    assert "is not the file that was converted: sha256" in line and str(impostor.parent) in line
    assert (out / "report.json").read_bytes() == before  # nothing rewritten


def test_weights_for_a_bundle_made_from_zoo_weights_is_a_usage_error(tmp_path):
    out = tmp_path / "rand"
    assert cli("convert", "cifar_resnet20_v1", "--weights", "random", "--sizes", "32x32", "--out", out).returncode == 0
    result = cli("check", out, "--weights", tmp_path / "x.params")
    assert result.returncode == 2
    assert "--weights is for bundles converted from a weights file; this one used random weights" in one_error(result)
