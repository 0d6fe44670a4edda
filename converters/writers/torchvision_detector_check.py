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

Levels 1-3 are judged as the forward check judges an adapted backbone
(:mod:`bbadapt.verify.equivalence`, :func:`float64_rule`): GluonCV runs those pieces again in
float64 (the truth), the export runs them in float64 too (its float64 twin: the same float32
numbers, cast), and the twin's RMS error against the truth must be at most the one-ulp
yardstick's, the twin again with every number of the export moved by one float32 ulp (two
seeded directions, the larger effect counts). Float64 arithmetic is far below that, so the
verdict does not move with the CPU's float32 kernels; a fixed float32 tolerance either
refused deep random-weight bodies (which round to a few 1e-5 .. 1e-4) or waved through small
real differences. The float32 differences from GluonCV are reported beside it, with
``rel_tol`` as the figure they are compared with.

Level 4 uses fixed tolerances; when partners are missing, the export in float64 judges
(:func:`detections_opinion`), recorded under ``float64`` and named in the summary.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from bbadapt.platform.heap import release_free_memory
from bbadapt.verify.detections import BOX_REL_TOL, FP64_FACTOR

REL_TOL = 1e-4

LEVELS = ("backbone", "rpn", "roi_heads")
FPN_LEVELS = ["P2", "P3", "P4", "P5", "P6"]

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


# What the check holds at its peak, per unit (calibrated with benchmarks/bench_proof_cost.py, see benchmarks/README.md):
# every detector parameter lives as GluonCV float32 (cast to float64 and back for the truth), the export in float32
# and its float64 twin (which the yardstick's draws move in place); the largest image's feature maps in float32 and
# float64 on both sides; the RoI head's activations for every proposal in float32, in chunks of ROI_CHUNK in float64.
# Every intermediate output is counted though few are alive at once: resnet50_v2 C4 at the default sizes reads 34M
# parameters, 682 feature elements a pixel and 2.6M head elements a RoI (x 300 RoIs), so 3.6 GB; measured 2026-12-07,
# the export grew by 2.3 GB from where the estimate is made (2.0 GB -> 4.3 GB peak, benchmarks/bench_proof_cost.py).
PARAM_BYTES = 32.0  # float32 GluonCV (+ its float64 cast) + float32 export + float64 twin
FEATURE_BYTES = 2.0  # per activation element of the features network at the largest size
HEAD_BYTES = 2.5  # per activation element of the RoI head and its pooled input, per RoI (GluonCV's float32 pass)


def check_bytes(gluon, sizes: list[tuple[int, int]]) -> int:
    """Estimated peak memory growth of :func:`run_check` at ``sizes``, read off the detector's symbolic graphs."""
    import mxnet as mx

    from bbadapt.verify.budget import PROBE_SIDE, activation_elements

    det = gluon.detector
    side = 4 * PROBE_SIDE  # deep enough for FPN's stride-64 level
    features = activation_elements(det.features, (1, 3, side, side)) / float(side * side)
    out = det.features(mx.sym.var("data"))
    first = out[0] if isinstance(out, (list, tuple)) else out
    channels = int(first.infer_shape(data=(1, 3, side, side))[1][0][1])
    roi = tuple(int(v) for v in gluon.settings["roi_size"])
    head = det.box_features if gluon.layout == "fpn" else det.top_features
    per_roi = channels * roi[0] * roi[1] + activation_elements(head, (1, channels, *roi))
    rois = int(det.rpn.get_test_post_nms())
    params = sum(int(np.prod(p.shape)) for p in det.collect_params().values())
    pixels = max(h * w for h, w in sizes)
    return int(params * PARAM_BYTES + pixels * features * FEATURE_BYTES + rois * per_roi * HEAD_BYTES)


def require_memory(gluon, sizes: list[tuple[int, int]]) -> int:
    """Refuse (one line, before any image is allocated) a check that would not fit in memory; return the estimate."""
    from bbadapt.platform.errors import ResourceError
    from bbadapt.verify.budget import available_bytes

    need, have = check_bytes(gluon, sizes), available_bytes()
    if need > have:
        h, w = max(sizes, key=lambda s: s[0] * s[1])
        raise ResourceError(f"the torchvision export's check at {h}x{w} needs about {need / 2**30:.1f} GB of memory and "
                            f"{have / 2**30:.1f} GB is available; choose smaller sizes or free memory")
    return need


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


