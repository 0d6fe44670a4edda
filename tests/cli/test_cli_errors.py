"""End-to-end CLI behaviour on bad input: one clear line, the right exit code, nothing left behind.

Every test runs the real command line (``python -m bbadapt.cli``) in a subprocess, inside its
own ``tmp_path``, with ``MXNET_HOME`` pointed at an empty directory so no pretrained weights can
come from a cache (the test machines are offline: downloads fail within seconds).

The base case is the small real model ``cifar_resnet20_v1`` with its packaged pretrained export
file. For every refusal we check:

* the exit code (2 for invalid arguments, 1 for any other error);
* exactly one non-empty stderr line, starting ``bbadapt: error:`` (progress lines, which start
  with ``... `` when stderr is not a terminal, are ignored);
* no traceback;
* no output directory and no ``.partial-`` staging directory left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = "cifar_resnet20_v1"
REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "bbadapt" / "data"
REAL_PARAMS = DATA / f"{MODEL}-0000.params"
OTHER_EXPORTED_PARAMS = DATA / "cifar_resnet20_v2-0000.params"
PHOTOS = DATA / "photos"
PROGRESS_PREFIX = "... "  # cli.progress_line's form when stderr is not a terminal
LEFTOVER_MARKERS = (".partial-", ".old-", ".recheck-")


# --------------------------------------------------------------------------- helpers


def run_cli(*args: str, cwd: Path, mxnet_home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``bbadapt ARGS`` as a user would, but with an empty, private ``MXNET_HOME``."""
    env = {k: v for k, v in os.environ.items() if k != "BBADAPT_DEBUG"}
    env.update(MXNET_HOME=str(mxnet_home), COLUMNS="200", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def message_lines(stderr: str) -> list[str]:
    """The stderr lines that are not blank and not progress lines."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(PROGRESS_PREFIX)]


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if any(marker in p.name for marker in LEFTOVER_MARKERS)]


def assert_refused(result: subprocess.CompletedProcess, code: int, *, tmp_path: Path, out: Path | None = None,
                   mentions: tuple[str, ...] = ()) -> str:
    """The shared contract of every refusal; returns the error line."""
    context = f"exit {result.returncode}\n--- stderr ---\n{result.stderr}\n--- stdout ---\n{result.stdout}"
    assert "Traceback" not in result.stderr, context
    assert result.returncode == code, context
    lines = message_lines(result.stderr)
    assert len(lines) == 1, context
    line = lines[0]
    assert line.startswith("bbadapt: error: ") and len(line) > len("bbadapt: error: "), context
    assert "internal error" not in line, context  # a bbadapt bug, not a refusal
    for text in mentions:
        assert text in line, context
    if out is not None:
        assert not out.exists(), f"{out} was left behind\n{context}"
    assert not leftovers(tmp_path), f"staging leftovers {leftovers(tmp_path)}\n{context}"
    return line


def snapshot(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``directory``."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def home(tmp_path_factory) -> Path:
    """An empty MXNET_HOME: nothing cached, so 'pretrained' must download (and offline, cannot)."""
    return tmp_path_factory.mktemp("mxnet-home")


@pytest.fixture
def cli(tmp_path, home):
    """``cli(*args)`` runs bbadapt in ``tmp_path`` with the empty MXNET_HOME."""
    return lambda *args: run_cli(*args, cwd=tmp_path, mxnet_home=home)


@pytest.fixture
def convert_into(tmp_path, cli):
    """``convert_into(*extra)`` converts MODEL from the real file into tmp_path/out with ``extra`` options."""
    out = tmp_path / "out"
    return out, (lambda *extra: cli("convert", MODEL, "--weights", REAL_PARAMS, "-o", out, *extra))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One real, successful conversion (real pretrained file -> bgr255), shared by the module."""
    root = tmp_path_factory.mktemp("converted")
    home = tmp_path_factory.mktemp("mxnet-home-converted")
    out = root / "bundle"
    result = run_cli("convert", MODEL, "--weights", REAL_PARAMS, "--to", "bgr255", "-o", out, cwd=root, mxnet_home=home)
    return out, result


@pytest.fixture
def bundle_copy(converted, tmp_path) -> Path:
    """A private copy of the shared bundle, for tests that damage it."""
    out, result = converted
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    return copy


@pytest.fixture(scope="module")
def real_arrays() -> dict:
    """The packaged pretrained parameters (export() form) as numpy arrays."""
    import mxnet as mx

    return {k: v.asnumpy() for k, v in mx.nd.load(str(REAL_PARAMS)).items()}


def save_arrays(path: Path, arrays: dict) -> Path:
    import mxnet as mx

    mx.nd.save(str(path), {k: mx.nd.array(v, dtype=v.dtype) for k, v in arrays.items()})
    return path


# --------------------------------------------------------------------------- the good path


def test_converting_the_real_file_to_bgr255_writes_a_complete_bundle(converted):
    out, result = converted
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert message_lines(result.stderr) == [], result.stderr
    for name in ("manifest.json", "backbone.params", "report.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == MODEL
    assert manifest["target"]["name"] == "bgr255"
    assert manifest["weights"]["kind"] == "file"
    assert manifest["check"]["passed"] is True
    assert f"wrote {out}" in result.stdout
    assert not leftovers(out.parent)


def test_check_on_a_fresh_bundle_passes(bundle_copy, cli, tmp_path):
    result = cli("check", bundle_copy)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert message_lines(result.stderr) == [], result.stderr
    assert "check PASSED" in result.stdout
    assert not leftovers(tmp_path)


# --------------------------------------------------------------------------- invalid arguments (exit 2)


def test_unknown_model_is_refused_with_a_near_name_suggestion(cli, tmp_path):
    result = cli("convert", "resnet50_v3")
    line = assert_refused(result, 2, tmp_path=tmp_path, out=tmp_path / "out", mentions=("resnet50_v3", "did you mean"))
    assert "resnet50_v2" in line or "resnet50_v1" in line


def test_unknown_model_without_a_near_name_points_to_bbadapt_list(cli, tmp_path):
    result = cli("convert", "vgg16", "-o", tmp_path / "out")
    assert_refused(result, 2, tmp_path=tmp_path, out=tmp_path / "out", mentions=("vgg16", "bbadapt list"))


@pytest.mark.parametrize("spec, says", [
    ("nonsense", "unknown input spec"),
    ("std=0", "std must be positive"),
    ("mean=1/2", "3 values"),
    ("order=xyz", "unknown channel order"),
], ids=["unknown-preset", "zero-std", "two-means", "bad-order"])
def test_invalid_target_spec_is_refused_as_invalid_arguments(convert_into, tmp_path, spec, says):
    out, convert = convert_into
    assert_refused(convert("--to", spec), 2, tmp_path=tmp_path, out=out, mentions=(says,))


def test_invalid_source_spec_is_refused_as_invalid_arguments(convert_into, tmp_path):
    out, convert = convert_into
    assert_refused(convert("--from", "scale=0"), 2, tmp_path=tmp_path, out=out, mentions=("scale must be positive",))


@pytest.mark.parametrize("option, value, says", [
    ("--fold", "xyz", "xyz"),
    ("--bn", "frozen", "frozen"),
    ("--seed", "-1", "greater than or equal to 0"),
    ("--tolerance", "-1e-5", "greater than or equal to 0"),
], ids=["fold", "bn", "negative-seed", "negative-tolerance"])
def test_invalid_fold_bn_seed_or_tolerance_is_typers_usage_error_without_traceback(convert_into, tmp_path, option, value, says):
    out, convert = convert_into
    result = convert(option, value)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert f"Invalid value for '{option}'" in result.stderr and says in result.stderr, result.stderr
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("sizes", ["32", "4x4", "32x32,16xfoo", "8x\u00b2"],
                         ids=["no-x", "too-small", "not-a-number", "superscript-digit"])
def test_bad_sizes_are_refused_as_invalid_arguments(convert_into, tmp_path, sizes):
    out, convert = convert_into
    assert_refused(convert("--sizes", sizes), 2, tmp_path=tmp_path, out=out, mentions=("bad size", "HxW"))


# --------------------------------------------------------------------------- bad weights (exit 1)


def test_missing_weights_file_is_refused_in_one_line(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("convert", MODEL, "--weights", tmp_path / "nowhere.params", "-o", out)
    assert_refused(result, 1, tmp_path=tmp_path, out=out, mentions=("not found", "nowhere.params"))


def test_empty_weights_file_is_refused_in_one_line(cli, tmp_path):
    empty = tmp_path / "empty.params"
    empty.touch()
    out = tmp_path / "out"
    assert_refused(cli("convert", MODEL, "--weights", empty, "-o", out), 1, tmp_path=tmp_path, out=out,
                   mentions=("empty", "empty.params"))


def test_truncated_params_file_is_refused_in_one_line(cli, tmp_path):
    data = REAL_PARAMS.read_bytes()
    truncated = tmp_path / "truncated.params"
    truncated.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_refused(cli("convert", MODEL, "--weights", truncated, "-o", out), 1, tmp_path=tmp_path, out=out,
                   mentions=("truncated.params",))


def test_garbage_bytes_params_file_is_refused_in_one_line(cli, tmp_path):
    garbage = tmp_path / "garbage.params"
    garbage.write_bytes(os.urandom(4096))
    out = tmp_path / "out"
    assert_refused(cli("convert", MODEL, "--weights", garbage, "-o", out), 1, tmp_path=tmp_path, out=out,
                   mentions=("garbage.params",))


def test_saved_parameters_of_another_model_are_refused(cli, tmp_path):
    from bbadapt.core import zoo

    other = tmp_path / "cifar_resnet56_v1.params"
    zoo.build("cifar_resnet56_v1").save_parameters(str(other))
    out = tmp_path / "out"
    assert_refused(cli("convert", MODEL, "--weights", other, "-o", out), 1, tmp_path=tmp_path, out=out,
                   mentions=("does not fit this model", "another model"))


def test_exported_parameters_of_another_model_are_refused(cli, tmp_path):
    alone = tmp_path / "other.params"  # without its -symbol.json: only the tensors can tell
    shutil.copy(OTHER_EXPORTED_PARAMS, alone)
    out = tmp_path / "out"
    assert_refused(cli("convert", MODEL, "--weights", alone, "-o", out), 1, tmp_path=tmp_path,
                   out=out, mentions=("another model",))


def test_a_model_name_that_contradicts_the_export_graph_is_refused(cli, tmp_path):
    out = tmp_path / "out"  # the -symbol.json beside the params says cifar_resnet20_v2
    assert_refused(cli("convert", MODEL, "--weights", OTHER_EXPORTED_PARAMS, "-o", out), 2, tmp_path=tmp_path,
                   out=out, mentions=("contradicts", "cifar_resnet20_v2"))


def test_mis_shaped_parameter_is_refused_and_named(cli, tmp_path, real_arrays):
    import numpy as np

    arrays = dict(real_arrays)
    key = "arg:cifarresnetv10_stage1_conv0_weight"
    assert arrays[key].shape == (16, 16, 3, 3)
    arrays[key] = np.zeros((16, 16, 1, 1), dtype=np.float32)
    bad = save_arrays(tmp_path / "misshaped.params", arrays)
    out = tmp_path / "out"
    assert_refused(cli("convert", MODEL, "--weights", bad, "-o", out), 1, tmp_path=tmp_path, out=out,
                   mentions=("mis-shaped", "(16, 16, 1, 1)"))


def test_nan_weight_is_refused_and_named(cli, tmp_path, real_arrays):
    import numpy as np

    arrays = dict(real_arrays)
    key = "arg:cifarresnetv10_conv0_weight"
    arrays[key] = arrays[key].copy()
    arrays[key][0, 0, 0, 0] = np.nan
    bad = save_arrays(tmp_path / "nan.params", arrays)
    out = tmp_path / "out"
    assert_refused(cli("convert", MODEL, "--weights", bad, "-o", out), 1, tmp_path=tmp_path, out=out,
                   mentions=("NaN", "features.0.weight"))


def test_pretrained_weights_offline_suggest_random_or_a_path(cli, tmp_path, home):
    out = tmp_path / "out"
    result = cli("convert", MODEL, "--weights", "pretrained", "-o", out)
    assert_refused(result, 1, tmp_path=tmp_path, out=out, mentions=(MODEL, "--weights random", "--weights PATH"))


# --------------------------------------------------------------------------- existing output


def test_existing_output_is_refused_without_force_and_left_untouched(convert_into, tmp_path):
    out, convert = convert_into
    out.mkdir()
    (out / "keep.txt").write_text("precious\n")
    before = snapshot(out)
    result = convert()
    assert_refused(result, 1, tmp_path=tmp_path, mentions=("already exists", "--force"))
    assert snapshot(out) == before


def test_existing_output_is_replaced_with_force(convert_into, tmp_path):
    out, convert = convert_into
    assert convert("--to", "rgb255").returncode == 0  # an earlier bbadapt output (foreign files: test_output_safety)
    result = convert("--to", "bgr255", "--force")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and message_lines(result.stderr) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "backbone.params", "report.json", "report.md", "report.html"])
    assert not leftovers(tmp_path)


def test_force_never_replaces_a_directory_that_is_not_a_bbadapt_output(convert_into, tmp_path):
    out, convert = convert_into
    out.mkdir()
    (out / "main.py").write_text("precious source\n")
    before = snapshot(out)
    result = convert("--force")
    assert_refused(result, 1, tmp_path=tmp_path, mentions=("not a bbadapt output",))
    assert snapshot(out) == before


def test_failed_conversion_with_force_leaves_the_existing_output_untouched(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("convert", MODEL, "--weights", REAL_PARAMS, "-o", out).returncode == 0  # an earlier bbadapt output
    before = snapshot(out)
    empty = tmp_path / "empty.params"
    empty.touch()
    result = cli("convert", MODEL, "--weights", empty, "-o", out, "--force")
    assert_refused(result, 1, tmp_path=tmp_path, mentions=("empty",))
    assert snapshot(out) == before


def test_output_path_that_is_a_file_is_refused(convert_into, tmp_path):
    out, convert = convert_into
    out.write_text("a file, not a directory\n")
    result = convert("--force")
    assert_refused(result, 1, tmp_path=tmp_path, mentions=("not a directory",))
    assert out.read_text() == "a file, not a directory\n"


def test_output_below_a_file_is_refused_before_any_work(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("a file\n")
    out = tmp_path / "notes.txt" / "out"
    result = cli("convert", MODEL, "--weights", REAL_PARAMS, "-o", out)
    assert_refused(result, 1, tmp_path=tmp_path, mentions=("cannot create output", "notes.txt is not a directory"))
    assert not any(line.startswith("... ") for line in result.stderr.splitlines()), "refused only after the work"
    assert (tmp_path / "notes.txt").read_text() == "a file\n"


def test_forcing_the_current_directory_as_output_is_refused_and_it_is_left_untouched(cli, tmp_path):
    (tmp_path / "keep.txt").write_text("precious\n")
    before = snapshot(tmp_path)
    result = cli("convert", MODEL, "--weights", REAL_PARAMS, "-o", ".", "--force")
    assert_refused(result, 1, tmp_path=tmp_path, mentions=("current directory",))
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- bbadapt check on bad bundles


def assert_check_refuses_and_leaves_bundle(cli, bundle, tmp_path, *mentions):
    """`bbadapt check` on a damaged bundle: one-line refusal, and the bundle is not touched."""
    before = snapshot(bundle)
    assert_refused(cli("check", bundle), 1, tmp_path=tmp_path, mentions=mentions)
    assert snapshot(bundle) == before


def test_check_refuses_a_missing_directory(cli, tmp_path):
    assert_refused(cli("check", tmp_path / "nothing-here"), 1, tmp_path=tmp_path, out=tmp_path / "nothing-here",
                   mentions=("nothing-here",))


def test_check_refuses_a_directory_without_manifest(cli, bundle_copy, tmp_path):
    (bundle_copy / "manifest.json").unlink()
    assert_check_refuses_and_leaves_bundle(cli, bundle_copy, tmp_path, "manifest.json missing")


def test_check_refuses_a_manifest_of_a_newer_schema_version(cli, bundle_copy, tmp_path):
    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] += 1
    manifest_path.write_text(json.dumps(manifest, indent=2))
    assert_check_refuses_and_leaves_bundle(cli, bundle_copy, tmp_path, "schema version", "upgrade bbadapt")


def _without_source_order(manifest: dict) -> dict:
    del manifest["source"]["order"]
    return manifest


@pytest.mark.parametrize("damage, says", [
    (lambda m: '{"schema_version": 1, "model": ', "not valid JSON"),
    (lambda m: [m], "not a JSON object"),
    (_without_source_order, "invalid source spec"),
    (lambda m: {**m, "plan": "fold everything"}, "malformed plan"),
    (lambda m: {**m, "plan": [*m["plan"], {"op": "fold_everything"}]}, "damaged plan"),
    (lambda m: {**m, "plan": [{"op": "fuse", "conv": "features.0"}, *m["plan"]]}, "step 1: fuse step lacks 'bn'"),
    (lambda m: {**m, "arch": "resnet50_v1"}, "unusable arch record"),
    # a manifest must never make bbadapt import and call arbitrary code
    (lambda m: {**m, "arch": {"builder": "os:system", "kwargs": {"command": "touch pwned"}}}, "unusable arch record"),
    (lambda m: {**m, "arch": {"builder": "converters.base:_private"}}, "unusable arch record"),
    (lambda m: {**m, "arch": {"builder": "converters.mxnet_symbol:read", "kwargs": {"path": "x"}}},
     "names no architecture builder"),
], ids=["not-json", "not-an-object", "source-spec-without-order", "plan-not-a-list", "plan-step-unknown",
        "plan-step-incomplete", "arch-not-a-record",
        "arch-builder-outside-converters", "arch-builder-private", "arch-builder-not-a-builder"])
def test_check_refuses_a_damaged_manifest(cli, bundle_copy, tmp_path, damage, says):
    manifest_path = bundle_copy / "manifest.json"
    damaged = damage(json.loads(manifest_path.read_text()))
    manifest_path.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    assert_check_refuses_and_leaves_bundle(cli, bundle_copy, tmp_path, says)
    assert not list(tmp_path.rglob("pwned"))


def test_check_refuses_a_bundle_without_its_parameters(cli, bundle_copy, tmp_path):
    (bundle_copy / "backbone.params").unlink()
    assert_check_refuses_and_leaves_bundle(cli, bundle_copy, tmp_path, "backbone.params")


def test_check_refuses_a_bundle_with_truncated_parameters(cli, bundle_copy, tmp_path):
    params = bundle_copy / "backbone.params"
    data = params.read_bytes()
    params.write_bytes(data[: len(data) // 2])
    assert_check_refuses_and_leaves_bundle(cli, bundle_copy, tmp_path, "backbone.params")


# --------------------------------------------------------------------------- --images


def test_images_dir_without_images_is_refused(convert_into, tmp_path):
    out, convert = convert_into
    empty = tmp_path / "photos"
    empty.mkdir()
    (empty / "README.txt").write_text("no pictures here\n")
    assert_refused(convert("--images", empty), 1, tmp_path=tmp_path, out=out, mentions=("no images",))


def test_images_dir_that_does_not_exist_is_refused(convert_into, tmp_path):
    out, convert = convert_into
    assert_refused(convert("--images", tmp_path / "nowhere"), 1, tmp_path=tmp_path, out=out, mentions=("not found",))


def test_images_dir_with_a_corrupt_jpg_is_refused(convert_into, tmp_path):
    out, convert = convert_into
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(PHOTOS / "raccoon-1.jpg", photos)
    (photos / "broken.jpg").write_bytes(os.urandom(2048))
    assert_refused(convert("--images", photos), 1, tmp_path=tmp_path, out=out, mentions=("broken.jpg",))


def test_images_dir_with_a_truncated_jpg_is_refused(convert_into, tmp_path):
    out, convert = convert_into
    photos = tmp_path / "photos"
    photos.mkdir()
    data = (PHOTOS / "raccoon-1.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(data[: len(data) // 3])
    assert_refused(convert("--images", photos), 1, tmp_path=tmp_path, out=out, mentions=("cut.jpg",))


# --------------------------------------------------------------------------- option combinations


@pytest.mark.parametrize("args, says", [
    (("convert", "resnet18_v1", "--arch", "resnet18_v1b", "--weights", "random"), "disagree"),
    (("convert", "--weights", "random"), "needs a MODEL"),
    (("convert", "--weights", "pretrained"), "needs a MODEL"),
    (("convert", MODEL, "--weights", "random", "--classes", "raccoon"), "--classes is for --detector"),
    (("convert", MODEL, "--weights", "random", "--detector", "faster-rcnn"), "needs --classes"),
    (("convert", MODEL, "--weights", "random", "--format", "keras"), "--format applies to a weights file"),
    (("convert", "--weights", str(REAL_PARAMS), "--format", "no-such-format"), "unknown format"),
    (("export", "somewhere"), "exactly one of"),
    (("export", "somewhere", "--onnx", "a.onnx", "--torchvision", "a.safetensors"), "exactly one of"),
], ids=["model-vs-arch", "random-without-model", "pretrained-without-model", "classes-without-detector",
        "detector-without-classes", "format-with-random", "unknown-format", "export-nothing", "export-two-things"])
def test_contradictory_or_incomplete_options_are_invalid_arguments(cli, tmp_path, args, says):
    assert_refused(cli(*args), 2, tmp_path=tmp_path, out=tmp_path / "out", mentions=(says,))


def test_a_file_of_no_known_format_is_refused_and_points_to_formats(cli, tmp_path):
    odd = tmp_path / "notes.txt"
    odd.write_text("these are not weights\n" * 100)
    assert_refused(cli("convert", "--weights", odd), 1, tmp_path=tmp_path, out=tmp_path / "out" / "notes",
                   mentions=("cannot tell the format", "bbadapt formats"))
