"""Detector-level proof: bbadapt's Faster R-CNN computes gluoncv's, on real photos.

The references are gluoncv itself: ``faster_rcnn_resnet50_v1b_voc`` (global-stats BN,
fed gluoncv's own normalizing test transform) and, for a pre-activation backbone, the
hand-wiring of the forum thread (``features[:8]`` / ``features[8:11]`` of a gluon
``resnet18_v2``) with its BatchNorms switched to ``use_global_stats``. Both get calibrated
random backbone weights and random heads; bbadapt's detector is built from the same
backbone weights (normalization folded for raw ``rgb255`` input, BN fused or affine), gets
the same head weights copied across, and sees the raw 0..255 pixels of the same images.

Tolerances (``bbadapt.detector_bundle.SCORE_TOL``/``BOX_TOL``): scores 1e-4 and boxes
1e-2 px. Folding and fusing reassociate float32 sums, which moves backbone activations by
~1e-6 relative; through the heads that is ~1e-6 on a softmax score and ~1e-4 px on a box
of ~100 px. A different proposal, class or NMS decision would show up as an unmatched
detection or as differences of order 1, far above both tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest

from bbadapt.core import zoo
from bbadapt.core.rewrite import adapt
from bbadapt.core.spec import PRESETS
from bbadapt.core.weights import randomize
from bbadapt.engines.gluon.build import C4_DEFAULTS, build_detector
from bbadapt.engines.gluon.detector_bundle import compare_detections
from bbadapt.verify import images

SHORT = 160  # short side of the test images (gluoncv's resize_short_within)
N_PHOTOS = 3  # resnet18
N_PHOTOS_R50 = 2  # resnet50: each image runs ~300 ROIs through stage 4


def _gluoncv_inputs(n: int = N_PHOTOS):
    """gluoncv's own test transform on real photos: (normalized tensors, the raw pixels it normalized)."""
    import mxnet as mx
    from gluoncv.data.transforms.presets.rcnn import load_test

    files = [str(f) for f in images.photo_files()[:n]]
    tensors, origs = load_test(files, short=SHORT, max_size=1000)
    raw = [mx.nd.array(o.transpose(2, 0, 1)[None].astype(np.float32)) for o in origs]
    return tensors, raw


def _calibrated(net, seed: int = 0):
    photos, _ = images.photos((128, 128), limit=4)
    randomize(net, seed, PRESETS["imagenet"].normalize(photos))
    return net


def _randomize_heads(detector, seed: int, x) -> None:
    """Seeded random heads scaled to the backbone's activations on ``x``, so that detections vary.

    Calibrated random backbones produce features of magnitude ~100 (nothing like trained
    ones); gluoncv's Normal(0.01) head init would then saturate every score and blow up
    every box. Each head layer's std is instead set from the RMS of its input: RPN conv
    outputs ~1, objectness and class logits ~1..2, box deltas ~0.1.
    """
    import mxnet as mx

    feat = detector.features(x)
    pooled = detector.top_features(feat).mean(axis=(2, 3))
    rms_feat = float(mx.nd.sqrt(mx.nd.mean(feat ** 2)).asscalar())
    rms_pooled = float(mx.nd.sqrt(mx.nd.mean(pooled ** 2)).asscalar())
    rng = np.random.RandomState(seed)
    gains = {"rpn.conv1.0": 1.4 / rms_feat, "rpn.score": 1.0, "rpn.loc": 0.1,
             "class_predictor": 2.0 / rms_pooled, "box_predictor": 0.1 / rms_pooled}
    params = detector._collect_params_with_prefix()
    for layer, gain in gains.items():
        weight, bias = params[f"{layer}.weight"], params[f"{layer}.bias"]
        fan_in = int(np.prod(weight.shape[1:]))
        weight.set_data(mx.nd.array(rng.normal(0, gain / np.sqrt(fan_in), weight.shape)))
        bias.set_data(mx.nd.array(rng.normal(0, 0.1, bias.shape)))


