"""The whole job, as one function the CLI and Python users share.

source weights -> Gluon net + source spec -> adapt -> check -> bundle. ``bbadapt convert``
and :func:`convert` take the same arguments; ``bbadapt check DIR`` is :func:`recheck`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bbadapt.bundle.backbone import load_adapted, save_backbone
from bbadapt.bundle.manifest import PARAMS, read_manifest, refuse_existing, staged_output, write_manifest
from bbadapt.bundle.provenance import locate_weights
from bbadapt.check.equivalence import check
from bbadapt.check.report import write_reports
from bbadapt.core import images as imgs
from bbadapt.core import zoo
from bbadapt.core.atomic import replace_together
from bbadapt.core.errors import OptionError, OutputError, WeightsError
from bbadapt.core.rewrite import FP16_MAX, TINY_VAR, Adapted, adapt
from bbadapt.core.spec import InputSpec, parse_spec
from bbadapt.core.weights import randomize

if TYPE_CHECKING:
    from bbadapt.core.registry import Converted

Progress = Callable[[str], None]
N_CALIBRATION_PHOTOS = 8
N_CALIBRATION_TILES = 32


def params_digest(net) -> str:
    """sha256 over every parameter (structural name + float32 bytes): identifies weights in memory."""
    digest = hashlib.sha256()
    for key, param in sorted(net._collect_params_with_prefix().items()):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(param.data().asnumpy(), dtype=np.float32).tobytes())
    return digest.hexdigest()


def calibration_images(info: zoo.ModelInfo) -> tuple[np.ndarray, str]:
    """Real images for BN calibration of random weights: CIFAR tiles or the packaged photos."""
    if info.is_cifar:
        tiles, _ = imgs.cifar_tiles()
        return tiles[:N_CALIBRATION_TILES], f"{N_CALIBRATION_TILES} packaged CIFAR-10 tiles"
    size = (info.input_size, info.input_size)
    raw, _ = imgs.photos(size, limit=N_CALIBRATION_PHOTOS)
    return raw, f"{len(raw)} packaged raccoon photos at {size[0]}x{size[1]}"


WEIGHT_KINDS = ("pretrained", "random")


def load_source(model: str | None, weights: str = "pretrained", seed: int = 0, source: InputSpec | None = None,
                progress: Progress | None = None, fmt: str | None = None) -> Converted:
    """The original network, whatever the weights: zoo ``pretrained``/``random``, or a file.

    A file goes through :mod:`converters` (format from content, ``fmt`` overrides; ``model``
    names the architecture where the file cannot). Returns a
    :class:`~converters.base.Converted`: the net, how to rebuild it, its info and provenance.
    """
    from bbadapt.core.registry import Converted
    from converters.readers import read

    say = progress or (lambda _m: None)
    if weights not in WEIGHT_KINDS:
        say(f"reading {weights}")
        return read(weights, fmt, arch=model, progress=say)
    if fmt:
        raise OptionError(f"--format applies to a weights file, not to --weights {weights}")
    if model is None:
        raise OptionError(f"--weights {weights} needs a model name (see `bbadapt list`)")
    info = zoo.model_info(model)
    if weights == "pretrained":
        say(f"getting pretrained {model} (cache: {os.environ.get('MXNET_HOME', '~/.mxnet')}/models)")
        net = zoo.build(model, pretrained=True)
        return Converted(net, {"zoo": model}, info,
                         {"kind": "pretrained", "library": info.library, "sha256": params_digest(net)})
    net = zoo.build(model)
    raw, what = calibration_images(info)
    say(f"random weights (seed {seed}), calibrating BatchNorm statistics on {what}")
    randomize(net, seed, parse_spec(source or info.source_spec).normalize(raw))
    return Converted(net, {"zoo": model}, info,
                     {"kind": "random", "seed": seed, "calibration": what, "sha256": params_digest(net),
                      "note": "seeded random weights with BN statistics calibrated on real photos; NOT pretrained"})


def _labelled(info: zoo.ModelInfo) -> tuple[np.ndarray, np.ndarray] | None:
    """CIFAR-10 classifiers also get their accuracy on the 100 packaged tiles."""
    if not info.is_cifar:
        return None
    tiles, labels = imgs.cifar_tiles()
    return tiles, labels


def convert(model: str | None, out: str | os.PathLike, weights: str = "pretrained", source: str | None = None,
            target: str = "rgb255", fold: str = "auto", bn: str | None = None, force: bool = False,
            images: str | None = None, sizes: list[tuple[int, int]] | None = None, seed: int = 0,
            tolerance: float = 1e-5, progress: Progress | None = None, fmt: str | None = None,
            detector: str | None = None, classes: list[str] | None = None, layout: str = "c4",
            freeze_at: int = 2, detector_options: dict | None = None) -> tuple[dict, Adapted]:
    """Adapt ``model`` (or the network in a weights file), check it and write ``out`` atomically.

    ``bn`` defaults to ``fused`` for a backbone and ``affine`` for a detector (the form that
    trains like a frozen BN). With ``detector="faster-rcnn"`` the output also holds a
    Faster R-CNN built on the adapted backbone (:mod:`bbadapt.detection`).
    Returns the report and the :class:`~bbadapt.rewrite.Adapted` net.
    """
    say = progress or (lambda _m: None)
    if detector not in (None, "faster-rcnn"):
        raise OptionError(f"unknown detector {detector!r}; bbadapt builds faster-rcnn")
    bn = bn or ("affine" if detector else "fused")
    tgt = parse_spec(target)
    src_override = parse_spec(source) if source else None
    if model is not None and weights in WEIGHT_KINDS:
        info = zoo.model_info(model)  # argument errors before any work
        if detector:
            _detection().validate_request(info, classes or [], layout, freeze_at)
    refuse_existing(Path(out), force)  # fail before minutes of work, not after
    if images:
        imgs.photo_files(images)
    original = load_source(model, weights, seed, src_override, say, fmt)
    info = original.info
    if detector:
        _detection().validate_request(info, classes or [], layout, freeze_at)
        _detection().discover_layout(original.net)  # can it be cut into a detector? before minutes of checking
    src = src_override or parse_spec(info.source_spec)
    net = original.net
    say(f"adapting: fold={fold}, bn={bn}")
    adapted = adapt(net, src, tgt, fold=fold, bn=bn)
    for param in net.collect_params().values():
        param.grad_req = "null"  # the original only serves as the reference now: free its gradients
    report = _checked(net, adapted, info, images, sizes, tolerance, say)
    say(f"writing {out}")
    with staged_output(out, force) as stage:
        params_sha = save_backbone(adapted, stage)
        manifest = {
            "kind": "detector" if detector else "backbone", "model": info.name, "arch": original.arch,
            "family": info.family, "input_size": info.input_size, "weights": original.provenance,
            "source": src.to_dict(), "target": tgt.to_dict(), "fold_requested": fold, "fold": adapted.fold,
            "bn": bn, "exact": adapted.exact, "plan": adapted.plan, "health": adapted.health,
            "graph": {"data_consumer": adapted.graph.data_consumer, "first_conv": adapted.graph.first_conv,
                      "stages": [s.path for s in adapted.graph.stages], "fusable_pairs": len(adapted.graph.pairs),
                      "unfusable": adapted.graph.unfusable},
            "params_file": PARAMS, "params_sha256": params_sha,
            "check": {"passed": report["passed"], "worst_max_rel": report["worst_max_rel"], "tolerance": tolerance},
        }
        if detector:
            say(f"building the Faster R-CNN ({layout}) on the adapted backbone")
            from bbadapt.detection.detector_bundle import add_detector

            manifest["detector"] = add_detector(stage, adapted, info, classes or [], layout=layout, freeze_at=freeze_at,
                                                overrides=detector_options, progress=say, seed=seed)
        write_manifest(stage, manifest)
        write_reports(report, stage, manifest)
    return report, adapted


def _detection():
    from bbadapt.detection import build as detection  # imports gluoncv's detector stack: only when a detector is asked for

    return detection  # validate_request runs before any heavy work


def _checked(original, adapted: Adapted, info: zoo.ModelInfo, images: str | None,
             sizes: list[tuple[int, int]] | None, tolerance: float, say: Progress) -> dict:
    """The check as convert and recheck run it: report with model name and BN health notes."""
    report = check(original, adapted.source, adapted, cifar=info.is_cifar, photos_dir=images, sizes=sizes,
                   tolerance=tolerance, labelled=_labelled(info), progress=say)
    report["model"] = info.name
    report["notes"] += health_notes(adapted.health)
    return report


def health_notes(health: list[dict]) -> list[str]:
    """One line per BatchNorm whose statistics deserve a look (the fold stays exact)."""
    notes = []
    for h in health:
        parts = []
        if h["tiny_var_channels"]:
            parts.append(f"{h['tiny_var_channels']} channels with running_var < {TINY_VAR:g} (scale up to {h['max_abs_scale']:.3g}, set by eps)")
        if h["fp16_overflow_channels"]:
            parts.append(f"{h['fp16_overflow_channels']} channels with running_var > {FP16_MAX:g} (overflows fp16)")
        notes.append(f"BatchNorm {h['bn']}: " + "; ".join(parts))
    return notes


def recheck(directory: str | os.PathLike, images: str | None = None, sizes: list[tuple[int, int]] | None = None,
            progress: Progress | None = None, weights: str | None = None) -> dict:
    """Re-run the equivalence check of an existing output and rewrite its reports.

    ``weights``: where the original weights file is now, when it moved since the conversion
    (checked by sha256 against the manifest)."""
    say = progress or (lambda _m: None)
    directory = Path(directory)
    if "checkpoint" in read_manifest(directory, require_params=False):
        raise OutputError(f"{directory} is a training checkpoint: it holds the trained detector, not the converted "
                          "backbone that `check` compares with its original; check the bundle it was trained from")
    manifest = read_manifest(directory)
    src = InputSpec.from_dict(manifest["source"])
    prov = manifest.get("weights", {})
    where = locate_weights(prov, weights)
    if where:
        weights, model = str(where[prov["path"]]), prov["arch_arg"] if "arch_arg" in prov else manifest["model"]
    else:
        weights, model = prov.get("kind", "pretrained"), manifest["model"]
    loaded = load_source(model, weights, int(prov.get("seed", 0)), src, say, prov.get("format"))
    original, info, again = loaded.net, loaded.info, loaded.provenance
    if prov.get("files") and set(again.get("files", {})) != {str(p.resolve()) for p in where.values()}:
        # e.g. a -symbol.json whose newest -EEEE.params is not the one converted
        raise WeightsError(f"re-reading {prov['path']} now reads {', '.join(sorted(again.get('files', {})))}, not the "
                           f"files converted ({', '.join(sorted(prov['files']))}); pass those files to convert again")
    say("rebuilding the adapted backbone from the bundle")
    adapted = load_adapted(directory, manifest)
    tolerance = float(manifest.get("check", {}).get("tolerance", 1e-5))  # judge as the conversion was judged
    report = _checked(original, adapted, info, images, sizes, tolerance, say)
    if again.get("sha256") != prov.get("sha256"):
        report["notes"].append("the regenerated original weights differ bitwise from those converted "
                               "(random calibration on another machine?); errors include that difference")
    tmp = Path(tempfile.mkdtemp(prefix=".recheck-", dir=directory))
    try:  # each report file is replaced whole, never left half-written
        write_reports(report, tmp, manifest)
        replace_together([(tmp / name, directory / name) for name in ("report.json", "report.md", "report.html")])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
