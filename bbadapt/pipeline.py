"""The whole job, as one function the CLI and Python users share.

source weights -> Gluon net + source spec -> adapt -> check -> bundle. ``bbadapt convert``
builds a :class:`ConvertOptions` (and a :class:`DetectorOptions` for ``--detector``) and
calls :func:`convert`; ``bbadapt check DIR`` is :func:`recheck`. The option objects live in
:mod:`bbadapt.options` and validated themselves when made: :func:`convert` adds only what needs
the model (that it exists, that it can carry the detector), once, and trusts the rest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bbadapt.bundle import describe
from bbadapt.bundle.backbone import load_adapted, save_backbone, stored_plan
from bbadapt.bundle.manifest import check_params, read_manifest, refuse_existing, staged_output, write_manifest
from bbadapt.bundle.provenance import locate_weights
from bbadapt.bundle.schema import BACKBONE_PARAMS, MANIFEST, REPORTS, BundleManifest, DetectorSection
from bbadapt.core import zoo
from bbadapt.core.rewrite import FP16_MAX, TINY_VAR, Adapted, adapt
from bbadapt.core.spec import InputSpec, parse_spec
from bbadapt.core.weights import randomize
from bbadapt.options import WEIGHT_KINDS, ConvertOptions, DetectorOptions, check_sizes, require_detector_fits
from bbadapt.platform.atomic import replace_together
from bbadapt.platform.errors import OptionError, OutputError, WeightsError
from bbadapt.verify import images as imgs
from bbadapt.verify.budget import require_check_memory
from bbadapt.verify.check_report import CheckReport
from bbadapt.verify.equivalence import CheckOptions, check, default_sizes
from bbadapt.verify.gradients import GradientOptions, training_check
from bbadapt.verify.report import write_reports

if TYPE_CHECKING:
    from bbadapt.core.registry import Converted

Progress = Callable[[str], None]
N_CALIBRATION_PHOTOS = 8
N_CALIBRATION_TILES = 32
CHECK_IMAGES_PER_SIZE = 2 + 1 + 3  # photos, noise, flat colours: what check() runs at each size


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


def load_source(model: str | None, weights: str = "pretrained", seed: int = 0, source: InputSpec | None = None,
                progress: Progress | None = None, fmt: str | None = None) -> Converted:
    """The original network, whatever the weights: zoo ``pretrained``/``random``, or a file.

    A file goes through :mod:`converters` (format from content, ``fmt`` overrides; ``model``
    names the architecture where the file cannot). Returns a
    :class:`~converters.base.Converted`: the net, how to rebuild it, its info and provenance.
    ``pretrained``/``random`` need ``model`` and take no ``fmt``: :func:`convert` refuses both
    before it gets here (:class:`ConvertOptions`), and a bundle's manifest always names its model.
    """
    from bbadapt.core.registry import Converted
    from converters.readers import read

    say = progress or (lambda _m: None)
    if weights not in WEIGHT_KINDS:
        say(f"reading {weights}")
        return read(weights, fmt, arch=model, progress=say)
    info = zoo.model_info(model)
    if weights == "pretrained":
        say(f"getting pretrained {model} (cache: {os.environ.get('MXNET_HOME', '~/.mxnet')}/models)")
        net, fetched = zoo.build_pretrained(model, say)
        return Converted(net, {"zoo": model}, info, {"kind": "pretrained", "library": info.library,
                                                     "sha256": params_digest(net), **fetched.provenance()})
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


def convert(model: str | None, out: str | os.PathLike, options: ConvertOptions | None = None,
            detector: DetectorOptions | None = None, progress: Progress | None = None) -> tuple[CheckReport, Adapted]:
    """Adapt ``model`` (or the network in a weights file), check it and write ``out`` atomically.

    ``options``: weights, specs, fold, BN form, check settings (:class:`ConvertOptions`).
    With ``detector`` the output also holds a Faster R-CNN built on the adapted backbone
    (:mod:`bbadapt.engines.gluon`), and the BN form defaults to ``affine`` (trains like a frozen BN).
    Returns the :class:`~bbadapt.verify.check_report.CheckReport` (``.to_dict()``: the report.json
    dict; it also reads like that dict) and the :class:`~bbadapt.core.rewrite.Adapted` net.

    ``options`` and ``detector`` are trusted as made (they validated themselves); what needs
    the model is checked here, once, where the model is first known: from its zoo name before
    any work, else from the weights file once read.
    """
    say = progress or (lambda _m: None)
    opts = options or ConvertOptions()
    bn = opts.bn or ("affine" if detector else "fused")
    tgt, src_override = opts.target_spec, opts.source_spec
    named = None  # the model's info when the name alone tells it (zoo weights)
    if opts.weights in WEIGHT_KINDS:
        if model is None:
            raise OptionError(f"--weights {opts.weights} needs a MODEL (see `bbadapt list`), or give a weights file")
        named = zoo.model_info(model)  # argument errors before any work
        if detector:
            require_detector_fits(named, detector)
    refuse_existing(Path(out), opts.force)  # fail before minutes of work, not after
    if opts.images:
        imgs.photo_files(opts.images)
    original = load_source(model, opts.weights, opts.seed, src_override, say, opts.fmt)
    info = original.info
    if detector:
        if named is None:  # a weights file: its model is known only now
            require_detector_fits(info, detector)
        _detection().discover_layout(original.net)  # can it be cut into a detector? before minutes of checking
    src = src_override or parse_spec(info.source_spec)
    net = original.net
    say(f"adapting: fold={opts.fold}, bn={bn}")
    adapted = adapt(net, src, tgt, fold=opts.fold, bn=bn)
    for param in net.collect_params().values():
        param.grad_req = "null"  # the original only serves as the reference now: free its gradients
    report = _checked(net, adapted, info, _check_options(info, opts.images, opts.sizes, opts.tolerance), say)
    report = report.with_notes(output_notes(original.provenance))
    if detector:
        report = add_training(report, net, adapted, info, opts.images, opts.tolerance, say)
    say(f"writing {out}")
    with staged_output(out, opts.force) as stage:
        params_sha = save_backbone(adapted, stage)
        section = _add_detector(stage, adapted, info, detector, opts.seed, say) if detector else None
        manifest = write_manifest(stage, BundleManifest(
            kind="detector" if detector else "backbone", model=info.name, arch=original.arch,
            family=info.family, input_size=info.input_size, weights=original.provenance,
            source=src.to_dict(), target=tgt.to_dict(), fold_requested=opts.fold, fold=adapted.fold,
            bn=bn, exact=adapted.exact, plan=tuple(adapted.plan), health=tuple(adapted.health),
            graph={"data_consumer": adapted.graph.data_consumer, "first_conv": adapted.graph.first_conv,
                   "stages": [s.path for s in adapted.graph.stages], "fusable_pairs": len(adapted.graph.pairs),
                   "unfusable": adapted.graph.unfusable},
            params_file=BACKBONE_PARAMS, params_sha256=params_sha,
            check={"passed": report.verdict.passed, "worst_max_rel": report.worst_max_rel,
                   "tolerance": opts.tolerance},
            detector=section))
        write_reports(report, stage, describe.context(manifest), describe.weights_text(manifest))
    return report, adapted


def _add_detector(stage: Path, adapted: Adapted, info: zoo.ModelInfo, detector: DetectorOptions, seed: int,
                  say: Progress) -> DetectorSection:
    """Build the Faster R-CNN on the adapted backbone, write its parameters into ``stage``; its manifest section."""
    say(f"building the Faster R-CNN ({detector.layout}) on the adapted backbone")
    from bbadapt.engines.gluon.detector_bundle import add_detector

    section = add_detector(stage, adapted, info, detector, progress=say, seed=seed)
    return DetectorSection.from_dict(section, str(stage / MANIFEST))


def _detection():
    from bbadapt.engines.gluon import build as detection  # gluoncv's detector stack: only when a detector is asked for

    return detection


def _check_options(info: zoo.ModelInfo, images: str | None, sizes: list[tuple[int, int]] | None,
                   tolerance: float) -> CheckOptions:
    """The check as convert and recheck run it: CIFAR nets on tiles (and their labels), others on photos."""
    return CheckOptions(sizes=sizes, photos_dir=images, cifar=info.is_cifar, tolerance=tolerance,
                        labelled=_labelled(info))


def _checked(original, adapted: Adapted, info: zoo.ModelInfo, options: CheckOptions, say: Progress) -> CheckReport:
    """The check's report with the model name and BN health notes (refused first if it cannot fit in memory)."""
    say("estimating the check's memory")
    require_check_memory(original, options.sizes or default_sizes(info.input_size), CHECK_IMAGES_PER_SIZE)
    report = check(original, adapted.source, adapted, options=options, progress=say)
    return replace(report, model=info.name).with_notes(health_notes(adapted.health))


