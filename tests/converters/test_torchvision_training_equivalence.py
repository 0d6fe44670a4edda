"""Training equivalence, the torch twin of tests/engines/gluon/test_training_equivalence.py (issue 20, item 5).

(a) the export: ``resnet18_v1b`` with seeded calibrated random weights, adapted from ``imagenet`` to
    raw ``rgb255`` (the normalization folded into the network), BN ``affine``, a C4 detector bundle
    (freeze-at 2), exported by ``bbadapt export --torchvision`` (the fold undone, every BN a
    ``FrozenBatchNorm2d`` with weight s, bias t, mean 0, var 1 - eps);
(b) the reference a PyTorch user builds: ``torchvision.models.resnet18`` with ``FrozenBatchNorm2d``
    for every BN, loaded with the *original* weights (gamma, beta, running statistics, conv1 as
    pretrained), the ImageNet normalization as ``image_mean``/``image_std`` of a stock
    ``GeneralizedRCNNTransform``, under the export's own RPN and RoI heads (GluonCV's).

Same 5 raccoon photos (tests/data/raccoon_voc, one per step), the same seeds, SGD (momentum
0.9), K = 5 steps: per-step losses within 1e-4 relative, every trainable parameter within 1e-5
relative or twice the rounding floor (the reference with every backbone value moved by one
ulp), the trainable sets the same (:mod:`bbadapt.verify.torch_training`). ``--bn fused``: the
same function at step 0, then the per-channel gradient-scale ratio is stated, not judged.
Short side 128: a step takes a fraction of a second on one core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bbadapt.bundle.manifest import staged_output, write_manifest
from bbadapt.core import zoo
from bbadapt.core.rewrite import adapt
from bbadapt.core.spec import PRESETS
from bbadapt.core.weights import randomize
from bbadapt.engines.gluon.detector_bundle import add_detector
from bbadapt.verify import images

torch = pytest.importorskip("torch")  # noqa: E402 - the [torch] extra; make test installs it

from bbadapt.verify import torch_training as tt  # noqa: E402

MODEL, DEPTH = "resnet18_v1b", 18
RACCOON = Path(__file__).resolve().parents[1] / "data" / "raccoon_voc"
SHORT, MAX_SIZE, K, SEED = 128, 192, 5, 0
RECIPE = dict(lr=1e-4, momentum=0.9, wd=1e-4)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SMALL = dict(rpn_channel=256, rpn_train_pre_nms=3000, rpn_train_post_nms=300, rpn_test_pre_nms=1000,
             rpn_test_post_nms=64, num_sample=32)


@pytest.fixture(scope="module")
def source():
    """resnet18_v1b with seeded random weights, BN statistics measured on real photos (ImageNet input)."""
    net = zoo.build(MODEL)
    raw, _ = images.photos((96, 96), limit=4)
    randomize(net, SEED, PRESETS["imagenet"].normalize(raw))
    return net


def gluon_params(net) -> dict[str, np.ndarray]:
    return {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}


def export_of(source, bn: str, root: Path):
    """``bbadapt convert``'s bundle from ``source`` (imagenet -> rgb255, ``bn``), exported for torchvision."""
    from converters.writers.torchvision_detector import ExportOptions, export_detector, import_runtime

    adapted = adapt(source, "imagenet", "rgb255", bn=bn)
    info = zoo.model_info(MODEL)
    bundle = root / f"frcnn-{bn}"
    with staged_output(bundle) as stage:
        section = add_detector(stage, adapted, info, ["raccoon"], "c4", freeze_at=2, overrides=SMALL, seed=SEED)
        write_manifest(stage, {"kind": "detector", "model": MODEL, "family": info.family,
                               "source": adapted.source.to_dict(), "target": adapted.target.to_dict(),
                               "plan": adapted.plan, "detector": section})
    out = root / f"tv-{bn}"
    export_detector(bundle, out, options=ExportOptions(sizes=[(64, 80)]))
    model = import_runtime(out).load(out, "cpu")
    model.transform.min_size, model.transform.max_size = (SHORT,), MAX_SIZE
    return model


def reference_of(source, export_model, nudge: bool = False):
    body = tt.reference_body(DEPTH, tt.torchvision_state(gluon_params(source)))
    if nudge:
        tt.nudge_by_one_ulp(body, SEED)
    mean, std = IMAGENET_MEAN, IMAGENET_STD  # what every torchvision reference script writes
    return tt.reference_detector(export_model, body, mean, std)


@pytest.fixture(scope="module")
def samples():
    return tt.voc_samples(RACCOON, "train", limit=K)


