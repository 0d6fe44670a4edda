"""Options are validated once, at the boundary (issue 19, item 3), and trusted inward.

Each bad value is refused with the same one line from the command line and from Python (the
option objects of :mod:`bbadapt.options` refuse it when made), and the command line does so
without importing mxnet. Then the inward code - :func:`bbadapt.pipeline.convert`, the detector
bundle and build, ``train``, ``evaluate`` - is run with every validator wrapped in a counter:
what needs the model is checked exactly once, everything else never again.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import bbadapt
from bbadapt.options import ConvertOptions, DetectorOptions, EvaluateOptions, TrainOptions
from bbadapt.platform.errors import BbadaptError, ModelError, OptionError, SpecError

REPO = Path(__file__).resolve().parents[2]
CIFAR = "cifar_resnet20_v1"

# A CLI run that also says whether mxnet was imported by the time the error was printed.
CLI = ("import sys\nfrom bbadapt.cli import main\ncode = main(sys.argv[1:])\n"
       "print('mxnet imported' if 'mxnet' in sys.modules else 'no mxnet')\nsys.exit(code)")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# (command line, the same request in Python, the message both give). The Python side is a
# callable so that the refusal happens where the object is made, not later.
BAD = {
    "target-spec": (["convert", CIFAR, "--weights", "random", "--to", "nonsense"],
                    lambda: ConvertOptions(weights="random", target="nonsense"), SpecError,
                    "unknown input spec 'nonsense'; presets: rgb255, bgr255, rgb01, imagenet, caffe, tf, cifar, or "
                    "order=..,scale=..,mean=a/b/c,std=a/b/c"),
    "source-spec": (["convert", CIFAR, "--weights", "random", "--from", "scale=0"],
                    lambda: ConvertOptions(weights="random", source="scale=0"), SpecError, "scale must be positive, got 0.0"),
    "small-size": (["convert", CIFAR, "--weights", "random", "--sizes", "32x32,4x4"],
                   lambda: ConvertOptions(weights="random", sizes=[(32, 32), (4, 4)]), OptionError,
                   "bad size '4x4'; use HxW[,HxW...] with sides >= 8, e.g. 224x224,129x161"),
    "format-with-random": (["convert", CIFAR, "--weights", "random", "--format", "keras"],
                           lambda: ConvertOptions(weights="random", fmt="keras"), OptionError,
                           "--format applies to a weights file, not to --weights random"),
    "duplicate-classes": (["convert", "resnet18_v1b", "--weights", "random", "--detector", "faster-rcnn",
                           "--classes", "dog,cat,dog"],
                          lambda: DetectorOptions(classes=["dog", "cat", "dog"]), OptionError, "duplicate class names: dog"),
    "empty-class": (["convert", "resnet18_v1b", "--weights", "random", "--detector", "faster-rcnn", "--classes", "dog,"],
                    lambda: DetectorOptions(classes=["dog", ""]), OptionError,
                    "invalid class name '': names must be non-empty, without surrounding spaces"),
    "max-below-short": (["train", "DIR", "--dataset", "voc:DIR", "--short-side", "200", "--max-size", "100"],
                        lambda: TrainOptions(short_side=200, max_size=100), OptionError,
                        "--max-size (100) must be at least --short-side (200)"),
    "zero-lr": (["train", "DIR", "--dataset", "voc:DIR", "--lr", "0"], lambda: TrainOptions(lr=0.0), OptionError,
                "--lr must be positive, got 0.0"),
    "metric": (["evaluate", "DIR", "--dataset", "voc:DIR", "--metric", "map"], lambda: EvaluateOptions(metric="map"),
               OptionError, "unknown metric 'map'; choose one of: auto, voc07, voc12, coco"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_value_is_refused_alike_from_the_cli_and_from_python(case, tmp_path):
    args, make, error, message = BAD[case]
    with pytest.raises(error) as caught:
        make()
    assert str(caught.value) == message and caught.value.exit_code == 2
    result = cli(*[str(tmp_path) if a == "DIR" else a for a in args], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"bbadapt: error: {message}"], result.stderr
    assert result.stdout.strip() == "no mxnet", "an option error imported mxnet"


# Values the command line cannot even spell (typer refuses them as usage errors, with its own
# message, pinned in test_cli_errors.py): a Python caller meets the object's rule instead.
PYTHON_ONLY = [
    (lambda: ConvertOptions(fold="xyz"), "unknown fold 'xyz'; choose one of auto, bn, conv"),
    (lambda: ConvertOptions(bn="frozen"), "unknown BN mode 'frozen'; choose one of "),
    (lambda: ConvertOptions(seed=-1), "--seed must be an integer in 0..4294967295, got -1"),
    (lambda: ConvertOptions(tolerance=-1e-5), "--tolerance must be a finite number >= 0, got -1e-05"),
    (lambda: ConvertOptions(sizes=[(224,)]), "bad size (224,)"),
    (lambda: DetectorOptions(classes=["dog"], kind="yolo"), "unknown detector 'yolo'; bbadapt builds faster-rcnn"),
    (lambda: DetectorOptions(classes=["dog"], layout="c5"), "unknown detector layout 'c5'; choose one of c4, fpn"),
    (lambda: DetectorOptions(classes=["dog"], freeze_at=6), "--freeze-at must be 0..5 "),
    (lambda: DetectorOptions(), "no detector classes given; pass --classes NAME[,NAME...]"),
    (lambda: DetectorOptions(classes=["dog"], overrides={"anchor_scales": (1, 2)}), "unknown detector setting 'anchor_scales'"),
    (lambda: DetectorOptions(classes=["dog"], layout="fpn", overrides={"min_stage": 2, "per_device_batch_size": 2,
                                                                       "rpn_channel": 8, "sizes": 1}),
     "unknown detector setting 'sizes'"),
    (lambda: TrainOptions(flip_p=2.0), "flip probability must be in [0, 1]"),
]


@pytest.mark.parametrize("make, message", PYTHON_ONLY)
def test_python_callers_meet_each_rule_when_the_object_is_made(make, message):
    with pytest.raises(OptionError) as caught:
        make()
    assert str(caught.value).startswith(message) and caught.value.exit_code == 2


def test_a_valid_object_cannot_be_changed_behind_its_validation():
    classes, overrides, sizes = ["dog"], {"num_sample": 16}, [(32, 32)]
    detector = DetectorOptions(classes=classes, overrides=overrides)
    options = ConvertOptions(weights="random", sizes=sizes)
    classes.append("dog")
    overrides["anchor_scales"] = 1
    sizes.append((1, 1))
    assert detector.classes == ("dog",) and dict(detector.overrides) == {"num_sample": 16}
    assert options.sizes == ((32, 32),)
    with pytest.raises(TypeError):
        detector.overrides["num_sample"] = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.target = "nonsense"
    with pytest.raises(OptionError, match="unknown fold"):  # a changed copy is made, so validated, again
        dataclasses.replace(options, fold="xyz")
    assert options.target_spec.to_string() == bbadapt.parse_spec("rgb255").to_string()


def test_the_python_api_builds_the_same_objects_the_cli_does():
    assert bbadapt.ConvertOptions is ConvertOptions and bbadapt.DetectorOptions is DetectorOptions
    assert bbadapt.TrainOptions is TrainOptions and bbadapt.EvaluateOptions is EvaluateOptions
    from bbadapt import pipeline
    from bbadapt.engines.gluon import options as detection_options

    assert pipeline.ConvertOptions is ConvertOptions and pipeline.DetectorOptions is DetectorOptions  # the old homes
    assert detection_options.TrainConfig is TrainOptions


def test_importing_the_options_does_not_import_mxnet():
    code = "import bbadapt.options, sys; assert 'mxnet' not in sys.modules, 'mxnet imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- model-dependent: once, where the model is known


@pytest.mark.parametrize("model, detector, error, message", [
    ("resnet50_v3", None, ModelError, "unknown model 'resnet50_v3'"),
    (None, None, OptionError, "--weights random needs a MODEL (see `bbadapt list`), or give a weights file"),
    (CIFAR, ["dog"], ModelError, f"{CIFAR} is a CIFAR network (32x32 inputs, no stride-16/32 stages); "
                                 "a Faster R-CNN needs an ImageNet-style ResNet"),
], ids=["unknown-model", "no-model", "cifar-detector"])
def test_what_needs_the_model_is_refused_alike_before_any_work(model, detector, error, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(error) as caught:
        bbadapt.convert(model, out, ConvertOptions(weights="random"),
                        DetectorOptions(classes=detector) if detector else None)
    assert str(caught.value).startswith(message) and not out.exists()
    args = ["convert", *([model] if model else []), "--weights", "random", "-o", str(out)]
    args += ["--detector", "faster-rcnn", "--classes", ",".join(detector)] if detector else []
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(f"bbadapt: error: {message}"), result.stderr
    assert result.stdout.strip() == "no mxnet" and not out.exists()


# ---------------------------------------------------------------- validated once: counted


VALIDATORS = {  # (module, name) of each rule; every module holding the same function by name is wrapped too
    "require_detector_fits": ("bbadapt.engines.gluon.options", "require_detector_fits"),
    "check_classes": ("bbadapt.engines.gluon.options", "check_classes"),
    "check_settings": ("bbadapt.engines.gluon.options", "check_settings"),
    "check_metric": ("bbadapt.engines.gluon.options", "check_metric"),
    "check_sizes": ("bbadapt.options", "check_sizes"),
    "validate_request": ("bbadapt.engines.gluon.build", "validate_request"),
    "settings_for": ("bbadapt.engines.gluon.build", "settings_for"),
}
METHODS = {"ConvertOptions": (ConvertOptions, "__post_init__"), "DetectorOptions": (DetectorOptions, "__post_init__"),
           "TrainOptions.check": (TrainOptions, "check"), "EvaluateOptions": (EvaluateOptions, "__post_init__")}


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Every validator wrapped in a counter, wherever a module imported it by name; ``calls`` counts."""
    import importlib

    for module in ("bbadapt.pipeline", "bbadapt.engines.gluon.build", "bbadapt.engines.gluon.detector_bundle",
                   "bbadapt.engines.gluon.train", "bbadapt.engines.gluon.evaluate", "bbadapt.cli"):
        importlib.import_module(module)
    counts = dict.fromkeys([*VALIDATORS, *METHODS], 0)

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, (module, attr) in VALIDATORS.items():
        original = getattr(importlib.import_module(module), attr)
        for mod in [m for key, m in sys.modules.items() if key.startswith("bbadapt") and m is not None]:
            if getattr(mod, attr, None) is original:
                monkeypatch.setattr(mod, attr, counted(name, original))
    for name, (cls, attr) in METHODS.items():
        monkeypatch.setattr(cls, attr, counted(name, getattr(cls, attr)))
    return counts


