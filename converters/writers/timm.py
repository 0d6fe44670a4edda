"""A bbadapt bundle as a timm folder: ``config.json`` + ``model.safetensors``, checked in timm before it is written.

timm loads it as it loads its own weights::

    timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file="OUT/model.safetensors"))

(strict), and ``config.json`` is what timm's ``save_for_hf`` writes (``architecture``, ``pretrained_cfg``),
so ``timm.data.resolve_data_config`` / ``create_transform`` build the right input transform from it.

What the weights expect. timm's ResNet has no layer that could hold a folded input normalization exactly
(folding a shift into the first conv is wrong near the zero padding), so, as the torchvision export:

* a bundle whose input step is the exact inserted affine (``fold=bn``, the default) is written with the fold
  undone: the weights take the bundle's SOURCE spec, and ``pretrained_cfg`` mean/std are the source's, so timm's
  transform of raw pixels feeds the model what the bundle's own input step would;
* a ``fold=conv`` bundle (the fold already lives in the first conv, approximate at the border) is written as it
  is: the weights take the bundle's TARGET spec, and ``pretrained_cfg`` mean/std are the ones that make timm's
  ``(x/255 - mean) / std`` compute it (``rgb255``: mean 0, std 1/255, i.e. raw pixels pass through). Only RGB
  targets: timm's transform cannot reorder channels.

BatchNorms are frozen constants whatever the bundle's form (``running_mean 0``, ``running_var 1-eps``, ``weight s``,
``bias t``): eval mode or ``FrozenBatchNorm2d`` only. ``config.json``'s ``bbadapt`` entry says all of this.

The check, before anything is written: timm builds the staged folder's model (full, and ``features_only=True,
out_indices=(1, 2, 3, 4)``: the C2..C5 maps detection frameworks consume), and both are run on real photos beside
the bundle's backbone (logits, and the outputs of ``layer1..layer4``); max rel above 1e-4 or a different top-1
refuses the export and nothing is left.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np

from bbadapt.platform.errors import ModelError, OutputError
from converters.readers import safetensors_io
from converters.readers.base import file_digest

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MAX_REL = 1e-4  # as the ONNX export: float32 kernels of two frameworks, never an approximation
DEFAULT_SIZES = [(224, 224), (129, 161)]
STEM_WIDTHS = {"b": None, "c": 32, "d": 32, "s": 64}  # gluoncv's deep-stem width of each variant timm registers
FROZEN_BN = "frozen constants: running_mean 0, running_var 1-eps, weight s, bias t (eval mode / FrozenBatchNorm2d only)"


def timm_layout(model: str) -> tuple[str, int, tuple[int, int, int] | None, bool]:
    """(timm arch, depth, deep-stem widths, avg_down) of a bundle's gluoncv model; one line when timm has no twin."""
    m = re.fullmatch(r"resnet(18|34|50|101|152)_v1([bcds])", model)
    if not m or (m.group(2) != "b" and m.group(1) in ("18", "34")):
        raise ModelError(f"the bundle's model {model} has no timm twin: timm's are gluoncv resnet{{18..152}}_v1b "
                         "(timm resnetN) and resnet{50,101,152}_v1c/_v1d/_v1s (timm resnetNc/d/s)")
    depth, variant = int(m.group(1)), m.group(2)
    width = STEM_WIDTHS[variant]
    arch = f"resnet{depth}{'' if variant == 'b' else variant}"
    return arch, depth, (width, width, 2 * width) if width else None, variant == "d"


def timm_mean_std(spec) -> tuple[list[float], list[float]]:
    """timm's ``mean``/``std`` (applied after ``x/255``) that compute ``spec``; RGB specs only."""
    if spec.order != "rgb":
        raise ModelError(f"the export would take {spec.to_string()} input, whose channel order timm's transform "
                         "cannot produce (it normalizes RGB); export an RGB bundle")
    std = [s / (255 * spec.scale) for s in spec.std]
    mean = [m / (255 * spec.scale) for m in spec.mean]
    return mean, std


def _config(arch: str, state: dict, spec, bundle, keep_fold: bool, stem) -> dict:
    mean, std = timm_mean_std(spec)
    classes, features = state["fc.weight"].shape
    size = int(bundle.manifest.input_size or 224)
    return {
        "architecture": arch, "num_classes": int(classes), "num_features": int(features), "global_pool": "avg",
        "pretrained_cfg": {"input_size": [3, size, size], "interpolation": "bilinear", "crop_pct": 0.875,
                           "crop_mode": "center", "mean": mean, "std": std, "num_classes": int(classes),
                           "pool_size": [7, 7], "first_conv": "conv1" if stem is None else "conv1.0",
                           "classifier": "fc"},
        "bbadapt": {"input_spec": spec.to_string(), "bundle_source": bundle.source.to_string(),
                    "bundle_target": bundle.target.to_string(), "model": bundle.model, "bundle_bn": bundle.manifest.bn,
                    "first_conv": "the bundle's fold=conv first conv, as it is" if keep_fold
                    else "the bundle's input fold undone (weights take the source spec)",
                    "bn": FROZEN_BN,
                    "meaning": "timm's transform with this pretrained_cfg (mean/std after x/255), then this model, "
                               "computes the bundle's backbone of raw RGB pixels"},
    }


def _bundle_outputs(net, x: np.ndarray) -> list[np.ndarray]:
    """The bundle backbone's C2..C5 (outputs of layer1..layer4) and logits for target-spec input."""
    import mxnet as mx

    y = mx.nd.array(x)
    for name in ("conv1", "bn1", "relu", "maxpool"):
        y = getattr(net, name)(y)
    maps = []
    for k in range(1, 5):
        y = getattr(net, f"layer{k}")(y)
        maps.append(y.asnumpy())
    return maps + [net(mx.nd.array(x)).asnumpy()]


