"""What ``bbadapt export`` says: every missing optional package by name with the extra that installs
it, and every figure of the summary with what it means (never a bare ``count_a``)."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from bbadapt import cli


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("hidden, named", [
    (("onnx", "onnxruntime"), "onnx and onnxruntime"),
    (("onnxruntime",), "onnxruntime"),
    (("onnx",), "onnx"),
])
def test_onnx_export_names_every_missing_package_and_the_extra(monkeypatch, capsys, tmp_path, hidden, named):
    for module in hidden:
        monkeypatch.setitem(sys.modules, module, None)  # import fails, as where it is not installed
    code, out, err = run(capsys, "export", tmp_path / "bundle", "--onnx", tmp_path / "b.onnx")
    assert code == 1 and out == ""
    assert err.strip() == (f"bbadapt: error: ONNX export needs {named}, not installed: pip install 'bbadapt[onnx]' "
                           "(onnx and onnxruntime's dependencies), then pip install --no-deps onnxruntime==1.16.3 "
                           "(its metadata asks numpy>=1.24, which mxnet 1.9.1 cannot use; see docs/formats.md)")
    assert not (tmp_path / "b.onnx").exists()


def test_a_missing_dependency_of_onnxruntime_is_named_too(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    import importlib

    real = importlib.import_module

    def flaky(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ModuleNotFoundError("No module named 'flatbuffers'", name="flatbuffers")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", flaky)
    code, _, err = run(capsys, "export", tmp_path / "bundle", "--onnx", tmp_path / "b.onnx")
    assert code == 1 and "needs onnxruntime (its dependency flatbuffers), not installed" in err


def test_the_symbol_export_summary_says_what_each_figure_means():
    """The detector export's summary (from the real comparison function) printed with meanings."""
    from bbadapt.engines.gluon.detector_bundle import compare_detections

    rows = np.array([[[0.0], [0.0]]]), np.array([[[0.9], [0.8]]]), np.array([[[1, 2, 30, 40], [5, 6, 50, 60.0]]])
    summary = {"symbol": "deploy/frcnn-symbol.json", "params": "deploy/frcnn-0000.params", "input_shape": [1, 3, 320, 480],
               **compare_detections(rows, rows)}
    lines = cli._export_lines(summary)
    assert "detections by the Gluon detector (eager): 2" in lines
    assert "detections by the exported files: 2" in lines
    assert "checked on a packaged photo of shape: 1x3x320x480" in lines
    assert "largest box coordinate difference between partners (px): 0" in lines
    assert not [line for line in lines if re.match(r"^[a-z0-9]+_[a-z0-9_]+: ", line)], lines
    assert len(lines) == len(summary)  # nothing dropped


def test_backbone_goes_with_torchvision_or_onnx_only(capsys, tmp_path):
    code, _, err = run(capsys, "export", tmp_path, "--backbone", "--symbol", tmp_path / "x")
    assert code == 2 and "--backbone goes with --torchvision or --onnx" in err