def _verdict(level: dict) -> str:
    return "passed" if level["float64"]["passed"] else "failed"


def _np(x) -> np.ndarray:
    return x.asnumpy() if hasattr(x, "asnumpy") else x.detach().cpu().numpy()


ROI_CHUNK = 50  # RoIs per float64 pass through the RoI head (C4: stage 4 on each); float32 passes take them all


def _roi_chunks(proposals: np.ndarray, dtype) -> list[np.ndarray]:
    """``proposals`` in chunks of ``ROI_CHUNK`` for a float64 run, whole otherwise.

    Each RoI goes through the head on its own (pooling, convs, BatchNorm in inference, fully connected
    layers: no op mixes RoIs), so a chunk computes the same numbers as the whole batch; in float64 only the
    summation order inside a kernel may change, 1e-16 relative, nine orders below the yardstick. What it
    saves: a C4 head holds 300 RoIs x 1024 x 14 x 14 float64 numbers (0.5 GB) per activation at once."""
    float64 = dtype is np.float64 or str(dtype) in ("float64", "torch.float64")
    if not float64 or len(proposals) <= ROI_CHUNK:
        return [proposals]
    return [proposals[i:i + ROI_CHUNK] for i in range(0, len(proposals), ROI_CHUNK)]


def _transformed(model, x):
    """The model's own normalization of ``x``, resizing off (the photos come at the check size)."""
    model.transform.resize_images = False
    return model.transform([x])[0]


class Float64Twin:
    """The exported model in float64, made on first need (a deep copy: the checked model stays float32).

    ``nudged()``: the one-ulp yardstick's models, the twin with every float number of the export
    (parameters and buffers) moved by one float32 ulp, in ``YARDSTICK_DRAWS`` seeded directions.
    Every number of an export was written by it (copied or recomputed from the bundle), so all move.

    The twin is channels-last: torch's float64 convolution (no oneDNN kernel; im2col and MKL's
    dgemm) runs the C4 head 14% faster that way, measured, and the sums it reorders move a
    float64 result by 1e-14 relative, seven orders below the yardstick.
    """

    def __init__(self, model) -> None:
        self._source, self._model = model, None

    def model(self):
        if self._model is None:
            import torch

            self._model = copy.deepcopy(self._source).double().to(memory_format=torch.channels_last)
            self._model.transform.resize_images = False
        return self._model

    def _numbers(self, model) -> list[tuple[str, object]]:
        return sorted([*model.named_parameters(), *model.named_buffers()], key=lambda t: t[0])

    def nudged(self):
        """The yardstick's models, one at a time: the twin itself, its numbers moved by one ulp for each draw and
        set back afterwards (from the float32 export, cast: the same bits), so no second float64 copy of the
        detector is held. The moves are those a fresh copy of the twin moved in the same order would get."""
        import torch

        from bbadapt.verify.equivalence import YARDSTICK_DRAWS
        from bbadapt.verify.yardstick import SEED, nudge

        twin = self.model()
        source = dict(self._numbers(self._source))
        try:
            for k in range(YARDSTICK_DRAWS):
                rng = np.random.RandomState(SEED + k)
                with torch.no_grad():
                    for name, tensor in self._numbers(twin):
                        if tensor.is_floating_point():
                            moved = nudge(source[name].detach().cpu().numpy(), rng)  # nudge makes its own float64 copy
                            tensor.copy_(torch.from_numpy(moved).to(tensor.device, tensor.dtype))
                yield twin
        finally:
            with torch.no_grad():
                for name, tensor in self._numbers(twin):
                    if tensor.is_floating_point():
                        tensor.copy_(source[name].to(tensor.dtype))


