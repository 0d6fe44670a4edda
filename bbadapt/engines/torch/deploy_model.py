"""The deployable detector: decoded uint8 pixels in, detections in the input's pixels out, one traceable graph.

:class:`DeployDetector` wraps a loaded torchvision export (``frcnn_runtime.GluonFasterRCNN``) and computes
what that model computes on ``[image / 255]`` (resize by the detector's rule, normalization, backbone, RPN,
RoI heads, boxes mapped back), written so that ``torch.jit.trace`` keeps every size dynamic and
``torch.onnx.export`` can represent every step:

* the batch is one tensor ``[N, H, W, 3]``: every image has the same size, so one resize serves all;
* per-image work is done on dense ``[N, ...]`` tensors with masks instead of Python loops over images
  (the trace of a loop would fix N): proposals are ``[N, k]``, RoIs ``[N, P]``, detections ``[N, C, P]``;
* "the first k of each group in score order" (pre-NMS top-k, post-NMS top-n, GluonCV's per-class
  ``nms_topk``) is a sort along the row and a cumulative count of the mask;
* NMS runs per row (image, or image and class) in a fixed order: candidates are ranked first, and
  the rank is the score NMS sees, so ties never reorder. In ONNX it is one ``NonMaxSuppression``
  over all rows (``max_output_boxes_per_class`` is the post-NMS cap); in torch, a loop over rows
  with torchvision's ``nms`` that is scripted when traced (so the loop count stays dynamic);
* sorting is stable in torch (``sort(stable=True)``) and ``TopK`` in ONNX, whose ties go to the lower index.

Outputs (flat, image by image, each image's detections by descending score): ``boxes`` float32 ``[K, 4]``
(x1, y1, x2, y2 in the input image's pixels), ``scores`` float32 ``[K]``, ``labels`` int64 ``[K]``
(1-based: ``classes[label - 1]``), ``batch_index`` int64 ``[K]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import roi_align

CHANNEL_ORDERS = ("rgb", "bgr")


def _onnx() -> bool:
    return torch.onnx.is_in_onnx_export()


def positions(like: Tensor, dim: int) -> Tensor:
    """Each element's index along ``dim``, as float32 in ``like``'s shape (a trace keeps the size symbolic)."""
    return torch.ones_like(like, dtype=torch.float32).cumsum(dim) - 1


def size_of(tensor: Tensor, dim: int) -> Tensor:
    """``tensor.shape[dim]`` as a 0-dim int64 tensor that a trace keeps symbolic."""
    return torch._shape_as_tensor(tensor)[dim]


def capped(tensor: Tensor, cap: int, dim: int):
    """``min(cap, tensor.shape[dim])`` that stays symbolic under a trace (the k of a top-k or a slice)."""
    if not torch.jit.is_tracing():
        return min(cap, tensor.shape[dim])
    both = torch.stack((torch.tensor(cap, dtype=torch.int64), size_of(tensor, dim)))
    return torch.min(both)


def order_desc(values: Tensor, k) -> tuple[Tensor, Tensor]:
    """The first ``k`` of each row (last dim) by descending value, ties to the lower index: (values, indices)."""
    if _onnx():
        return values.topk(k, dim=-1, largest=True, sorted=True)
    out = values.sort(dim=-1, descending=True, stable=True)
    return out.values[..., :k], out.indices[..., :k]


@torch.jit._script_if_tracing
def _nms_rows_torch(boxes: Tensor, ranks: Tensor, iou: float, limit: int) -> Tensor:
    keep = torch.zeros(ranks.shape, dtype=torch.bool, device=ranks.device)
    for row in range(ranks.shape[0]):
        valid = torch.where(ranks[row] > 0)[0]
        kept = torch.ops.torchvision.nms(boxes[row][valid], ranks[row][valid], iou)
        if limit > 0:
            kept = kept[:limit]
        keep[row, valid[kept]] = True
    return keep


class _NmsRows(torch.autograd.Function):
    """Per-row NMS as ONNX ``NonMaxSuppression`` (rows are its batches, one class)."""

    @staticmethod
    def forward(ctx, boxes: Tensor, ranks: Tensor, iou: float, limit: int) -> Tensor:  # noqa: D102
        return _nms_rows_torch(boxes, ranks, iou, limit)

    @staticmethod
    def symbolic(g, boxes, ranks, iou: float, limit: int):  # noqa: D102
        cap = g.op("Constant", value_t=torch.tensor([limit if limit > 0 else 2**31 - 1], dtype=torch.int64))
        thresh = g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32))
        floor = g.op("Constant", value_t=torch.tensor([0.0], dtype=torch.float32))
        axes = g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64))
        selected = g.op("NonMaxSuppression", boxes, g.op("Unsqueeze", ranks, axes), cap, thresh, floor)
        shape = g.op("Shape", ranks)
        zeros = g.op("ConstantOfShape", shape, value_t=torch.tensor([0], dtype=torch.bool))
        pairs = g.op("Gather", selected, g.op("Constant", value_t=torch.tensor([0, 2], dtype=torch.int64)), axis_i=1)
        ones = g.op("Expand", g.op("Constant", value_t=torch.tensor([True])),
                    g.op("Slice", g.op("Shape", selected), g.op("Constant", value_t=torch.tensor([0])),
                         g.op("Constant", value_t=torch.tensor([1]))))
        return g.op("ScatterND", zeros, pairs, ones)


def nms_rows(boxes: Tensor, ranks: Tensor, iou: float, limit: int) -> Tensor:
    """Keep mask ``[R, P]``: greedy NMS in each row in descending ``ranks`` (> 0; others are absent), at most ``limit``."""
    if _onnx():
        return _NmsRows.apply(boxes, ranks, iou, limit)
    return _nms_rows_torch(boxes, ranks, iou, limit)


def ranks_of(mask: Tensor) -> Tensor:
    """Rank scores for :func:`nms_rows`: P, P-1, ... along the (already ordered) last dim; -1 where ``mask`` is off."""
    position = positions(mask, -1)
    return torch.where(mask, size_of(mask, -1).to(torch.float32) - position, torch.full_like(position, -1.0))


def gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """``values[n, index[n, j], ...]`` for a ``[N, M, ...]`` tensor and a ``[N, K]`` index."""
    extra = values.shape[2:]
    expanded = index.reshape(index.shape + (1,) * len(extra)).expand(index.shape + extra)
    return values.gather(1, expanded)


class DeployDetector(nn.Module):
    """A ``GluonFasterRCNN`` (eval) behind a uint8 ``[N, H, W, 3]`` input; see the module docstring for the contract."""

    def __init__(self, model: nn.Module, channel_order: str = "rgb") -> None:
        super().__init__()
        if channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel order {channel_order!r}: expected one of {', '.join(CHANNEL_ORDERS)}")
        self.model = model.eval()
        self.bgr = channel_order == "bgr"
        transform = model.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(transform.image_std, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.min_size, self.max_size = float(transform.min_size[-1]), float(transform.max_size)
        rpn, heads = model.rpn, model.roi_heads
        self.pre_nms, self.post_nms = int(rpn._pre_nms_top_n["testing"]), int(rpn._post_nms_top_n["testing"])
        self.rpn_iou, self.rpn_min_size = float(rpn.nms_thresh), float(rpn.gluon_min_size)
        self.score_thresh, self.det_iou = float(heads.score_thresh), float(heads.nms_thresh)
        self.nms_topk, self.per_image = int(heads.nms_topk), int(heads.detections_per_img)
        pooler = heads.box_roi_pool
        self.scales = [float(s) for s in pooler.scales]
        self.output_size = tuple(int(s) for s in pooler.output_size)
        self.sampling_ratio = int(pooler.sampling_ratio)
        self.levels = (pooler.map_levels.k_min, pooler.map_levels.k_max)

    # ------------------------------------------------------------ input

    def prepare(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Normalized, resized float batch, and (input height, width) / (resized height, width) as float32 ``[2]``."""
        x = images.permute(0, 3, 1, 2).to(torch.float32).contiguous()  # NCHW memory, as the eager model's input
        if self.bgr:
            x = x.flip(1)
        x = ((x / 255.0) - self.mean) / self.std
        # torchvision's eager rule, in float64 as Python computes it there: scale = min(min_size / short side,
        # max_size / long side), size = floor(side * scale); its traced branch uses float32 and can lose a row.
        # Tensor / tensor: torch computes ``float / tensor`` as float * (1 / tensor), a different rounding.
        shape = torch._shape_as_tensor(x)[2:].to(torch.float64)
        limits = torch.tensor([self.min_size, self.max_size], dtype=torch.float64)
        scale = torch.div(limits, torch.stack((shape.min(), shape.max())).to(torch.float64)).min()
        size = torch.floor(shape * scale).to(torch.int64)
        out = [size[0], size[1]] if torch.jit.is_tracing() else [int(size[0]), int(size[1])]
        x = F.interpolate(x, size=out, mode="bilinear", align_corners=False)
        resized = torch._shape_as_tensor(x)[2:].to(torch.float32)
        return x, shape.to(torch.float32) / resized

    # ------------------------------------------------------------ RPN

    def anchors(self, features: list[Tensor]) -> Tensor:
        """GluonCV's anchors ``[A, 4]`` by the export's own generator (its sizes stay symbolic in a trace)."""
        generator = self.model.rpn.anchor_generator
        return torch.cat([generator.grid(level, f.shape[-2], f.shape[-1], f.device, f.dtype)
                          for level, f in enumerate(features)])

    def proposals(self, features: list[Tensor], height: Tensor, width: Tensor) -> tuple[Tensor, Tensor]:
        """RoIs ``[N, P, 4]`` and their mask ``[N, P]``: GluonCV's proposal selection per image."""
        n = features[0].shape[0]
        objectness, deltas = concat_box_prediction_layers(*self.model.rpn.head(features))  # torchvision's RPN order
        scores = objectness.reshape(n, -1).sigmoid()
        anchors = self.anchors(features)[None].expand(n, -1, -1).reshape(-1, 4)
        boxes = self.model.rpn.box_coder.decode_single(deltas, anchors).reshape(n, -1, 4)
        zero = torch.zeros_like(width)
        boxes = torch.stack((boxes[..., 0].clamp(zero, width), boxes[..., 1].clamp(zero, height),
                             boxes[..., 2].clamp(zero, width), boxes[..., 3].clamp(zero, height)), dim=-1)
        valid = ((boxes[..., 2] - boxes[..., 0] + 1 >= self.rpn_min_size)
                 & (boxes[..., 3] - boxes[..., 1] + 1 >= self.rpn_min_size) & (scores > 0))
        top, order = order_desc(torch.where(valid, scores, torch.full_like(scores, -1.0)), capped(scores, self.pre_nms, 1))
        boxes = gather_rows(boxes, order)
        keep = nms_rows(boxes, ranks_of(top > 0), self.rpn_iou, self.post_nms)
        # the kept ones first, in score order: a distinct key per column, so any top-k agrees
        key = keep.to(torch.float32) * 1e7 - positions(keep, 1)
        _, first = key.topk(capped(key, self.post_nms, 1), dim=1)
        return gather_rows(boxes, first), keep.gather(1, first)

    # ------------------------------------------------------------ RoI heads

    def pool(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """RoIAlign of ``rois`` ``[R, 5]`` on each RoI's level (GluonCV's level rule for FPN)."""
        if len(features) == 1 or len(self.scales) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.model.roi_heads.box_roi_pool.map_levels([rois[:, 1:]])
        pooled = None
        for level, scale in enumerate(self.scales):
            here = roi_align(features[level], rois, self.output_size, scale, self.sampling_ratio)
            pooled = here if pooled is None else torch.where((levels == level).reshape(-1, 1, 1, 1), here, pooled)
        return pooled

    def detections(self, features: list[Tensor], boxes: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per image and class: score > thresh, GluonCV's ``nms_topk``, NMS; then per image the best ``per_image``."""
        heads = self.model.roi_heads
        n, p = boxes.shape[0], boxes.shape[1]  # sizes read off a shape stay symbolic in a trace
        rois = torch.cat((positions(boxes[..., :1], 0), boxes), dim=2).reshape(-1, 5)
        logits, regression = heads.box_predictor(heads.box_head(self.pool(features, rois)))
        decoded = heads.box_coder.decode_single(regression, rois[:, 1:]).reshape(n, p, -1, 4)[:, :, 1:]
        scores = torch.softmax(logits, -1).reshape(n, p, -1)[:, :, 1:].permute(0, 2, 1)          # [N, C, P]
        decoded = decoded.permute(0, 2, 1, 3)                                                     # [N, C, P, 4]
        candidate = mask[:, None, :] & (scores > self.score_thresh)
        top, order = order_desc(torch.where(candidate, scores, torch.full_like(scores, -1.0)), capped(scores, 2**31 - 1, 2))
        present = top > 0
        if self.nms_topk > 0:
            present = present & (present.to(torch.int64).cumsum(2) <= self.nms_topk)
        ordered = decoded.gather(2, order[..., None].expand(-1, -1, -1, 4))
        keep = nms_rows(ordered.flatten(0, 1), ranks_of(present).flatten(0, 1), self.det_iou, 0).reshape(present.shape)
        labels = (positions(keep, 1) + 1).to(torch.int64)
        flat = torch.where(keep, top, torch.full_like(top, -1.0)).reshape(n, -1)  # class-major, as GluonCV concatenates
        limit = self.per_image if self.per_image > 0 else 2**31 - 1
        best, pick = order_desc(flat, capped(flat, limit, 1))
        return gather_rows(ordered.reshape(n, -1, 4), pick), best, labels.reshape(n, -1).gather(1, pick)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """uint8 ``[N, H, W, 3]`` -> boxes ``[K, 4]``, scores ``[K]``, labels ``[K]``, batch_index ``[K]``."""
        x, ratio = self.prepare(images)
        features = list(self.model.backbone(x).values())
        height, width = torch._shape_as_tensor(x)[2].to(torch.float32), torch._shape_as_tensor(x)[3].to(torch.float32)
        rois, mask = self.proposals(features, height, width)
        boxes, scores, labels = self.detections(features[: len(self.scales)], rois, mask)
        found = torch.nonzero(scores > 0)
        picked = boxes[found[:, 0], found[:, 1]] * torch.stack((ratio[1], ratio[0], ratio[1], ratio[0]))
        return picked, scores[found[:, 0], found[:, 1]], labels[found[:, 0], found[:, 1]], found[:, 0]
