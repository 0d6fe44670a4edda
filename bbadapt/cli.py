"""``bbadapt`` command line: convert, check, export, formats, list. Mirrors the Python API.

Exit codes: 0 the check passed; 3 the check failed (the report is still written and says
why); 2 invalid arguments (unknown model, bad spec or option); 1 any other error (bad
weights file, missing download, existing output). Errors are one line on stderr;
``BBADAPT_DEBUG=1`` shows the traceback of unexpected ones.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

from bbadapt.bundle.schema import BEST, CHECKPOINTS, LAST, REPORT_HTML, REPORT_MD
from bbadapt.engines.gluon.options import (
    LR_PER_IMAGE,
    RANDOM_LR_FACTOR,
    RANDOM_WARMUP_ITERS,
    WARMUP_ITERS,
    EvaluateOptions,
    TrainConfig,
)
from bbadapt.platform.errors import BbadaptError, OptionError

if TYPE_CHECKING:
    from bbadapt.verify.check_report import CheckReport

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn model-zoo ResNets into verified, detection-ready backbones.")
out_console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
EXIT_CHECK_FAILED = 3
TRAIN, EVALUATE = TrainConfig(), EvaluateOptions()  # every train/evaluate default shown in --help comes from these


class Fold(str, Enum):
    auto = "auto"
    bn = "bn"
    conv = "conv"


class BNMode(str, Enum):
    global_stats = "global-stats"
    affine = "affine"
    fused = "fused"


def fail(message: str, code: int) -> None:
    err_console.print(f"bbadapt: error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def warning_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """Python warnings (numpy's, MXNet's, gluoncv's) as one note line each, duplicates once: never raw on stderr."""
    notes: dict[str, None] = {}
    for w in caught:
        text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
        notes[f"{w.category.__name__}: {text} (at {Path(w.filename).name}:{w.lineno})"] = None
    return list(notes)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn bbadapt's errors into one stderr line and an exit code, and warnings into notes.

    A warning a library emits while a command runs (numpy's ``RuntimeWarning: invalid value
    encountered ...``) would otherwise reach stderr raw, with a source line; it becomes a
    ``bbadapt: note:`` line after a command that succeeds, and after an error the one error line
    is all that is printed (it is what the user must act on).
    """
    with warnings.catch_warnings(record=True) as caught:
        with _errors_as_lines():
            yield
    for note in warning_notes(caught):
        err_console.print(f"bbadapt: note: {note}", markup=False, soft_wrap=True)


@contextlib.contextmanager
def _errors_as_lines() -> Iterator[None]:
    try:
        yield
    except BbadaptError as exc:
        fail(str(exc), exc.exit_code)
    except typer.Exit:  # a command's own exit (it is a RuntimeError): not a bug
        raise
    except KeyboardInterrupt as exc:  # bbadapt.platform.atomic says when the write had already completed
        fail(f"interrupted; {exc or 'nothing was written'}", 130)
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, traceback on request
        if os.environ.get("BBADAPT_DEBUG"):
            raise
        from .platform.cuda_libs import explain_load_error  # mxnet's CUDA build without a library it needs

        fail(explain_load_error(exc) or f"internal error: {type(exc).__name__}: "
             f"{str(exc).splitlines()[0] if str(exc) else ''} (rerun with BBADAPT_DEBUG=1 for the traceback)", 1)


@contextlib.contextmanager
def progress_line() -> Iterator:
    """A spinner on stderr that shows the current long step (quiet when not a terminal)."""
    if err_console.is_terminal:
        with err_console.status("starting") as status:
            yield lambda msg: status.update(msg)
    else:
        yield lambda msg: err_console.print(f"... {msg}", markup=False)


def parse_sizes(text: Optional[str]) -> Optional[list[tuple[int, int]]]:
    """``HxW,HxW`` as pairs; the text's form only: their range is :class:`~bbadapt.options.ConvertOptions`'s
    rule (:func:`~bbadapt.options.check_sizes`), the same for Python callers."""
    if not text:
        return None
    sizes = []
    for part in text.split(","):
        h, sep, w = part.strip().lower().partition("x")
        if not (sep and h.isdecimal() and w.isdecimal()):
            raise OptionError(f"bad size {part!r}; use HxW[,HxW...] with sides >= 8, e.g. 224x224,129x161")
        sizes.append((int(h), int(w)))
    return sizes


def _summary(report: CheckReport, out: Path) -> None:
    """The check's lines on the terminal: figures from the report, the verdict as decided (never judged again here)."""
    from bbadapt.verify.check_report import judged, tolerance_text, yardstick_text
    from bbadapt.verify.report import training_headline

    verdict = report.verdict
    cls = report.classification or {}
    agree = f"; top-1 agreement {cls['top1_agreement']:.0%}" if cls.get("top1_agreement") is not None else ""
    lab = cls.get("labelled")
    if lab:
        agree += (f"; accuracy on {lab['n']} labelled tiles: original {lab['accuracy_original']:.0%}, "
                  f"adapted {lab['accuracy_adapted']:.0%}")
    n_sizes = len({tuple(i["size"]) for i in report.inputs})
    decided = yardstick_text(report)
    decided = f"; {decided}" if decided else ""
    if report.exact:
        out_console.print(f"check {verdict.word}: worst max rel {report.worst_max_rel:.2e} "
                          f"({tolerance_text(report)}) over {len(report.probes)} probes, "
                          f"{len(report.inputs)} images at {n_sizes} sizes{agree}{decided}", markup=False)
    else:
        err_console.print("bbadapt: warning: this fold is APPROXIMATE (fold=conv with a non-zero shift): "
                          "results differ near the image border; see the report", markup=False)
        output = report.probes[-1]
        within = "within tolerance" if verdict.passed else "NOT within tolerance"
        out_console.print(f"check {verdict.word} (approximate fold): interiors of {', '.join(judged(report)[0]) or 'no probe'} "
                          f"{within} ({tolerance_text(report)}); not judged: the borders; worst max rel including the "
                          f"border {report.worst_max_rel:.2e}, final output max rel {output.max_rel:.2e}{agree}",
                          markup=False)
    if report.training:
        out_console.print(training_headline(report.training), markup=False)
    for note in report.notes:
        if note.startswith(("BatchNorm ", "INCONCLUSIVE", "weights stored as ")):
            err_console.print(f"bbadapt: note: {note}", markup=False)
    for reason in verdict.reasons:
        out_console.print(f"  - {reason}", markup=False)
    out_console.print(f"report: {out / REPORT_MD} (and {REPORT_HTML})", markup=False)


class Detector(str, Enum):
    faster_rcnn = "faster-rcnn"


class Layout(str, Enum):
    c4 = "c4"
    fpn = "fpn"


def default_out(model: Optional[str], weights: str) -> Path:
    """out/MODEL, or out/<weights file name without -symbol/-0000 and suffixes>."""
    if model:
        return Path("out") / model
    stem = Path(weights).name
    for suffix in (".json", ".params", ".safetensors", ".pth", ".pt", ".h5", ".hdf5", ".pkl", ".weights"):
        stem = stem.removesuffix(suffix)
    stem = stem.removesuffix("-symbol")
    stem = stem.rsplit("-", 1)[0] if stem.rsplit("-", 1)[-1].isdecimal() else stem
    return Path("out") / (stem or "converted")


def parse_classes(text: Optional[str]) -> list[str]:
    return [c.strip() for c in text.split(",")] if text else []


@app.command()
def convert(
    model: Optional[str] = typer.Argument(None, help="zoo model name, e.g. resnet50_v2 (see `bbadapt list`); "
                                                      "with a weights file: its architecture, where the file cannot tell"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory", show_default="out/MODEL"),
    weights: str = typer.Option("pretrained", help="pretrained (download; cached in $MXNET_HOME), random, or a weights "
                                                   "file of any format in `bbadapt formats`"),
    fmt: Optional[str] = typer.Option(None, "--format", help="format of the weights file", show_default="detected from content"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture (zoo name) for a weights file; same as MODEL",
                                       show_default="MODEL, or what the file tells"),
    source: Optional[str] = typer.Option(None, "--from", help="input spec the weights expect", show_default="the model's own"),
    target: str = typer.Option("rgb255", "--to", help="input spec you will feed: preset or order=..,scale=..,mean=a/b/c,std=a/b/c"),
    fold: Fold = typer.Option(Fold.auto, help="where the input map goes: bn (exact), conv (approximate at borders), auto"),
    bn: Optional[BNMode] = typer.Option(None, help="frozen BatchNorm form", show_default="fused; affine with --detector"),
    detector: Optional[Detector] = typer.Option(None, help="also build a detector on the adapted backbone",
                                                show_default="none: a backbone only"),
    classes: Optional[str] = typer.Option(None, help="detector class names, comma-separated (e.g. raccoon,dog)",
                                           show_default="none"),
    layout: Layout = typer.Option(Layout.c4, help="detector layout: c4 (stride 16 + stage-4 head) or fpn"),
    freeze_at: int = typer.Option(2, min=0, max=5, help="detector: freeze the backbone up to here (0 none, 1 stem, "
                                                         "2 stem+stage1 as GluonCV, ..., 5 all)"),
    force: bool = typer.Option(False, help="replace an existing output directory"),
    images: Optional[Path] = typer.Option(None, help="directory of photos for the check", show_default="packaged photos"),
    sizes: Optional[str] = typer.Option(None, help="check sizes HxW,HxW", show_default="224x224,129x161; 32x32,37x29 for CIFAR"),
    tolerance: float = typer.Option(1e-5, min=0.0, help="max-rel tolerance of the equivalence check"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed for --weights random"),
) -> None:
    """Fold input normalization and freeze BatchNorm, prove equivalence, write the backbone (and detector)."""
    from bbadapt.options import ConvertOptions, DetectorOptions

    with user_errors():  # the flags' own grammar here; every value's rule in the option objects, none repeated
        if model and arch and model != arch:
            raise OptionError(f"MODEL {model!r} and --arch {arch!r} disagree; give one")
        model = model or arch
        if classes and not detector:
            raise OptionError("--classes is for --detector faster-rcnn")
        if detector and not parse_classes(classes):
            raise OptionError("--detector needs --classes, e.g. --classes raccoon")
        options = ConvertOptions(weights=weights, fmt=fmt, source=source, target=target, fold=fold.value,
                                 bn=bn.value if bn else None, seed=seed, force=force,
                                 images=str(images) if images else None, sizes=parse_sizes(sizes), tolerance=tolerance)
        detector_options = (DetectorOptions(classes=parse_classes(classes), kind=detector.value, layout=layout.value,
                                            freeze_at=freeze_at) if detector else None)
        from bbadapt.pipeline import convert as run_convert  # the model's own checks come first there, before mxnet

        out = out or default_out(model, weights)
        with progress_line() as say:
            report, adapted = run_convert(model, out, options, detector_options, progress=say)
        from bbadapt.core.plan import Affine, Fuse, GlobalStats

        kinds = [type(step) for step in adapted.steps]
        out_console.print(f"{report['model']}: {adapted.source.to_string()} -> {adapted.target.to_string()}, "
                          f"fold={adapted.fold}{'' if adapted.exact else ' (APPROXIMATE)'}, bn={adapted.bn}: "
                          f"{kinds.count(Fuse)} BN fused, {kinds.count(Affine)} affine, "
                          f"{kinds.count(GlobalStats)} global-stats"
                          f"{', input folded' if adapted.fold != 'none' else ''}", markup=False)
        _summary(report, out)
        if detector:
            out_console.print(f"detector: Faster R-CNN ({layout.value}) for {', '.join(parse_classes(classes))}; "
                              f"load it with bbadapt.load_detector({str(out)!r})", markup=False)
        out_console.print(f"wrote {out}", markup=False)
    if not report.verdict.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def check(
    directory: Path = typer.Argument(..., help="an output directory of `bbadapt convert`"),
    images: Optional[Path] = typer.Option(None, help="directory of photos for the check",
                                           show_default="packaged photos"),
    sizes: Optional[str] = typer.Option(None, help="check sizes HxW,HxW",
                                        show_default="224x224,129x161; 32x32,37x29 for CIFAR"),
    weights: Optional[Path] = typer.Option(None, help="where the original weights file is now, if it moved since the "
                                                      "conversion (verified by sha256 against the manifest)",
                                           show_default="the path in the manifest"),
) -> None:
    """Re-run the equivalence check of an existing output (rewrites its reports)."""
    from bbadapt.pipeline import recheck

    with user_errors():
        with progress_line() as say:
            report = recheck(directory, images=str(images) if images else None, sizes=parse_sizes(sizes), progress=say,
                             weights=str(weights) if weights else None)
        _summary(report, directory)
    if not report.verdict.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def formats() -> None:
    """The weight formats `convert --weights FILE` reads (detected from content; --format overrides)."""
    from rich.table import Table

    from converters.readers import formats as known

    table = Table("format", "what", "typical files")
    for f in known():
        table.add_row(f.name, f.description, " ".join(f.extensions))
    out_console.print(table)


EXPORTERS = {  # --option: (module, function); each writes atomically and verifies what it wrote
    "symbol": ("bbadapt.engines.gluon.detector_bundle", "export_symbol"),
    "torchvision": ("converters.writers.torchvision_detector", "export"),
    "onnx": ("converters.writers.onnx", "export_bundle"),
    "timm": ("converters.writers.timm", "export_bundle"),
}
# What each figure of an export summary means, printed instead of the bare key.
EXPORT_LABELS = {
    "format": "format", "out": "wrote", "symbol": "wrote the symbol", "params": "wrote the parameters",
    "sha256": "sha256 of the written file", "container": "container", "architecture": "architecture",
    "model": "model", "input_spec": "input spec it expects", "bundle_target": "input spec of the bundle itself",
    "tensors": "tensors written", "opset": "ONNX opset", "ir_version": "ONNX IR version", "onnx": "onnx version",
    "input": "input name", "outputs": "output names", "runtime": "checked with",
    "input_shape": "checked on a packaged photo of shape",
    "count_a": "detections by the Gluon detector (eager)", "count_b": "detections by the exported files",
    "unmatched": "detections without a partner (same class, score and box within tolerance)",
    "max_abs_score_diff": "largest score difference between partners",
    "max_abs_box_diff_px": "largest box coordinate difference between partners (px)",
    "score_tol": "score tolerance", "box_tol_px": "box tolerance (px)", "passed": "check passed",
    "check_passed": "check passed", "check_max_abs": "check: largest |exported - MXNet|",
    "check_max_rel": "check: largest |exported - MXNet| / max |MXNet|",
    "check_worst_max_rel": "check: worst max rel against the bundle", "meaning": "what it is", "note": "note",
    "check": "wrote the proof", "classes": "classes", "bytes": "file size (bytes)",
    "cases": "checked (size, batch, image) cases", "takes": "input",
    "judged_in_float64": "cases with near-ties, judged by the eager model in float64 (passed)",
    "eager_detections": "detections by the eager torch model", "file_detections": "detections by the written file",
}


def _export_lines(summary: dict) -> list[str]:
    lines = []
    for key, value in summary.items():
        if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
            value = ", ".join(map(str, value)) if key != "input_shape" else "x".join(map(str, value))
        if not isinstance(value, (str, int, float, bool)):
            continue
        label = EXPORT_LABELS.get(key, key.replace("_", " "))
        text = f"{value:.3g}" if isinstance(value, float) else ("yes" if value is True else "no" if value is False else value)
        lines.append(f"{label}: {text}")
    return lines


@app.command()
def export(
    directory: Path = typer.Argument(..., help="an output directory of `bbadapt convert`"),
    symbol: Optional[Path] = typer.Option(None, help="PREFIX: write PREFIX-symbol.json + PREFIX-0000.params (deployment)",
                                           show_default="none; give one of --symbol, --torchvision, --onnx"),
    torchvision: Optional[Path] = typer.Option(None, help="FILE.safetensors (or .pth with torch): torchvision ResNet weights; "
                                               "for a detector, a directory: a torchvision FasterRCNN (docs/torchvision.md)",
                                                show_default="none"),
    torchvision_input: str = typer.Option("01", help="detector to torchvision: the model's input, RGB 0..1 (01) or 0..255 (255)"),
    onnx: Optional[Path] = typer.Option(None, help="FILE.onnx, checked with onnxruntime against MXNet",
                                         show_default="none"),
    timm: Optional[Path] = typer.Option(None, "--timm", help="DIR: a timm folder (config.json + model.safetensors), "
                                        "checked in timm against the bundle", show_default="none"),
    torchscript: Optional[Path] = typer.Option(None, "--torchscript", help="FILE.pt: a torchvision export or torch "
                                               "checkpoint as one TorchScript detector taking uint8 pixels (docs/deploy.md)",
                                               show_default="none"),
    deploy_input: str = typer.Option("rgb", "--deploy-input", help="--onnx/--torchscript of a detector: the order of the "
                                     "decoded pixels the file takes, rgb (PIL) or bgr (OpenCV)"),
    backbone: bool = typer.Option(False, "--backbone", help="export the backbone of a detector bundle "
                                                            "(with --torchvision or --onnx)", show_default="off"),
    force: bool = typer.Option(False, help="replace an existing export"),
) -> None:
    """Carry an adapted backbone or detector out: MXNet symbol, torchvision weights, ONNX, TorchScript.

    DIR a torchvision export or torch checkpoint with --onnx or --torchscript: one deployable detector file
    (uint8 pixels in, resize and normalization inside), proven in onnxruntime / TorchScript first."""
    import importlib

    with user_errors():
        chosen = {k: v for k, v in {"symbol": symbol, "torchvision": torchvision, "onnx": onnx, "timm": timm,
                                    "torchscript": torchscript}.items() if v}
        if len(chosen) != 1:
            raise OptionError("give exactly one of --symbol PREFIX, --torchvision FILE, --onnx FILE, --timm DIR, "
                              "--torchscript FILE")
        (kind, target), = chosen.items()
        if backbone and kind in ("symbol", "torchscript"):
            raise OptionError(f"--backbone goes with --torchvision or --onnx (or --timm); --{kind} exports the whole detector")
        from bbadapt.engines.torch.export import is_export

        if kind == "torchscript" or (kind == "onnx" and is_export(directory)):
            from bbadapt.engines.torch.deploy import DeployOptions, deploy

            options = DeployOptions(form=kind, channel_order=deploy_input, force=force)
            with progress_line() as say:
                summary = deploy(directory, target, options, progress=say)
            for line in _export_lines(summary):
                out_console.print(line, markup=False)
            return
        module, function = EXPORTERS[kind]
        exporter = getattr(importlib.import_module(module), function)
        extra = {"backbone": True} if backbone else {}
        if kind == "torchvision":
            extra["input_range"] = torchvision_input
        with progress_line() as say:
            summary = exporter(Path(directory), Path(target), force=force, progress=say, **extra)
        for line in _export_lines(summary):
            out_console.print(line, markup=False)


LIST_COLUMNS = ("model", "family", "default --from", "library", "status")


@app.command("list")
def list_models(all_models: bool = typer.Option(False, "--all", help="also list the further ResNet kin (SE, ResNeXt, pruned)",
                                                show_default="off")) -> None:
    """The supported models and the input spec their pretrained weights expect.

    On a terminal: a table. Piped or redirected: plain text, one model a line, the columns
    (model, family, default --from, library, status) separated by tabs.
    """
    from rich.table import Table

    from bbadapt.core.zoo import list_models as models

    rows = [(m.name, m.family, m.source_spec, m.library, "supported" if m.core else "generic (stretch)")
            for m in models(core_only=not all_models)]
    if not out_console.is_terminal:
        for row in rows:
            print("\t".join(row))
        return
    table = Table()
    for k, name in enumerate(LIST_COLUMNS):  # model names are never cut: the other columns wrap first
        table.add_column(name, no_wrap=k == 0, min_width=max(len(r[0]) for r in rows) if k == 0 else None)
    for row in rows:
        table.add_row(*row)
    out_console.print(table)


@app.command("inspect")
def inspect_weights(
    file: Path = typer.Argument(..., help="a weights file (.params, -symbol.json, ...)"),
    as_json: bool = typer.Option(False, "--json", help="print the inspection as JSON", show_default="off"),
) -> None:
    """What a weights file is: format, tensors, probable architecture, BatchNorm health (no mxnet needed).

    Every format is read completely and validated: exit 1 for a damaged or unsafe file."""
    import json

    with user_errors():
        from converters.readers.inspection import inspect_file, render

        info = inspect_file(file)  # an unsafe or unreadable file raises: one line, exit 1
        if as_json:
            out_console.print(json.dumps(info, indent=2), markup=False, highlight=False, soft_wrap=True)
        else:
            render(info, out_console)
        if info.get("status") == "damaged":
            raise typer.Exit(1)


GPUS_HELP = "GPUs, e.g. 0 or 0,1"
NO_GPU = "none: the CPU"
CPU_HELP = "run on the CPU (what happens without --gpus)"


def _fields_of(cls, values: dict) -> dict:
    """The entries of ``values`` (a command's parameters) that are fields of the dataclass ``cls``:
    each option is declared once, in the command's signature, under its field's name."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _epoch_steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise OptionError(f"--lr-steps takes epoch numbers like 14,20, got {text!r}") from None


@app.command("train")
def train_cmd(
    directory: Path = typer.Argument(..., help="a detector bundle (bbadapt convert MODEL --detector faster-rcnn)"),
    dataset: str = typer.Option(..., help="voc:DIR or coco:ANNOTATIONS.json[:IMAGES_DIR]"),
    val_dataset: Optional[str] = typer.Option(TRAIN.val_dataset, help="validation data", show_default="--dataset (VOC: its "
                                                                     "--val-split; COCO: the file itself)"),
    train_split: str = typer.Option(TRAIN.train_split, help="VOC image set to train on (ImageSets/Main/NAME.txt)"),
    val_split: str = typer.Option(TRAIN.val_split, help="VOC image set to validate on"),
    epochs: int = typer.Option(TRAIN.epochs, min=1, help="epochs to train (with --resume: up to this epoch)"),
    lr: Optional[float] = typer.Option(TRAIN.lr, help=f"base learning rate (SGD, momentum {TRAIN.momentum:g}, wd "
                                       f"{TRAIN.wd:g})", show_default=f"{LR_PER_IMAGE:g} x --batch-size, GluonCV's recipe; "
                                       f"{RANDOM_LR_FACTOR:g} x that for random backbone weights; with --resume: the run's"),
    lr_steps: str = typer.Option(",".join(map(str, TRAIN.lr_steps)), help=f"multiply the lr by {TRAIN.lr_decay:g} after "
                                 "each of these epochs, e.g. 14,20", show_default="none"),
    warmup_iters: Optional[int] = typer.Option(TRAIN.warmup_iters, "--warmup", min=0, help=(
        f"iterations of linear warmup from lr x {TRAIN.warmup_factor:.2g}"), show_default=(
        f"{WARMUP_ITERS}; {RANDOM_WARMUP_ITERS} for random backbone weights; with --resume: the run's")),
    batch_size: Optional[int] = typer.Option(TRAIN.batch_size, min=1, help="images per step over all devices and all "
                                             "--horovod workers (the global batch, as gluoncv's script); a multiple of "
                                             "devices x workers", show_default="one image per device per worker"),
    gpus: Optional[str] = typer.Option(None, help=GPUS_HELP + "; several: data parallel", show_default=NO_GPU),
    cpu: bool = typer.Option(False, "--cpu", help=CPU_HELP, show_default="off"),
    amp: bool = typer.Option(TRAIN.amp, "--amp/--no-amp", help="mixed precision (GPU only)"),
    hybridize: bool = typer.Option(TRAIN.hybridize, help="hybridize with static_alloc"),
    short_side: int = typer.Option(TRAIN.short_side, min=16, help="training images are resized to this short side"),
    max_size: int = typer.Option(TRAIN.max_size, min=16, help="... and at most this long side"),
    checkpoint_every: int = typer.Option(TRAIN.checkpoint_every, min=1, help="keep checkpoints/epoch-NNNN every N "
                                         "epochs (and the last; best and last always point at a kept one)"),
    val_interval: int = typer.Option(TRAIN.val_interval, min=1, help="validate (VOC07 mAP) every N epochs; "
                                                                     "best-by-mAP follows"),
    log_interval: int = typer.Option(TRAIN.log_interval, min=1, help="iterations per train.log.jsonl record"),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="continue from checkpoints/last"),
    horovod: bool = typer.Option(False, "--horovod/--no-horovod", help="one worker of a horovodrun job (see docs/training.md): rank "
                                 "0's parameters are broadcast, gradients averaged by hvd.DistributedTrainer, each "
                                 "worker reads its own part of the images every epoch, only rank 0 logs, validates "
                                 "and writes checkpoints; --resume works (checkpoints on a shared filesystem)"),
    seed: int = typer.Option(TRAIN.seed, min=0, help="seed of the data order, flips and new layers"),
    num_workers: int = typer.Option(TRAIN.num_workers, "--workers", min=0, help="data loader worker processes"),
) -> None:
    """Train a Faster R-CNN bundle on VOC or COCO data; checkpoints go to DIR/checkpoints/."""
    with user_errors():
        config = TrainConfig(**_fields_of(TrainConfig, {**locals(), "lr_steps": _epoch_steps(lr_steps)}))  # validated
        from bbadapt.engines.common.datasets import parse_dataset
        from bbadapt.engines.common.progress import console_progress
        from bbadapt.engines.torch.export import is_export
        from bbadapt.platform.devices import device_choice

        parse_dataset(dataset)  # usage errors before any bundle or data is read
        gpus = device_choice(gpus, cpu)
        torch_engine = is_export(directory)  # the engine follows the directory's content: an export trains in torch
        if torch_engine:
            if horovod:
                raise OptionError("--horovod drives the MXNet engine; a torchvision export trains on several processes "
                                  "under torchrun (torchrun --nproc_per_node N bbadapt train ...)")
            from bbadapt.engines.torch.train import install_sigterm
            from bbadapt.engines.torch.train import train as torch_train

            install_sigterm()
            train = lambda *a, horovod, **k: torch_train(*a, **k)  # noqa: ARG005
        else:
            from bbadapt.engines.gluon.train import train

        try:
            with console_progress(err_console) as progress:
                result = train(directory, dataset, config, gpus=gpus, resume=resume, horovod=horovod, progress=progress)
        except KeyboardInterrupt:
            last = directory / CHECKPOINTS / LAST
            if torch_engine and sys.modules["bbadapt.engines.torch.train"].TERMINATED:
                fail("stopped by torchrun: another process of this job failed or was killed; "
                     + (f"{last} is intact (continue with --resume)" if last.is_dir() else "no checkpoint was written"), 1)
            fail(f"interrupted; {last} is intact (continue with --resume)" if last.is_dir()
                 else "interrupted; no checkpoint was written", 130)
        if result["rank"] != 0:
            return  # under --horovod, rank 0 speaks for the job
        if result["started_at_epoch"] >= result["epochs"]:
            out_console.print(f"nothing to do: {directory / 'checkpoints' / 'last'} is at epoch "
                              f"{result['started_at_epoch']} (--epochs {epochs})", markup=False)
            return
        best = f"{result['best_map']:.4f}" if result["best_map"] is not None else "not validated"
        refs = ", ".join(f"{name} -> {os.readlink(path)}" for name in (LAST, BEST)
                         if (path := directory / CHECKPOINTS / name).is_symlink())
        out_console.print(f"trained epochs {result['started_at_epoch'] + 1}..{result['epochs']} "
                          f"({result['iterations']} iterations in all, lr {result['lr']:g}, warmup "
                          f"{result['warmup_iters']}); best validation mAP {best}; checkpoints in "
                          f"{directory / 'checkpoints'}{f' ({refs})' if refs else ''}", markup=False)


@app.command("evaluate")
def evaluate_cmd(
    directory: Path = typer.Argument(..., help="a checkpoint (DIR/checkpoints/best) or a detector bundle"),
    dataset: str = typer.Option(..., help="voc:DIR or coco:ANNOTATIONS.json[:IMAGES_DIR]"),
    metric: str = typer.Option(EVALUATE.metric, help="auto (coco on COCO data, voc07 on VOC data), voc07 (11-point), "
                               "voc12 (area) or coco (needs pycocotools)"),
    split: str = typer.Option(EVALUATE.split, help="VOC image set to evaluate on"),
    gpus: Optional[str] = typer.Option(None, help=GPUS_HELP + "; evaluation uses one", show_default=NO_GPU),
    cpu: bool = typer.Option(False, "--cpu", help=CPU_HELP, show_default="off"),
    short_side: Optional[int] = typer.Option(EVALUATE.short_side, min=16, help="", show_default="the training short side"),
    max_size: Optional[int] = typer.Option(EVALUATE.max_size, min=16, help="", show_default="the training max size"),
) -> None:
    """Print detection mAP per class and the mean."""
    with user_errors():
        options = EvaluateOptions(**_fields_of(EvaluateOptions, locals()))  # the metric is refused here
        from bbadapt.engines.common.datasets import parse_dataset
        from bbadapt.engines.torch.export import is_export
        from bbadapt.platform.devices import device_choice

        parse_dataset(dataset)
        gpus = device_choice(gpus, cpu)
        if is_export(directory):  # a torchvision export or a torch checkpoint: the torch engine (no mxnet)
            from bbadapt.engines.torch.evaluate import evaluate
        else:
            from bbadapt.engines.gluon.evaluate import evaluate

        with progress_line() as say:
            result = evaluate(directory, dataset, options, gpus=gpus,
                              progress=lambda i, n: say(f"image {i}/{n}") if i % 10 == 0 else None)
        for name, ap in result["per_class"].items():
            out_console.print(f"{name:<20} {ap:.4f}", markup=False)
        out_console.print(f"{result['metric']} mAP {result['map']:.4f} on {result['images']} images "
                          f"(short side {result['short_side']})", markup=False)


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    gpu: bool = typer.Option(False, "--gpu", help="exit 1 (one line on stderr) unless a usable GPU exists"),
) -> None:
    """What this environment can run: mxnet build, CUDA libraries, driver, GPUs, horovod, torch (see docs/gpu.md).

    Exit 0 when either engine runs on the CPU (MXNet; or torch for a torchvision export); ``--gpu``: MXNet's GPU.
    """
    import json

    with user_errors():
        from .doctor import collect, render

        report = collect()
        if as_json:
            out_console.print(json.dumps(report, indent=2), markup=False, highlight=False, soft_wrap=True)
        else:
            for line in render(report):
                out_console.print(line, markup=False, highlight=False)
        if not report["cpu_ok"] and not report["torch_ok"]:
            fail(f"neither engine can run here: mxnet: {report['mxnet'].get('error') or report['mxnet'].get('cpu_check')}; "
                 f"torch: {report['torch']['error']}", 1)
        if gpu and report["gpu"]["problem"]:
            fail(f"no usable GPU: {report['gpu']['problem']}", 1)


def main(args: Optional[list[str]] = None) -> int:
    """Run the CLI. A usage error (unknown option, bad value, missing argument) is one line on
    stderr, ``bbadapt: error: ...``, with exit code 2, like every other error; ``--help`` has the details."""
    try:  # typer >= 0.20 carries its own copy of click
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover - older typer on click itself
        from click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(args=args, prog_name="bbadapt", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # a bare `bbadapt` or `bbadapt train`: the help, as --help gives it
        help_text = exc.ctx.get_help()
        if help_text:
            out_console.print(help_text, markup=False, highlight=False)
        code = 0
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "bbadapt"
        err_console.print(f"bbadapt: error: {one_line(exc.format_message())} (see `{where} --help`)", markup=False)
        code = exc.exit_code
    except typer.TyperException as exc:
        err_console.print(f"bbadapt: error: {one_line(exc.format_message())}", markup=False)
        code = exc.exit_code
    except typer.Abort:
        err_console.print("bbadapt: error: aborted", markup=False)
        code = 1
    return code if isinstance(code, int) else 0


def one_line(text: str) -> str:
    return " ".join(str(text).split())



if __name__ == "__main__":
    sys.exit(main())