@contextmanager
def roi_chunked(model):
    """``model``'s own forward with its box head fed ``ROI_CHUNK`` RoIs at a time (see :func:`_roi_chunks`): the
    float64 opinion's full forward then holds one chunk's head activations, not all 300 RoIs' (C4: 0.5 GB each)."""
    import torch

    class RoiChunks(torch.nn.Module):
        def __init__(self, head) -> None:
            super().__init__()
            self.head = head

        def forward(self, pooled):
            return torch.cat([self.head(part) for part in pooled.split(ROI_CHUNK)])

    heads = model.roi_heads
    head = heads.box_head
    heads.box_head = RoiChunks(head)
    try:
        yield model
    finally:
        heads.box_head = head


@contextmanager
def in_float64(detector):
    """GluonCV's detector in float64 for the truth levels 1-3 are judged by, then back (float32 -> float64 ->
    float32 is exact)."""
    detector.cast("float64")
    try:
        yield detector
    finally:
        detector.cast("float32")


def float64_rule(gl32: dict, gl64: dict, tv32: dict, tv64: dict, yards: list[dict], rel_tol: float) -> dict:
    """How levels 1-3 are judged: the forward check's rule, GluonCV in float64 the truth, the export's twin judged.

    Per part (:func:`bbadapt.verify.equivalence.against_yardstick`): the export's float64 twin
    (``tv64``) must be no further from GluonCV float64 (``gl64``) than the one-ulp yardstick's
    runs (``yards``) are from the twin, by RMS. The float32 figures (the export's largest
    difference from GluonCV float32 against ``rel_tol``, GluonCV float32's own error against
    float64) are reported beside it. An export that computes something else fails whatever the
    rounding: BatchNorm eps set to 0 by torchvision's ``overwrite_eps`` is 6.7e-5 max rel on a
    ResNet-18 C4 export, inside a plain tolerance, and far above the yardstick.
    """
    from bbadapt.verify.equivalence import against_yardstick

    parts = {}
    for name in gl32:
        decision = against_yardstick([gl64[name]], [tv64[name]], [[y[name] for y in yards]])
        max_rel = difference(gl32[name], tv32[name])["max_rel"]
        parts[name] = {"max_rel": max_rel, "within_rel_tol": max_rel <= rel_tol,
                       "rms_ratio": decision["rms_ratio"] if decision else 0.0,
                       "gluoncv_fp32_max_rel_vs_fp64": difference(gl32[name], gl64[name])["max_rel"],
                       "float64_twin": decision, "within": decision is None or decision["within"]}
    return {"rule": "the export's float64 twin's RMS error against GluonCV float64 at most the one-ulp yardstick's (the "
                    "twin with every number of the export moved by one float32 ulp)", "parts": parts,
            "worst_rms_ratio": max(p["rms_ratio"] for p in parts.values()),
            "passed": all(p["within"] for p in parts.values())}


def detections_opinion(gluon: list, torch32: list, torch64: list) -> dict:
    """Level 4 with missing partners: the export in float64 as the judge.

    GluonCV's full detector does not run in float64 (its proposal ops fix float32), so the truth is the
    export in float64 (:func:`bbadapt.verify.detections.float64_opinion`): GluonCV's float32 detections
    must all find partners in it, at tolerances raised to what the export's own float32 rounding moves.
    """
    from bbadapt.verify.detections import float64_opinion

    opinion = float64_opinion(gluon, torch32, torch64, box_rel_tol=BOX_REL_TOL)
    return {"export_fp32_vs_fp64": opinion["reference_fp32_vs_fp64"],
            "gluoncv_vs_export_fp64": opinion["candidate_vs_reference_fp64"], "passed": opinion["passed"]}


