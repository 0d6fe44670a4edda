"""A Faster R-CNN in a bundle: write it, reload it, export it as a symbol, compare detections.

A bundle (or a training checkpoint) stores the detector as ``manifest.json`` (with a
``detector`` section) + ``detector.params``. Reloading never needs the backbone's own
``backbone.params``: the backbone structure is rebuilt from the architecture and the plan
in the manifest, the detector around it from the recorded settings, and every value comes
from ``detector.params`` (loaded strictly: nothing missing, nothing extra).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bbadapt.bundle.backbone import backbone_structure
from bbadapt.bundle.manifest import read_manifest
from bbadapt.bundle.schema import DETECTOR_PARAMS, BundleManifest, DetectorSection
from bbadapt.engines.gluon.build import build_detector, build_from_options, instance_pattern
from bbadapt.engines.gluon.options import DetectorOptions, require_detector_fits
from bbadapt.platform.atomic import replace_together
from bbadapt.platform.devices import check_contexts
from bbadapt.platform.errors import BbadaptError, OutputError
from bbadapt.verify.detections import BOX_TOL, SCORE_TOL, compare_detections, detections  # noqa: F401 - re-exported

Progress = Callable[[str], None]
EXPORT_SHORT = 320
TARGET_GENERATOR = "_target_generator."  # built on the first training step; never part of a saved detector


def _quiet(_message: str) -> None:
    return None


# ---------------------------------------------------------------- parameters


def _canonical(key: str, pattern: re.Pattern) -> str:
    """A parameter key without the backbone's per-instance counter (FPN keys carry full names)."""
    return pattern.sub("<backbone>_", key)


def save_detector_params(detector, path: str | os.PathLike) -> str:
    """``save_parameters`` form, minus the R-CNN target generator; returns the sha256 of the file.

    gluoncv creates ``_target_generator`` lazily, on the first training step: its encoder
    constants are no parameters of a freshly built detector, so a file holding them fails the
    strict load that :func:`load_detector` does. A bundle's detector was never trained (nothing
    to leave out); a training checkpoint's was. Multi-device parameters are saved once
    (``_reduce``: the average of the copies, as ``save_parameters`` does).
    """
    import mxnet as mx

    from bbadapt.core.weights import sha256_of

    params = {name: param._reduce() for name, param in detector._collect_params_with_prefix().items()
              if not name.startswith(TARGET_GENERATOR)}
    mx.nd.save(str(path), params)
    return sha256_of(path)


def load_detector_params(detector, backbone, path: str | os.PathLike) -> None:
    """Fill ``detector`` strictly from ``path``, whichever process numbered the backbone's blocks."""
    from bbadapt.core.weights import assign, read_params_file

    pattern = re.compile(instance_pattern(backbone.prefix, backbone))
    keys = {_canonical(k, pattern): k for k in detector._collect_params_with_prefix()}
    arrays = {keys.get(_canonical(k, pattern), k): v for k, v in read_params_file(path).items()}
    assign(detector, arrays, origin=str(path))


# ---------------------------------------------------------------- bundle


def add_detector(stage: Path, adapted, info, detector: DetectorOptions | list[str], layout: str | None = None,
                 freeze_at: int | None = None, overrides: dict | None = None, progress: Progress | None = None,
                 seed: int = 0) -> dict:
    """Build the detector on ``adapted`` (a copy of its net), write ``detector.params`` into ``stage``.

    ``detector``: a :class:`DetectorOptions`, taken as it is (it was validated when made, and
    :func:`bbadapt.pipeline.convert` checked it against the model); or, as before, the class
    names, with ``layout`` (default ``c4``), ``freeze_at`` (default 2) and ``overrides``, which
    are then validated here, once, with the model ``info``.
    Returns the manifest's ``detector`` section as JSON (``DetectorSection.from_dict`` types it).
    """
    from bbadapt.core.rewrite import clone

    say = progress or _quiet
    if isinstance(detector, DetectorOptions):
        if layout is not None or freeze_at is not None or overrides is not None:
            raise TypeError("add_detector: give layout, freeze_at and overrides in the DetectorOptions, not beside it")
        options = detector
    else:
        options = DetectorOptions(classes=list(detector), layout="c4" if layout is None else layout,
                                  freeze_at=2 if freeze_at is None else freeze_at, overrides=overrides)
        require_detector_fits(info, options)
    say(f"building Faster R-CNN ({options.layout}, classes: {', '.join(options.classes)}, "
        f"freeze-at {options.freeze_at})")
    net, section = build_from_options(clone(adapted.net), adapted.graph, info.family, options, seed=seed)
    say(f"writing {DETECTOR_PARAMS}")
    return {**section, "params_file": DETECTOR_PARAMS,
            "params_sha256": save_detector_params(net, Path(stage) / DETECTOR_PARAMS),
            "input": adapted.target.to_dict()}


