"""Faster R-CNN (gluoncv) from an adapted backbone: layout discovery, freezing, build.

The forum recipe this replaces sliced ``features[:8]`` by hand and guessed a
``train_patterns`` regex per family. Here both come from the network itself:

* the stages come from tracing (:func:`bbadapt.trace.trace`), the order in which the
  blocks around them run comes from one eager forward pass with hooks, and the blocks that
  follow stage 4 while keeping its output shape (v2's final BN + ReLU) are the "tail" that
  belongs to ``top_features``;
* ``--freeze-at N`` freezes the first ``N`` units (stem, stage 1, ...), and the
  ``train_patterns`` regex is generated from the names of the parameters that stay
  trainable, then checked to select exactly those.

Bundle I/O (``add_detector``, ``load_detector``, ``export_symbol``) lives in
:mod:`bbadapt.detector_bundle`.
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, field

from bbadapt.core.blocks import get_block
from bbadapt.core.zoo import import_gluoncv
from bbadapt.engines.gluon.options import (  # noqa: F401 - the vocabulary lives there (mxnet-free); importable from here too
    C4_DEFAULTS,
    FPN_DEFAULTS,
    FREEZE_LEVELS,
    LAYOUTS,
    DetectorOptions,
    check_classes,
    check_settings,
    layout_defaults,
    require_detector_fits,
)
from bbadapt.platform.devices import context_of
from bbadapt.platform.errors import ModelError

import_gluoncv()  # gluoncv is imported lazily below; this makes it work beside torch >= 2

PROBE_SIZE = 64  # input side of the eager pass that discovers the execution order
FPN_FILTERS = 256
FPN_BOX_HIDDEN = 1024
_TUPLES = ("roi_size", "strides", "scales", "ratios", "alloc_size")


@dataclass
class BackboneLayout:
    """Where the detector cuts the backbone, in structural paths of the backbone net."""

    container: str  # the block whose children run one after another ("" for v1b, "features" for gluon)
    stem: list[str]  # children that run before stage 1, in execution order
    stages: list[str]  # the four stages (strides 4, 8, 16, 32)
    tail: list[str] = field(default_factory=list)  # after stage 4, same output shape (v2: final BN + ReLU)
    outputs: list[str] = field(default_factory=list)  # symbol node of C2..C5, without the backbone prefix

    def units(self) -> list[list[str]]:
        """The freezable units in order: stem, stage 1 .. stage 4 (+ tail)."""
        return [self.stem, *[[s] for s in self.stages[:3]], [self.stages[3], *self.tail]]

    def to_dict(self) -> dict:
        return {"container": self.container, "stem": self.stem, "stages": self.stages, "tail": self.tail,
                "outputs": self.outputs}


# ---------------------------------------------------------------- requests and settings


def validate_request(info, classes: list[str], layout: str, freeze_at: int) -> DetectorOptions:
    """A detector request given as loose values, checked before any heavy work: the valid
    :class:`DetectorOptions` it makes (class names, layout, freeze level), then whether the model
    can carry it. The convert pipeline makes its options once and does not come through here."""
    options = DetectorOptions(classes=list(classes), layout=layout, freeze_at=freeze_at)
    require_detector_fits(info, options)
    return options


def settings_for(layout: str, overrides: dict | None = None) -> dict:
    """gluoncv's defaults for ``layout`` with ``overrides`` applied (unknown keys refused)."""
    check_settings(layout, overrides)
    return _settings(layout, overrides)


def _settings(layout: str, overrides) -> dict:
    """:func:`settings_for` for overrides already validated (a :class:`DetectorOptions`'s)."""
    base = {**layout_defaults(layout), **(overrides or {})}
    return {k: tuple(v) if k in _TUPLES and isinstance(v, list) else v for k, v in base.items()}


