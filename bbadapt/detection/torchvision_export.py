"""A bbadapt Faster R-CNN (bundle or training checkpoint) as a torchvision ``FasterRCNN``, proven.

``bbadapt export DIR --torchvision OUT`` on a detector writes the directory ``OUT``:

* ``model.safetensors``: the torchvision state dict (written with numpy, no torch needed);
* ``config.json``: classes, every setting, input convention, freeze-at, BN eps, provenance;
* ``frcnn_runtime.py``: a module needing only torch + torchvision whose ``load(OUT, device)``
  builds the (lightly subclassed) ``FasterRCNN`` -- :mod:`bbadapt.detection.frcnn_runtime`,
  where every difference from stock torchvision is listed;
* ``check.json``: the proof, four levels on real photos at an odd, a normal and a tiny size
  (:mod:`bbadapt.detection.torchvision_export_check`).

Everything is written into a staging directory, the runtime there loads the weights there,
and the directory is renamed to ``OUT`` only when the check passes.

Input convention: the bundle's input fold is undone (conv1 gets the weights that take the
SOURCE spec, as the backbone export does) and the source normalization moves into the
transform's ``image_mean``/``image_std``: by default the model takes RGB 0..1 floats like
every torchvision reference script (``input_range="255"``: RGB 0..255). A BGR source is
served by permuting conv1's input channels. Phase 1: ``resnetN_v1b`` backbones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import numpy as np

from bbadapt.core import atomic
from bbadapt.core.errors import ModelError, OptionError, OutputError
from bbadapt.detection.torchvision_export_check import INPUT_RANGES
from converters.readers import safetensors_io

RUNTIME_SOURCE = Path(__file__).with_name("frcnn_runtime.py")
RUNTIME_FILE = "frcnn_runtime.py"
FORMAT = "bbadapt-torchvision-faster-rcnn"

RPN_TRAINING = {"fg_iou_thresh": 0.7, "bg_iou_thresh": 0.3, "batch_size_per_image": 256, "positive_fraction": 0.5}
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)  # gluoncv RCNN box decoder; torchvision's weights are 1/std
SCORE_THRESH = 0.01  # gluoncv MultiPerClassDecoder
FPN_LEVELS = (2, 5)  # P2..P5 pool RoIs; P6 feeds the RPN only


@dataclass
class ExportOptions:
    """How to export: the model's input range and the check's image sizes."""

    input_range: str = "01"  # "01": RGB 0..1 (torchvision's convention); "255": RGB 0..255
    sizes: list[tuple[int, int]] | None = None  # check sizes (HxW); None: odd, normal (gluoncv short side), tiny
    force: bool = False


@dataclass
class GluonDetector:
    """A detector bundle or checkpoint rebuilt in MXNet, with its backbone net kept addressable."""

    directory: Path
    manifest: dict
    section: dict
    backbone: object  # adapted gluon backbone (its parameters are the detector's)
    detector: object  # gluoncv FasterRCNN
    source: object  # InputSpec the backbone weights were trained with
    target: object  # InputSpec the detector takes
    model: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def layout(self) -> str:
        return self.section["layout"]

    @property
    def settings(self) -> dict:
        return self.section["settings"]


def is_detector_dir(directory: str | os.PathLike) -> bool:
    """Does ``directory`` hold a detector (bundle or checkpoint) rather than a backbone bundle?"""
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and (manifest.get("kind") == "detector" or isinstance(manifest.get("detector"), dict))


def load_gluon(directory: str | os.PathLike) -> GluonDetector:
    """Rebuild the stored detector (as :func:`bbadapt.detector_bundle.load_detector`), keeping its backbone."""
    from bbadapt.bundle.backbone import backbone_structure
    from bbadapt.core.spec import InputSpec
    from bbadapt.detection.build import build_detector
    from bbadapt.detection.detector_bundle import DETECTOR_PARAMS, detector_section, load_detector_params

    directory = Path(directory)
    manifest, section = detector_section(directory)
    backbone = backbone_structure(manifest)
    detector, _ = build_detector(backbone, None, section.get("family", manifest.get("family", "")),
                                 list(section["classes"]), section["layout"], int(section["freeze_at"]),
                                 seed=int(section.get("seed", 0)), **section["settings"])
    load_detector_params(detector, backbone, directory / section.get("params_file", DETECTOR_PARAMS))
    model = (manifest.get("arch") or {}).get("zoo") or manifest.get("model", "")
    return GluonDetector(directory, manifest, section, backbone, detector, InputSpec.from_dict(manifest["source"]),
                         InputSpec.from_dict(section.get("input") or manifest["target"]), str(model))


# ---------------------------------------------------------------- tensors


def _value(param) -> np.ndarray:
    return param.data().asnumpy().astype(np.float32)


def backbone_tensors(gluon: GluonDetector) -> tuple[dict[str, np.ndarray], int]:
    """torchvision ResNet tensors of the backbone, conv1 taking the SOURCE spec; and the depth."""
    from bbadapt.bundle.backbone import load_adapted
    from converters.readers.torchvision import IGNORED_SUFFIX
    from converters.writers.bundle_io import Bundle
    from converters.writers.torchvision import _v1b_depth, torchvision_state

    try:
        depth = _v1b_depth(gluon.model)
    except ModelError:
        raise ModelError(f"the detector's backbone {gluon.model} cannot be exported to torchvision yet: "
                         "phase 1 takes resnet{18,34,50,101,152}_v1b bodies") from None
    adapted = load_adapted(gluon.directory, gluon.manifest, net=gluon.backbone)
    state = torchvision_state(Bundle(gluon.directory, gluon.manifest, adapted, gluon.model))
    return {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIX) and not k.startswith("fc.")}, depth


def rgb_first_conv(weight: np.ndarray, source) -> np.ndarray:
    """conv1 for source-normalized input in RGB order (source channel j reads raw channel perm[j])."""
    return weight[:, list(np.argsort(source.perm))]


def image_normalization(source, input_range: str) -> tuple[list[float], list[float]]:
    """``image_mean``/``image_std`` (RGB order) mapping the model's input to the source spec, exactly."""
    divisor = INPUT_RANGES[input_range]
    mean, std = [0.0] * 3, [0.0] * 3
    for j, raw_channel in enumerate(source.perm):
        mean[raw_channel] = source.mean[j] / (divisor * source.scale)
        std[raw_channel] = source.std[j] / (divisor * source.scale)
    return mean, std


