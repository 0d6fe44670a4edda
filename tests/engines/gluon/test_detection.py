"""bbadapt's Faster R-CNN: where it cuts the backbone, what trains, bundles, export, bad input.

Expected values are computed from the networks themselves (strides from input sizes,
trainable sets from the traced stages and the Conv2D blocks), never written out per family.
The detector-level equivalence with gluoncv is in test_detection_equivalence.py.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from bbadapt.bundle.manifest import SCHEMA_VERSION, staged_output, write_manifest
from bbadapt.core import zoo
from bbadapt.core.rewrite import adapt, clone
from bbadapt.core.trace import block_paths
from bbadapt.engines.gluon.build import C4_DEFAULTS, FPN_DEFAULTS, build_detector, discover_layout, validate_request
from bbadapt.engines.gluon.detector_bundle import (
    DETECTOR_PARAMS,
    add_detector,
    compare_detections,
    export_symbol,
    load_detector,
    probe_photo,
)
from bbadapt.platform.errors import BbadaptError, ModelError, OptionError, OutputError, WeightsError
from tests.conftest import calibrated

VOC = Path(__file__).resolve().parents[2] / "data" / "raccoon_voc" / "VOC2017"
CLASSES = ["raccoon"]


@functools.lru_cache(maxsize=6)
def adapted(name: str, bn: str = "fused"):
    """A calibrated zoo net adapted for raw rgb255 input (shared: build detectors on clones)."""
    return adapt(calibrated(name), "imagenet", "rgb255", bn=bn)


def detector_for(name: str, bn: str = "fused", layout: str = "c4", freeze_at: int = 2, **overrides):
    a = adapted(name, bn)
    net = clone(a.net)
    det, info = build_detector(net, a.graph, zoo.model_info(name).family, CLASSES, layout, freeze_at, **overrides)
    return det, info, net


def photo(short: int = 128):
    return mx.nd.array(probe_photo(short), dtype="float32")


def make_bundle(out: Path, name: str, bn: str = "fused", layout: str = "c4", classes=CLASSES, freeze_at: int = 2):
    """A bundle as ``convert --detector faster-rcnn`` writes it: manifest with plan + detector section."""
    a = adapted(name, bn)
    info = zoo.model_info(name)
    with staged_output(out) as stage:
        section = add_detector(stage, a, info, list(classes), layout, freeze_at)
        write_manifest(stage, {"kind": "backbone", "model": name, "family": info.family,
                               "source": a.source.to_dict(), "target": a.target.to_dict(), "plan": a.plan,
                               "detector": section})
    return section


# ---------------------------------------------------------------- where the backbone is cut


@pytest.mark.parametrize("name", ["resnet18_v1b", "resnet18_v2", "resnet18_v1"])
def test_c4_features_end_at_stride_16_and_top_features_at_stride_32(name):
    det, info, _ = detector_for(name)
    x = photo(128)
    h, w = x.shape[2:]
    feat = det.features(x)
    top = det.top_features(feat)
    assert feat.shape[2:] == (math.ceil(h / 16), math.ceil(w / 16))
    assert top.shape[2:] == (math.ceil(h / 32), math.ceil(w / 32))
    layout = info["backbone_layout"]
    assert layout["stages"] == [s.path for s in adapted(name).graph.stages]
    assert info["settings"] == {k: list(v) if isinstance(v, tuple) else v for k, v in C4_DEFAULTS.items()}


def test_v2_top_features_end_with_the_final_batchnorm_and_relu():
    """Pre-activation nets leave stage 4 un-normalized; the final BN + ReLU belong to top_features."""
    det, info, net = detector_for("resnet18_v2", bn="affine")
    tail = info["backbone_layout"]["tail"]
    blocks = block_paths(net)
    assert [type(blocks[p]).__name__ for p in tail] == ["FrozenAffine", "Activation"]
    assert info["backbone_layout"]["stages"][-1] == "features.8" and tail == ["features.9", "features.10"]
    top = det.top_features(det.features(photo(128)))
    assert float(top.min().asscalar()) >= 0.0  # ends in the ReLU
    # v1b has nothing between stage 4 and the pooling
    assert detector_for("resnet18_v1b")[1]["backbone_layout"]["tail"] == []


def test_cifar_networks_are_refused_before_any_work():
    with pytest.raises(ModelError, match="CIFAR"):
        validate_request(zoo.model_info("cifar_resnet20_v1"), CLASSES, "c4", 2)


def test_a_backbone_without_stride_16_and_32_stages_is_refused():
    net = zoo.build("cifar_resnet20_v2")
    with pytest.raises(ModelError, match="strides 4/8/16/32"):
        discover_layout(net)


# ---------------------------------------------------------------- what trains


def _conv_units(net, graph) -> dict[str, int]:
    """Every Conv2D of the backbone's feature path -> 0 (stem) or its stage number (1..4)."""
    from mxnet.gluon import nn

    stages = [s.path for s in graph.stages]
    units = {}
    for path, block in block_paths(net).items():
        if not isinstance(block, nn.Conv2D):
            continue
        inside = [k for k, s in enumerate(stages, 1) if path.startswith(s + ".")]
        units[path] = inside[0] if inside else 0
    return units


