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
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from bbadapt.core.errors import BbadaptError, OptionError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn model-zoo ResNets into verified, detection-ready backbones.")
out_console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
EXIT_CHECK_FAILED = 3


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


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn bbadapt's errors into one stderr line and an exit code."""
    try:
        yield
    except BbadaptError as exc:
        fail(str(exc), exc.exit_code)
    except typer.Exit:  # a command's own exit (it is a RuntimeError): not a bug
        raise
    except KeyboardInterrupt as exc:  # bbadapt.core.atomic says when the write had already completed
        fail(f"interrupted; {exc or 'nothing was written'}", 130)
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, traceback on request
        if os.environ.get("BBADAPT_DEBUG"):
            raise
        from .core.cuda_libs import explain_load_error  # mxnet's CUDA build without a library it needs

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
    if not text:
        return None
    sizes = []
    for part in text.split(","):
        h, sep, w = part.strip().lower().partition("x")
        if not (sep and h.isdecimal() and w.isdecimal() and int(h) >= 8 and int(w) >= 8):
            raise OptionError(f"bad size {part!r}; use HxW[,HxW...] with sides >= 8, e.g. 224x224,129x161")
        sizes.append((int(h), int(w)))
    return sizes


def _summary(report: dict, out: Path) -> None:
    cls = report.get("classification") or {}
    agree = f"; top-1 agreement {cls['top1_agreement']:.0%}" if cls.get("top1_agreement") is not None else ""
    lab = cls.get("labelled")
    if lab:
        agree += (f"; accuracy on {lab['n']} labelled tiles: original {lab['accuracy_original']:.0%}, "
                  f"adapted {lab['accuracy_adapted']:.0%}")
    n_sizes = len({tuple(i["size"]) for i in report["inputs"]})
    if report["exact"]:
        raised = report["tolerance"].get("raised")
        tolerance = f"tolerance {report['tolerance']['max_rel']:.0e}" + (
            f"; raised at {', '.join(raised)}, where the original's own float32 error is larger: judged relative "
            f"to the original ({report['tolerance']['fp64_factor']:g}x)" if raised else "")
        out_console.print(f"check {report['verdict']}: worst max rel {report['worst_max_rel']:.2e} "
                          f"({tolerance}) over {len(report['probes'])} probes, "
                          f"{len(report['inputs'])} images at {n_sizes} sizes{agree}", markup=False)
    else:
        err_console.print("bbadapt: warning: this fold is APPROXIMATE (fold=conv with a non-zero shift): "
                          "results differ near the image border; see the report", markup=False)
        judged = [p["name"] for p in report["probes"] if p["passed"] is not None]
        verdict = "within tolerance" if report["passed"] else "NOT within tolerance"
        out_console.print(f"check {report['verdict']} (approximate fold): interiors of {', '.join(judged) or 'no probe'} "
                          f"{verdict}; worst max rel including the border {report['worst_max_rel']:.2e}{agree}", markup=False)
    for note in report["notes"]:
        if note.startswith(("BatchNorm ", "INCONCLUSIVE")):
            err_console.print(f"bbadapt: note: {note}", markup=False)
    for reason in report["reasons"]:
        out_console.print(f"  - {reason}", markup=False)
    out_console.print(f"report: {out / 'report.md'} (and report.html)", markup=False)


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
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory [default: out/MODEL]"),
    weights: str = typer.Option("pretrained", help="pretrained (download; cached in $MXNET_HOME), random, or a weights "
                                                   "file of any format in `bbadapt formats`"),
    fmt: Optional[str] = typer.Option(None, "--format", help="format of the weights file [default: detected from content]"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture (zoo name) for a weights file; same as MODEL"),
    source: Optional[str] = typer.Option(None, "--from", help="input spec the weights expect [default: the model's own]"),
    target: str = typer.Option("rgb255", "--to", help="input spec you will feed: preset or order=..,scale=..,mean=a/b/c,std=a/b/c"),
    fold: Fold = typer.Option(Fold.auto, help="where the input map goes: bn (exact), conv (approximate at borders), auto"),
    bn: Optional[BNMode] = typer.Option(None, help="frozen BatchNorm form [default: fused; affine with --detector]"),
    detector: Optional[Detector] = typer.Option(None, help="also build a detector on the adapted backbone"),
    classes: Optional[str] = typer.Option(None, help="detector class names, comma-separated (e.g. raccoon,dog)"),
    layout: Layout = typer.Option(Layout.c4, help="detector layout: c4 (stride 16 + stage-4 head) or fpn"),
    freeze_at: int = typer.Option(2, min=0, max=5, help="detector: freeze the backbone up to here (0 none, 1 stem, "
                                                         "2 stem+stage1 as GluonCV, ..., 5 all)"),
    force: bool = typer.Option(False, help="replace an existing output directory"),
    images: Optional[Path] = typer.Option(None, help="directory of photos for the check [default: packaged photos]"),
    sizes: Optional[str] = typer.Option(None, help="check sizes HxW,HxW [default: 224x224,129x161; 32x32,37x29 for CIFAR]"),
    tolerance: float = typer.Option(1e-5, min=0.0, help="max-rel tolerance of the equivalence check"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed for --weights random"),
) -> None:
    """Fold input normalization and freeze BatchNorm, prove equivalence, write the backbone (and detector)."""
    from bbadapt.core.spec import parse_spec
    from bbadapt.core.zoo import model_info

    with user_errors():
        if model and arch and model != arch:
            raise OptionError(f"MODEL {model!r} and --arch {arch!r} disagree; give one")
        model = model or arch
        if weights in ("pretrained", "random"):
            if model is None:
                raise OptionError(f"--weights {weights} needs a MODEL (see `bbadapt list`), or give a weights file")
            model_info(model)  # argument errors first, before importing mxnet
        parse_spec(target)
        if source:
            parse_spec(source)
        if classes and not detector:
            raise OptionError("--classes is for --detector faster-rcnn")
        if detector and not parse_classes(classes):
            raise OptionError("--detector needs --classes, e.g. --classes raccoon")
        sizes_parsed = parse_sizes(sizes)
        from bbadapt.pipeline import ConvertOptions, DetectorOptions
        from bbadapt.pipeline import convert as run_convert

        options = ConvertOptions(weights=weights, fmt=fmt, source=source, target=target, fold=fold.value,
                                 bn=bn.value if bn else None, seed=seed, force=force,
                                 images=str(images) if images else None, sizes=sizes_parsed, tolerance=tolerance)
        detector_options = (DetectorOptions(classes=parse_classes(classes), kind=detector.value, layout=layout.value,
                                            freeze_at=freeze_at) if detector else None)
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
    if not report["passed"]:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def check(
    directory: Path = typer.Argument(..., help="an output directory of `bbadapt convert`"),
    images: Optional[Path] = typer.Option(None, help="directory of photos for the check"),
    sizes: Optional[str] = typer.Option(None, help="check sizes HxW,HxW"),
) -> None:
    """Re-run the equivalence check of an existing output (rewrites its reports)."""
    from bbadapt.pipeline import recheck

    with user_errors():
        with progress_line() as say:
            report = recheck(directory, images=str(images) if images else None, sizes=parse_sizes(sizes), progress=say)
        _summary(report, directory)
    if not report["passed"]:
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
    "symbol": ("bbadapt.detection.detector_bundle", "export_symbol"),
    "torchvision": ("bbadapt.detection.torchvision_export", "export"),
    "onnx": ("converters.writers.onnx", "export_bundle"),
}