def _params(gluon: GluonDetector) -> dict:
    return gluon.detector._collect_params_with_prefix()


def head_tensors(gluon: GluonDetector) -> dict[str, np.ndarray]:
    """RPN, FPN and box-head tensors under torchvision's names."""
    params = _params(gluon)
    rpn = "rpn.rpn_head" if gluon.layout == "fpn" else "rpn"
    names = {f"{rpn}.conv1.0.weight": "rpn.head.conv.0.0.weight", f"{rpn}.conv1.0.bias": "rpn.head.conv.0.0.bias",
             f"{rpn}.score.weight": "rpn.head.cls_logits.weight", f"{rpn}.score.bias": "rpn.head.cls_logits.bias",
             f"{rpn}.loc.weight": "rpn.head.bbox_pred.weight", f"{rpn}.loc.bias": "rpn.head.bbox_pred.bias",
             "class_predictor.weight": "roi_heads.box_predictor.cls_score.weight",
             "class_predictor.bias": "roi_heads.box_predictor.cls_score.bias"}
    if gluon.layout == "fpn":
        for idx in range(4):
            for kind, block in (("conv_lat", "inner_blocks"), ("conv1", "layer_blocks")):
                for leaf in ("weight", "bias"):
                    names[f"features.P{idx + 2}_{kind}_{leaf}"] = f"backbone.fpn.{block}.{idx}.0.{leaf}"
        for leaf in ("weight", "bias"):
            names[f"features.P6_conv1_{leaf}"] = f"backbone.fpn.extra_blocks.p6.{leaf}"
            names[f"box_features.0.{leaf}"] = f"roi_heads.box_head.fc6.{leaf}"
            names[f"box_features.2.{leaf}"] = f"roi_heads.box_head.fc7.{leaf}"
    missing = sorted(k for k in names if k not in params)
    if missing:
        raise ModelError(f"the detector lacks {', '.join(missing[:3])}: not a bbadapt Faster R-CNN of layout {gluon.layout}")
    tensors = {tv: _value(params[gl]) for gl, tv in names.items()}
    weight, bias = _value(params["box_predictor.weight"]), _value(params["box_predictor.bias"])
    tensors["roi_heads.box_predictor.bbox_pred.weight"] = np.concatenate([np.zeros((4, weight.shape[1]), np.float32), weight])
    tensors["roi_heads.box_predictor.bbox_pred.bias"] = np.concatenate([np.zeros(4, np.float32), bias])
    return tensors


def state_dict(gluon: GluonDetector) -> tuple[dict[str, np.ndarray], int]:
    """The whole torchvision state dict (float32) and the backbone depth."""
    body, depth = backbone_tensors(gluon)
    body["conv1.weight"] = rgb_first_conv(body["conv1.weight"], gluon.source)
    state = {}
    for name, value in body.items():
        in_head = gluon.layout == "c4" and name.startswith("layer4.")
        state[f"roi_heads.box_head.{name}" if in_head else f"backbone.body.{name}"] = value.astype(np.float32)
    state.update(head_tensors(gluon))
    return state, depth


