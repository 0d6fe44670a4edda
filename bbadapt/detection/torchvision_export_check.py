"""The proof behind a torchvision detector export: four levels, real photos, three sizes.

Each photo (the packaged raccoon photos, already resized to the check size: the two
libraries resize differently, see the runtime's ``GluonTransform``) goes through the
GluonCV detector (fed the bundle's input spec) and the exported torchvision model (fed RGB
0..1 or 0..255, normalized by its own transform, resizing off), and four things are compared:

1. backbone features (C4: the stride-16 map; FPN: P2..P6);
2. RPN raw outputs: objectness logits and box deltas of every level, and the anchors;
   the proposals after selection are reported beside (counts, largest difference);
3. RoI-head outputs for given proposals: both heads get GluonCV's proposals and their class
   logits and box deltas are compared (torchvision's four background rows left out);
4. final detections, matched one to one (class, score within 1e-4, box within 1e-2 px plus
   1e-5 of the coordinate, for the float32 ulps of boxes far outside the image):
   near-tied scores may come out in another order, so partners are matched, not ranked.
   GluonCV classifies its -1 padding proposals (when fewer than ``post_nms`` survive) into
   detections at exactly (-1, -1, -1, -1); those are dropped and counted.

Levels 1-3 pass when the largest difference is at most ``rel_tol`` of the reference's
largest magnitude (float32 sums in another order move them ~1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REL_TOL = 1e-4
BOX_REL_TOL = 1e-5  # boxes match within 1e-2 px + 1e-5 of the coordinate (random heads throw boxes to 1e7 px)

INPUT_RANGES = {"01": 255.0, "255": 1.0}  # --torchvision-input: raw pixel divisor of the model's input


@dataclass
class CheckOptions:
    sizes: list[tuple[int, int]] | None = None  # HxW; None: default_sizes()
    input_range: str = "01"
    rel_tol: float = REL_TOL


def default_sizes(settings: dict) -> list[tuple[int, int]]:
    """An odd size, the detector's normal size (its short side, 4:3 within max_size), a tiny one."""
    short, longest = int(settings["short"]), int(settings["max_size"])
    normal = (short, min(longest, round(short * 4 / 3)))
    odd = (short // 2 | 1, round(short * 2 / 3) | 1)
    return [odd, normal, (64, 80)]


def difference(reference: np.ndarray, other: np.ndarray) -> dict:
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if reference.shape != other.shape:
        return {"shape": list(reference.shape), "other_shape": list(other.shape), "max_abs": float("inf"),
                "max_rel": float("inf")}
    if reference.size == 0:
        return {"shape": list(reference.shape), "max_abs": 0.0, "max_rel": 0.0}
    max_abs = float(np.max(np.abs(reference - other)))
    scale = float(np.max(np.abs(reference)))
    return {"shape": list(reference.shape), "max_abs": max_abs, "max_rel": max_abs / scale if scale else max_abs}


def _worst(parts: dict) -> float:
    return max((p["max_rel"] for p in parts.values()), default=0.0)


def _np(x) -> np.ndarray:
    return x.asnumpy() if hasattr(x, "asnumpy") else x.detach().cpu().numpy()


class ImageCheck:
    """One photo through both detectors, level by level."""

    def __init__(self, gluon, model, raw: np.ndarray, options: CheckOptions) -> None:
        import mxnet as mx
        import torch


        self.gluon, self.model, self.options = gluon, model, options
        self.det = gluon.detector
        self.x_gl = mx.nd.array(gluon.target.normalize(raw))
        self.device = next(model.parameters()).device  # the model may sit on a GPU; GluonCV runs where it was built
        x_tv = torch.from_numpy((raw[0] / INPUT_RANGES[options.input_range]).astype(np.float32)).to(self.device)
        model.transform.resize_images = False
        self.images, _ = model.transform([x_tv])
        self.x_tv = x_tv

    def features(self) -> tuple[list, dict, dict]:
        feats_gl = self.det.features(self.x_gl)
        feats_gl = list(feats_gl) if isinstance(feats_gl, (list, tuple)) else [feats_gl]
        feats_tv = self.model.backbone(self.images.tensors)
        names = ["P2", "P3", "P4", "P5", "P6"] if self.gluon.layout == "fpn" else ["C4"]
        parts = {n: difference(_np(a), _np(b)) for n, a, b in zip(names, feats_gl, feats_tv.values(), strict=True)}
        return feats_gl, feats_tv, parts

    def rpn(self, feats_gl: list, feats_tv: dict) -> tuple[np.ndarray, dict]:
        import mxnet as mx

        fpn = self.gluon.layout == "fpn"
        head = self.det.rpn.rpn_head if fpn else self.det.rpn
        levels = feats_gl[:5] if fpn else feats_gl
        logits, deltas = self.model.rpn.head(list(feats_tv.values()))
        parts = {}
        for i, feat in enumerate(levels):
            mid = head.conv1(feat)
            parts[f"objectness_{i}"] = difference(_np(head.score(mid)), _np(logits[i]))
            parts[f"deltas_{i}"] = difference(_np(head.loc(mid)), _np(deltas[i]))
        generators = list(self.det.rpn.anchor_generator) if fpn else [self.det.rpn.anchor_generator]
        anchors_gl = np.concatenate([_np(g(f))[0] for g, f in zip(generators, levels)])
        anchors_tv = _np(self.model.rpn.anchor_generator(self.images, list(feats_tv.values()))[0])
        scores, boxes = self.det.rpn(mx.nd.zeros_like(self.x_gl), *feats_gl)
        proposals_gl = _np(boxes)[0][_np(scores)[0, :, 0] >= 0]
        proposals_tv = _np(self.model.rpn(self.images, feats_tv)[0][0])
        same = proposals_gl.shape == proposals_tv.shape
        info = {"anchors": difference(anchors_gl, anchors_tv),
                "proposals": {"gluoncv": len(proposals_gl), "torchvision": len(proposals_tv),
                              "max_abs_px_same_rank": float(np.max(np.abs(proposals_gl - proposals_tv), initial=0.0)) if same else None}}
        return proposals_gl, {"raw": parts, **info, "max_rel": _worst(parts), "anchors_max_abs_px": info["anchors"]["max_abs"]}

    def roi_heads(self, feats_gl: list, feats_tv: dict, proposals: np.ndarray) -> dict:
        import mxnet as mx
        import torch

        s = self.gluon.settings
        rois = mx.nd.array(np.concatenate([np.zeros((len(proposals), 1), np.float32), proposals], axis=1))
        if self.gluon.layout == "fpn":
            pooled = self.det._pyramid_roi_feats(mx.nd, feats_gl, rois, tuple(s["roi_size"]), tuple(s["strides"]),
                                                 roi_mode="align")
            box_feat = self.det.box_features(pooled)
        else:
            pooled = mx.nd.contrib.ROIAlign(feats_gl[0], rois, tuple(s["roi_size"]), 1.0 / s["strides"], sample_ratio=2)
            box_feat = mx.nd.contrib.AdaptiveAvgPooling2D(self.det.top_features(pooled), output_size=1)
        heads = self.model.roi_heads
        pooled_tv = heads.box_roi_pool(feats_tv, [torch.from_numpy(proposals).to(self.device)], self.images.image_sizes)
        logits, deltas = heads.box_predictor(heads.box_head(pooled_tv))
        parts = {"class_logits": difference(_np(self.det.class_predictor(box_feat)), _np(logits)),
                 "box_deltas": difference(_np(self.det.box_predictor(box_feat)), _np(deltas)[:, 4:])}
        return {**parts, "proposals": len(proposals), "max_rel": _worst(parts),
                "background_rows_zero": bool(np.all(_np(heads.box_predictor.bbox_pred.weight)[:4] == 0))}

    def detections(self) -> dict:
        from bbadapt.detection.detector_bundle import compare_detections

        ids, scores, boxes = (_np(o)[0] for o in self.det(self.x_gl))
        padding = np.all(boxes == -1, axis=1) & (ids[:, 0] >= 0)
        gluon = [ids[~padding][None], scores[~padding][None], boxes[~padding][None]]
        out = self.model([self.x_tv])[0]
        labels = _np(out["labels"]).astype(np.float64) - 1
        torch_side = [labels.reshape(1, -1, 1), _np(out["scores"]).reshape(1, -1, 1), _np(out["boxes"]).reshape(1, -1, 4)]
        result = compare_detections(gluon, torch_side, box_rel_tol=BOX_REL_TOL)
        return {**result, "gluoncv_padding_rows_dropped": int(padding.sum())}


def check_image(gluon, model, raw: np.ndarray, options: CheckOptions) -> dict:
    import torch

    with torch.no_grad():
        run = ImageCheck(gluon, model, raw, options)
        feats_gl, feats_tv, backbone = run.features()
        proposals, rpn = run.rpn(feats_gl, feats_tv)
        roi = run.roi_heads(feats_gl, feats_tv, proposals)
        detections = run.detections()
    backbone = {**backbone, "max_rel": _worst(backbone)}
    passed = (backbone["max_rel"] <= options.rel_tol and rpn["max_rel"] <= options.rel_tol
              and rpn["anchors_max_abs_px"] == 0.0 and roi["max_rel"] <= options.rel_tol and detections["passed"]
              and detections["count_a"] > 0)
    return {"size": list(raw.shape[2:]), "backbone": backbone, "rpn": rpn, "roi_heads": roi, "detections": detections,
            "passed": bool(passed)}


def run_check(gluon, model, options: CheckOptions, progress=None) -> dict:
    """The four-level comparison on one photo per size; ``passed`` only if every image passes."""
    from bbadapt.core import images

    say = progress or (lambda _m: None)
    sizes = options.sizes or default_sizes(gluon.settings)
    files = images.photo_files()
    results = []
    for i, size in enumerate(sizes):
        say(f"checking {size[0]}x{size[1]} ({files[i % len(files)].name})")
        raw, names = images.photos(size, limit=i % len(files) + 1)
        result = check_image(gluon, model, raw[-1:], options)
        results.append({"photo": names[-1], **result})
    worst = {level: max(r[level]["max_rel"] for r in results) for level in ("backbone", "rpn", "roi_heads")}
    matched = sum(r["detections"]["count_a"] - r["detections"]["unmatched"] for r in results)
    total = sum(r["detections"]["count_a"] for r in results)
    summary = (f"backbone max rel {worst['backbone']:.2g}, RPN {worst['rpn']:.2g}, RoI heads {worst['roi_heads']:.2g}; "
               f"detections {matched}/{total} matched"
               f" (score <= {max(r['detections']['max_abs_score_diff'] for r in results):.2g}, "
               f"box <= {max(r['detections']['max_abs_box_diff_px'] for r in results):.2g} px)")
    empty = [r["photo"] for r in results if r["detections"]["count_a"] == 0]
    if empty:
        summary += f"; no detections to compare on {len(empty)} image(s)"
    return {"passed": all(r["passed"] for r in results), "summary": summary, "rel_tol": options.rel_tol,
            "input_range": options.input_range, "worst_max_rel": worst, "images": results,
            "resizing": "images were resized before both detectors (torchvision resizing off): the two libraries' "
                        "resize differs (round vs floor, OpenCV uint8 vs float bilinear)"}