@app.command()
def export(
    directory: Path = typer.Argument(..., help="an output directory of `bbadapt convert`"),
    symbol: Optional[Path] = typer.Option(None, help="PREFIX: write PREFIX-symbol.json + PREFIX-0000.params (deployment)"),
    torchvision: Optional[Path] = typer.Option(None, help="FILE.safetensors (or .pth with torch): torchvision ResNet weights; "
                                               "for a detector, a directory: a torchvision FasterRCNN (docs/torchvision.md)"),
    torchvision_input: str = typer.Option("01", help="detector to torchvision: the model's input, RGB 0..1 (01) or 0..255 (255)"),
    onnx: Optional[Path] = typer.Option(None, help="FILE.onnx, checked with onnxruntime against MXNet"),
    force: bool = typer.Option(False, help="replace an existing export"),
) -> None:
    """Carry an adapted backbone or detector out: MXNet symbol, torchvision weights, or ONNX."""
    import importlib

    with user_errors():
        chosen = {k: v for k, v in {"symbol": symbol, "torchvision": torchvision, "onnx": onnx}.items() if v}
        if len(chosen) != 1:
            raise OptionError("give exactly one of --symbol PREFIX, --torchvision FILE, --onnx FILE")
        (kind, target), = chosen.items()
        module, function = EXPORTERS[kind]
        exporter = getattr(importlib.import_module(module), function)
        with progress_line() as say:
            extra = {"input_range": torchvision_input} if kind == "torchvision" else {}
            summary = exporter(Path(directory), Path(target), force=force, progress=say, **extra)
        for key, value in summary.items():
            if isinstance(value, (str, int, float, bool)):
                out_console.print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}", markup=False)


