"""A bbadapt Faster R-CNN (bundle or training checkpoint) as a torchvision ``FasterRCNN``, proven.

``bbadapt export DIR --torchvision OUT`` on a detector writes the directory ``OUT``:

* ``model.safetensors``: the torchvision state dict (written with numpy, no torch needed);
* ``config.json``: classes, every setting, input convention, freeze-at, BN eps, provenance;
* ``frcnn_runtime.py``: a module needing only torch + torchvision whose ``load(OUT, device)``
  builds the (lightly subclassed) ``FasterRCNN`` -- :mod:`converters.writers.frcnn_runtime`,
  where every difference from stock torchvision is listed;
* ``check.json``: the proof, four levels on real photos at an odd, a normal and a tiny size
  (:mod:`converters.writers.torchvision_detector_check`).

Everything is written into a staging directory, the runtime there loads the weights there,
and the directory is renamed to ``OUT`` only when the check passes.

Input convention: the bundle's input fold is undone (conv1 gets the weights that take the
SOURCE spec, as the backbone export does) and the source normalization moves into the
transform's ``image_mean``/``image_std``: by default the model takes RGB 0..1 floats like
every torchvision reference script (``input_range="255"``: RGB 0..255). A BGR source is
served by permuting conv1's input channels (and Gluon v2's data BN's).

Bodies: every GluonCV/Gluon ImageNet ResNet the detector builds on (v1b; v1c/v1d/v1e/v1s:
deep 3x3 stem, v1d/v1e with average-pool shortcuts; Gluon v1; Gluon v2: data BN,
pre-activation blocks, final BN + ReLU), read off the network by :class:`BodyReader` into a
description (``config["backbone"]["body"]``) from which the runtime's ``ResNetBody`` is built.
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

from bbadapt.bundle.schema import (
    EXPORT_CHECK,
    EXPORT_CONFIG,
    EXPORT_FILES,
    EXPORT_RUNTIME,
    EXPORT_WEIGHTS,
    TORCHVISION_FORMAT,
    BundleManifest,
    DetectorSection,
    TorchvisionExport,
    directory_of,
)
from bbadapt.core import foldmath
from bbadapt.platform import atomic
from bbadapt.platform.errors import ModelError, OptionError, OutputError
from converters.readers import safetensors_io
from converters.writers.torchvision_detector_check import INPUT_RANGES

RUNTIME_SOURCE = Path(__file__).with_name("frcnn_runtime.py")
RUNTIME_FILE = EXPORT_RUNTIME  # the names this module always exported; the files are named in bbadapt.bundle.schema
FORMAT = TORCHVISION_FORMAT

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

    manifest: BundleManifest  # read from the bundle or checkpoint directory (``manifest.directory``)
    backbone: object  # adapted gluon backbone (its parameters are the detector's)
    detector: object  # gluoncv FasterRCNN
    source: object  # InputSpec the backbone weights were trained with
    target: object  # InputSpec the detector takes
    model: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.manifest.directory

    @property
    def section(self) -> DetectorSection:
        return self.manifest.detector

    @property
    def layout(self) -> str:
        return self.section.layout

    @property
    def settings(self) -> dict:
        return self.section.settings


def load_gluon(bundle: str | os.PathLike | BundleManifest) -> GluonDetector:
    """Rebuild the stored detector (as :func:`bbadapt.detector_bundle.load_detector`), keeping its backbone.

    ``bundle``: a detector bundle or checkpoint directory, or its manifest (read once).
    """
    from bbadapt.bundle.backbone import backbone_structure
    from bbadapt.engines.gluon.detector_bundle import build_stored, read_detector

    manifest = read_detector(bundle)
    backbone = backbone_structure(manifest)
    detector = build_stored(manifest, backbone)
    return GluonDetector(manifest, backbone, detector, manifest.source_spec(), manifest.detector_input_spec(),
                         manifest.model_name)


# ---------------------------------------------------------------- tensors


def _value(param) -> np.ndarray:
    return param.data().asnumpy().astype(np.float32)


def backbone_tensors(gluon: GluonDetector) -> tuple[dict[str, np.ndarray], dict, int]:
    """The backbone as :class:`frcnn_runtime.ResNetBody` tensors (conv1 taking the SOURCE spec), its body
    description and depth: read off the detector's own stem/stage/tail cut (see :class:`BodyReader`)."""
    from bbadapt.bundle.backbone import load_adapted
    from converters.writers.bundle_io import Bundle

    adapted = load_adapted(gluon.manifest, net=gluon.backbone)
    reader = BodyReader(Bundle(gluon.manifest, adapted, gluon.model), _cut(gluon))
    return reader.read()