@pytest.mark.parametrize("name,bn,freeze_at", [
    *[("resnet18_v1b", "fused", k) for k in range(6)],
    ("resnet18_v2", "affine", 0), ("resnet18_v2", "affine", 2), ("resnet18_v2", "affine", 5),
    ("resnet18_v1b", "global-stats", 0),
])
def test_freeze_at_leaves_exactly_the_expected_parameters_trainable(name, bn, freeze_at):
    det, info, net = detector_for(name, bn=bn, freeze_at=freeze_at)
    units = _conv_units(net, adapted(name, bn).graph)
    blocks = block_paths(net)
    expected = {p.name for path, unit in units.items() if unit >= freeze_at
                for p in (blocks[path].weight, blocks[path].bias) if p is not None}
    backbone = {p.name for p in net.collect_params().values()}
    selected = {p.name for p in det.collect_train_params().values()}
    assert selected & backbone == expected
    if freeze_at == 0:
        assert any(units[p] == 0 for p in units) and expected  # the stem conv trains too
    if freeze_at == 5:
        assert not selected & backbone
    # heads always train; no BatchNorm, affine or constant parameter ever does
    heads = {p.name for p in det.collect_params().values() if p.name not in backbone}
    assert {n for n in heads if "anchor" not in n} <= selected
    assert not any(n.endswith(("gamma", "beta", "running_mean", "running_var", "_scale", "_shift", "anchor_"))
                   for n in selected)
    # what is not selected cannot train, and the manifest lists exactly the selected ones
    for key, p in det._collect_params_with_prefix().items():
        assert (p.grad_req == "write") == (p.name in selected), key
    assert len(info["trainable"]) == len(selected)


# ---------------------------------------------------------------- symbol traceability and FPN


