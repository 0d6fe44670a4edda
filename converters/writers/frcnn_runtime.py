"""A GluonCV Faster R-CNN, as exported by bbadapt, rebuilt as a torchvision ``FasterRCNN``.

This file is copied verbatim into every ``bbadapt export DIR --torchvision OUT`` of a
detector and needs only ``torch`` and ``torchvision`` (no bbadapt, no mxnet)::

    import sys; sys.path.insert(0, "OUT")
    import frcnn_runtime
    model = frcnn_runtime.load("OUT", "cuda")       # eval mode; model.train() to train
    detections = model([image])                       # image: float CHW, RGB, 0..1 (see config.json "input")

The model is torchvision's ``FasterRCNN`` (``GeneralizedRCNN``: transform, backbone, RPN,
RoI heads) built from ``config.json``; a few parts are subclassed so that inference
computes what the GluonCV detector computed (``check.json`` beside this file is the proof):

* backbone: :class:`ResNetBody`, built from ``config["backbone"]["body"]`` (stem, block kind,
  pre-activation, stride position, shortcut kind, final BN); for GluonCV ``resnetN_v1b`` it
  is torchvision's own ``resnetN`` layer for layer and name for name;
* anchors: GluonCV's cell anchors (py-faster-rcnn enumeration, stored in the config)
  shifted by a *fixed* stride per level (torchvision derives the stride from the padded
  image size, which moves anchors by up to a stride on odd sizes);
* RPN head: the 3x3 conv is ``rpn_channels`` wide (torchvision's is as wide as its input);
* proposals (:meth:`GluonRPN.filter_proposals`): sigmoid, clip to the image, drop boxes with
  ``w + 1 < min_size`` or ``h + 1 < min_size``, one global top-k of the rest (stable, by
  score), NMS, keep the first ``post_nms``; torchvision takes the top-k per level before
  the size filter;
* box coders: GluonCV's clip (none for C4, 4.14 for FPN) instead of log(1000/16);
* RoIAlign with explicit scales; FPN level ``floor(4 + log2(sqrt((w+1)(h+1))/224 + 1e-6))``;
  P6 = a 3x3 stride-2 conv on the C5 lateral (not a max pool), top-down by 2x nearest + crop;
* detections (:meth:`GluonRoIHeads.postprocess_detections`): softmax, score > 0.01, no
  clipping, per class the top ``nms_topk`` then NMS, every survivor kept;
* transform: no padding to a multiple of 32 (``size_divisible = 1``).

Labels: torchvision label ``k`` is ``config["classes"][k - 1]`` (0 is the background);
GluonCV's class id is ``k - 1``. Boxes are ``x1, y1, x2, y2`` in input pixels.

BatchNorm: every backbone BatchNorm is a ``FrozenBatchNorm2d`` with weight s, bias t, mean 0
and ``running_var = 1 - eps`` (so var + eps is exactly 1 in float32). Never call
torchvision's ``overwrite_eps(model, 0.0)`` on this model: it would scale every channel by
1/sqrt(1 - 1e-5) and stop being the checked function.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT = "bbadapt-torchvision-faster-rcnn"
_DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}
_STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")  # freezable units, as torchvision counts them


# ---------------------------------------------------------------- files


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file (8-byte header length, JSON header, raw data)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    start = 8 + n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = bytearray(data[start + begin:start + end])
        dtype = _DTYPES[entry["dtype"]]
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(entry["shape"])
    return tensors


def read_config(directory: str | Path) -> dict:
    config = json.loads((Path(directory) / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{directory}: {CONFIG} is not a {FORMAT} config")
    return config


def load(directory: str | Path, device: str | torch.device = "cpu") -> GluonFasterRCNN:
    """The exported detector on ``device``, in eval mode, frozen layers without gradients."""
    config = read_config(directory)
    model = GluonFasterRCNN(config)
    model.load_state_dict(read_safetensors(Path(directory) / WEIGHTS), strict=True)
    return model.to(device).eval()


# ---------------------------------------------------------------- backbone


V1B_BODY = {"stem": {"data_bn": False, "convs": [[64, 7, 2]]}, "preact": False, "stride_on": "conv2",
            "downsample": "conv", "tail_bn": False}  # exports before the body was described: resnetN_v1b


def body_of(spec: dict) -> dict:
    """The body description of ``config["backbone"]`` (see :class:`ResNetBody`)."""
    return {**V1B_BODY, **spec.get("body", {})}


def _frozen_bn(spec: dict):
    return lambda c: FrozenBatchNorm2d(c, eps=spec["bn_eps"])


class PreActBasic(nn.Module):
    """GluonCV/Gluon ``BasicBlockV2``: BN-ReLU first; the shortcut conv reads the pre-activated input."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, norm) -> None:
        super().__init__()
        self.bn1 = norm(inplanes)
        self.conv1 = tv_resnet.conv3x3(inplanes, planes, stride)
        self.bn2 = norm(planes)
        self.conv2 = tv_resnet.conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def residual(self, x: Tensor) -> Tensor:
        return self.conv2(self.relu(self.bn2(self.conv1(x))))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.relu(self.bn1(x))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        return self.residual(x) + shortcut