class ImageCheck:
    """One photo through both detectors, level by level.

    Each level's values are computed by one method per side (``_gluon_levels``,
    ``_torch_levels``, ``gluon_detections``, ``torch_detections``), so that the float64 runs
    (GluonCV's for levels 1-3, the export's for missing detection partners) repeat exactly
    the pieces that were compared in float32.
    """

    def __init__(self, gluon, model, raw: np.ndarray, options: CheckOptions, twin: Float64Twin) -> None:
        import mxnet as mx
        import torch

        self.gluon, self.model, self.options, self.twin, self.raw = gluon, model, options, twin, raw
        self.det = gluon.detector
        self.x_gl = mx.nd.array(gluon.target.normalize(raw))
        self.device = next(model.parameters()).device  # the model may sit on a GPU; GluonCV runs where it was built
        self.x_tv = torch.from_numpy((raw[0] / INPUT_RANGES[options.input_range]).astype(np.float32)).to(self.device)
        self.images = _transformed(model, self.x_tv)

    # ---------------------------------------------------------------- the GluonCV side

    def _feature_names(self) -> list[str]:
        return FPN_LEVELS if self.gluon.layout == "fpn" else ["C4"]

    def _gluon_features(self, x) -> list:
        feats = self.det.features(x)
        return list(feats) if isinstance(feats, (list, tuple)) else [feats]

    def _gluon_levels(self, feats: list, proposals: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Backbone features, RPN head outputs and RoI-head outputs for ``proposals``, in ``feats``' dtype."""
        import mxnet as mx

        fpn, s = self.gluon.layout == "fpn", self.gluon.settings
        head = self.det.rpn.rpn_head if fpn else self.det.rpn
        rpn = {}
        for i, feat in enumerate(feats):  # the RPN reads every feature map (P2..P6, or C4)
            mid = head.conv1(feat)
            rpn[f"objectness_{i}"], rpn[f"deltas_{i}"] = _np(head.score(mid)), _np(head.loc(mid))
        logits, deltas = [], []
        for chunk in _roi_chunks(proposals, feats[0].dtype):
            rois = np.concatenate([np.zeros((len(chunk), 1)), chunk], axis=1)
            rois = mx.nd.array(rois, dtype=feats[0].dtype)
            if fpn:
                pooled = self.det._pyramid_roi_feats(mx.nd, feats, rois, tuple(s["roi_size"]), tuple(s["strides"]),
                                                     roi_mode="align")
                box_feat = self.det.box_features(pooled)
            else:
                pooled = mx.nd.contrib.ROIAlign(feats[0], rois, tuple(s["roi_size"]), 1.0 / s["strides"],
                                                sample_ratio=2)
                box_feat = mx.nd.contrib.AdaptiveAvgPooling2D(self.det.top_features(pooled), output_size=1)
            del pooled
            logits.append(_np(self.det.class_predictor(box_feat)))
            deltas.append(_np(self.det.box_predictor(box_feat)))
        roi = {"class_logits": np.concatenate(logits), "box_deltas": np.concatenate(deltas)}
        return {"backbone": {n: _np(f) for n, f in zip(self._feature_names(), feats, strict=True)}, "rpn": rpn,
                "roi_heads": roi}

    def _gluon_proposals(self, feats: list) -> np.ndarray:
        import mxnet as mx

        scores, boxes = self.det.rpn(mx.nd.zeros_like(self.x_gl), *feats)
        return _np(boxes)[0][_np(scores)[0, :, 0] >= 0]

    def _gluon_anchors(self, feats: list) -> np.ndarray:
        fpn = self.gluon.layout == "fpn"
        generators = list(self.det.rpn.anchor_generator) if fpn else [self.det.rpn.anchor_generator]
        return np.concatenate([_np(g(f))[0] for g, f in zip(generators, feats, strict=True)])

    def gluon_detections(self) -> tuple[list, int]:
        ids, scores, boxes = (_np(o)[0] for o in self.det(self.x_gl))
        padding = np.all(boxes == -1, axis=1) & (ids[:, 0] >= 0)
        return [ids[~padding][None], scores[~padding][None], boxes[~padding][None]], int(padding.sum())

    # ---------------------------------------------------------------- the torchvision side

    def _torch_levels(self, proposals: np.ndarray, model=None) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
        """Levels 1-3 of the export (or of ``model``, one of its float64 twins, on the same photo)."""
        import torch

        if model is None:
            model, images = self.model, self.images
        else:
            images = _transformed(model, self.x_tv.to(torch.float64))
        feats = model.backbone(images.tensors)
        logits, deltas = model.rpn.head(list(feats.values()))
        rpn = {}
        for i, (logit, delta) in enumerate(zip(logits, deltas, strict=True)):
            rpn[f"objectness_{i}"], rpn[f"deltas_{i}"] = _np(logit), _np(delta)
        heads = model.roi_heads
        logits, deltas = [], []
        for chunk in _roi_chunks(proposals, images.tensors.dtype):
            boxes = torch.from_numpy(chunk).to(images.tensors)
            pooled = heads.box_roi_pool(feats, [boxes], images.image_sizes)
            logit, delta = heads.box_predictor(heads.box_head(pooled))
            del pooled
            logits.append(_np(logit))
            deltas.append(_np(delta)[:, 4:])  # no background rows
        levels = {"backbone": {n: _np(f) for n, f in zip(self._feature_names(), feats.values(), strict=True)}, "rpn": rpn,
                  "roi_heads": {"class_logits": np.concatenate(logits), "box_deltas": np.concatenate(deltas)}}
        return feats, levels

    @staticmethod
    def torch_detections(model, x) -> list[np.ndarray]:
        out = model([x])[0]
        labels = _np(out["labels"]).astype(np.float64) - 1
        return [labels.reshape(1, -1, 1), _np(out["scores"]).reshape(1, -1, 1), _np(out["boxes"]).reshape(1, -1, 4)]

    # ---------------------------------------------------------------- the comparison

    def levels(self) -> dict:
        """Levels 1-3: differences from GluonCV float32, judged against GluonCV in float64 (:func:`float64_rule`)."""
        feats_gl = self._gluon_features(self.x_gl)
        anchors_gl = self._gluon_anchors(feats_gl)
        self._refuse_too_few_anchors(len(anchors_gl))
        proposals = self._gluon_proposals(feats_gl)
        gl = self._gluon_levels(feats_gl, proposals)
        feats_tv, tv = self._torch_levels(proposals)
        gl64 = self._gluon_float64(proposals)
        release_free_memory()
        tv64 = self._torch_levels(proposals, self.twin.model())[1]
        release_free_memory()
        yards = []
        for nudged in self.twin.nudged():
            yards.append(self._torch_levels(proposals, nudged)[1])
            release_free_memory()
        result = {}
        for level in LEVELS:
            parts = {n: difference(gl[level][n], tv[level][n]) for n in gl[level]}
            rule = float64_rule(gl[level], gl64[level], tv[level], tv64[level], [y[level] for y in yards],
                                self.options.rel_tol)
            result[level] = {**parts, "max_rel": _worst(parts), "float64": rule, "passed": rule["passed"]}
        anchors_tv = _np(self.model.rpn.anchor_generator(self.images, list(feats_tv.values()))[0])
        proposals_tv = _np(self.model.rpn(self.images, feats_tv)[0][0])
        same = proposals.shape == proposals_tv.shape
        anchors = difference(anchors_gl, anchors_tv)
        result["rpn"] |= {"anchors": anchors, "anchors_max_abs_px": anchors["max_abs"],
                          "proposals": {"gluoncv": len(proposals), "torchvision": len(proposals_tv),
                                        "max_abs_px_same_rank": float(np.max(np.abs(proposals - proposals_tv), initial=0.0))
                                        if same else None}}
        result["rpn"]["passed"] = result["rpn"]["passed"] and anchors["max_abs"] == 0.0
        result["roi_heads"] |= {"proposals": len(proposals),
                                "background_rows_zero": bool(np.all(_np(self.model.roi_heads.box_predictor.bbox_pred.weight)[:4] == 0))}
        return result

    def _refuse_too_few_anchors(self, anchors: int) -> None:
        """GluonCV's RPN keeps its first ``rpn_test_post_nms`` boxes of all anchors, and fails inside
        MXNet at a size with fewer anchors than that (C4, 300 proposals: 48x64 has 180)."""
        from bbadapt.platform.errors import OptionError

        keep = self.det.rpn.get_test_post_nms()
        if anchors < keep:
            h, w = self.raw.shape[2:]
            raise OptionError(f"GluonCV's detector cannot run at the check size {h}x{w} ({anchors} anchors, fewer than "
                              f"the {keep} proposals its RPN keeps); choose a larger size")

    def _gluon_float64(self, proposals: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        import mxnet as mx

        with in_float64(self.det):
            x = mx.nd.array(self.gluon.target.normalize(self.raw, "float64"), dtype="float64")
            return self._gluon_levels(self._gluon_features(x), proposals.astype(np.float64))

    def detections(self) -> dict:
        """Level 4; when partners are missing, the float64 export is the judge (see :func:`detections_opinion`)."""
        from bbadapt.engines.gluon.detector_bundle import compare_detections

        gluon, padding = self.gluon_detections()
        torch_side = self.torch_detections(self.model, self.x_tv)
        result = compare_detections(gluon, torch_side, box_rel_tol=BOX_REL_TOL)
        result["gluoncv_padding_rows_dropped"] = padding
        if not result["passed"]:
            import torch

            with roi_chunked(self.twin.model()) as twin:
                exact = self.torch_detections(twin, self.x_tv.to(torch.float64))
            result["float64"] = detections_opinion(gluon, torch_side, exact)
            result["passed"] = result["float64"]["passed"]
        return result


def check_image(gluon, model, raw: np.ndarray, options: CheckOptions, twin: Float64Twin | None = None) -> dict:
    import torch

    with torch.no_grad():
        run = ImageCheck(gluon, model, raw, options, twin or Float64Twin(model))
        levels = run.levels()
        detections = run.detections()
    passed = all(levels[level]["passed"] for level in LEVELS) and detections["passed"] and detections["count_a"] > 0
    return {"size": list(raw.shape[2:]), **levels, "detections": detections, "passed": bool(passed)}


@contextmanager
def torch_threads():
    """Torch on every core it may use while the check runs: importing MXNet leaves torch's OpenMP at one thread,
    and the export's float64 runs (three per image) are most of the check. ``OMP_NUM_THREADS``, when set, rules."""
    import os

    import torch

    before = torch.get_num_threads()
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    cores = int(wanted) if wanted.isdecimal() and int(wanted) > 0 else len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_check(gluon, model, options: CheckOptions, progress=None) -> dict:
    """The four-level comparison on one photo per size; ``passed`` only if every image passes."""
    from bbadapt.verify import images

    say = progress or (lambda _m: None)
    sizes = options.sizes or default_sizes(gluon.settings)
    files = images.photo_files()
    results, twin = [], Float64Twin(model)
    with torch_threads():
        for i, size in enumerate(sizes):
            say(f"checking {size[0]}x{size[1]} ({files[i % len(files)].name})")
            raw, names = images.photos(size, limit=i % len(files) + 1)
            result = check_image(gluon, model, raw[-1:], options, twin)
            results.append({"photo": names[-1], **result})
            release_free_memory()
    worst = {level: max(r[level]["max_rel"] for r in results) for level in LEVELS}
    ratio = max(r[level]["float64"]["worst_rms_ratio"] for r in results for level in LEVELS)
    matched = sum(r["detections"]["count_a"] - r["detections"]["unmatched"] for r in results)
    total = sum(r["detections"]["count_a"] for r in results)
    summary = (f"backbone max rel {worst['backbone']:.2g}, RPN {worst['rpn']:.2g}, RoI heads {worst['roi_heads']:.2g} "
               f"(the float64 export's RMS error vs GluonCV float64 at most {ratio:.3g}x the one-ulp yardstick's); "
               f"detections {matched}/{total} matched"
               f" (score <= {max(r['detections']['max_abs_score_diff'] for r in results):.2g}, "
               f"box <= {max(r['detections']['max_abs_box_diff_px'] for r in results):.2g} px)")
    empty = [r["photo"] for r in results if r["detections"]["count_a"] == 0]
    if empty:
        summary += f"; no detections to compare on {len(empty)} image(s)"
    judged = [f"{r['size'][0]}x{r['size'][1]} {_verdict(r['detections'])}" for r in results if "float64" in r["detections"]]
    if judged:
        summary += f"; detections judged against the float64 export: {', '.join(judged)}"
    return {"passed": all(r["passed"] for r in results), "summary": summary, "rel_tol": options.rel_tol,
            "fp64_factor": FP64_FACTOR, "worst_rms_ratio": ratio,
            "input_range": options.input_range, "worst_max_rel": worst, "images": results,
            "resizing": "images were resized before both detectors (torchvision resizing off): the two libraries' "
                        "resize differs (round vs floor, OpenCV uint8 vs float bilinear)"}