def _copy_heads(source, target) -> None:
    """Every parameter that is not part of the backbone, by structural name (both nets must agree)."""
    src = {k: p for k, p in source._collect_params_with_prefix().items()
           if not k.startswith(("features.", "top_features."))}
    dst = {k: p for k, p in target._collect_params_with_prefix().items()
           if not k.startswith(("features.", "top_features."))}
    assert set(src) == set(dst)
    for key, p in src.items():
        dst[key].set_data(p.data())


def _assert_same_detections(reference, ours, tensors, raw) -> list[dict]:
    results = []
    for x_norm, x_raw in zip(tensors, raw, strict=True):
        result = compare_detections(reference(x_norm), ours(x_raw))
        assert result["passed"] and result["count_a"] > 0, result
        results.append(result)
    return results


@pytest.fixture(scope="module")
def voc_reference():
    """gluoncv's faster_rcnn_resnet50_v1b_voc, reset to one class, calibrated backbone, random heads."""
    import mxnet as mx
    from gluoncv.model_zoo import faster_rcnn_resnet50_v1b_voc

    ref = faster_rcnn_resnet50_v1b_voc(pretrained=False, pretrained_base=False)
    ref.initialize(mx.init.Xavier())
    ref.reset_class(["raccoon"])
    source = _calibrated(zoo.build("resnet50_v1b"))
    values = {p.name: p.data() for p in source.collect_params().values()}
    backbone = [p for p in ref.collect_params().values() if p.name.startswith(source.prefix)]
    assert len(backbone) > 100  # names agree: both are gluoncv's resnet50_v1b with its fixed prefix
    for p in backbone:
        p.set_data(values[p.name])
    ref(mx.nd.zeros((1, 3, 128, 128)))
    _randomize_heads(ref, seed=1, x=_gluoncv_inputs()[0][0])
    return ref, source


@pytest.mark.parametrize("bn", ["fused", "affine"])
def test_resnet50_v1b_detector_matches_gluoncv_faster_rcnn_voc(voc_reference, bn):
    ref, source = voc_reference
    adapted = adapt(source, "imagenet", "rgb255", bn=bn)
    ours, _ = build_detector(adapted.net, adapted.graph, "gluoncv-v1b", ["raccoon"], "c4", freeze_at=2)
    _copy_heads(ref, ours)
    tensors, raw = _gluoncv_inputs(N_PHOTOS_R50)
    results = _assert_same_detections(ref, ours, tensors, raw)
    assert sum(r["count_a"] for r in results) >= 10 * N_PHOTOS_R50  # a meaningful number of detections compared


def _forum_detector(base):
    """The forum thread's hand-wiring of a gluon v2 ResNet, with frozen (global-stats) BatchNorm."""
    from gluoncv.model_zoo.rcnn.faster_rcnn import get_faster_rcnn

    from bbadapt.core.weights import batchnorms

    for bn in batchnorms(base):
        bn._kwargs["use_global_stats"] = True
    features, top_features = base.features[:8], base.features[8:11]
    return get_faster_rcnn("resnet18_v2", "custom", features=features, top_features=top_features,
                           classes=["raccoon"], train_patterns=".*dense|.*rpn|.*stage(2|3|4)_conv",
                           **C4_DEFAULTS)


@pytest.mark.parametrize("bn", ["fused", "affine"])
def test_resnet18_v2_detector_matches_the_forum_threads_hand_wired_detector(bn):
    import mxnet as mx

    source = _calibrated(zoo.build("resnet18_v2"))
    adapted = adapt(source, "imagenet", "rgb255", bn=bn)
    ref = _forum_detector(source)
    ref.collect_params().initialize(mx.init.Xavier())  # heads only: the backbone keeps its values
    ref(mx.nd.zeros((1, 3, 128, 128)))
    _randomize_heads(ref, seed=2, x=_gluoncv_inputs()[0][0])
    ours, _ = build_detector(adapted.net, adapted.graph, "gluon-v2", ["raccoon"], "c4", freeze_at=2)
    _copy_heads(ref, ours)
    tensors, raw = _gluoncv_inputs()
    results = _assert_same_detections(ref, ours, tensors, raw)
    assert sum(r["count_a"] for r in results) >= 10 * N_PHOTOS