def test_convert_checks_the_model_once_and_trusts_the_options(calls, monkeypatch, tmp_path):
    """A whole ``convert --detector`` (the equivalence and gradient checks stubbed: they take no options)."""
    import json

    from bbadapt import pipeline
    from bbadapt.core import zoo
    from bbadapt.core.registry import Converted
    from bbadapt.core.rewrite import clone
    from bbadapt.verify.check_report import CheckReport
    from tests.conftest import calibrated

    model = "resnet18_v1b"
    options = ConvertOptions(weights="random", target="bgr255", sizes=[(64, 64)])
    detector = DetectorOptions(classes=["raccoon", "dog"], freeze_at=3, overrides={"num_sample": 16})
    assert calls["ConvertOptions"] == 1 and calls["DetectorOptions"] == 1 and calls["check_classes"] == 1
    made = dict(calls)

    def source(name, weights, seed, spec, say, fmt):  # the zoo net with calibrated random weights, quickly
        assert (name, weights, fmt) == (model, "random", None)
        return Converted(clone(calibrated(model)), {"zoo": model}, zoo.model_info(model), {"kind": "random", "seed": seed})

    monkeypatch.setattr(pipeline, "load_source", source)
    written = json.loads((Path(__file__).parents[1] / "data" / "v1_reports" / "cifar" / "report.json").read_text())
    monkeypatch.setattr(pipeline, "_checked", lambda *a: CheckReport.from_dict(written))  # a real report, as main wrote it
    monkeypatch.setattr(pipeline, "add_training", lambda report, *a: report)
    monkeypatch.setattr(pipeline, "write_reports", lambda *a: None)
    pipeline.convert(model, tmp_path / "out", options, detector)
    during = {k: calls[k] - made[k] for k in calls}
    assert during.pop("require_detector_fits") == 1  # where the model is first known: its zoo name
    assert not any(during.values()), {k: v for k, v in during.items() if v}  # nothing is checked again
    section = json.loads((tmp_path / "out" / "manifest.json").read_text())["detector"]
    assert (section["classes"], section["freeze_at"], section["settings"]["num_sample"]) == (["raccoon", "dog"], 3, 16)