def add_training(report: CheckReport, original, adapted: Adapted, info: zoo.ModelInfo, images: str | None,
                 tolerance: float, say: Progress) -> CheckReport:
    """A bundle that will train gets the ``training`` section: its gradients against frozen-BN training of the original.

    A failing gradient check fails the report as a whole (the bundle would not train like
    the original; :func:`~bbadapt.verify.check_report.decide` says so); ``fused`` and an
    approximate fold are stated, not judged.
    """
    say("checking the gradients against the frozen-BN original")
    training = training_check(original, adapted, GradientOptions(cifar=info.is_cifar, photos_dir=images,
                                                                 tolerance=tolerance), progress=say)
    return replace(report, training=training)


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


def output_notes(provenance: dict) -> list[str]:
    """How the weights were stored when not float32 (the reader's one dtype note), where the reader took the input
    spec from when the file says or assumes one (its input_spec_note), and what an original graph
    computed after its classifier (softmax, a loss): output-only, not converted."""
    notes = [provenance[k] for k in ("dtype_note", "input_spec_note") if provenance.get(k)]
    ops = provenance.get("output_activations") or []
    if ops:
        notes.append(f"the original graph applies {', '.join(ops)} after its classifier; output-only, not part of the "
                     "converted network, which outputs the classifier's logits (apply it yourself where needed)")
    return notes


