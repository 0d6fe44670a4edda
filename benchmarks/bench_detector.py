"""Is bbadapt's Faster R-CNN faster than gluoncv's own? Measured on CPU, resnet50_v1b, batch 1.

Variants, all from the same calibrated random backbone weights and the same head weights:

* ``gluoncv``: ``faster_rcnn_resnet50_v1b_custom`` (``use_global_stats`` BatchNorm), fed
  the output of gluoncv's normalizing transform (the normalization itself is not timed);
* ``bbadapt affine`` / ``bbadapt fused``: ``adapt(..., "imagenet", "rgb255", bn=...)`` +
  :func:`bbadapt.engines.gluon.build.build_detector`, fed raw 0..255 pixels.

Both are timed hybridized (``static_alloc``, as gluoncv's train script runs them), on a real
photo at short side 512: inference, and a training step (forward in training mode with the
photo's ground-truth box, backward of the summed raw outputs, which reaches every trainable
parameter; the stock regexes/freeze levels: gluoncv's own, bbadapt ``freeze_at=2``, the same
set). Runs are round robin (each round runs every variant once, rotating the order), medians
are reported. Before timing, the detections are checked to agree (same function).

    python benchmarks/bench_detector.py [--runs 5] [--short 512]

Targets (printed, not enforced): training step >= 1.1x faster than gluoncv, inference no slower.
"""

from __future__ import annotations

import argparse
import statistics
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd

from bbadapt.core import zoo
from bbadapt.core.rewrite import adapt
from bbadapt.core.spec import PRESETS
from bbadapt.core.weights import randomize
from bbadapt.engines.gluon.build import build_detector
from bbadapt.engines.gluon.detector_bundle import compare_detections
from bbadapt.verify import images

MODEL = "resnet50_v1b"
PHOTO = "raccoon-1"
VOC = Path(__file__).resolve().parents[1] / "tests" / "data" / "raccoon_voc" / "VOC2017"  # raccoon-1.xml
TRAIN_TARGET, INFER_TARGET = 1.1, 1.0
# faster_rcnn_resnet50_v1b_custom keeps FasterRCNN's constructor defaults where they differ from the voc model
CUSTOM_SETTINGS = {"scales": (8, 16, 32), "max_num_gt": 300}


def photo_and_box(short: int):
    """The packaged photo resized to ``short`` (gluoncv's resize), raw and normalized, with its box."""
    from gluoncv.data.transforms.presets.rcnn import load_test

    path = images.data_dir() / "photos" / f"{PHOTO}.jpg"
    normalized, orig = load_test(str(path), short=short, max_size=1000)
    raw = mx.nd.array(orig.transpose(2, 0, 1)[None].astype(np.float32))
    root = ET.parse(VOC / "Annotations" / f"{PHOTO}.xml").getroot()
    width = float(root.find("size/width").text)
    scale = orig.shape[1] / width
    box = [float(root.find(f"object/bndbox/{k}").text) * scale for k in ("xmin", "ymin", "xmax", "ymax")]
    return normalized, raw, mx.nd.array([[box]]), mx.nd.array([[[0.0]]])


def gluoncv_detector(source):
    from gluoncv.model_zoo import faster_rcnn_resnet50_v1b_custom

    ref = faster_rcnn_resnet50_v1b_custom(classes=["raccoon"], transfer=None, pretrained_base=False)
    ref.initialize(mx.init.Xavier())
    values = {p.name: p.data() for p in source.collect_params().values()}
    for p in ref.collect_params().values():
        if p.name in values:
            p.set_data(values[p.name])
    ref(mx.nd.zeros((1, 3, 128, 128)))
    ref.collect_params().setattr("grad_req", "null")  # gluoncv's train script does exactly this
    ref.collect_train_params().setattr("grad_req", "write")
    return ref


def copy_heads(source, target) -> None:
    src = {k: p for k, p in source._collect_params_with_prefix().items()
           if not k.startswith(("features.", "top_features."))}
    dst = target._collect_params_with_prefix()
    for key, p in src.items():
        dst[key].set_data(p.data())