@pytest.mark.parametrize("layout", ["c4", "fpn"])
def test_features_stay_symbol_traceable_for_gluoncv_train_transform(layout):
    """gluoncv's train transform calls ``net.features(mx.sym.var('data'))`` to size RPN targets."""
    from gluoncv.data.transforms.presets.rcnn import FasterRCNNDefaultTrainTransform

    det, _, _ = detector_for("resnet18_v1b", layout=layout)
    sym = det.features(mx.sym.var("data"))
    outputs = sym if isinstance(sym, list) else [sym]  # FPN: one symbol per level
    assert len(outputs) == (5 if layout == "fpn" else 1) and all(isinstance(s, mx.sym.Symbol) for s in outputs)
    root = ET.parse(VOC / "Annotations" / "raccoon-1.xml").getroot()
    box = [float(root.find(f"object/bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
    label = np.array([box + [0.0]])
    img = mx.image.imread(str(VOC / "JPEGImages" / "raccoon-1.jpg"))
    # rgb255 input: to_tensor's /255 undone by std = 1/255, no mean
    transform = FasterRCNNDefaultTrainTransform(160, 1000, det, mean=(0, 0, 0), std=(1 / 255,) * 3,
                                                flip_p=0.0, ashape=det.ashape, multi_stage=layout == "fpn")
    x, bbox, cls_targets = transform(img, label)[:3]
    assert x.shape[1] == 160 and 200 < float(x.max().asscalar()) <= 255.0 + 1e-3  # raw pixels
    assert bbox.shape == (1, 5)
    levels = cls_targets if isinstance(cls_targets, (list, tuple)) else [cls_targets]  # FPN: per level
    positives = sum(int(np.sum(np.asarray(getattr(t, "asnumpy", lambda t=t: t)()) == 1)) for t in levels)
    assert positives >= 1  # the raccoon got positive anchors


@pytest.mark.parametrize("name", ["resnet18_v1b", "resnet18_v2"])
def test_fpn_builds_and_runs_with_outputs_at_strides_4_to_64(name):
    det, info, _ = detector_for(name, layout="fpn")
    x = photo(128)
    h, w = x.shape[2:]
    feats = det.features(x)
    assert [f.shape[2:] for f in feats] == [(math.ceil(h / s), math.ceil(w / s)) for s in (4, 8, 16, 32, 64)]
    assert all(f.shape[1] == 256 for f in feats)
    ids, scores, boxes = det(x)
    assert ids.shape[:2] == scores.shape[:2] == boxes.shape[:2] and boxes.shape[2] == 4

    assert info["settings"]["strides"] == list(FPN_DEFAULTS["strides"])


def test_fpn_roi_features_come_from_each_rois_own_level_and_nothing_else():
    """FPN pools each ROI from the level its size picks (FPN paper: 4 + log2(side/224), P2..P5) and adds zeros.

    MXNet 1.9's CPU ROIAlign leaves the output of ROIs with batch index -1 unwritten, which
    is how gluoncv masks the other levels; bbadapt's detector must not depend on that memory.
    """
    det, _, _ = detector_for("resnet18_v1b", layout="fpn")
    feats = det.features(photo(128))[:4]
    rois = mx.nd.array([[0, 0, 0, 29, 29], [0, 0, 0, 119, 119], [0, 0, 0, 239, 239], [0, 0, 0, 499, 499]])
    pooled = det._pyramid_roi_feats(mx.nd, feats, rois, (7, 7), det._strides)
    levels = []
    for n, (_, x1, y1, x2, y2) in enumerate(rois.asnumpy()):
        side = math.sqrt((x2 - x1 + 1) * (y2 - y1 + 1))
        level = min(max(math.floor(4 + math.log2(side / 224.0 + 1e-6)), 2), 5)
        levels.append(level)
        own = mx.nd.contrib.ROIAlign(feats[level - 2], rois[n:n + 1], (7, 7), 1.0 / det._strides[level - 2],
                                     sample_ratio=2)
        np.testing.assert_allclose(pooled[n].asnumpy(), own[0].asnumpy(), rtol=1e-6, atol=1e-6)
    assert levels == [2, 3, 4, 5]


# ---------------------------------------------------------------- bundles


@pytest.mark.parametrize("name,bn,layout", [("resnet18_v2", "affine", "c4"), ("resnet18_v1b", "fused", "fpn")])
def test_a_bundle_reloads_to_the_detector_that_was_built(tmp_path, name, bn, layout):
    section = make_bundle(tmp_path / "b", name, bn, layout)
    built, info, _ = detector_for(name, bn=bn, layout=layout)  # same seed: same heads
    loaded = load_detector(tmp_path / "b", ctx=mx.cpu(0))
    x = photo(128)
    for a, b in zip(built(x), loaded(x), strict=True):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())["detector"]
    assert manifest["classes"] == CLASSES and manifest["layout"] == layout and manifest["freeze_at"] == 2
    assert manifest["train_patterns"] == loaded.train_patterns == info["train_patterns"]
    assert manifest["trainable"] == info["trainable"] and manifest["params_file"] == DETECTOR_PARAMS
    assert manifest["input"]["name"] == "rgb255" and section["settings"]["scales"] == [2, 4, 8, 16, 32]
    assert all(ctx == mx.cpu(0) for p in loaded.collect_params().values() for ctx in p.list_ctx())


def test_a_checkpoint_directory_with_only_manifest_and_detector_params_loads(tmp_path):
    make_bundle(tmp_path / "b", "resnet18_v1b")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(tmp_path / "b" / "manifest.json", ckpt)
    trained = load_detector(tmp_path / "b")
    x = photo(128)
    before = trained(x)
    bias = trained.class_predictor.bias
    bias.set_data(bias.data() + mx.nd.array([0.0, 3.0]))  # "training" changed the weights
    trained.save_parameters(str(ckpt / DETECTOR_PARAMS))
    again = load_detector(ckpt)
    same = compare_detections(trained(x), again(x), 0.0, 0.0)
    assert same["passed"] and same["count_a"] > 0
    assert not compare_detections(before, again(x))["passed"]  # the checkpoint's values, not the bundle's
    assert load_detector(ckpt, per_device_batch_size=2)._batch_size == 2  # a training run's batch size
    assert not (ckpt / "backbone.params").exists()


def _one_line_error(exc_type, directory, match):
    with pytest.raises(exc_type, match=match) as err:
        load_detector(directory)
    assert isinstance(err.value, BbadaptError) and "\n" not in str(err.value)


def test_unusable_bundles_fail_with_one_line(tmp_path):
    good = tmp_path / "good"
    make_bundle(good, "resnet18_v1b")

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return d

    manifest = json.loads((good / "manifest.json").read_text())
    _one_line_error(OutputError, variant("noparams", lambda d: (d / DETECTOR_PARAMS).unlink()), "lacks its detector")
    newer = {**manifest, "schema_version": SCHEMA_VERSION + 1}
    _one_line_error(OutputError, variant("newer", lambda d: (d / "manifest.json").write_text(json.dumps(newer))),
                    "schema version")
    plain = {k: v for k, v in manifest.items() if k != "detector"}
    _one_line_error(OutputError, variant("plain", lambda d: (d / "manifest.json").write_text(json.dumps(plain))),
                    "no detector")
    cut = variant("cut", lambda d: (d / DETECTOR_PARAMS).write_bytes((good / DETECTOR_PARAMS).read_bytes()[:5000]))
    _one_line_error(WeightsError, cut, "truncated|corrupt")
    two = {**manifest, "detector": {**manifest["detector"], "classes": ["raccoon", "dog"]}}
    _one_line_error(WeightsError, variant("classes", lambda d: (d / "manifest.json").write_text(json.dumps(two))),
                    "mis-shaped")
    _one_line_error(OutputError, tmp_path / "missing", "no bbadapt output")


@pytest.mark.parametrize("classes,layout,freeze_at,match", [
    ([], "c4", 2, "no detector classes"),
    (["raccoon", "raccoon"], "c4", 2, "duplicate"),
    (["raccoon", " "], "c4", 2, "invalid class name"),
    (CLASSES, "c5", 2, "unknown detector layout"),
    (CLASSES, "c4", 6, "freeze-at"),
])
def test_bad_detector_requests_are_refused_before_any_work(classes, layout, freeze_at, match):
    with pytest.raises(OptionError, match=match):
        validate_request(zoo.model_info("resnet18_v1b"), classes, layout, freeze_at)


def test_unknown_setting_overrides_are_refused_and_known_ones_apply():
    with pytest.raises(OptionError, match="unknown detector setting 'anchor_scales'"):
        detector_for("resnet18_v1b", anchor_scales=(1, 2))
    det, info, _ = detector_for("resnet18_v1b", scales=(4, 8), rpn_test_post_nms=50)
    assert info["settings"]["scales"] == [4, 8] and det.rpn.anchor_generator._num_depth == 2 * 3
    assert det(photo(128))[0].shape[1] == 50


# ---------------------------------------------------------------- symbol export


def test_export_symbol_writes_files_that_give_the_same_detections(tmp_path):
    from mxnet.gluon import SymbolBlock

    make_bundle(tmp_path / "b", "resnet18_v1b")
    prefix = tmp_path / "deploy" / "frcnn"
    prefix.parent.mkdir()
    stale = Path(f"{prefix}-symbol.json")
    stale.write_text("an earlier export")
    with pytest.raises(OutputError, match="already exist"):
        export_symbol(tmp_path / "b", prefix)
    assert stale.read_text() == "an earlier export"
    result = export_symbol(tmp_path / "b", prefix, force=True, short=160)
    assert result["passed"] and result["count_a"] > 0
    files = sorted(p.name for p in prefix.parent.iterdir())
    assert files == ["frcnn-0000.params", "frcnn-symbol.json"]  # nothing partial left behind
    # independently of export_symbol's own check: another photo, another size
    imported = SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")
    gluon = load_detector(tmp_path / "b")
    x = mx.image.imread(str(VOC / "JPEGImages" / "raccoon-100.jpg"))
    x = mx.image.imresize(x, 192, 144).transpose((2, 0, 1)).expand_dims(0).astype("float32")
    same = compare_detections(gluon(x), imported(x))
    assert same["passed"] and same["count_a"] > 0


def test_export_symbol_over_a_directory_is_refused_and_leaves_everything_as_it_was(tmp_path):
    make_bundle(tmp_path / "b", "resnet18_v1b")
    prefix = tmp_path / "deploy" / "frcnn"
    Path(f"{prefix}-0000.params").mkdir(parents=True)  # in the way, even with --force
    Path(f"{prefix}-symbol.json").write_text("an earlier export")
    with pytest.raises(OutputError, match="not files"):
        export_symbol(tmp_path / "b", prefix, force=True, short=160)
    assert Path(f"{prefix}-symbol.json").read_text() == "an earlier export"
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["frcnn-0000.params", "frcnn-symbol.json"]


def test_a_train_patterns_regex_that_selects_frozen_parameters_is_caught():
    """The generated regex is checked against the intended set; a looser one (gluoncv-style) is refused."""
    from bbadapt.engines.gluon.build import _check_selection

    det, _, net = detector_for("resnet18_v1b", bn="global-stats", freeze_at=2)
    layout = discover_layout(net)
    _check_selection(det, net, layout, 2)  # the generated one passes
    det.train_patterns = ".*"  # would train frozen BN gamma/beta and stage 1
    with pytest.raises(ModelError, match="select"):
        _check_selection(det, net, layout, 2)