def _check_in_timm(arch: str, weights: Path, bundle, spec, sizes) -> dict:
    """timm's own model (full and features_only) from the staged file, against the bundle on real photos."""
    import timm
    import torch

    from bbadapt.verify import images

    overlay = {"file": str(weights)}
    try:
        full = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay).eval()
        feats = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, features_only=True,
                                  out_indices=(1, 2, 3, 4)).eval()
    except Exception as exc:  # noqa: BLE001 - timm/torch raise many kinds; all mean "timm does not take it"
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise OutputError(f"timm does not load the export as {arch} ({reason}); nothing written") from None
    worst, per_size = 0.0, []
    for size in sizes:
        raw, _ = images.photos(size, limit=2)
        ref = _bundle_outputs(bundle.adapted.net, bundle.target.normalize(raw))
        with torch.no_grad():
            x = torch.from_numpy(spec.normalize(raw))
            got = [m.numpy() for m in feats(x)] + [full(x).numpy()]
        rels = [float(np.abs(g.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-30)) for g, r in zip(got, ref)]
        top1 = bool(np.all(got[-1].argmax(1) == ref[-1].argmax(1)))
        per_size.append({"size": list(size), "max_rel": {n: r for n, r in zip(("C2", "C3", "C4", "C5", "logits"), rels)},
                         "top1_agree": top1})
        worst = max(worst, *rels)
        if max(rels) > MAX_REL or not top1 or not all(np.all(np.isfinite(g)) for g in got):
            raise OutputError(f"timm's {arch} from the export does not reproduce the bundle at {size[0]}x{size[1]} "
                              f"(max rel {max(rels):.3g}, top-1 {'agrees' if top1 else 'differs'}); nothing written")
    return {"passed": True, "worst_max_rel": worst, "tolerance": MAX_REL, "sizes": per_size,
            "runtime": f"timm {timm.__version__}, torch {torch.__version__}"}


def export_ownership_problem(out: Path) -> str | None:
    """Why an existing ``out`` must not be replaced by ``--force`` (None: it is a bbadapt timm export)."""
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if names != {CONFIG, WEIGHTS}:
        return "it is not a bbadapt timm export (config.json + model.safetensors and nothing else)"
    try:
        if "bbadapt" not in json.loads((out / CONFIG).read_text()):
            return "its config.json was not written by bbadapt"
    except (OSError, ValueError):
        return "its config.json is unreadable"
    return None


def export_bundle(bundle_dir: str | Path, out: str | Path, force: bool = False, progress=None,
                  sizes: list[tuple[int, int]] | None = None, backbone: bool = False) -> dict:
    """Write a bundle's backbone as a timm folder ``out`` (see the module docstring); returns a summary with the check."""
    from bbadapt.core.plan import FoldIntoConv, input_step
    from bbadapt.platform import atomic
    from converters.writers.bundle_io import open_bundle
    from converters.writers.torchvision import resnet_state

    say = progress or (lambda _m: None)
    out = Path(out)
    atomic.check_target(out, force, export_ownership_problem)
    try:
        import timm  # noqa: F401 - the check needs it; fail before the work
    except ImportError:
        raise OutputError("the timm export is checked in timm, which is not installed (pip install 'bbadapt[timm]')") from None
    say(f"reading bundle {bundle_dir}")
    bundle = open_bundle(bundle_dir, backbone=backbone)
    arch, depth, stem, avg_down = timm_layout(bundle.model)
    keep_fold = isinstance(input_step(bundle.adapted.steps), FoldIntoConv)
    if keep_fold and bundle.target.order != "rgb":
        raise ModelError("the bundle's input fold (fold=conv) takes BGR input, which timm's transform cannot produce; "
                         "export a fold=bn bundle (its fold is undone) or one with an RGB target")
    spec = bundle.target if keep_fold else bundle.source
    state = resnet_state(bundle, depth, stem, avg_down, keep_input_fold=keep_fold)
    config = _config(arch, state, spec, bundle, keep_fold, stem)
    payload = safetensors_io.dumps(state, {"format": "pt", "bbadapt.input_spec": spec.to_string(),
                                           "bbadapt.model": bundle.model, "bbadapt.bn": FROZEN_BN})
    with tempfile.TemporaryDirectory(prefix="bbadapt-timm-") as tmp:
        staged = Path(tmp) / WEIGHTS
        staged.write_bytes(payload)
        say(f"checking the export in timm ({arch}, full and features_only) against the bundle")
        check = _check_in_timm(arch, staged, bundle, spec, sizes or DEFAULT_SIZES)
    with atomic.staged_directory(out, force, export_ownership_problem, what="timm export") as stage:
        (stage / WEIGHTS).write_bytes(payload)
        (stage / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    say(f"wrote {out}")
    return {"format": "timm", "out": str(out), "architecture": arch, "input_spec": spec.to_string(),
            "bundle_target": bundle.target.to_string(), "tensors": len(state),
            "sha256": file_digest(out / WEIGHTS), "check_passed": True, "check_worst_max_rel": check["worst_max_rel"],
            "check": check, "runtime": check["runtime"],
            "meaning": f"timm.create_model('{arch}', pretrained=True, pretrained_cfg_overlay=dict(file=OUT/{WEIGHTS})); "
                       "config.json's mean/std make timm's transform feed it; BNs are frozen constants (eval mode)"}