def _cut(gluon: GluonDetector) -> dict:
    """Stem, stage and tail paths of the backbone, as the detector was built on them."""
    stored = gluon.section.backbone_layout
    if stored and stored.get("stages"):
        return stored
    from bbadapt.engines.gluon.build import discover_layout

    return discover_layout(gluon.backbone).to_dict()


class BodyReader:
    """Walks an adapted GluonCV/Gluon ResNet and writes it as ``ResNetBody`` tensors plus its description.

    Nothing is looked up per model name: the stem is the convs and BatchNorm slots of the
    detector's stem paths (a BN before the first conv is Gluon v2's data BN; one 7x7 conv, or
    GluonCV's deep 3x3 stem); every block is its convs and BN slots in order (a BN first means
    pre-activation, Gluon v2; a BN after conv ``k`` is ``bn{k}`` and takes the conv's bias, a BN
    before conv ``k`` in a pre-activation block is ``bn{k}``); the shortcut is a 1x1 conv, or an
    average pool then a 1x1 (GluonCV v1d); the stride sits on whichever conv has it; the tail
    (Gluon v2's final BN + ReLU) becomes ``layer4.post_bn``. The description must be the same
    in every stage, and the runtime's strict ``load_state_dict`` and the four-level check then
    prove that it is the network.
    """

    def __init__(self, bundle, cut: dict) -> None:
        from bbadapt.core.plan import FoldIntoConv, input_step

        self.bundle, self.cut = bundle, cut
        self.net = bundle.adapted.net
        self.step = input_step(bundle.adapted.steps)
        if isinstance(self.step, FoldIntoConv) and self.step.absorb_bn:
            raise ModelError("the bundle folded its input and data BatchNorm into conv1 (input fold 'conv' through a "
                             "data BN); export a bundle made with the default input fold")
        self.state: dict[str, np.ndarray] = {}
        self.body: dict = {}

    # ------------------------------------------------------------ leaves

    def _leaves(self, path: str, skip: tuple[str, ...] = ()) -> list[tuple[str, str, object]]:
        """(kind, path, block) of the convs ("conv"), BN slots ("bn") and pools ("avgpool", "maxpool") under ``path``."""
        from mxnet.gluon import nn

        from bbadapt.core.blocks import FrozenAffine, Identity, get_block

        block = get_block(self.net, path)
        if self.step is not None and path == self.step.conv:
            return [("conv", path, block)]  # the input conv (its input affine, if any, is undone by _first_conv)
        if isinstance(block, nn.Conv2D):
            return [("conv", path, block)]
        if isinstance(block, (nn.BatchNorm, FrozenAffine, Identity)):
            return [("bn", path, block)]
        if isinstance(block, nn.AvgPool2D):
            return [("avgpool", path, block)]
        if isinstance(block, nn.MaxPool2D):
            return [("maxpool", path, block)]
        out = []
        for name in block._children:
            if name not in skip:
                out += self._leaves(f"{path}.{name}" if path else name, skip)
        return out

    def _conv(self, path: str, block) -> tuple[np.ndarray, np.ndarray, dict]:
        from bbadapt.core.blocks import param_value
        from bbadapt.core.plan import FoldIntoBN
        from bbadapt.core.spec import affine_map
        from converters.writers.torchvision import _bias, _first_conv

        if isinstance(self.step, FoldIntoBN) and path == self.step.conv:  # reads target order: back to source order
            perm = affine_map(self.bundle.source, self.bundle.target)[0]
            weight, bias = foldmath.unpermute_conv_input(param_value(block.weight), perm), _bias(block)
        elif self.step is not None and path == self.step.conv:
            weight, bias = _first_conv(self.bundle, block)
        else:
            weight, bias = param_value(block.weight), _bias(block)
        conv = block if "weight" in block._reg_params else block[len(block) - 1]  # the input affine's sequence: its conv
        kw = conv._kwargs
        if tuple(kw.get("dilate", (1, 1))) != (1, 1) or int(kw.get("num_group", 1)) != 1 \
                or tuple(kw["pad"]) != (weight.shape[2] // 2,) * 2 or weight.shape[2] != weight.shape[3]:
            raise ModelError(f"{path} is not a plain square conv with 'same' padding (dilated or grouped?): "
                             "the torchvision export does not describe it")
        return weight, bias, {"stride": int(kw["stride"][0]), "out": int(weight.shape[0]), "k": int(weight.shape[2])}

    def _put_conv(self, name: str, weight: np.ndarray) -> None:
        self.state[f"{name}.weight"] = weight

    def _put_bn(self, name: str, block, bias: np.ndarray | None, channels: int) -> None:
        from converters.readers.torchvision import VAR_ONE
        from converters.writers.torchvision import _affine_of

        s, t = (block.s, block.t) if isinstance(block, _Slot) else _affine_of(block)
        s, t = np.broadcast_to(s, (channels,)), np.broadcast_to(t, (channels,))
        self.state[f"{name}.weight"] = s
        self.state[f"{name}.bias"] = foldmath.fused_bias(np.zeros(channels) if bias is None else bias, s, t)
        self.state[f"{name}.running_mean"] = np.zeros(channels)
        self.state[f"{name}.running_var"] = np.full(channels, VAR_ONE)

    @staticmethod
    def _no_bias(path: str, bias: np.ndarray) -> None:
        if np.any(bias != 0):
            raise ModelError(f"{path} has a bias and no BatchNorm after it: the torchvision body has no place for it")

    # ------------------------------------------------------------ stem, blocks, tail

    def stem(self) -> None:
        leaves = [leaf for path in self.cut["stem"] for leaf in self._leaves(path)]
        kinds = [k for k, _, _ in leaves]
        data_bn = bool(kinds) and kinds[0] == "bn"
        body = kinds[1:] if data_bn else kinds
        n = body.count("conv")
        if n < 1 or body != ["conv", "bn"] * n + ["maxpool"]:
            raise ModelError(f"the backbone's stem ({', '.join(kinds)}) is not [data BN] conv-BN (once or more) + max pool")
        if data_bn:
            self._data_bn(leaves[0][2], leaves[1])
            leaves = leaves[1:]
        convs = []
        for i in range(n):
            (_, cpath, cblock), (_, _bpath, bblock) = leaves[2 * i], leaves[2 * i + 1]
            weight, bias, info = self._conv(cpath, cblock)
            conv_name, bn_name = ("conv1", "bn1") if n == 1 else (f"conv1.{3 * i}", "bn1" if i == n - 1 else f"conv1.{3 * i + 1}")
            self._put_conv(conv_name, weight)
            self._put_bn(bn_name, bblock, bias, info["out"])
            convs.append([info["out"], info["k"], info["stride"]])
        pool = leaves[-1][2]._kwargs
        if tuple(pool["kernel"]) != (3, 3) or tuple(pool["stride"]) != (2, 2) or tuple(pool["pad"]) != (1, 1):
            raise ModelError("the backbone's stem max pool is not 3x3, stride 2, padding 1")
        self.body["stem"] = {"data_bn": data_bn, "convs": convs}

    def _data_bn(self, block, conv_leaf) -> None:
        """Gluon v2's data BN on the SOURCE-normalized input: the input fold into it (if any) undone."""
        from bbadapt.core.plan import FoldIntoBN
        from bbadapt.core.spec import affine_map
        from converters.writers.torchvision import _affine_of

        s, t = (np.broadcast_to(v, (3,)) for v in _affine_of(block))
        if isinstance(self.step, FoldIntoBN):  # x_t -> affine -> conv reading target order
            perm, a, b = affine_map(self.bundle.source, self.bundle.target)
            s_src = s[list(perm)] / a  # FrozenAffine values are in target order: out[perm[c]] = values[c]
            s, t = s_src, t[list(perm)] - s_src * b
        elif self.step is not None and self.step.conv == conv_leaf[1]:
            raise ModelError("the bundle folded its input into conv1 behind the data BN; cannot undo it exactly")
        self._put_bn("data_bn", _Slot(s, t), None, 3)

    def stages(self) -> None:
        from bbadapt.core.blocks import get_block

        counts = []
        for index, stage_path in enumerate(self.cut["stages"], start=1):
            stage = get_block(self.net, stage_path)
            names = list(stage._children)
            counts.append(len(names))
            for i, name in enumerate(names):
                self._block(f"{stage_path}.{name}", f"layer{index}.{i}", first=i == 0, stage=index)
        self.body["layers"] = counts

    def _block(self, path: str, name: str, first: bool, stage: int) -> None:
        from bbadapt.core.blocks import get_block

        block = get_block(self.net, path)
        leaves = self._leaves(path, skip=("downsample",))
        kinds = [k for k, _, _ in leaves]
        preact = kinds[:1] == ["bn"]
        n = kinds.count("conv")
        want = ["bn", "conv"] * n if preact else ["conv", "bn"] * n
        if n not in (2, 3) or kinds != want:
            raise ModelError(f"{path} ({', '.join(kinds)}) is neither a conv-BN block nor a pre-activation BN-conv block")
        strides, prev_bias = [], None
        for k in range(n):  # conv k's bias lands in the BN right after it (pre-activation: the one before conv k+1)
            bn_leaf, conv_leaf = (leaves[2 * k], leaves[2 * k + 1]) if preact else (leaves[2 * k + 1], leaves[2 * k])
            weight, bias, info = self._conv(conv_leaf[1], conv_leaf[2])
            self._put_conv(f"{name}.conv{k + 1}", weight)
            if preact:
                self._put_bn(f"{name}.bn{k + 1}", bn_leaf[2], prev_bias, int(weight.shape[1]))
                prev_bias = bias
            else:
                self._put_bn(f"{name}.bn{k + 1}", bn_leaf[2], bias, info["out"])
            strides.append(info["stride"])
            self.width = info["out"]
        if preact:
            self._no_bias(leaves[-1][1], prev_bias)
        self._describe(path, "block", "bottleneck" if n == 3 else "basic")
        self._describe(path, "preact", preact)
        stride_on = [f"conv{k + 1}" for k, s in enumerate(strides) if s != 1]
        if len(stride_on) > 1 or (stride_on and not first) or (first and stage > 1 and not stride_on):
            raise ModelError(f"{path}: strides {strides} are not one stride-2 conv in each stage's first block")
        if stride_on and n == 3:
            self._describe(path, "stride_on", stride_on[0])
        elif stride_on and stride_on[0] != "conv1":
            raise ModelError(f"{path}: a basic block with its stride on {stride_on[0]}")
        if "downsample" in block._children:  # where one is expected: the runtime's strict load says
            self._downsample(f"{path}.downsample", f"{name}.downsample", preact, strides)

    def _downsample(self, path: str, name: str, preact: bool, strides: list[int]) -> None:
        leaves = self._leaves(path)
        kinds = [k for k, _, _ in leaves]
        stride = max(strides)
        if kinds == ["conv", "bn"] or kinds == ["conv"] and preact:
            kind = "conv"
        elif kinds == ["avgpool", "conv", "bn"]:
            kind = "avg_conv"
            pool = leaves[0][2]._kwargs
            if tuple(pool["kernel"]) != (stride,) * 2 or tuple(pool["stride"]) != (stride,) * 2 \
                    or pool.get("pooling_convention") != "full" or pool.get("count_include_pad", True):
                raise ModelError(f"{path}: the average pool is not {stride}x{stride}/{stride}, ceil mode, "
                                 "padding not counted")
        else:
            raise ModelError(f"{path} ({', '.join(kinds)}) is not a 1x1 conv(-BN) or avg pool + 1x1 conv-BN shortcut")
        self._describe(path, "downsample", kind)
        offset = len(kinds) - (2 if kinds[-1] == "bn" else 1)
        conv_path, conv = leaves[offset][1], leaves[offset][2]
        weight, bias, info = self._conv(conv_path, conv)
        if info["stride"] != (1 if kind == "avg_conv" else stride):
            raise ModelError(f"{conv_path}: the shortcut conv's stride {info['stride']} does not match its block")
        local = lambda p: p[len(path) + 1:]  # noqa: E731 - the gluon index inside the shortcut is the torch index
        if kinds[-1] == "bn":
            self._put_conv(f"{name}.{local(conv_path)}", weight)
            self._put_bn(f"{name}.{local(leaves[-1][1])}", leaves[-1][2], bias, info["out"])
        else:
            self._no_bias(conv_path, bias)
            self._put_conv(name if conv_path == path else f"{name}.{local(conv_path)}", weight)

    def tail(self) -> None:
        leaves = [leaf for path in self.cut.get("tail", []) for leaf in self._leaves(path)]
        if [k for k, _, _ in leaves] not in ([], ["bn"]):
            raise ModelError(f"the backbone's tail after stage 4 ({', '.join(k for k, _, _ in leaves)}) is not one BN + ReLU")
        self.body["tail_bn"] = bool(leaves)
        if leaves:
            self._put_bn("layer4.post_bn", leaves[0][2], None, self.width)

    def _describe(self, path: str, key: str, value) -> None:
        if self.body.setdefault(key, value) != value:
            raise ModelError(f"{path}: {key} {value!r} differs from the other blocks' {self.body[key]!r}; "
                             "the torchvision body describes one kind of block")

    def read(self) -> tuple[dict[str, np.ndarray], dict, int]:
        from bbadapt.core.zoo import resnet_depth

        self.stem()
        self.stages()
        self.tail()
        self.body.setdefault("stride_on", "conv1" if self.body["block"] == "basic" else "conv2")
        self.body.setdefault("downsample", "conv")
        depth = resnet_depth(tuple(self.body["layers"]), self.body["block"] == "bottleneck")
        if depth is None:
            raise ModelError(f"a ResNet with {self.body['layers']} {self.body['block']} blocks per stage is not one "
                             "of the ResNet paper's depths (18, 34, 50, 101, 152)")
        order = ("stem", "block", "layers", "preact", "stride_on", "downsample", "tail_bn")
        body = {k: self.body[k] for k in order}
        return {k: np.asarray(v, np.float32) for k, v in self.state.items()}, body, depth


class _Slot:
    """A BN slot given by its affine (the data BN once the input fold is undone)."""

    def __init__(self, s: np.ndarray, t: np.ndarray) -> None:
        self.s, self.t = s, t


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


def state_dict(gluon: GluonDetector) -> tuple[dict[str, np.ndarray], dict, int]:
    """The whole torchvision state dict (float32), the body description and the backbone depth."""
    body, description, depth = backbone_tensors(gluon)
    first = "conv1.weight" if len(description["stem"]["convs"]) == 1 else "conv1.0.weight"
    body[first] = rgb_first_conv(body[first], gluon.source)
    if description["stem"]["data_bn"]:  # Gluon v2: the data BN reads the same channels as conv1
        order = list(np.argsort(gluon.source.perm))
        for leaf in ("weight", "bias"):
            body[f"data_bn.{leaf}"] = body[f"data_bn.{leaf}"][order]
    state = {}
    for name, value in body.items():
        in_head = gluon.layout == "c4" and name.startswith("layer4.")
        state[f"roi_heads.box_head.{name}" if in_head else f"backbone.body.{name}"] = value.astype(np.float32)
    state.update(head_tensors(gluon))
    return state, description, depth


# ---------------------------------------------------------------- config


def cell_anchors(gluon: GluonDetector) -> list[list[list[float]]]:
    """GluonCV's anchors at feature cell (0, 0) per level, read off the detector's anchor constants."""
    generators = gluon.detector.rpn.anchor_generator
    generators = list(generators) if gluon.layout == "fpn" else [generators]
    return [_value(g.anchors)[0, 0, 0, 0].reshape(-1, 4).tolist() for g in generators]


def _box_clip(settings: dict):
    return None if settings.get("clip") in (None, -1) else float(settings["clip"])


def make_config(gluon: GluonDetector, body: dict, depth: int, input_range: str) -> TorchvisionExport:
    """``config.json``: everything the runtime needs, and what a reader needs to trust it."""
    from bbadapt.core.foldmath import unit_variance
    from converters.readers.torchvision import BN_EPS

    s = gluon.settings
    fpn = gluon.layout == "fpn"
    strides = [int(v) for v in s["strides"]] if fpn else [int(s["strides"])]
    mean, std = image_normalization(gluon.source, input_range)
    freeze_at = gluon.section.freeze_at
    return TorchvisionExport.from_dict({
        "format": FORMAT, "format_version": 1, "runtime": RUNTIME_FILE,
        "classes": list(gluon.section.classes),
        "labels": "torchvision label k is classes[k-1]; 0 is the background (gluoncv class id = k-1)",
        "layout": gluon.layout,
        "backbone": {"arch": f"resnet{depth}", "gluon_model": gluon.model, "block": body["block"],
                     "layers": list(body["layers"]), "body": body, "freeze_at": freeze_at, "trainable_layers": 5 - freeze_at,
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
        "provenance": _provenance(gluon),
    })


def _provenance(gluon: GluonDetector) -> dict:
    """Where the export came from: the bundle or checkpoint, its training state, weights and detector params."""
    from bbadapt.bundle.manifest import versions

    checkpoint = gluon.manifest.checkpoint
    return {"bundle": str(gluon.directory.resolve()), "kind": gluon.manifest.kind,
            "checkpoint": checkpoint.to_dict() if checkpoint else None, "weights": gluon.manifest.weights,
            "detector_params_sha256": gluon.section.params_sha256,
            "exported": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": {**versions(), **_torch_versions()}}


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


def export_ownership_problem(out: Path) -> str | None:
    """Why ``--force`` must not replace ``out``: only a torchvision detector export, by content, holding only its files."""
    names = {p.name for p in out.iterdir()}
    if not names:
        return None
    from bbadapt.bundle.schema import parse_json

    try:
        config, where = parse_json(out / EXPORT_CONFIG)
    except OutputError:
        return f"it is not a torchvision detector export (no readable {EXPORT_CONFIG})"
    try:
        TorchvisionExport.from_dict(config, where)
    except OutputError:
        return f"its {EXPORT_CONFIG} is not a bbadapt torchvision detector export"
    foreign = sorted(names - EXPORT_FILES)
    if foreign:
        return f"it holds files bbadapt did not write ({', '.join(foreign[:3])})"
    return None


def export_detector(bundle: str | os.PathLike | BundleManifest, out: str | os.PathLike, force: bool = False, progress=None,
                    options: ExportOptions | None = None) -> dict:
    """Write ``out`` (a directory) from the detector in ``bundle`` (a directory or its manifest); see the module docstring."""
    from converters.writers.torchvision_detector_check import CheckOptions, default_sizes, require_memory, run_check

    options = options or ExportOptions(force=force)
    force = force or options.force
    if options.input_range not in INPUT_RANGES:
        raise OptionError(f"unknown torchvision input range {options.input_range!r}; choose 01 or 255")
    say = progress or (lambda _m: None)
    out = atomic.resolve_target(Path(out))
    atomic.check_target(out, force, export_ownership_problem)
    _require_torch()
    say(f"loading the detector from {directory_of(bundle)}")
    gluon = load_gluon(bundle)
    say("estimating the check's memory")
    require_memory(gluon, options.sizes or default_sizes(gluon.settings))  # refused before anything is written
    state, body, depth = state_dict(gluon)
    config = make_config(gluon, body, depth, options.input_range)
    with atomic.staged_directory(out, force, export_ownership_problem, what="torchvision export") as stage:
        metadata = {"format": "pt", "bbadapt.format": FORMAT, "bbadapt.layout": gluon.layout}
        (stage / EXPORT_WEIGHTS).write_bytes(safetensors_io.dumps(state, metadata))
        (stage / EXPORT_CONFIG).write_text(config.to_json())
        shutil.copyfile(RUNTIME_SOURCE, stage / config.runtime)
        say("loading the export with its own runtime and checking it against the GluonCV detector")
        try:
            model = import_runtime(stage).load(stage, "cpu")
        except RuntimeError as exc:  # strict load_state_dict: the description does not build this network
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = " ".join(lines[:2])[:300] if lines else type(exc).__name__
            raise ModelError(f"the torchvision body described from {gluon.model or 'the backbone'} does not take its "
                             f"tensors (a pruned variant?): {reason}") from None
        check = run_check(gluon, model, CheckOptions(sizes=options.sizes, input_range=options.input_range), say)
        (stage / EXPORT_CHECK).write_text(json.dumps(check, indent=2) + "\n")
        if not check["passed"]:
            raise OutputError(f"the torchvision model does not reproduce the GluonCV detector ({check['summary']}); "
                              "nothing written")
    say(f"wrote {out}")
    return {"format": "torchvision-faster-rcnn", "out": str(out), "layout": gluon.layout, "architecture": config.architecture,
            "classes": ",".join(config.classes), "input": config.input_meaning, "tensors": len(state),
            "check_passed": True, "check": check["summary"],
            "load": f"sys.path.insert(0, {str(out)!r}); import frcnn_runtime; frcnn_runtime.load({str(out)!r}, 'cpu')"}


def export(bundle_dir: str | Path, out: str | Path, force: bool = False, progress=None,
           sizes: list[tuple[int, int]] | None = None, input_range: str = "01", backbone: bool = False) -> dict:
    """``bbadapt export --torchvision``: a detector bundle or checkpoint becomes a torchvision ``FasterRCNN``
    directory (:func:`export_detector`); a backbone bundle a ResNet state dict
    (:func:`converters.writers.torchvision.export_bundle`; ``backbone``: a detector bundle's backbone)."""
    from bbadapt.bundle.manifest import read_manifest

    manifest = read_manifest(bundle_dir, require_params=False)  # read once, handed to the writer
    if manifest.holds_detector and not backbone and Path(out).suffix in (".safetensors", ".pth", ".pt"):
        raise OutputError(f"{bundle_dir} holds a detector; export its backbone with --backbone, or the whole detector "
                          "as a torchvision FasterRCNN into a directory (a name without .safetensors/.pth)")
    if manifest.holds_detector and not backbone:
        options = ExportOptions(input_range=input_range, sizes=sizes, force=force)
        return export_detector(manifest, out, force=force, progress=progress, options=options)
    from converters.writers.torchvision import export_bundle

    return export_bundle(manifest, out, force=force, progress=progress, sizes=sizes, backbone=backbone)