def test_a_weights_file_is_fitted_once_after_it_is_read(calls, monkeypatch, tmp_path):
    from bbadapt import pipeline
    from bbadapt.core import zoo
    from bbadapt.core.registry import Converted

    class Stop(Exception):
        pass

    def source(name, weights, seed, spec, say, fmt):
        return Converted(None, {"zoo": CIFAR}, zoo.model_info(CIFAR), {"kind": "file"})

    monkeypatch.setattr(pipeline, "load_source", source)
    detector = DetectorOptions(classes=["dog"])
    before = calls["require_detector_fits"]
    with pytest.raises(ModelError, match="CIFAR network"):
        pipeline.convert(None, tmp_path / "out", ConvertOptions(weights=str(tmp_path / "w.params")), detector)
    assert calls["require_detector_fits"] - before == 1


def test_loose_values_make_one_object_each(calls):
    """The entry points for loose values (a manifest's section, scripts) validate once, by making the object."""
    from bbadapt.core import zoo
    from bbadapt.engines.gluon.build import validate_request

    made = validate_request(zoo.model_info("resnet18_v1b"), ["dog"], "fpn", 0)
    assert made == DetectorOptions(classes=("dog",), layout="fpn", freeze_at=0)
    assert calls["DetectorOptions"] == 2 and calls["require_detector_fits"] == 1 and calls["check_classes"] == 2


def test_train_and_evaluate_trust_their_options(calls, tmp_path):
    from bbadapt.engines.gluon.evaluate import evaluate
    from bbadapt.engines.gluon.train import train

    config, options = TrainOptions(epochs=1), EvaluateOptions(metric="voc12")
    assert calls["TrainOptions.check"] == 1 and calls["check_metric"] == 1
    with pytest.raises(BbadaptError, match="no bbadapt output|manifest"):
        train(tmp_path / "nothing", "voc:x", config)
    with pytest.raises(BbadaptError, match="no bbadapt output|manifest"):
        evaluate(tmp_path / "nothing", "voc:x", options)
    assert calls["TrainOptions.check"] == 1 and calls["check_metric"] == 1