@pytest.fixture(scope="module")
def exports(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("tv-train")
    return {bn: export_of(source, bn, root) for bn in ("affine", "fused")}


@pytest.fixture(scope="module")
def reference(source, exports, samples):
    return tt.sgd_steps(reference_of(source, exports["affine"]), samples, K, seed=SEED, **RECIPE)


def test_the_reference_is_torchvisions_own_resnet_with_frozen_bn(source, exports):
    from torchvision.models.resnet import BasicBlock
    from torchvision.ops import FrozenBatchNorm2d

    model = reference_of(source, exports["affine"])
    assert isinstance(model.backbone.body.layer2[0], BasicBlock)
    assert isinstance(model.roi_heads.box_head.layer4[0].bn1, FrozenBatchNorm2d)
    assert model.backbone.body.bn1.running_var.min() < 0.5  # the original statistics, not the export's 1 - eps
    assert type(model.transform).__name__ == "GeneralizedRCNNTransform"
    # the export's own transform holds the same normalization, derived from the bundle's source spec
    assert exports["affine"].transform.image_mean == pytest.approx(IMAGENET_MEAN, rel=1e-6)
    assert exports["affine"].transform.image_std == pytest.approx(IMAGENET_STD, rel=1e-6)
    export_trainable = {n for n, p in exports["affine"].named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == export_trainable
    assert not any(p.requires_grad for p in model.backbone.body.layer1.parameters())  # freeze-at 2


def test_k_sgd_steps_of_the_export_equal_torchvisions_recipe(source, exports, samples, reference, record_property):
    ref_steps, ref_params, _ = reference
    assert all(all(np.isfinite(v) for v in r.values()) for r in ref_steps)
    assert all(any(abs(r[k]) > 0 for r in ref_steps) for k in ref_steps[0])  # every loss term is exercised
    ours = tt.sgd_steps(exports["affine"], samples, K, seed=SEED, **RECIPE)
    floor = tt.sgd_steps(reference_of(source, exports["affine"], nudge=True), samples, K, seed=SEED, **RECIPE)
    result = tt.verdict(ours, reference, floor[1])
    record_property("figures", result)
    print(f"\nexport vs torchvision resnet18 + FrozenBatchNorm2d, {K} steps: losses {result['losses']:.2e}, "
          f"parameters {result['params']:.2e} ({result['worst']}), ulp floor {result['rounding_floor']:.2e}, "
          f"{result['trainable']} trainable tensors")
    assert result["trainable"] > 20
    assert result["losses"] <= tt.LOSS_RTOL, result
    assert result["params"] <= result["param_tolerance"], result


def test_the_rule_refuses_a_wrong_export(source, exports, samples, reference):
    """One stage-3 conv of the export scaled by 1.001: the rule must see it."""
    import copy

    wrong = copy.deepcopy(exports["affine"])
    with torch.no_grad():
        wrong.backbone.body.layer3[0].conv1.weight.mul_(1.001)
    floor = tt.sgd_steps(reference_of(source, exports["affine"], nudge=True), samples, K, seed=SEED, **RECIPE)
    result = tt.verdict(tt.sgd_steps(wrong, samples, K, seed=SEED, **RECIPE), reference, floor[1])
    assert not result["passed"], result


def test_fused_bn_is_a_different_optimisation_and_its_gradient_scale_is_stated(source, exports, samples, reference,
                                                                                record_property):
    ref_steps, _, ref_grads = reference
    steps, _, grads = tt.sgd_steps(exports["fused"], samples, K, seed=SEED, **RECIPE)
    first = tt.loss_difference(steps[:1], ref_steps[:1])
    assert first <= tt.LOSS_RTOL, f"fused: step 0 losses differ by {first:.2e}: not the same function"
    params = gluon_params(source)
    scales = {}
    for name in ref_grads:
        if not name.endswith(".weight") or "conv" not in name and "downsample.0" not in name:
            continue
        gluon = name.replace("roi_heads.box_head.", "").replace("backbone.body.", "")
        bn = gluon.replace("downsample.0", "downsample.1").replace("conv", "bn").rsplit(".", 1)[0]
        if f"{bn}.gamma" in params:
            scales[name] = params[f"{bn}.gamma"] / np.sqrt(params[f"{bn}.running_var"] + 1e-5)
    scale = tt.fused_gradient_scale(grads, ref_grads, scales)
    statement = tt.fused_statement(scale)
    record_property("figures", {"step0_losses": first, "gradient_scale": scale})
    print("\n" + statement)
    assert scale and scale["channels"] > 100 and scale["agree"] > 0.9, statement