def json_settings(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


# ---------------------------------------------------------------- layout discovery


def _execution_order(backbone, container: str) -> list[tuple[str, tuple]]:
    """(child name, output shape) of the container's children in the order they run."""
    import mxnet as mx

    calls: list[tuple[str, tuple]] = []
    handles = []
    for name, child in get_block(backbone, container)._children.items():
        def hook(_block, _inputs, output, name=name):
            calls.append((name, tuple(output.shape)))
        handles.append(child.register_forward_hook(hook))
    try:
        backbone.hybridize(False)  # hooks of children only fire in an eager pass
        backbone(mx.nd.zeros((1, 3, PROBE_SIZE, PROBE_SIZE), ctx=context_of(backbone)))
    finally:
        for handle in handles:
            handle.detach()
    names = [n for n, _ in calls]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ModelError(f"cannot cut this backbone: blocks {', '.join(twice)} run more than once")
    return calls


def discover_layout(backbone, graph=None) -> BackboneLayout:
    """Stem, stages and tail of ``backbone`` from its traced stages and one eager pass."""
    from bbadapt.core.trace import trace

    graph = graph or trace(backbone)
    stages = [s.path for s in graph.stages]
    jumps = [s.jump for s in graph.stages]
    if jumps != [4, 8, 16, 32]:
        raise ModelError(f"a Faster R-CNN needs four stages at strides 4/8/16/32; this backbone's stages "
                         f"({', '.join(stages) or 'none found'}) have strides {jumps}")
    parents = {s.rpartition(".")[0] for s in stages}
    if len(parents) != 1:
        raise ModelError(f"the stages {', '.join(stages)} do not share one parent block; cannot cut the backbone")
    container = parents.pop()
    join = (lambda n: f"{container}.{n}") if container else (lambda n: n)
    order = _execution_order(backbone, container)
    names = [join(n) for n, _ in order]
    if not all(s in names for s in stages):
        raise ModelError("a stage did not run in the probe pass; cannot cut the backbone")
    first, last = names.index(stages[0]), names.index(stages[3])
    if names[first:last + 1] != stages:
        raise ModelError(f"blocks run between the stages ({', '.join(names[first:last + 1])}); cannot cut the backbone")
    stage4_shape = order[last][1]
    tail = []
    for name, shape in order[last + 1:]:
        if shape != stage4_shape:
            break  # the pooling (or anything else that changes the shape) ends the feature extractor
        tail.append(join(name))
    layout = BackboneLayout(container, names[:first], stages, tail)
    layout.outputs = _stage_outputs(backbone, layout)
    return layout


def _stage_outputs(backbone, layout: BackboneLayout) -> list[str]:
    """Symbol node names (backbone prefix removed) of C2..C5; C5 after the tail if there is one."""
    from bbadapt.core.trace import symbol_graph

    nodes = symbol_graph(backbone)
    prefix = backbone.prefix
    out = []
    for k, path in enumerate(layout.stages):
        blocks = [path] + (layout.tail if k == 3 else [])
        last = None
        for block_path in blocks:
            block_prefix = get_block(backbone, block_path).prefix
            members = [n["name"] for n in nodes if n["op"] != "null" and n["name"].startswith(block_prefix)]
            if members:
                last = members[-1]
        if last is None or not last.startswith(prefix):
            raise ModelError(f"cannot find the output node of {path} in the traced backbone")
        out.append(last[len(prefix):])
    return out


# ---------------------------------------------------------------- freezing


def instance_pattern(prefix: str, block) -> str:
    """A regex for a block's name prefix that ignores Gluon's per-instance counter.

    ``resnetv20_`` and ``resnetv21_`` name the same layer of two instances; the pattern must
    select the same parameters in the process that built the detector and in any later one
    that reloads it.
    """
    base = type(block).__name__.lower()
    if prefix.startswith(base) and re.fullmatch(r"\d*_", prefix[len(base):]):
        return re.escape(base) + r"\d*_"
    return re.escape(prefix)


def _owned_params(block) -> list[tuple[object, str, object]]:
    """(owner block, local name, Parameter) for every parameter under ``block``."""
    from bbadapt.core.trace import block_paths

    return [(b, local, p) for b in block_paths(block).values() for local, p in b._reg_params.items()]


def backbone_trainable(backbone, layout: BackboneLayout, freeze_at: int) -> list:
    """Parameters of the units after the first ``freeze_at`` that can train.

    Decided by structure, not by the ``grad_req`` the net happens to carry: BatchNorm (any
    frozen form) and FrozenAffine parameters never train, nor do constants.
    """
    params = []
    from mxnet.gluon import nn

    from bbadapt.core.blocks import FrozenAffine

    for unit in layout.units()[freeze_at:]:
        for path in unit:
            for owner, _local, p in _owned_params(get_block(backbone, path)):
                if can_train(p) and not isinstance(owner, (nn.BatchNorm, FrozenAffine)):
                    params.append(p)
    return params


def make_train_patterns(backbone, layout: BackboneLayout, freeze_at: int, head_patterns: list[str]) -> str:
    """The regex gluoncv's ``collect_train_params`` uses: heads + the unfrozen backbone layers."""
    wanted = {id(p) for p in backbone_trainable(backbone, layout, freeze_at)}
    root = instance_pattern(backbone.prefix, backbone)
    owners: list[str] = []
    for unit in layout.units()[freeze_at:]:
        for path in unit:
            for _owner, local, p in _owned_params(get_block(backbone, path)):
                if id(p) in wanted and p.name.startswith(backbone.prefix):
                    stem = re.escape(p.name[len(backbone.prefix):-len(local)])
                    if stem not in owners:
                        owners.append(stem)
    parts = list(head_patterns)
    if owners:
        parts.append(f"{root}(?:{'|'.join(owners)})(?:weight|bias)$")
    return "|".join(parts)


def head_patterns(detector, layout: str) -> list[str]:
    """Patterns of the detector's own layers: everything under its prefix but the anchor constants, FPN's P layers."""
    parts = [instance_pattern(detector.prefix, detector) + "(?!.*anchor)"]
    if layout == "fpn":
        parts.append(r"P\d+_")
    return parts


def can_train(param) -> bool:
    """Constants (anchors, FrozenAffine's zero/one) and non-differentiable parameters never train."""
    from mxnet.gluon.parameter import Constant

    return not isinstance(param, Constant) and getattr(param, "_differentiable", True)


def apply_freeze(detector, train_patterns: str) -> list[str]:
    """Leave only the selected parameters trainable; returns their structural names."""
    selected = {id(p) for p in detector.collect_params(train_patterns).values()}
    trainable = []
    for key, p in sorted(detector._collect_params_with_prefix().items()):
        if id(p) in selected and can_train(p):
            p.grad_req = "write"
            trainable.append(key)
        else:
            p.grad_req = "null"
    return trainable


# ---------------------------------------------------------------- building


def _c4_parts(backbone, layout: BackboneLayout):
    from mxnet.gluon import nn

    features, top = nn.HybridSequential(prefix=""), nn.HybridSequential(prefix="")
    for path in layout.stem + layout.stages[:3]:
        features.add(get_block(backbone, path))
    for path in layout.stages[3:] + layout.tail:
        top.add(get_block(backbone, path))
    return features, top


def _fpn_features(backbone, layout: BackboneLayout):
    import warnings

    from gluoncv.nn.feature import FPNFeatureExpander

    with warnings.catch_warnings():  # SymbolBlock's "data: None" type-inference chatter
        warnings.simplefilter("ignore")
        return FPNFeatureExpander(network=backbone, outputs=layout.outputs, num_filters=[FPN_FILTERS] * 4,
                                  use_1x1=True, use_upsample=True, use_elewadd=True, use_p6=True, no_bias=False,
                                  pretrained=False, ctx=context_of(backbone))


def _fpn_box_head(detector):
    """gluoncv's FPN box head (2 x Dense 1024 + ReLU), created under the detector's prefix."""
    import mxnet as mx
    from mxnet.gluon import nn

    with detector.name_scope():
        head = nn.HybridSequential(prefix="box_")
        with head.name_scope():
            for _ in range(2):
                head.add(nn.Dense(FPN_BOX_HIDDEN, weight_initializer=mx.init.Normal(0.01)))
                head.add(nn.Activation("relu"))
    return head


@functools.lru_cache(maxsize=1)
def fpn_rcnn_class():
    """gluoncv's ``FasterRCNN`` with ROI features pooled deterministically for FPN.

    gluoncv pools each FPN level with ROIAlign after setting the ROIs of other levels to
    batch index -1; MXNet 1.9's CPU ROIAlign skips such ROIs without writing their output,
    so uninitialized memory entered the summed ROI features (detections changed from run to
    run). Here every level pools every ROI and the other levels' ROIs are zeroed with
    ``where`` (gluoncv's own path for MXNet builds without ``box_encode``). Same class name,
    so parameter names and ``train_patterns`` are those of gluoncv's class.
    """
    from gluoncv.model_zoo.rcnn.faster_rcnn import FasterRCNN as GluonCVFasterRCNN

    class FasterRCNN(GluonCVFasterRCNN):
        def _pyramid_roi_feats(self, F, features, rpn_rois, roi_size, strides, roi_mode="align",
                               roi_canonical_scale=224.0, sampling_ratio=2, eps=1e-6):
            if roi_mode != "align":
                return super()._pyramid_roi_feats(F, features, rpn_rois, roi_size, strides, roi_mode,
                                                  roi_canonical_scale, sampling_ratio, eps)
            top = self._max_stage - 1 if self._max_stage > 5 else self._max_stage  # P6 feeds the RPN only
            _, x1, y1, x2, y2 = F.split(rpn_rois, axis=-1, num_outputs=5)
            side = F.sqrt((x2 - x1 + 1) * (y2 - y1 + 1))
            level = F.squeeze(F.clip(F.floor(4 + F.log2(side / roi_canonical_scale + eps)), self._min_stage, top))
            pooled = []
            for i, stage in enumerate(range(self._min_stage, top + 1)):
                feat = F.contrib.ROIAlign(features[i], rpn_rois, roi_size, 1.0 / strides[i],
                                          sample_ratio=sampling_ratio)
                pooled.append(F.where(level == stage, feat, F.zeros_like(feat)))
            return F.ElementWiseSum(*pooled)

    return FasterRCNN


def init_heads(detector, seed: int) -> None:
    """Seeded initialization of every parameter the backbone did not bring, shapes included."""
    import mxnet as mx

    ctx = _ctx_of_any(detector)
    mx.random.seed(seed)
    fresh = [p for p in detector.collect_params().values() if p._data is None and not p._deferred_init]
    default = mx.init.Xavier(rnd_type="uniform", factor_type="in", magnitude=1.0)
    for p in fresh:  # layers that name an initializer keep it (gluoncv's Normal(0.01) heads)
        p.initialize(init=mx.init.Zero() if p.init is None and p.name.endswith("bias") else None,
                     default_init=default, ctx=ctx)
    with _one_proposal(detector):  # resolves deferred shapes (and their seeded values)
        detector(mx.nd.zeros((1, 3, 128, 128), ctx=ctx))


@contextlib.contextmanager
def _one_proposal(detector):
    """Run the shape-resolving pass with 1 RPN proposal instead of 300: stage 4 per ROI is the cost.

    ``_rpn_test_post_nms`` / ``rpn._test_post_nms`` are gluoncv 0.10's (pinned) attributes
    for the number of test-time proposals; both are restored on exit.
    """
    saved = (detector._rpn_test_post_nms, detector.rpn._test_post_nms)
    detector._rpn_test_post_nms = detector.rpn._test_post_nms = 1
    try:
        yield
    finally:
        detector._rpn_test_post_nms, detector.rpn._test_post_nms = saved


def _ctx_of_any(detector):
    for p in detector.collect_params().values():
        if p._data is not None:
            return p.list_ctx()[0]
    import mxnet as mx

    return mx.cpu()


def build_detector(backbone, graph, family: str, classes: list[str], layout: str = "c4", freeze_at: int = 1,
                   seed: int = 0, **overrides):
    """A gluoncv ``FasterRCNN`` on ``backbone`` (an adapted net); returns it and its description.

    ``graph``: the backbone's traced :class:`~bbadapt.trace.Graph` (traced here when None).
    ``family`` only labels the description. Settings default to gluoncv's
    ``faster_rcnn_resnet50_v1b_voc`` (C4) or ``faster_rcnn_fpn_resnet50_v1b_coco`` (FPN);
    ``overrides`` replace any of them. Heads are initialized from ``seed``; parameters
    outside ``train_patterns`` get ``grad_req='null'``.

    The loose values (a bundle's detector section, a script's) become one :class:`DetectorOptions`,
    validated as it is made; :func:`build_from_options` takes one that is already made.
    """
    options = DetectorOptions(classes=list(classes), layout=layout, freeze_at=freeze_at, overrides=overrides)
    return build_from_options(backbone, graph, family, options, seed=seed)


def build_from_options(backbone, graph, family: str, options: DetectorOptions, seed: int = 0):
    """:func:`build_detector` for a :class:`DetectorOptions`, trusted as it is (it validated itself when made)."""
    from gluoncv.model_zoo.rcnn.faster_rcnn import get_faster_rcnn

    classes, layout, freeze_at = list(options.classes), options.layout, options.freeze_at
    settings = _settings(layout, options.overrides)
    found = discover_layout(backbone, graph)
    ctx = context_of(backbone)
    if layout == "c4":
        features, top = _c4_parts(backbone, found)
        detector = get_faster_rcnn(name=backbone.prefix.rstrip("_"), dataset="custom", pretrained=False, ctx=ctx,
                                   features=features, top_features=top, classes=list(classes), **settings)
    else:
        features = _fpn_features(backbone, found)
        detector = fpn_rcnn_class()(features=features, top_features=None, box_features=None,
                                    classes=list(classes), **settings)
        detector.box_features = _fpn_box_head(detector)
    init_heads(detector, seed)
    patterns = make_train_patterns(backbone, found, freeze_at, head_patterns(detector, layout))
    detector.train_patterns = patterns
    trainable = apply_freeze(detector, patterns)
    _check_selection(detector, backbone, found, freeze_at)
    info = {"architecture": "faster-rcnn", "family": family, "classes": list(classes), "layout": layout,
            "freeze_at": freeze_at, "settings": json_settings(settings), "train_patterns": patterns,
            "trainable": trainable, "backbone_layout": found.to_dict(), "seed": seed}
    return detector, info


def _check_selection(detector, backbone, layout: BackboneLayout, freeze_at: int) -> None:
    """The generated regex must select exactly the intended backbone parameters (no more, no less)."""
    backbone_ids = {id(p) for p in backbone.collect_params().values()}
    wanted = {p.name for p in backbone_trainable(backbone, layout, freeze_at)}
    got = {p.name for p in detector.collect_params(detector.train_patterns).values()
           if id(p) in backbone_ids and can_train(p)}
    if got != wanted:
        extra, missing = sorted(got - wanted), sorted(wanted - got)
        raise ModelError(f"internal: generated train_patterns select {extra[:3]} too many and miss {missing[:3]}")