@app.command("list")
def list_models(all_models: bool = typer.Option(False, "--all", help="also list the further ResNet kin (SE, ResNeXt, pruned)")) -> None:
    """The supported models and the input spec their pretrained weights expect."""
    from rich.table import Table

    from bbadapt.core.zoo import list_models as models

    table = Table("model", "family", "default --from", "library", "status")
    for m in models(core_only=not all_models):
        table.add_row(m.name, m.family, m.source_spec, m.library, "supported" if m.core else "generic (stretch)")
    out_console.print(table)


@app.command("inspect")
def inspect_weights(
    file: Path = typer.Argument(..., help="a weights file (.params, -symbol.json, ...)"),
    as_json: bool = typer.Option(False, "--json", help="print the inspection as JSON"),
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


@app.command("train")
def train_cmd(
    directory: Path = typer.Argument(..., help="a detector bundle (bbadapt convert MODEL --detector faster-rcnn)"),
    dataset: str = typer.Option(..., help="voc:DIR or coco:ANNOTATIONS.json[:IMAGES_DIR]"),
    val_dataset: Optional[str] = typer.Option(None, help="validation data [default: --dataset (VOC: its --val-split; COCO: the file itself)]"),
    train_split: str = typer.Option("train", help="VOC image set to train on (ImageSets/Main/NAME.txt)"),
    val_split: str = typer.Option("val", help="VOC image set to validate on"),
    epochs: int = typer.Option(2, min=1),
    lr: float = typer.Option(0.01, help="base learning rate (SGD, momentum 0.9, wd 1e-4)"),
    lr_steps: str = typer.Option("", help="epochs at which the lr is multiplied by 0.1, e.g. 14,20"),
    warmup: int = typer.Option(0, min=0, help="linear warmup iterations at the start (from lr/3)"),
    batch_size: int = typer.Option(1, min=1, help="images per step over all devices and all --horovod workers (the "
                                   "global batch, as gluoncv's script); a multiple of devices x workers"),
    gpus: Optional[str] = typer.Option(None, help="GPUs to train on, e.g. 0 or 0,1 (data parallel)"),
    cpu: bool = typer.Option(False, "--cpu", help="train on the CPU (the default when no --gpus)"),
    amp: bool = typer.Option(False, "--amp", help="mixed precision (GPU only)"),
    hybridize: bool = typer.Option(True, help="hybridize with static_alloc"),
    short_side: int = typer.Option(600, min=16),
    max_size: int = typer.Option(1000, min=16),
    checkpoint_every: int = typer.Option(1, min=1, help="write checkpoints/epoch-NNNN every N epochs"),
    val_interval: int = typer.Option(1, min=1, help="validate (VOC07 mAP) every N epochs; best-by-mAP follows"),
    log_interval: int = typer.Option(10, min=1, help="iterations per train.log.jsonl record"),
    resume: bool = typer.Option(False, "--resume", help="continue from checkpoints/last"),
    horovod: bool = typer.Option(False, "--horovod", help="one worker of a horovodrun job (see docs/training.md): rank "
                                 "0's parameters are broadcast, gradients averaged by hvd.DistributedTrainer, each "
                                 "worker reads its own part of the images every epoch, only rank 0 logs, validates "
                                 "and writes checkpoints; --resume works (checkpoints on a shared filesystem)"),
    seed: int = typer.Option(0, min=0),
    workers: int = typer.Option(0, min=0, help="data loader worker processes"),
) -> None:
    """Train a Faster R-CNN bundle on VOC or COCO data; checkpoints go to DIR/checkpoints/."""
    with user_errors():
        from bbadapt.core.errors import OptionError
        from bbadapt.detection.datasets import parse_dataset

        parse_dataset(dataset)  # usage errors before any bundle or data is read
        try:
            steps = [int(v) for v in lr_steps.split(",") if v.strip()]
        except ValueError:
            raise OptionError(f"--lr-steps takes epoch numbers like 14,20, got {lr_steps!r}") from None
        from bbadapt.core.devices import contexts
        from bbadapt.detection.train import console_progress, train

        ctx = contexts(gpus, cpu)
        try:
            with console_progress(err_console) as progress:
                result = train(directory, dataset, epochs=epochs, lr=lr, lr_steps=steps, warmup_iters=warmup,
                               batch_size=batch_size, ctx=ctx, amp=amp, hybridize=hybridize, short_side=short_side,
                               max_size=max_size, checkpoint_every=checkpoint_every, val_interval=val_interval,
                               log_interval=log_interval, resume=resume, seed=seed, horovod=horovod,
                               val_dataset=val_dataset, train_split=train_split, val_split=val_split,
                               num_workers=workers, progress=progress)
        except KeyboardInterrupt:
            fail("interrupted; checkpoints written so far are intact (continue with --resume)", 130)
        if result["rank"] != 0:
            return  # under --horovod, rank 0 speaks for the job
        if result["started_at_epoch"] >= result["epochs"]:
            out_console.print(f"nothing to do: {directory / 'checkpoints' / 'last'} is at epoch "
                              f"{result['started_at_epoch']} (--epochs {epochs})", markup=False)
            return
        best = f"{result['best_map']:.4f}" if result["best_map"] is not None else "not validated"
        out_console.print(f"trained epochs {result['started_at_epoch'] + 1}..{result['epochs']} "
                          f"({result['iterations']} iterations in all); best VOC07 mAP {best}; "
                          f"checkpoints in {directory / 'checkpoints'}", markup=False)


@app.command("evaluate")
def evaluate_cmd(
    directory: Path = typer.Argument(..., help="a checkpoint (DIR/checkpoints/best) or a detector bundle"),
    dataset: str = typer.Option(..., help="voc:DIR or coco:ANNOTATIONS.json[:IMAGES_DIR]"),
    metric: str = typer.Option("voc07", help="voc07 (11-point), voc12 (area) or coco (needs pycocotools)"),
    split: str = typer.Option("val", help="VOC image set to evaluate on"),
    gpu: Optional[int] = typer.Option(None, min=0, help="GPU to run on [default: CPU]"),
    short_side: Optional[int] = typer.Option(None, min=16, help="[default: the training short side]"),
    max_size: Optional[int] = typer.Option(None, min=16),
) -> None:
    """Print detection mAP per class and the mean."""
    with user_errors():
        from bbadapt.detection.datasets import parse_dataset
        from bbadapt.detection.evaluate import check_metric

        parse_dataset(dataset)
        check_metric(metric)
        from bbadapt.core.devices import contexts
        from bbadapt.detection.evaluate import evaluate

        ctx = contexts(str(gpu) if gpu is not None else None)[0]
        with progress_line() as say:
            result = evaluate(directory, dataset, metric=metric, split=split, ctx=ctx, short_side=short_side,
                              max_size=max_size, progress=lambda i, n: say(f"image {i}/{n}") if i % 10 == 0 else None)
        for name, ap in result["per_class"].items():
            out_console.print(f"{name:<20} {ap:.4f}", markup=False)
        out_console.print(f"{metric} mAP {result['map']:.4f} on {result['images']} images "
                          f"(short side {result['short_side']})", markup=False)


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    gpu: bool = typer.Option(False, "--gpu", help="exit 1 (one line on stderr) unless a usable GPU exists"),
) -> None:
    """What this environment can run: mxnet build, CUDA libraries, driver, GPUs, horovod (see docs/gpu.md)."""
    import json

    with user_errors():
        from .doctor import collect, render

        report = collect()
        if as_json:
            out_console.print(json.dumps(report, indent=2), markup=False, highlight=False, soft_wrap=True)
        else:
            for line in render(report):
                out_console.print(line, markup=False, highlight=False)
        if not report["cpu_ok"]:
            fail(f"mxnet cannot run here: {report['mxnet'].get('error') or report['mxnet'].get('cpu_check')}", 1)
        if gpu and report["gpu"]["problem"]:
            fail(f"no usable GPU: {report['gpu']['problem']}", 1)


def main() -> None:
    app(prog_name="bbadapt")


if __name__ == "__main__":
    sys.exit(main())
