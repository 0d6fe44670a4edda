"""Deploy a detector: one ONNX file (or TorchScript file) that takes decoded uint8 pixels, proven before it is kept.

The source is a torchvision detector export or a torch-engine checkpoint (:mod:`bbadapt.engines.torch.export`);
the graph is :class:`bbadapt.engines.torch.deploy_model.DeployDetector`, traced once on a photo at
:data:`TRACE_SIZE`. The proof runs the *written bytes* (onnxruntime, or ``torch.jit.load``) on the packaged
photos at :data:`CHECK_SIZES` (none of them the traced size), one and two images a batch, beside the eager
model (``frcnn_runtime``, the one the export's own check proved against GluonCV), fed the same pixels as
float RGB 0..1. Detections are matched one to one (:func:`bbadapt.verify.detections.compare_detections`);
any miss and nothing is written. The figures go to ``<file name>.check.json`` beside the file
(``detector.onnx.check.json``: an ONNX and a TorchScript file of one detector can share a folder).

ONNX goes through torch's TorchScript-based exporter (``dynamo=False``) at opset :data:`OPSET`: the graph's
sizes are data-dependent (proposals left after NMS), which that exporter traces as ONNX ops and
``torch.export`` refuses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bbadapt.platform.errors import OptionError, OutputError
from bbadapt.verify.detections import BOX_REL_TOL

OPSET = 17  # onnxruntime >= 1.14 runs it; NonMaxSuppression, RoiAlign and Resize as used here exist since 11..16
TRACE_SIZE = (240, 320)  # (height, width) the graph is traced at; every size is dynamic
CHECK_SIZES = ((375, 500), (411, 257), (480, 640))  # (height, width): none is the traced size
CHECK_BATCHES = (1, 2)
INPUTS = ("images",)
OUTPUTS = ("boxes", "scores", "labels", "batch_index")
FORMS = {".onnx": "onnx", ".pt": "torchscript"}
RUNTIME_NOTE = {"onnx": "onnxruntime (CPUExecutionProvider)", "torchscript": "torch.jit.load"}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DeployOptions:
    """What ``bbadapt export DIR --onnx FILE`` / ``--torchscript FILE`` writes."""

    form: str = "onnx"  # onnx | torchscript
    channel_order: str = "rgb"  # the decoded pixels' order: rgb (PIL), bgr (OpenCV)
    force: bool = False


def _quiet(_message: str) -> None:
    return None


def check_images(size: tuple[int, int], count: int) -> np.ndarray:
    """``count`` packaged photos, decoded, resized to ``size`` (h, w): uint8 ``[N, H, W, 3]``, RGB."""
    from bbadapt.verify.images import photos

    raw, _ = photos(size, limit=count)
    return np.ascontiguousarray(np.clip(np.rint(raw), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))


def eager_rows(model, batch: np.ndarray, dtype=None) -> list[tuple]:
    """The eager model's detections per image, as ``compare_detections`` reads them (class id = label - 1).

    ``dtype``: float64 for a float64 copy of the model (the judge of near-ties)."""
    import torch

    dtype = dtype or torch.float32
    with torch.no_grad():
        out = model([torch.from_numpy(image).permute(2, 0, 1).to(dtype) / 255.0 for image in batch])
    return [((o["labels"].numpy() - 1)[None], o["scores"].numpy()[None], o["boxes"].numpy()[None]) for o in out]


def deployed_rows(outputs, count: int) -> list[tuple]:
    """Split a deployed model's flat outputs (boxes, scores, labels, batch_index) into per-image rows."""
    boxes, scores, labels, index = (np.asarray(o) for o in outputs)
    return [((labels[index == i] - 1)[None], scores[index == i][None], boxes[index == i][None]) for i in range(count)]


def metadata(export, options: DeployOptions) -> dict[str, str]:
    """What a user of the file needs and the file cannot say by its shapes (stored in the file itself)."""
    import bbadapt

    transform = export.section("transform")
    return {
        "bbadapt_version": bbadapt.__version__,
        "format": "bbadapt-deploy-faster-rcnn",
        "classes": json.dumps(list(export.classes)),
        "input": f"images: uint8 [N, H, W, 3], {options.channel_order.upper()}, decoded pixels; N, H, W dynamic",
        "resize": (f"short side to {transform['min_size']}, long side at most {transform['max_size']} "
                   "(scale = min of the two ratios, size = floor(side * scale), bilinear)"),
        "outputs": ("boxes float32 [K, 4] x1 y1 x2 y2 in input pixels; scores float32 [K]; "
                    "labels int64 [K], classes[label - 1]; batch_index int64 [K]"),
    }