def read_detector(bundle: str | os.PathLike | BundleManifest) -> BundleManifest:
    """The manifest of a detector bundle or checkpoint, read once, with one-line errors.

    ``bundle``: a directory, or a manifest already read (checked again for its detector only).
    """
    manifest = bundle if isinstance(bundle, BundleManifest) else read_manifest(bundle, require_params=False)
    directory = manifest.directory
    if manifest.detector is None:
        raise OutputError(f"{directory} holds no detector (manifest has no 'detector' section); "
                          "convert with --detector faster-rcnn")
    params = manifest.detector_params_path
    if not params.is_file():
        raise OutputError(f"{directory} lacks its detector parameters {params.name}")
    return manifest


def build_stored(manifest: BundleManifest, backbone, **overrides):
    """The ``FasterRCNN`` the manifest's detector section describes, on ``backbone``, its values from the params file."""
    section: DetectorSection = manifest.detector
    detector, _ = build_detector(backbone, None, manifest.detector_family, list(section.classes), section.layout,
                                 section.freeze_at, seed=section.seed, **{**section.settings, **overrides})
    load_detector_params(detector, backbone, manifest.detector_params_path)
    return detector


def load_detector(directory: str | os.PathLike | BundleManifest, ctx=None, **overrides):
    """Rebuild the ``FasterRCNN`` stored in ``directory`` (bundle or checkpoint, or its manifest, read once) on ``ctx``.

    Needs only ``manifest.json`` and ``detector.params``. ``ctx``: an ``mx.Context``
    (``mx.cpu()``, ``mx.gpu(0)``) or a list of them for data-parallel training.
    ``overrides``: settings that do not change parameter shapes, e.g. a training run's
    ``per_device_batch_size`` (gluoncv bakes the batch size into the graph).
    """
    manifest = read_detector(directory)
    if ctx is not None:
        check_contexts(ctx)  # a GPU mxnet-cu112 cannot run is refused before any kernel runs on it
    detector = build_stored(manifest, backbone_structure(manifest), **overrides)
    if ctx is not None:
        detector.collect_params().reset_ctx(ctx)
    return detector


# ---------------------------------------------------------------- detections


# ---------------------------------------------------------------- symbol export


def probe_photo(short: int = EXPORT_SHORT) -> np.ndarray:
    """The first packaged photo as a batch of one, raw RGB 0..255 NCHW, short side ``short`` (aspect kept)."""
    from PIL import Image

    from bbadapt.verify.images import photo_files, photos

    first = photo_files()[0]
    with Image.open(first) as img:
        w, h = img.size
    scale = short / min(w, h)
    return photos((round(h * scale), round(w * scale)), limit=1)[0]


def export_symbol(directory: str | os.PathLike, prefix: str | os.PathLike, force: bool = False,
                  progress: Progress | None = None, short: int = EXPORT_SHORT) -> dict:
    """Write ``PREFIX-symbol.json`` + ``PREFIX-0000.params`` (hybridized, inference mode), verified.

    The written files are loaded back with ``SymbolBlock.imports`` and run on a real photo;
    their detections must match those of the Gluon detector run eagerly (not the graph that
    was exported, which would be compared with itself). Nothing is written unless they do.
    """
    import mxnet as mx
    from mxnet.gluon import SymbolBlock

    say = progress or _quiet
    prefix = Path(prefix)
    targets = [Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params")]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise OutputError(f"{', '.join(existing)} already exist; pass --force to replace")
    not_files = [str(t) for t in targets if t.exists() and not t.is_file()]
    if not_files:
        raise OutputError(f"{', '.join(not_files)} exist and are not files; choose another prefix")
    say(f"loading the detector from {directory}")
    detector = load_detector(directory, ctx=mx.cpu())
    x = mx.nd.array(probe_photo(short), dtype="float32")
    say("running the Gluon detector (eager) on a packaged photo")
    reference = detector(x)
    detector.hybridize(static_alloc=True, static_shape=True)
    detector(x)  # export needs the hybridized graph built
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{prefix.name}.partial-", dir=prefix.parent))
    except OSError as exc:
        raise OutputError(f"cannot write {prefix}: {exc.strerror or exc}") from None
    try:
        say("exporting the symbol and parameters")
        detector.export(str(tmp / "model"), epoch=0)
        written = [tmp / "model-symbol.json", tmp / "model-0000.params"]
        say("checking SymbolBlock.imports of the written files")
        with warnings.catch_warnings():  # SymbolBlock's "data: None" type-inference chatter
            warnings.simplefilter("ignore")
            imported = SymbolBlock.imports(str(written[0]), ["data"], str(written[1]), ctx=mx.cpu())
        result = compare_detections(reference, imported(x))
        if not result["passed"]:
            raise BbadaptError(f"the exported symbol does not reproduce the detections ({result['unmatched']} of "
                               f"{result['count_a']} unmatched); nothing written")
        replace_together(list(zip(written, targets, strict=True)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if result["count_a"] == 0:
        result["note"] = "no detections on the probe photo (random heads?): only empty outputs were compared"
    return {"symbol": str(targets[0]), "params": str(targets[1]), "input_shape": list(x.shape), **result}
