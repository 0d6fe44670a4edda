"""The Python API mirrors the CLI, and takes option objects instead of long parameter lists."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import bbadapt
from bbadapt import cli
from bbadapt.platform.errors import OptionError

REPO = Path(__file__).resolve().parents[2]
MAX_PARAMS = 8
# Registered architecture builders are called with the keyword record a manifest stores ({"builder", "kwargs"}):
# their parameter names are a file format that bundles already on disk use.
RECORD_SIGNATURES = {("bbadapt/core/architectures/symbolic_resnet.py", "symbolic_resnet")}


def test_every_convert_option_of_the_cli_is_a_field_of_the_python_options():
    cli_names = set(inspect.signature(cli.convert).parameters) - {"model", "out", "arch"}  # arch: an alias of MODEL
    convert_fields = {f.name for f in dataclasses.fields(bbadapt.ConvertOptions)}
    detector_fields = {f.name for f in dataclasses.fields(bbadapt.DetectorOptions)} | {"detector"}  # --detector: kind
    assert cli_names <= convert_fields | detector_fields, cli_names - convert_fields - detector_fields
    assert list(inspect.signature(bbadapt.convert).parameters) == ["model", "out", "options", "detector", "progress"]


def test_the_option_objects_are_public():
    assert {"ConvertOptions", "DetectorOptions", "CheckOptions"} <= set(bbadapt.__all__)
    assert bbadapt.CheckOptions().tolerance == bbadapt.ConvertOptions().tolerance == 1e-5


def test_an_unknown_detector_is_refused_when_the_options_are_made():
    with pytest.raises(OptionError, match="unknown detector 'yolo'"):
        bbadapt.DetectorOptions(classes=["raccoon"], kind="yolo")


def _public_functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            yield node
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from (n for n in node.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_"))


def _n_params(node: ast.FunctionDef) -> int:
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + [p.arg for p in (a.vararg, a.kwarg) if p]
    return len([n for n in names if n not in ("self", "cls")])


def test_no_public_function_of_the_library_layers_takes_more_than_eight_parameters():
    roots = [REPO / "bbadapt" / d for d in ("core", "check", "bundle")] + [REPO / "bbadapt" / "pipeline.py", REPO / "converters"]
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*.py")))]
    too_long = [f"{p.relative_to(REPO)}:{fn.name} ({_n_params(fn)})" for p in files for fn in _public_functions(p)
                if _n_params(fn) > MAX_PARAMS and (str(p.relative_to(REPO)), fn.name) not in RECORD_SIGNATURES]
    assert not too_long
