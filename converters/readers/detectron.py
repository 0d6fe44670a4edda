"""Detectron / Caffe2 ResNet pickles (``R-50.pkl`` style) onto Gluon ``resnetN_v1``.

The file: a pickle (Python 2 era, protocol 2, byte strings that must be read as latin-1)
of ``{"blobs": {name: ndarray}}`` or of the blob dict itself. Names:

* stem ``conv1_w`` (``conv1_b`` if present), ``res_conv1_bn_s`` / ``res_conv1_bn_b``;
* blocks ``res{2..5}_{i}_branch2{a,b,c}_w`` with ``..._bn_s`` / ``..._bn_b``, and the
  projection shortcut ``res{k}_0_branch1_w`` + its ``_bn_s`` / ``_bn_b``;
* head ``pred_w``/``pred_b`` or ``fc1000_w``/``fc1000_b``, often absent from backbone files;
* ``*_momentum`` (SGD state) is ignored.

Caffe2's BatchNorm was replaced by ``AffineChannel`` (``y = x * s + b``, no statistics)
when the MSRA weights were converted, and the stride sits in the first 1x1 of each
bottleneck: exactly Gluon's ``resnetN_v1`` layout. Each AffineChannel becomes a Gluon
BatchNorm with ``gamma = s``, ``beta = b``, ``running_mean = 0`` and a ``running_var``
that makes ``var + eps`` exactly 1 in float32 (:func:`bbadapt.core.foldmath.batchnorm_for_affine`), so the
converted net computes ``x * s + b`` bit for bit. Gluon's bottleneck 1x1 convs have a
bias Caffe2's lack: set to zero. A conv bias in the file (``conv1_b``) goes into the
following BN's ``beta`` (``s * (Wx + c) + b``).

Input convention (Detectron's ``PIXEL_MEANS``, BGR, 0..255 minus the mean, std 1):
:data:`SOURCE_SPEC`. detectron2's configs for the same MSRA weights use
103.53/116.28/123.675 instead; pass ``--from`` to override.

A missing head is not invented from nothing silently: the net gets a seeded random
classifier (deterministic, so re-checks rebuild the same one) and the provenance says
``"head": "absent ..."``; the backbone is what a detector uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bbadapt.core.architectures.gluon_resnet import gluon_resnet_v1
from bbadapt.core.foldmath import batchnorm_for_affine
from bbadapt.core.registry import Converted, custom_info
from bbadapt.core.zoo import RESNET_LAYOUTS
from bbadapt.platform.errors import ModelError, WeightsError
from converters.readers import safe_pickle
from converters.readers.base import (
    Format,
    ResNetNaming,
    file_digest,
    float32_tensors,
    read_layout,
    require_file,
    unmatched_error,
)

SOURCE_SPEC = "order=bgr,scale=1,mean=102.9801/115.9465/122.7717,std=1/1/1"
BN_EPS = 1e-5  # gluon BatchNorm's default, what resnetN_v1 builds
HEAD_SEED = 0
_BLOB_NAME = re.compile(rb"(?:res[2-5]_\d+_branch|res_conv1_bn|conv1_[wb]|pred_[wb]|fc1000_[wb]|blobs)")
BUILDER = "gluon-resnet-v1"
HEADS = (("pred_w", "pred_b"), ("fc1000_w", "fc1000_b"))


def blobs_of(loaded, path: Path) -> dict[str, np.ndarray]:
    """The blob dict inside a Detectron pickle (``{"blobs": {...}}`` or flat), momentum dropped."""
    if isinstance(loaded, dict) and isinstance(loaded.get("blobs"), dict):
        loaded = loaded["blobs"]
    if not isinstance(loaded, dict) or not loaded:
        raise WeightsError(f"{path} is a pickle but not a Detectron weights dict (no blobs)")
    arrays = {}
    for key, value in loaded.items():
        name = key.decode("latin-1") if isinstance(key, bytes) else str(key)
        if name.endswith("_momentum"):
            continue
        if not isinstance(value, np.ndarray):
            raise WeightsError(f"{path}: blob {name} is a {type(value).__name__}, not an array")
        arrays[name] = value
    return arrays


NAMING = ResNetNaming(re.compile(r"^res([2-5])_(\d+)_branch"), (2, 3, 4, 5), "conv1_w", "res2_0_branch2c_w",
                      "the blobs are not a Detectron ResNet (need conv1_w and res2..res5 blocks)")


def layout(names) -> tuple[int, bool, tuple[int, ...]]:
    """(depth, bottleneck, blocks per stage) read off the blob names."""
    depth, bottleneck, counts = read_layout(names, NAMING)
    if depth is None:
        raise WeightsError(f"a Detectron ResNet with {counts} {'bottleneck' if bottleneck else 'basic'} blocks per "
                           f"stage has no Gluon resnet_v1 twin (known: {sorted(RESNET_LAYOUTS)})")
    return depth, bottleneck, counts


def pairs(depth: int, net_params) -> list[tuple[str, str, str]]:
    """(Caffe2 prefix, Gluon conv path, Gluon BN path) for every conv+AffineChannel of ``depth``."""
    counts, bottleneck = RESNET_LAYOUTS[depth]
    out = [("conv1", "features.0", "features.1")]
    branches = (("branch2a", 0, 1), ("branch2b", 3, 4)) + ((("branch2c", 6, 7),) if bottleneck else ())
    for stage, n in enumerate(counts, start=2):
        for i in range(n):
            block = f"features.{stage + 2}.{i}"
            for branch, conv, bn in branches:
                out.append((f"res{stage}_{i}_{branch}", f"{block}.body.{conv}", f"{block}.body.{bn}"))
            if f"{block}.downsample.0.weight" in net_params:
                out.append((f"res{stage}_{i}_branch1", f"{block}.downsample.0", f"{block}.downsample.1"))
    return out


def _bn_name(prefix: str) -> str:
    return "res_conv1_bn" if prefix == "conv1" else f"{prefix}_bn"


def to_gluon(blobs: dict[str, np.ndarray], depth: int, net_params) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Gluon structural arrays from the blobs; also the blobs nothing used and the blobs (or params) missing."""
    used: set[str] = set()
    absent: list[str] = []
    out: dict[str, np.ndarray] = {}

    def take(name: str, required: bool = True):
        if name not in blobs and required:
            absent.append(name)
        if name in blobs:
            used.add(name)
            return blobs[name].astype(np.float64)
        return None

    for prefix, conv, bn in pairs(depth, net_params):
        weight, bias = take(f"{prefix}_w"), take(f"{prefix}_b", required=False)
        s, b = take(f"{_bn_name(prefix)}_s"), take(f"{_bn_name(prefix)}_b")
        if weight is not None:
            out[f"{conv}.weight"] = weight.astype(np.float32)
        if f"{conv}.bias" in net_params and weight is not None:
            out[f"{conv}.bias"] = np.zeros(weight.shape[0], np.float32)  # gluon v1's 1x1 bias; Caffe2 has none
        if s is not None and b is not None:
            shift = b + s * bias if bias is not None and bias.shape == s.shape else b
            if bias is not None and bias.shape != s.shape:
                used.discard(f"{prefix}_b")  # reported as unmatched below
            for key, value in batchnorm_for_affine(s, shift, BN_EPS).items():
                out[f"{bn}.{key}"] = value
    for w_name, b_name in HEADS:
        if w_name in blobs:
            out["output.weight"] = take(w_name).astype(np.float32)
            bias = take(b_name, required=False)
            if bias is not None:
                out["output.bias"] = bias.astype(np.float32)
            break
    unmatched = sorted(set(blobs) - used)
    unfilled = sorted(k for k in net_params if k not in out and not k.startswith("output."))
    return out, unmatched, absent or unfilled  # missing in Caffe2 names where they exist