def trace_input() -> object:
    import torch

    return torch.from_numpy(check_images(TRACE_SIZE, 1))


def to_onnx(deploy, meta: dict[str, str], path: Path) -> None:
    """Export ``deploy`` to ``path`` (opset :data:`OPSET`, dynamic N/H/W/K) and store ``meta`` in its metadata."""
    import onnx
    import torch

    dynamic = {"images": {0: "N", 1: "H", 2: "W"}, **{name: {0: "K"} for name in OUTPUTS}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
        torch.onnx.export(deploy, (trace_input(),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUTS), output_names=list(OUTPUTS), dynamic_axes=dynamic)
    model = onnx.load(str(path))
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def to_torchscript(deploy, meta: dict[str, str], path: Path) -> None:
    """Trace ``deploy`` and save it with ``meta`` as the extra file ``bbadapt.json``."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(deploy, (trace_input(),), check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={"bbadapt.json": json.dumps(meta)})


def runner(form: str, path: Path) -> Callable[[np.ndarray], list]:
    """Run the written file: ``batch`` uint8 NHWC -> the four outputs as numpy arrays."""
    if form == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: session.run(None, {"images": batch})
    import torch

    loaded = torch.jit.load(str(path))

    def run(batch: np.ndarray) -> list:
        with torch.no_grad():
            return [o.numpy() for o in loaded(torch.from_numpy(batch))]

    return run


def prove(model, form: str, path: Path, channel_order: str, say: Progress) -> dict:
    """The written file against the eager model at every check size and batch; the figures and the verdict."""
    import copy

    import torch

    from bbadapt.verify.detections import compare_detections, float64_opinion

    run = runner(form, path)
    cases, model64 = [], None
    for size, count in ((size, count) for size in CHECK_SIZES for count in CHECK_BATCHES):
        say(f"checking {form} against the eager model: {count} photo(s) at {size[0]}x{size[1]}")
        batch = check_images(size, count)
        fed = batch[..., ::-1].copy() if channel_order == "bgr" else batch
        start = time.perf_counter()
        ours = deployed_rows(run(fed), count)
        seconds = time.perf_counter() - start
        references, truths = eager_rows(model, batch), None
        for image, (reference, deployed) in enumerate(zip(references, ours)):
            result = _plain(compare_detections(reference, deployed, box_rel_tol=BOX_REL_TOL))
            if not result["passed"]:  # near-ties across NMS / top-k: the eager model in float64 judges
                if model64 is None:
                    say("missing partners: running the eager model in float64 to judge near-ties")
                    model64 = copy.deepcopy(model).to(torch.float64)
                truths = truths or eager_rows(model64, batch, torch.float64)
                opinion = float64_opinion(deployed, reference, truths[image], box_rel_tol=BOX_REL_TOL)
                result["float64"] = {k: _plain(v) if isinstance(v, dict) else v for k, v in opinion.items()}
                result["passed"] = opinion["passed"]
            result["passed"] = bool(result["passed"]) and result["count_a"] > 0  # no detections proves nothing
            cases.append({"size": list(size), "batch": count, "image": image, "seconds": round(seconds, 3), **result})
        if not all(c["passed"] for c in cases):
            break  # refused: the remaining sizes would not change the verdict
    passed = all(c["passed"] for c in cases)
    return {"passed": passed, "cases": cases,
            "rule": ("each eager detection has a partner in the file's output (same class, score within score_tol, "
                     "box within box_tol px + box_rel_tol x coordinate), counts equal; near-ties matched, not ranked; "
                     "where partners are missing, the eager model in float64 judges (bbadapt.verify.detections."
                     "float64_opinion, as the torchvision export's check)"),
            "runtime": RUNTIME_NOTE[form], "sizes": [list(s) for s in CHECK_SIZES], "batches": list(CHECK_BATCHES),
            "traced_at": list(TRACE_SIZE)}


def _plain(figures: dict) -> dict:
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in figures.items()}


def form_of(out: Path, form: str | None = None) -> str:
    """The deploy form of ``out`` (``.onnx`` or ``.pt``), checked against ``form`` when one is asked for."""
    found = FORMS.get(out.suffix)
    if found is None or (form and found != form):
        wanted = {v: k for k, v in FORMS.items()}.get(form or "", " or ".join(FORMS))
        raise OptionError(f"{out}: name the {form or 'deploy'} file {wanted}")
    return found


def require_packages(form: str) -> None:
    import importlib

    needed = ("onnx", "onnxruntime") if form == "onnx" else ()
    missing = []
    for name in ("torch", "torchvision", *needed):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise OutputError(f"deploying to {form} needs {', '.join(missing)}: pip install 'bbadapt[torch,deploy]'")


def deploy(directory: str | os.PathLike, out: str | os.PathLike, options: DeployOptions = DeployOptions(),
           progress: Progress | None = None) -> dict:
    """Write the detector at ``directory`` (torchvision export or torch checkpoint) as one deployable file.

    Refuses an existing ``out`` unless ``options.force``; the file is proven before it is moved into place
    and nothing is left when the proof fails. Returns a summary (also written to ``<file name>.check.json``).
    """
    from bbadapt.engines.torch.deploy_model import CHANNEL_ORDERS, DeployDetector
    from bbadapt.engines.torch.export import load_model
    from bbadapt.platform.atomic import check_target, write_file

    say = progress or _quiet
    out = Path(out)
    form = form_of(out, options.form)
    if options.channel_order not in CHANNEL_ORDERS:
        raise OptionError(f"--deploy-input {options.channel_order!r}: expected one of {', '.join(CHANNEL_ORDERS)}")
    check_path = out.with_name(f"{out.name}.check.json")
    check_target(out, options.force, None, kind="file")
    check_target(check_path, options.force, None, kind="file")
    require_packages(form)
    model, export = load_model(directory)  # not an export or checkpoint: one line, before any progress
    deployed = DeployDetector(model, options.channel_order).eval()
    meta = metadata(export, options)
    with tempfile.TemporaryDirectory(prefix=".bbadapt-deploy-", dir=out.parent if out.parent.is_dir() else None) as tmp:
        staged = Path(tmp) / f"model{out.suffix}"
        say(f"tracing the detector at {TRACE_SIZE[0]}x{TRACE_SIZE[1]} and writing {form}")
        (to_onnx if form == "onnx" else to_torchscript)(deployed, meta, staged)
        check = prove(model, form, staged, options.channel_order, say)
        check.update(form=form, opset=OPSET if form == "onnx" else None, options=asdict(options), metadata=meta,
                     source=str(directory), bytes=staged.stat().st_size)
        if not check["passed"]:
            worst = max(check["cases"], key=lambda c: (c["unmatched"], abs(c["count_a"] - c["count_b"])))
            raise OutputError(f"the {form} file disagrees with the eager model ({worst['unmatched']} of "
                              f"{worst['count_a']} detections without a partner at {worst['size'][0]}x{worst['size'][1]}, "
                              f"batch {worst['batch']}); nothing written")
        write_file(check_path, lambda p: p.write_text(json.dumps(check, indent=2) + "\n"), options.force)
        try:
            write_file(out, lambda p: shutil.copyfile(staged, p), options.force)
        except BaseException:
            check_path.unlink(missing_ok=True)
            raise
    say(f"wrote {out}")
    worst = max(check["cases"], key=lambda c: c["max_abs_box_diff_px"])
    return {"format": form, "out": str(out), "check": str(check_path), "runtime": check["runtime"],
            "opset": check["opset"], "takes": "images uint8 [N, H, W, 3] " + options.channel_order.upper(),
            "outputs": list(OUTPUTS), "classes": list(export.classes), "bytes": check["bytes"],
            "cases": len(check["cases"]), "eager_detections": sum(c["count_a"] for c in check["cases"]),
            "file_detections": sum(c["count_b"] for c in check["cases"]),
            "unmatched": sum(c["unmatched"] for c in check["cases"] if "float64" not in c),
            "judged_in_float64": sum("float64" in c for c in check["cases"]),
            "max_abs_score_diff": max(c["max_abs_score_diff"] for c in check["cases"]),
            "max_abs_box_diff_px": worst["max_abs_box_diff_px"], "passed": True}