def recheck(directory: str | os.PathLike, images: str | None = None, sizes: list[tuple[int, int]] | None = None,
            progress: Progress | None = None, weights: str | None = None) -> CheckReport:
    """Re-run the equivalence check of an existing output and rewrite its reports.

    ``weights``: where the original weights file is now, when it moved since the conversion
    (checked by sha256 against the manifest)."""
    say = progress or (lambda _m: None)
    sizes = check_sizes(sizes)  # the same rule as convert's (ConvertOptions), before any work
    directory = Path(directory)
    manifest = read_manifest(directory, require_params=False)
    if manifest.is_checkpoint:
        raise OutputError(f"{directory} is a training checkpoint: it holds the trained detector, not the converted "
                          "backbone that `check` compares with its original; check the bundle it was trained from")
    check_params(manifest)
    stored_plan(manifest)  # a damaged plan is found before minutes of reloading the original
    prov = manifest.provenance
    where = locate_weights(prov.to_dict(), weights)
    if where:
        weights, model = str(where[prov.path]), prov.model_for(manifest.model)
    else:
        weights, model = prov.kind, manifest.model
    loaded = load_source(model, weights, prov.seed, manifest.source_spec(), say, prov.format)
    original, info, again = loaded.net, loaded.info, loaded.provenance
    if prov.files and set(again.get("files", {})) != {str(p.resolve()) for p in where.values()}:
        # e.g. a -symbol.json whose newest -EEEE.params is not the one converted
        raise WeightsError(f"re-reading {prov.path} now reads {', '.join(sorted(again.get('files', {})))}, not the "
                           f"files converted ({', '.join(sorted(prov.files))}); pass those files to convert again")
    say("rebuilding the adapted backbone from the bundle")
    adapted = load_adapted(manifest)
    tolerance = manifest.check_tolerance  # judge as the conversion was judged
    report = _checked(original, adapted, info, _check_options(info, images, sizes, tolerance), say)
    report = report.with_notes(output_notes(again))
    if manifest.kind == "detector":
        report = add_training(report, original, adapted, info, images, tolerance, say)
    if again.get("sha256") != prov.sha256:
        report = report.with_notes(["the regenerated original weights differ bitwise from those converted "
                                    "(random calibration on another machine?); errors include that difference"])
    tmp = Path(tempfile.mkdtemp(prefix=".recheck-", dir=directory))
    try:  # each report file is replaced whole, never left half-written
        write_reports(report, tmp, describe.context(manifest), describe.weights_text(manifest))
        replace_together([(tmp / name, directory / name) for name in REPORTS])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
