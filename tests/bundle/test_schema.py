"""The typed schema of what bbadapt writes and reads back: round trips, defaults, and one-line refusals.

Every refusal is one :class:`OutputError` line that names the file and the field, so a damaged
or foreign manifest is told apart from a bug before any network is built.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bbadapt.bundle.manifest import read_manifest, store_manifest, write_manifest
from bbadapt.bundle.schema import (
    BACKBONE_PARAMS,
    DETECTOR_PARAMS,
    EXPORT_CONFIG,
    EXPORT_RUNTIME,
    EXPORT_WEIGHTS,
    MANIFEST,
    SCHEMA_VERSION,
    TORCHVISION_FORMAT,
    BundleManifest,
    CheckpointSection,
    DetectorSection,
    TorchvisionExport,
)
from bbadapt.core.spec import parse_spec
from bbadapt.platform.errors import OutputError

REPO = Path(__file__).resolve().parents[2]
V1 = REPO / "tests" / "data" / "v1_bundles"
V1_MANIFESTS = ["backbone", "detector", "detector/checkpoints/epoch-0001", "manifests/resnet18_v1b-detector.json"]


def _path(name: str) -> Path:
    return V1 / name if name.endswith(".json") else V1 / name / MANIFEST


def minimal(**changes) -> dict:
    """The least a version-1 manifest holds (tests and older bundles write no more)."""
    data = {"schema_version": 1, "model": "resnet18_v1b", "plan": [],
            "source": parse_spec("imagenet").to_dict(), "target": parse_spec("rgb255").to_dict()}
    data.update(changes)
    return data


DETECTOR = {"classes": ["raccoon"], "layout": "c4", "freeze_at": 2, "settings": {"short": 192}}
CHECKPOINT = {"epoch": 1, "iteration": 30, "val_map": 0.5, "best_map": 0.5, "config": {"short_side": 192}}


def refusal(data, where: str = "bundle/manifest.json", kind=BundleManifest) -> str:
    """The one line ``kind.from_json`` refuses ``data`` with (JSON text in, as from a file)."""
    text = data if isinstance(data, str) else json.dumps(data)
    with pytest.raises(OutputError) as err:
        kind.from_json(text, where=where)
    message = str(err.value)
    assert "\n" not in message and where in message
    return message


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", V1_MANIFESTS)
def test_every_v1_manifest_reads_and_writes_back_the_same_json(name):
    raw = json.loads(_path(name).read_text())
    manifest = BundleManifest.from_json(_path(name))
    assert manifest.to_dict() == raw  # unknown keys (input_size, graph, health ...) travel unchanged
    again = BundleManifest.from_json(manifest.to_json(), where="again")
    assert again == manifest and again.to_json() == manifest.to_json()


def test_the_v1_torchvision_config_reads_and_writes_back_the_same_json_in_the_same_order():
    text = (V1 / "torchvision" / EXPORT_CONFIG).read_text()
    config = TorchvisionExport.from_json(V1 / "torchvision" / EXPORT_CONFIG)
    assert config.to_json() == text  # byte for byte: the export always wrote it with indent 2
    assert (config.classes, config.layout, config.architecture) == (("raccoon",), "c4", "resnet18")
    assert config.section("input")["range"] == "01" and config.section("nothing") == {}


def test_to_dict_is_a_copy():
    manifest = BundleManifest.from_json(_path("detector"))
    d = manifest.to_dict()
    d["detector"]["settings"]["short"] = 1
    d["weights"]["kind"] = "changed"
    assert manifest.detector.settings["short"] == 192 and manifest.provenance.kind == "file"


def test_a_minimal_manifest_gets_its_defaults_from_the_schema():
    m = BundleManifest.from_json(json.dumps(minimal()), where="m.json")
    assert (m.kind, m.params_file, m.family, m.bn, m.detector, m.checkpoint) == ("backbone", BACKBONE_PARAMS, "", "", None, None)
    assert m.check_tolerance == 1e-5 and m.provenance.kind == "pretrained" and not m.random_weights
    assert m.arch_record == {"zoo": "resnet18_v1b"} and m.model_name == "resnet18_v1b"
    assert m.target_spec().name == "rgb255" and m.classes == []
    d = BundleManifest.from_dict(minimal(detector=DETECTOR))
    assert d.holds_detector and d.kind == "backbone"  # older test bundles say backbone and hold a detector
    assert (d.detector.params_file, d.detector.seed, d.detector.family) == (DETECTOR_PARAMS, 0, None)
    assert d.detector_input_spec().name == "rgb255"  # no detector input: the manifest's target


def test_the_model_name_is_the_arch_records_zoo_name_else_the_model():
    assert BundleManifest.from_dict(minimal(arch={"zoo": "resnet18_v1b"}, model="other")).model_name == "resnet18_v1b"
    symbolic = BundleManifest.from_json(_path("detector"))
    assert symbolic.arch["builder"] == "mxnet-symbolic-resnet" and symbolic.model_name == symbolic.model


def test_the_detector_family_is_its_sections_else_the_manifests():
    assert BundleManifest.from_dict(minimal(family="v1b", detector=DETECTOR)).detector_family == "v1b"
    own = {**DETECTOR, "family": "v2"}
    assert BundleManifest.from_dict(minimal(family="v1b", detector=own)).detector_family == "v2"
    empty = {**DETECTOR, "family": ""}  # recorded empty is recorded: as the loaders always read it
    assert BundleManifest.from_dict(minimal(family="v1b", detector=empty)).detector_family == ""


def test_the_checkpoint_section_is_typed_and_a_run_setting_has_a_default():
    m = BundleManifest.from_json(_path("detector/checkpoints/epoch-0001"))
    run = m.checkpoint
    assert isinstance(run, CheckpointSection) and m.is_checkpoint
    assert (run.epoch, run.iteration, run.val_metric) == (1, 30, "voc07")
    assert run.config_value("short_side") == 192 and run.config_value("nothing", 7) == 7
    assert m.replace(checkpoint=None).to_dict() == {k: v for k, v in m.to_dict().items() if k != "checkpoint"}


def test_weights_provenance_accessors():
    prov = BundleManifest.from_json(_path("detector")).provenance
    assert prov.kind == "file" and prov.format == "mxnet-symbol" and prov.path.endswith("resnet-18-symbol.json")
    assert len(prov.files) == 2 and prov.sha256 == prov.files[prov.path] and prov.seed == 0
    assert prov.model_for("x") is None  # the conversion recorded arch_arg None: the file named its architecture
    random = BundleManifest.from_json(V1 / "manifests" / "resnet18_v1b-detector.json")
    assert random.random_weights and random.provenance.model_for("resnet18_v1b") == "resnet18_v1b"


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("key", ["model", "source", "target", "plan"])
def test_a_missing_top_level_field_is_one_line_naming_file_and_field(key):
    data = minimal()
    del data[key]
    assert refusal(data) == f"bundle/manifest.json lacks {key!r}"


@pytest.mark.parametrize("key", ["classes", "layout", "freeze_at", "settings"])
def test_a_missing_detector_field_is_one_line_naming_file_and_field(key):
    section = {k: v for k, v in DETECTOR.items() if k != key}
    assert refusal(minimal(detector=section)) == f"bundle/manifest.json: the detector section lacks {key!r}"


@pytest.mark.parametrize("key", ["epoch", "iteration", "config"])
def test_a_missing_checkpoint_field_is_one_line_naming_file_and_field(key):
    section = {k: v for k, v in CHECKPOINT.items() if k != key}
    message = refusal(minimal(detector=DETECTOR, checkpoint=section))
    assert message == f"bundle/manifest.json: the checkpoint section lacks {key!r}"


MISTYPED = [
    ("model", 5, "model"), ("kind", 3, "kind"), ("params_sha256", 5, "params_sha256"), ("bn", 1, "bn"),
    ("weights", "random", "weights"), ("check", [], "check"), ("exact", "yes", "exact"), ("versions", "1.0", "versions"),
    ("detector", "faster-rcnn", "detector"), ("detector.freeze_at", "2", "detector.freeze_at"),
    ("detector.freeze_at", True, "detector.freeze_at"), ("detector.classes", "raccoon", "detector.classes"),
    ("detector.classes", ["raccoon", 3], "detector.classes"), ("detector.settings", [], "detector.settings"),
    ("detector.layout", None, "detector.layout"), ("detector.seed", 0.5, "detector.seed"),
    ("detector.family", 1, "detector.family"), ("checkpoint.epoch", "1", "checkpoint.epoch"),
    ("checkpoint.config", [], "checkpoint.config"), ("checkpoint.val_map", "high", "checkpoint.val_map"),
]


@pytest.mark.parametrize("key, value, field", MISTYPED, ids=[f"{k}={v!r}" for k, v, _ in MISTYPED])
def test_a_mistyped_field_is_one_line_naming_file_and_field(key, value, field):
    data = minimal(detector=copy.deepcopy(DETECTOR), checkpoint=copy.deepcopy(CHECKPOINT))
    *parents, last = key.split(".")
    target = data
    for parent in parents:
        target = target[parent]
    target[last] = value
    message = refusal(data)
    assert re.search(rf"\b{re.escape(field)}\b", message), message
    assert message.startswith("bundle/manifest.json: ")


def test_an_unknown_kind_is_refused():
    assert "kind 'segmenter' is not one bbadapt writes" in refusal(minimal(kind="segmenter"))


def test_todays_messages_stay():
    assert "has schema version 2; this bbadapt reads up to 1 (upgrade bbadapt)" in refusal(minimal(schema_version=2))
    assert "has no valid schema_version" in refusal(minimal(schema_version="1"))
    assert "not valid JSON" in refusal('{"schema_version": 1, "model": ')
    assert "not a bbadapt manifest (not a JSON object)" in refusal("[1]")
    assert "has an invalid source spec" in refusal(minimal(source={"preset": "nonsense"}))
    assert "has a malformed plan" in refusal(minimal(plan="fold everything"))
    assert "has an unusable arch record" in refusal(minimal(arch="resnet50_v1"))
    hostile = refusal(minimal(detector={"params_file": "../detector.params"}))
    assert "detector.params_file '../detector.params' is not a file name inside the bundle; refused" in hostile


def test_a_foreign_or_newer_torchvision_config_is_refused():
    good = json.loads((V1 / "torchvision" / EXPORT_CONFIG).read_text())
    assert "not a bbadapt torchvision detector export" in refusal({**good, "format": "other"}, "x/config.json", TorchvisionExport)
    assert "format version 2" in refusal({**good, "format_version": 2}, "x/config.json", TorchvisionExport)
    assert "lacks 'classes'" in refusal({k: v for k, v in good.items() if k != "classes"}, "x/config.json", TorchvisionExport)
    assert "runtime" in refusal({**good, "runtime": "../evil.py"}, "x/config.json", TorchvisionExport)


def test_the_shipped_runtime_reads_the_names_the_schema_writes():
    """frcnn_runtime.py ships inside an export and imports no bbadapt: its constants must agree by value.

    Read in a child process: the runtime imports torch, and loading torch's native libraries into this
    worker, which has MXNet, matplotlib and scipy loaded, crashed it with a segfault (seen on CI and here)."""
    code = ("import json; from converters.writers import frcnn_runtime as r; "
            "print(json.dumps([r.CONFIG, r.WEIGHTS, r.FORMAT, r.__file__]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    config, weights, fmt, file = json.loads(result.stdout.splitlines()[-1])
    assert (config, weights, fmt) == (EXPORT_CONFIG, EXPORT_WEIGHTS, TORCHVISION_FORMAT)
    assert Path(file).name == EXPORT_RUNTIME


# ---------------------------------------------------------------- reading and writing bundles


def test_read_manifest_returns_the_typed_manifest_and_the_old_dict_form(tmp_path):
    import bbadapt

    m = bbadapt.read_manifest(V1 / "backbone")
    assert isinstance(m, bbadapt.BundleManifest) and bbadapt.BundleManifest is BundleManifest
    assert m == read_manifest(V1 / "backbone") and m.directory == V1 / "backbone"
    assert m.to_dict() == json.loads((V1 / "backbone" / MANIFEST).read_text())
    assert m.backbone_params_path == V1 / "backbone" / BACKBONE_PARAMS


def test_write_manifest_stamps_and_store_manifest_keeps_the_stamp(tmp_path):
    written = write_manifest(tmp_path, {**minimal(), "detector": DETECTOR})
    assert written.schema_version == SCHEMA_VERSION and written.created and "bbadapt" in written.versions
    assert isinstance(written.detector, DetectorSection) and written.directory == tmp_path
    assert BundleManifest.from_json(tmp_path / MANIFEST) == written
    later = tmp_path / "later"
    later.mkdir()
    run = CheckpointSection.from_dict(CHECKPOINT)
    kept = store_manifest(later, written.replace(checkpoint=run))
    again = BundleManifest.from_json(later / MANIFEST)
    assert again == kept and again.created == written.created and again.checkpoint == run


def test_write_manifest_refuses_fields_the_schema_refuses(tmp_path):
    with pytest.raises(OutputError, match="the detector section lacks 'layout'"):
        write_manifest(tmp_path, {**minimal(), "detector": {"classes": ["a"], "freeze_at": 2, "settings": {}}})
    assert not (tmp_path / MANIFEST).exists()


# ---------------------------------------------------------------- the rule


RAW_ACCESS = re.compile(r"manifest\[|manifest\.get\(")


def test_no_raw_manifest_access_outside_the_bundle_package():
    """``grep -rnE 'manifest\\[|manifest\\.get\\(' bbadapt converters`` finds only ``bbadapt/bundle/``.

    (Until the report's manifest context moves to ``bbadapt/bundle/describe.py``, this names
    ``bbadapt/verify/report.py``: the rule holds once both branches are merged.)
    """
    found = []
    for package in ("bbadapt", "converters"):
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if relative.startswith("bbadapt/bundle/"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if RAW_ACCESS.search(line):
                    found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "raw manifest access outside bbadapt/bundle/:\n" + "\n".join(found)