# ---------------------------------------------------------------- config


def cell_anchors(gluon: GluonDetector) -> list[list[list[float]]]:
    """GluonCV's anchors at feature cell (0, 0) per level, read off the detector's anchor constants."""
    generators = gluon.detector.rpn.anchor_generator
    generators = list(generators) if gluon.layout == "fpn" else [generators]
    return [_value(g.anchors)[0, 0, 0, 0].reshape(-1, 4).tolist() for g in generators]


def _box_clip(settings: dict):
    return None if settings.get("clip") in (None, -1) else float(settings["clip"])


def make_config(gluon: GluonDetector, depth: int, input_range: str) -> dict:
    """``config.json``: everything the runtime needs, and what a reader needs to trust it."""
    from bbadapt.bundle.manifest import versions
    from bbadapt.core.foldmath import unit_variance
    from bbadapt.core.zoo import RESNET_LAYOUTS
    from converters.readers.torchvision import BN_EPS

    s = gluon.settings
    fpn = gluon.layout == "fpn"
    counts, bottleneck = RESNET_LAYOUTS[depth]
    strides = [int(v) for v in s["strides"]] if fpn else [int(s["strides"])]
    mean, std = image_normalization(gluon.source, input_range)
    freeze_at = int(gluon.section["freeze_at"])
    return {
        "format": FORMAT, "format_version": 1, "runtime": RUNTIME_FILE,
        "classes": list(gluon.section["classes"]),
        "labels": "torchvision label k is classes[k-1]; 0 is the background (gluoncv class id = k-1)",
        "layout": gluon.layout,
        "backbone": {"arch": f"resnet{depth}", "gluon_model": gluon.model, "block": "bottleneck" if bottleneck else "basic",
                     "layers": list(counts), "freeze_at": freeze_at, "trainable_layers": 5 - freeze_at,
                     "bn": "FrozenBatchNorm2d", "bn_eps": BN_EPS, "bn_running_var": float(unit_variance(BN_EPS)),
                     "bn_note": "frozen constants (weight s, bias t, mean 0, var 1-eps): never overwrite_eps(model, 0.0)"},
        "fpn_channels": 256 if fpn else None,
        "input": {"range": input_range, "order": "rgb", "image_mean": mean, "image_std": std,
                  "meaning": f"float RGB 0..{'1' if input_range == '01' else '255'}; the transform normalizes to the "
                             "source spec the weights were trained with",
                  "source_spec": gluon.source.to_dict(), "bundle_input_spec": gluon.target.to_dict()},
        "transform": {"min_size": int(s["short"]), "max_size": int(s["max_size"]), "size_divisible": 1,
                      "resize_note": "torchvision floors and resizes floats; gluoncv rounds and resizes uint8 "
                                     "with OpenCV: same size rule, not the same pixels"},
        "rpn": {"channels": int(s["rpn_channel"]), "strides": strides, "cell_anchors": cell_anchors(gluon),
                "pre_nms_top_n": {"training": int(s["rpn_train_pre_nms"]), "testing": int(s["rpn_test_pre_nms"])},
                "post_nms_top_n": {"training": min(int(s["rpn_train_post_nms"]), int(s["rpn_train_pre_nms"])),
                                   "testing": min(int(s["rpn_test_post_nms"]), int(s["rpn_test_pre_nms"]))},
                "nms_thresh": float(s["rpn_nms_thresh"]), "min_size": float(s["rpn_min_size"]),
                "bbox_xform_clip": _box_clip(s), **RPN_TRAINING},
        "roi_heads": {"output_size": [int(v) for v in s["roi_size"]], "sampling_ratio": 2, "aligned": False,
                      "strides": strides[:4] if fpn else strides, "levels": list(FPN_LEVELS) if fpn else None,
                      "representation_size": 1024 if fpn else None,
                      "box_coder_weights": [1.0 / v for v in RCNN_STDS], "bbox_xform_clip": _box_clip(s),
                      "score_thresh": SCORE_THRESH, "nms_thresh": float(s["nms_thresh"]), "nms_topk": int(s["nms_topk"]),
                      "detections_per_img": -1, "fg_iou_thresh": float(s["pos_iou_thresh"]),
                      "bg_iou_thresh": float(s["pos_iou_thresh"]), "batch_size_per_image": int(s["num_sample"]),
                      "positive_fraction": float(s["pos_ratio"])},
        "gluoncv_settings": dict(s),
        "provenance": {"bundle": str(gluon.directory.resolve()), "kind": gluon.manifest.get("kind"),
                       "checkpoint": gluon.manifest.get("checkpoint"), "weights": gluon.manifest.get("weights"),
                       "detector_params_sha256": gluon.section.get("params_sha256"),
                       "exported": datetime.now(UTC).isoformat(timespec="seconds"),
                       "versions": {**versions(), **_torch_versions()}},
    }