class PreActBottleneck(PreActBasic):
    """Gluon ``BottleneckV2``: BN-ReLU-1x1, BN-ReLU-3x3 (the stride), BN-ReLU-1x1 to 4x the width."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, norm) -> None:
        nn.Module.__init__(self)
        self.bn1 = norm(inplanes)
        self.conv1 = tv_resnet.conv1x1(inplanes, planes)
        self.bn2 = norm(planes)
        self.conv2 = tv_resnet.conv3x3(planes, planes, stride)
        self.bn3 = norm(planes)
        self.conv3 = tv_resnet.conv1x1(planes, planes * 4)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def residual(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn2(self.conv1(x)))
        return self.conv3(self.relu(self.bn3(self.conv2(x))))


class ResNetBody(nn.Module):
    """The ResNets GluonCV/Gluon detectors sit on, from a description (``config["backbone"]["body"]``).

    * ``stem``: ``data_bn`` (a BN on the normalized input, Gluon v2), ``convs`` ``[out, kernel,
      stride]`` (one 7x7, or GluonCV's deep 3x3 stem as ``conv1.0/.3/.6`` with BNs ``.1/.4``),
      then ``bn1``, ReLU, 3x3/2 max pool;
    * ``block`` basic or bottleneck, ``layers`` blocks per stage, stage widths 64..512;
      ``preact``: pre-activation blocks (:class:`PreActBasic`, :class:`PreActBottleneck`),
      else torchvision's ``BasicBlock``/``Bottleneck`` with the stride on ``stride_on``
      (``conv2``: torchvision, GluonCV v1b; ``conv1``: Gluon ``BottleneckV1``);
    * ``downsample``: ``conv`` (1x1 with the stride) or ``avg_conv`` (GluonCV v1d: average
      pool with the stride, ceil mode, padding not counted, then a 1x1), a BN after it unless
      ``preact``;
    * ``tail_bn``: BN + ReLU after the last block (Gluon v2), kept inside ``layer4`` as
      ``layer4.post_bn`` so that whatever takes stage 4 takes it too.

    ``resnetN_v1b`` is torchvision's own ``resnetN``, name for name.
    """

    def __init__(self, spec: dict) -> None:
        super().__init__()
        body, norm = body_of(spec), _frozen_bn(spec)
        stem = body["stem"]
        if stem["data_bn"]:
            self.data_bn = norm(3)
        convs, in_c = [], 3
        for out_c, k, stride in stem["convs"]:
            convs.append(nn.Conv2d(in_c, out_c, k, stride=stride, padding=k // 2, bias=False))
            in_c = out_c
        if len(convs) == 1:
            self.conv1 = convs[0]
        else:
            parts: list[nn.Module] = []
            for conv in convs[:-1]:
                parts += [conv, norm(conv.out_channels), nn.ReLU(inplace=True)]
            self.conv1 = nn.Sequential(*parts, convs[-1])
        self.bn1 = norm(in_c)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.widths = []
        for index, (count, planes) in enumerate(zip(spec["layers"], (64, 128, 256, 512), strict=True)):
            layer, in_c = self._stage(body, spec["block"], in_c, planes, count, 1 if index == 0 else 2, norm)
            if index == 3 and body["tail_bn"]:
                layer.add_module("post_bn", norm(in_c))
                layer.add_module("post_relu", nn.ReLU(inplace=True))
            setattr(self, f"layer{index + 1}", layer)
            self.widths.append(in_c)

    @staticmethod
    def _stage(body: dict, block: str, in_c: int, planes: int, count: int, stride: int, norm):
        bottleneck = block == "bottleneck"
        out_c = planes * (4 if bottleneck else 1)
        blocks = []
        for i in range(count):
            s = stride if i == 0 else 1
            downsample = None
            if i == 0 and (s != 1 or in_c != out_c):
                if body["downsample"] == "avg_conv":
                    pool = nn.AvgPool2d(s, s, ceil_mode=True, count_include_pad=False) if s > 1 else nn.Identity()
                    parts = [pool, tv_resnet.conv1x1(in_c, out_c)]
                else:
                    parts = [tv_resnet.conv1x1(in_c, out_c, s)]
                downsample = parts[0] if body["preact"] and len(parts) == 1 else nn.Sequential(
                    *parts, *([] if body["preact"] else [norm(out_c)]))
            if body["preact"]:
                kind = PreActBottleneck if bottleneck else PreActBasic
                blocks.append(kind(in_c, planes, s, downsample, norm))
            else:
                unit = (tv_resnet.Bottleneck if bottleneck else tv_resnet.BasicBlock)(
                    in_c, planes, s, downsample, norm_layer=norm)
                if bottleneck and body["stride_on"] == "conv1" and s != 1:
                    unit.conv1.stride, unit.conv2.stride = (s, s), (1, 1)
                blocks.append(unit)
            in_c = out_c
        return nn.Sequential(*blocks), out_c

    def forward(self, x: Tensor) -> Tensor:  # the features up to stage 4 (detectors take them by name)
        for module in self.children():
            x = module(x)
        return x


def stage_width(layer: nn.Sequential) -> int:
    last = [m for m in layer if not isinstance(m, (FrozenBatchNorm2d, nn.ReLU))][-1]
    return last.conv3.out_channels if hasattr(last, "conv3") else last.conv2.out_channels


def _resnet(spec: dict) -> ResNetBody:
    return ResNetBody(spec)


class C4Backbone(nn.Module):
    """Stem + layer1..layer3 (stride 16): GluonCV's ``features`` of a C4 detector."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        net = _resnet(spec)
        self.body = IntermediateLayerGetter(net, return_layers={"layer3": "0"})  # drops layer4, pool, fc
        self.out_channels = stage_width(net.layer3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.body(x)


class C4BoxHead(nn.Module):
    """Stage 4 on the pooled RoIs, then a global average pool: GluonCV's C4 box head."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.layer4 = _resnet(spec).layer4

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(x).mean(dim=(2, 3))


class GluonP6(ExtraFPNBlock):
    """P6 = 3x3 stride-2 conv on the C5 lateral (GluonCV ``P6_conv1``); applied by :class:`GluonFPN`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, results, x, names):  # pragma: no cover - GluonFPN calls self.p6 directly
        raise RuntimeError("GluonP6 needs the C5 lateral; it runs inside GluonFPN")


class GluonFPN(FeaturePyramidNetwork):
    """torchvision's FPN layers with GluonCV's wiring: nearest 2x upsampling + crop, P6 from the C5 lateral."""

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names, feats = list(x.keys()), list(x.values())
        last = self.inner_blocks[-1](feats[-1])
        p6 = self.extra_blocks.p6(last)
        results = [self.layer_blocks[-1](last)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[idx](feats[idx])
            up = last.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            last = lateral + up[:, :, :lateral.shape[2], :lateral.shape[3]]
            results.insert(0, self.layer_blocks[idx](last))
        return OrderedDict([*zip(names, results), ("p6", p6)])


def fpn_backbone(spec: dict, channels: int) -> BackboneWithFPN:
    net = _resnet(spec)
    widths = [stage_width(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)]
    backbone = BackboneWithFPN(net, {f"layer{k}": str(k - 1) for k in range(1, 5)}, widths, channels)
    backbone.fpn = GluonFPN(widths, channels, extra_blocks=GluonP6(channels))
    return backbone


# ---------------------------------------------------------------- RPN


class FixedStrideAnchors(nn.Module):
    """GluonCV's anchors: per level, the stored cell anchors shifted by ``stride * (x, y)``.

    Order (y, x, anchor), the same on both sides. Needs no image size: GluonCV's anchors do
    not depend on it, torchvision's do (stride = padded image size // feature size).
    """

    def __init__(self, cell_anchors: list, strides: list) -> None:
        super().__init__()
        self.strides = [int(s) for s in strides]
        self.cell_anchors = [torch.tensor(c, dtype=torch.float32) for c in cell_anchors]

    def num_anchors_per_location(self) -> list[int]:
        return [len(c) for c in self.cell_anchors]

    def grid(self, level: int, height: int, width: int, device, dtype) -> Tensor:
        stride = self.strides[level]
        xs = torch.arange(width, device=device, dtype=dtype) * stride
        ys = torch.arange(height, device=device, dtype=dtype) * stride
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
        return (shifts + self.cell_anchors[level].to(device, dtype).reshape(1, -1, 4)).reshape(-1, 4)

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        per_level = [self.grid(i, f.shape[-2], f.shape[-1], f.device, f.dtype) for i, f in enumerate(feature_maps)]
        anchors = torch.cat(per_level)
        return [anchors for _ in range(feature_maps[0].shape[0])]


class GluonRPNHead(RPNHead):
    """torchvision's ``RPNHead`` (same names, same forward) with a ``mid_channels``-wide 3x3 conv."""

    def __init__(self, in_channels: int, mid_channels: int, num_anchors: int) -> None:
        super().__init__(in_channels, num_anchors)
        self.conv = nn.Sequential(Conv2dNormActivation(in_channels, mid_channels, kernel_size=3, norm_layer=None))
        self.cls_logits = nn.Conv2d(mid_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(mid_channels, num_anchors * 4, 1)
        for layer in (self.conv[0][0], self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)


def ordered_nms(boxes: Tensor, iou: float) -> Tensor:
    """Greedy NMS in the given order (indices kept, in that order): ties never reorder."""
    rank = torch.arange(len(boxes), 0, -1, device=boxes.device, dtype=torch.float32)
    return torchvision.ops.nms(boxes.float(), rank, iou)


def stable_order(scores: Tensor) -> Tensor:
    return torch.sort(scores, descending=True, stable=True).indices


class GluonRPN(RegionProposalNetwork):
    """torchvision's RPN (targets, losses) with GluonCV's proposal selection."""

    def __init__(self, *args, min_size: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gluon_min_size = float(min_size)

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        scores_all = torch.sigmoid(objectness.detach().reshape(proposals.shape[0], -1))
        final_boxes, final_scores = [], []
        for boxes, scores, (height, width) in zip(proposals, scores_all, image_shapes):
            boxes = torch.stack((boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                                 boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)), dim=1)
            valid = ((boxes[:, 2] - boxes[:, 0] + 1 >= self.gluon_min_size)
                     & (boxes[:, 3] - boxes[:, 1] + 1 >= self.gluon_min_size) & (scores > 0))
            keep = torch.where(valid)[0]
            keep = keep[stable_order(scores[keep])][: self.pre_nms_top_n()]
            boxes, scores = boxes[keep], scores[keep]
            kept = ordered_nms(boxes, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[kept])
            final_scores.append(scores[kept])
        return final_boxes, final_scores


# ---------------------------------------------------------------- RoI heads


class GluonLevelMapper:
    """FPN level of each RoI as GluonCV computes it (+1 in w and h), minus ``k_min``."""

    def __init__(self, k_min: int, k_max: int, canonical_scale: float = 224.0, canonical_level: int = 4,
                 eps: float = 1e-6) -> None:
        self.k_min, self.k_max, self.s0, self.lvl0, self.eps = k_min, k_max, canonical_scale, canonical_level, eps

    def __call__(self, boxlists: list[Tensor]) -> Tensor:
        boxes = torch.cat(boxlists)
        side = torch.sqrt((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1))
        level = torch.floor(self.lvl0 + torch.log2(side / self.s0 + self.eps))
        return (level.clamp(self.k_min, self.k_max) - self.k_min).to(torch.int64)


class FixedScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` with the scales (1/stride) and level mapping given, never inferred."""

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int, strides: list,
                 levels: tuple[int, int] | None = None) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.scales = [1.0 / float(s) for s in strides]
        k_min, k_max = levels if levels else (4, 4)
        self.map_levels = GluonLevelMapper(k_min, k_max)


class GluonRoIHeads(RoIHeads):
    """torchvision's RoI heads (sampling, losses) with GluonCV's detection post-processing."""

    def __init__(self, *args, nms_topk: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nms_topk = int(nms_topk)

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        counts = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(counts)
        pred_scores = torch.softmax(class_logits, -1).split(counts)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores in zip(pred_boxes, pred_scores):
            out_b, out_s, out_l = [], [], []
            for label in range(1, scores.shape[1]):
                idx = torch.where(scores[:, label] > self.score_thresh)[0]
                idx = idx[stable_order(scores[idx, label])]
                if self.nms_topk > 0:
                    idx = idx[: self.nms_topk]
                b = boxes[idx, label]
                kept = idx[ordered_nms(b, self.nms_thresh)]
                out_b.append(boxes[kept, label])
                out_s.append(scores[kept, label])
                out_l.append(torch.full((len(kept),), label, dtype=torch.int64, device=scores.device))
            limit = self.detections_per_img if self.detections_per_img > 0 else None
            scores_i = torch.cat(out_s)
            order = stable_order(scores_i)[:limit]
            all_boxes.append(torch.cat(out_b)[order])
            all_scores.append(scores_i[order])
            all_labels.append(torch.cat(out_l)[order])
        return all_boxes, all_scores, all_labels


# ---------------------------------------------------------------- transform and model


class GluonTransform(GeneralizedRCNNTransform):
    """torchvision's transform without padding; ``resize_images = False`` feeds images at their own size.

    Resizing stays torchvision's (floor, float bilinear) where GluonCV rounds and resizes
    uint8 with OpenCV: the same size rule, not the same pixels. The equivalence check
    feeds already-resized images with resizing off.
    """

    resize_images = True

    def resize(self, image, target=None):
        if not self.resize_images:
            return image, target
        return super().resize(image, target)


def _clip(value) -> float:
    return math.inf if value is None else float(value)


class GluonFasterRCNN(FasterRCNN):
    """torchvision ``FasterRCNN`` assembled from a bbadapt export's ``config.json``."""

    def __init__(self, config: dict) -> None:
        rpn_cfg, roi_cfg, spec = config["rpn"], config["roi_heads"], config["backbone"]
        fpn = config["layout"] == "fpn"
        if fpn:
            backbone = fpn_backbone(spec, config["fpn_channels"])
            box_head: nn.Module = TwoMLPHead(backbone.out_channels * roi_cfg["output_size"][0] * roi_cfg["output_size"][1],
                                             roi_cfg["representation_size"])
            pooler = FixedScaleRoIAlign(["0", "1", "2", "3"], roi_cfg["output_size"], roi_cfg["sampling_ratio"],
                                        roi_cfg["strides"], tuple(roi_cfg["levels"]))
            head_width = roi_cfg["representation_size"]
        else:
            backbone = C4Backbone(spec)
            box_head = C4BoxHead(spec)
            pooler = FixedScaleRoIAlign(["0"], roi_cfg["output_size"], roi_cfg["sampling_ratio"], roi_cfg["strides"])
            head_width = stage_width(box_head.layer4)
        anchors = FixedStrideAnchors(rpn_cfg["cell_anchors"], rpn_cfg["strides"])
        rpn = GluonRPN(anchors, GluonRPNHead(backbone.out_channels, rpn_cfg["channels"], anchors.num_anchors_per_location()[0]),
                       rpn_cfg["fg_iou_thresh"], rpn_cfg["bg_iou_thresh"], rpn_cfg["batch_size_per_image"],
                       rpn_cfg["positive_fraction"], rpn_cfg["pre_nms_top_n"], rpn_cfg["post_nms_top_n"],
                       rpn_cfg["nms_thresh"], min_size=rpn_cfg["min_size"])
        rpn.box_coder.bbox_xform_clip = _clip(rpn_cfg["bbox_xform_clip"])
        roi_heads = GluonRoIHeads(pooler, box_head, FastRCNNPredictor(head_width, len(config["classes"]) + 1),
                                  roi_cfg["fg_iou_thresh"], roi_cfg["bg_iou_thresh"], roi_cfg["batch_size_per_image"],
                                  roi_cfg["positive_fraction"], tuple(roi_cfg["box_coder_weights"]),
                                  roi_cfg["score_thresh"], roi_cfg["nms_thresh"], roi_cfg["detections_per_img"],
                                  nms_topk=roi_cfg["nms_topk"])
        roi_heads.box_coder.bbox_xform_clip = _clip(roi_cfg["bbox_xform_clip"])
        tf = config["transform"]
        transform = GluonTransform(tf["min_size"], tf["max_size"], config["input"]["image_mean"],
                                   config["input"]["image_std"], size_divisible=tf["size_divisible"])
        GeneralizedRCNN.__init__(self, backbone, rpn, roi_heads, transform)
        self.config = config
        self.freeze(config["backbone"]["trainable_layers"])

    def freeze(self, trainable_layers: int) -> None:
        """torchvision's ``trainable_backbone_layers``: only the last ``trainable_layers`` of conv1, layer1..4 train."""
        train = set(_STAGES[len(_STAGES) - trainable_layers:]) if trainable_layers else set()
        named = list(self.backbone.body.named_parameters())
        if isinstance(self.roi_heads.box_head, C4BoxHead):
            named += [(f"layer4.{n}", p) for n, p in self.roi_heads.box_head.layer4.named_parameters()]
        for name, param in named:
            param.requires_grad_(name.split(".")[0] in train)

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])