def build(short: int):
    source = zoo.build(MODEL)
    calib, _ = images.photos((224, 224), limit=8)
    randomize(source, 0, PRESETS["imagenet"].normalize(calib))
    nets = {"gluoncv": gluoncv_detector(source)}
    for bn in ("affine", "fused"):
        adapted = adapt(source, "imagenet", "rgb255", bn=bn)
        det, _ = build_detector(adapted.net, adapted.graph, "gluoncv-v1b", ["raccoon"], "c4", freeze_at=2,
                                **CUSTOM_SETTINGS)
        nets[f"bbadapt {bn}"] = det
    normalized, raw, box, label = photo_and_box(short)
    inputs = {name: (normalized if name == "gluoncv" else raw) for name in nets}
    scale_heads(nets["gluoncv"], normalized)
    for name in ("bbadapt affine", "bbadapt fused"):
        copy_heads(nets["gluoncv"], nets[name])
    return nets, inputs, box, label


def scale_heads(detector, x, seed: int = 1) -> None:
    """Random heads scaled to the random backbone's (large) activations, so detections are not degenerate."""
    feat = detector.features(x)
    pooled = detector.top_features(feat).mean(axis=(2, 3))
    rms = [float(mx.nd.sqrt(mx.nd.mean(a ** 2)).asscalar()) for a in (feat, pooled)]
    gains = {"rpn.conv1.0": 1.4 / rms[0], "rpn.score": 1.0, "rpn.loc": 0.1,
             "class_predictor": 2.0 / rms[1], "box_predictor": 0.1 / rms[1]}
    rng = np.random.RandomState(seed)
    params = detector._collect_params_with_prefix()
    for layer, gain in gains.items():
        weight = params[f"{layer}.weight"]
        weight.set_data(mx.nd.array(rng.normal(0, gain / np.sqrt(np.prod(weight.shape[1:])), weight.shape)))
        params[f"{layer}.bias"].set_data(mx.nd.array(rng.normal(0, 0.1, params[f"{layer}.bias"].shape)))


def infer(net, x, _box, _label) -> None:
    out = net(x)
    mx.nd.waitall()
    return out


def train_step(net, x, box, label) -> None:
    with autograd.train_mode(), autograd.record():
        cls_pred, box_pred, _, _, _, rpn_score, rpn_box = net(x, box, label)[:7]
        loss = cls_pred.sum() + box_pred.sum() + rpn_score.sum() + rpn_box.sum()
    loss.backward()
    mx.nd.waitall()


def round_robin(nets, inputs, step, box, label, warmup: int, runs: int) -> dict[str, float]:
    names = list(nets)
    for net in nets.values():  # a fresh graph: training and inference calls differ in arguments
        net.hybridize(static_alloc=True)
    for _ in range(warmup):
        for name in names:
            step(nets[name], inputs[name], box, label)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            step(nets[name], inputs[name], box, label)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--short", type=int, default=512)
    args = parser.parse_args()
    nets, inputs, box, label = build(args.short)
    reference = infer(nets["gluoncv"], inputs["gluoncv"], box, label)
    for name in ("bbadapt affine", "bbadapt fused"):
        same = compare_detections(reference, infer(nets[name], inputs[name], box, label))
        print(f"{name}: detections vs gluoncv: {same['count_a']} vs {same['count_b']}, unmatched {same['unmatched']}, "
              f"max |score diff| {same['max_abs_score_diff']:.2e}, max |box diff| {same['max_abs_box_diff_px']:.2e} px")
    shape = tuple(inputs["gluoncv"].shape)
    print(f"\n{MODEL}, input {shape[2]}x{shape[3]}, batch 1, {args.runs} round-robin runs (median), "
          f"OMP_NUM_THREADS={__import__('os').environ.get('OMP_NUM_THREADS', 'unset')}\n")
    train = round_robin(nets, inputs, train_step, box, label, args.warmup, args.runs)
    inference = round_robin(nets, inputs, infer, box, label, args.warmup, args.runs)
    print(f"{'variant':<16}| {'train step s':>12} | {'gluoncv/this':>12} | {'inference s':>11} | {'this/gluoncv':>12}")
    print("-" * 74)
    for name in nets:
        print(f"{name:<16}| {train[name]:>12.3f} | {train['gluoncv'] / train[name]:>12.3f} | "
              f"{inference[name]:>11.3f} | {inference[name] / inference['gluoncv']:>12.3f}")
    for name in ("bbadapt affine", "bbadapt fused"):
        speedup, slowdown = train["gluoncv"] / train[name], inference[name] / inference["gluoncv"]
        print(f"{name}: training {speedup:.2f}x (target >= {TRAIN_TARGET}x: {'PASS' if speedup >= TRAIN_TARGET else 'MISS'}), "
              f"inference {slowdown:.2f}x of gluoncv's time (target <= {INFER_TARGET:.2f}: "
              f"{'PASS' if slowdown <= INFER_TARGET else 'MISS'})")


if __name__ == "__main__":
    main()