def _torch_versions() -> dict:
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


# ---------------------------------------------------------------- staging and export


def import_runtime(directory: Path) -> ModuleType:
    """Import the runtime file shipped in ``directory`` (the checked one, not this package's copy)."""
    name = f"_bbadapt_frcnn_runtime_{abs(hash(str(directory)))}"
    spec = importlib.util.spec_from_file_location(name, directory / RUNTIME_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision's operator-registration RuntimeError
        raise OutputError("exporting a detector to torchvision needs torch and torchvision "
                          f"(pip install 'bbadapt[torch]'): {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}") from None


EXPORT_FILES = frozenset({"model.safetensors", "config.json", RUNTIME_FILE, "check.json", "__pycache__"})


def export_ownership_problem(out: Path) -> str | None:
    """Why ``--force`` must not replace ``out``: only a torchvision detector export, by content, holding only its files."""
    names = {p.name for p in out.iterdir()}
    if not names:
        return None
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return "it is not a torchvision detector export (no readable config.json)"
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        return "its config.json is not a bbadapt torchvision detector export"
    foreign = sorted(names - EXPORT_FILES)
    if foreign:
        return f"it holds files bbadapt did not write ({', '.join(foreign[:3])})"
    return None


def export_detector(directory: str | os.PathLike, out: str | os.PathLike, force: bool = False, progress=None,
                    options: ExportOptions | None = None) -> dict:
    """Write ``out`` (a directory) from the detector in ``directory``; see the module docstring."""
    from bbadapt.detection.torchvision_export_check import CheckOptions, run_check

    options = options or ExportOptions(force=force)
    force = force or options.force
    if options.input_range not in INPUT_RANGES:
        raise OptionError(f"unknown torchvision input range {options.input_range!r}; choose 01 or 255")
    say = progress or (lambda _m: None)
    out = atomic.resolve_target(Path(out))
    atomic.check_target(out, force, export_ownership_problem)
    _require_torch()
    say(f"loading the detector from {directory}")
    gluon = load_gluon(directory)
    state, depth = state_dict(gluon)
    config = make_config(gluon, depth, options.input_range)
    with atomic.staged_directory(out, force, export_ownership_problem, what="torchvision export") as stage:
        metadata = {"format": "pt", "bbadapt.format": FORMAT, "bbadapt.layout": gluon.layout}
        (stage / "model.safetensors").write_bytes(safetensors_io.dumps(state, metadata))
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(RUNTIME_SOURCE, stage / RUNTIME_FILE)
        say("loading the export with its own runtime and checking it against the GluonCV detector")
        model = import_runtime(stage).load(stage, "cpu")
        check = run_check(gluon, model, CheckOptions(sizes=options.sizes, input_range=options.input_range), say)
        (stage / "check.json").write_text(json.dumps(check, indent=2) + "\n")
        if not check["passed"]:
            raise OutputError(f"the torchvision model does not reproduce the GluonCV detector ({check['summary']}); "
                              "nothing written")
    say(f"wrote {out}")
    return {"format": "torchvision-faster-rcnn", "out": str(out), "layout": gluon.layout, "architecture": config["backbone"]["arch"],
            "classes": ",".join(config["classes"]), "input": config["input"]["meaning"], "tensors": len(state),
            "check_passed": True, "check": check["summary"],
            "load": f"sys.path.insert(0, {str(out)!r}); import frcnn_runtime; frcnn_runtime.load({str(out)!r}, 'cpu')"}


def export(bundle_dir: str | Path, out: str | Path, force: bool = False, progress=None,
           sizes: list[tuple[int, int]] | None = None, input_range: str = "01", backbone: bool = False) -> dict:
    """``bbadapt export --torchvision``: a detector bundle or checkpoint becomes a torchvision ``FasterRCNN``
    directory (:func:`export_detector`); a backbone bundle a ResNet state dict
    (:func:`converters.writers.torchvision.export_bundle`; ``backbone``: a detector bundle's backbone)."""
    if is_detector_dir(bundle_dir) and not backbone and Path(out).suffix in (".safetensors", ".pth", ".pt"):
        raise OutputError(f"{bundle_dir} holds a detector; export its backbone with --backbone, or the whole detector "
                          "as a torchvision FasterRCNN into a directory (a name without .safetensors/.pth)")
    if is_detector_dir(bundle_dir) and not backbone:
        options = ExportOptions(input_range=input_range, sizes=sizes, force=force)
        return export_detector(bundle_dir, out, force=force, progress=progress, options=options)
    from converters.writers.torchvision import export_bundle

    return export_bundle(bundle_dir, out, force=force, progress=progress, sizes=sizes, backbone=backbone)