def _head(blobs: dict[str, np.ndarray]) -> tuple[int, str]:
    for w_name, _ in HEADS:
        if w_name in blobs:
            weight = blobs[w_name]
            if weight.ndim != 2:
                raise WeightsError(f"head {w_name} has shape {weight.shape}; expected (classes, features)")
            return int(weight.shape[0]), f"from the file ({w_name})"
    return 1000, f"absent in the file: seeded random classifier (seed {HEAD_SEED}); only the backbone is converted"


def _random_head(net) -> None:
    import mxnet as mx

    rng = np.random.RandomState(HEAD_SEED)
    weight = net.output.weight
    weight.set_data(mx.nd.array(rng.normal(0, 0.01, weight.shape), dtype="float32"))
    net.output.bias.set_data(mx.nd.zeros(net.output.bias.shape))


def read(path: Path, arch: str | None = None, progress=None) -> Converted:
    """A Detectron ResNet pickle as Gluon ``resnetN_v1`` with affine-only BatchNorms."""
    from bbadapt.core.weights import assign, structural_params

    say = progress or (lambda _m: None)
    path = require_file(path)
    blobs = blobs_of(safe_pickle.load(path), path)
    tensors = float32_tensors(blobs, str(path))
    blobs = tensors.arrays
    depth, bottleneck, counts = layout(set(blobs))
    if arch is not None and arch not in (f"resnet{depth}_v1", f"R-{depth}", f"resnet{depth}"):
        raise ModelError(f"--arch {arch} contradicts the file, which holds a Detectron R-{depth} "
                         f"(accepted: resnet{depth}_v1, R-{depth}, resnet{depth})")
    classes, head = _head(blobs)
    say(f"Detectron R-{depth} ({counts} {'bottleneck' if bottleneck else 'basic'} blocks) -> gluon resnet{depth}_v1, head {head}")
    net = gluon_resnet_v1(depth, classes)
    params = structural_params(net)
    arrays, unmatched, missing = to_gluon(blobs, depth, params)
    if unmatched or missing:
        raise unmatched_error(f"{path} (Detectron R-{depth})", unmatched, missing)
    if "output.weight" not in arrays:
        _random_head(net)
        arrays["output.weight"] = net.output.weight.data().asnumpy()
        arrays["output.bias"] = net.output.bias.data().asnumpy()
    assign(net, arrays, origin=str(path))
    digest = file_digest(path)
    provenance = {"kind": "file", "format": FORMAT.name, "path": str(path.resolve()), "sha256": digest,
                  "files": {str(path.resolve()): digest}, "arch_arg": arch,
                  "layout": {"depth": depth, "bottleneck": bottleneck, "blocks": list(counts)},
                  "naming": "Caffe2/Detectron blobs (conv1_w, res_conv1_bn_s, res2_0_branch2a_w ...)",
                  "bn": f"AffineChannel as BatchNorm(mean 0, var+eps == 1 in float32, eps {BN_EPS})",
                  "head": head, "dtype_note": tensors.note, "input_spec_note": "Detectron PIXEL_MEANS (BGR); detectron2 uses 103.53/116.28/123.675"}
    info = custom_info(f"detectron_R-{depth}", "gluon-v1", SOURCE_SPEC)
    return Converted(net=net, arch={"builder": BUILDER, "kwargs": {"depth": depth, "classes": classes}},
                     info=info, provenance=provenance)


def sniff(path: Path, head: bytes) -> bool:
    """A pickle that is not torch's legacy format and names Caffe2 ResNet blobs near its start."""
    try:
        if not safe_pickle.looks_like(head) or head.startswith(b"\x80\x02\x8a\x0a"):
            return False
        return _BLOB_NAME.search(head) is not None
    except Exception:  # noqa: BLE001 - a sniffer must not raise on garbage
        return False


FORMAT = Format(
    name="detectron",
    description="Detectron/Caffe2 ResNet pickle (R-50.pkl: conv1_w, res2_0_branch2a_w, AffineChannel _bn_s/_b) -> gluon resnetN_v1",
    sniff=sniff,
    read=read,
    extensions=(".pkl",),
)
