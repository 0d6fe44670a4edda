"""`bbadapt export DIR --torchvision OUT` for detectors: a torchvision FasterRCNN proven to detect the same.

Two real bundles (random-weight resnet18_v1b, imagenet weights convention, classes raccoon and
dog): a C4 detector exported for RGB 0..1 input, and an FPN detector exported from a
checkpoint-like directory (manifest + detector.params only) for RGB 0..255 input. The check
sizes are small (an odd one and a tiny one) to keep the run short; the tiny one makes GluonCV
pad its proposals with -1 rows, which the check must drop. A BGR (Caffe) source is covered by
the arithmetic that serves it: conv1's channel permutation and the transform's mean/std, and
end to end by the resnet18_v2 body (its input fold sits in the data BN, which is undone).

The other bodies (``BODIES``: Gluon v1 and v2, GluonCV's deep stem with average-pool
shortcuts) are exported as C4 detectors at one odd size, with fewer test-time proposals
(each RoI runs stage 4), and must pass the same four-level check.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bbadapt.platform.errors import OutputError

SIZES = [(101, 135), (64, 80)]
CLASSES = ["raccoon", "dog"]


def _bundle(root: Path, layout: str, source: str | None, model: str = "resnet18_v1b",
            overrides: dict | None = None) -> Path:
    from bbadapt.pipeline import ConvertOptions, DetectorOptions, convert

    out = root / f"frcnn-{layout}"
    convert(model, out, ConvertOptions(weights="random", source=source, sizes=[(64, 64)]),
            DetectorOptions(classes=CLASSES, layout=layout, freeze_at=2, overrides=overrides))
    return out


def _export(bundle: Path, out: Path, input_range: str) -> dict:
    from converters.writers.torchvision_detector import export as export_bundle

    return export_bundle(bundle, out, sizes=SIZES, input_range=input_range)


@pytest.fixture(scope="module")
def c4(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv-c4")
    bundle = _bundle(root, "c4", source=None)
    return bundle, root / "export", _export(bundle, root / "export", "01")


@pytest.fixture(scope="module")
def fpn(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv-fpn")
    bundle = _bundle(root, "fpn", source=None)
    checkpoint = root / "checkpoint"  # what a training checkpoint holds: no backbone.params
    checkpoint.mkdir()
    for name in ("manifest.json", "detector.params"):
        shutil.copy(bundle / name, checkpoint / name)
    return checkpoint, root / "export", _export(checkpoint, root / "export", "255")


def _check(export: Path) -> dict:
    return json.loads((export / "check.json").read_text())


def _load(export: Path):
    from converters.writers.torchvision_detector import import_runtime

    return import_runtime(export).load(export, "cpu")


def _assert_four_levels_passed(check: dict, sizes: list[tuple[int, int]]) -> None:
    assert check["passed"] and [r["size"] for r in check["images"]] == [list(s) for s in sizes]
    assert check["worst_rms_ratio"] <= 1.0  # the float64 export within the one-ulp yardstick of GluonCV float64
    for image in check["images"]:
        for level in ("backbone", "rpn", "roi_heads"):
            rule = image[level]["float64"]
            assert image[level]["passed"] and rule["passed"] and rule["worst_rms_ratio"] <= 1.0
            assert all(p["float64_twin"]["within"] for p in rule["parts"].values() if p["float64_twin"])
        assert image["rpn"]["anchors_max_abs_px"] == 0.0 and image["roi_heads"]["proposals"] > 0
        found = image["detections"]
        assert found["count_a"] > 0 and found["count_a"] == found["count_b"] and found["unmatched"] == 0


@pytest.mark.parametrize("which", ["c4", "fpn"])
def test_the_export_holds_weights_config_runtime_and_a_passed_four_level_check(which, request):
    _, export, summary = request.getfixturevalue(which)
    assert sorted(p.name for p in export.iterdir()) == ["check.json", "config.json", "frcnn_runtime.py", "model.safetensors"]
    assert summary["check_passed"] and summary["layout"] == which
    check = _check(export)
    _assert_four_levels_passed(check, SIZES)
    assert check["images"][1]["detections"]["gluoncv_padding_rows_dropped"] > 0  # 64x80: fewer proposals than post_nms
    body = json.loads((export / "config.json").read_text())["backbone"]["body"]
    assert body == {"stem": {"data_bn": False, "convs": [[64, 7, 2]]}, "block": "basic", "layers": [2, 2, 2, 2],
                    "preact": False, "stride_on": "conv1", "downsample": "conv", "tail_bn": False}
    model = _load(export)  # v1b is torchvision's own resnet18, name for name
    import torchvision

    reference = torchvision.models.resnet18().state_dict()
    body_keys = {k[len("backbone.body."):] for k in model.state_dict() if k.startswith("backbone.body.")}
    assert body_keys and body_keys <= set(reference)


RESNET18_V2 = {"stem": {"data_bn": True, "convs": [[64, 7, 2]]}, "block": "basic", "layers": [2, 2, 2, 2],
               "preact": True, "stride_on": "conv1", "downsample": "conv", "tail_bn": True}
# (model, layout) -> (input spec, the body description the export must derive from the network)
BODIES = {
    ("resnet18_v1", "c4"): (None, {"stem": {"data_bn": False, "convs": [[64, 7, 2]]}, "block": "basic",
                                   "layers": [2, 2, 2, 2], "preact": False, "stride_on": "conv1", "downsample": "conv",
                                   "tail_bn": False}),
    ("resnet18_v2", "c4"): ("caffe", RESNET18_V2),
    ("resnet18_v2", "fpn"): (None, RESNET18_V2),  # the final BN + ReLU must reach the FPN's C5
    ("resnet50_v1d", "c4"): (None, {"stem": {"data_bn": False, "convs": [[32, 3, 2], [32, 3, 1], [64, 3, 1]]},
                                    "block": "bottleneck", "layers": [3, 4, 6, 3], "preact": False,
                                    "stride_on": "conv2", "downsample": "avg_conv", "tail_bn": False}),
    ("resnet50_v2", "c4"): (None, {"stem": {"data_bn": True, "convs": [[64, 7, 2]]}, "block": "bottleneck",
                                   "layers": [3, 4, 6, 3], "preact": True, "stride_on": "conv2", "downsample": "conv",
                                   "tail_bn": True}),
}
BODY_SIZES = [(101, 135)]  # odd: stride-2 convs and v1d's ceil-mode average pools meet odd maps (51x68 ... 13x17)
BODY_SETTINGS = {"rpn_test_post_nms": 64}  # C4 runs stage 4 once per proposal


@pytest.fixture(scope="module", params=list(BODIES), ids=lambda key: "-".join(key))
def body(request, tmp_path_factory):
    model, layout = request.param
    source, _ = BODIES[request.param]
    root = tmp_path_factory.mktemp(f"tv-{model}-{layout}")
    bundle = _bundle(root, layout, source=source, model=model, overrides=BODY_SETTINGS)
    from converters.writers.torchvision_detector import export as export_bundle

    return request.param, root / "export", export_bundle(bundle, root / "export", sizes=BODY_SIZES)


def test_other_resnet_bodies_export_with_their_own_description_and_pass_the_four_level_check(body):
    (model, layout), export, summary = body
    source, description = BODIES[(model, layout)]
    assert summary["check_passed"] and summary["layout"] == layout
    _assert_four_levels_passed(_check(export), BODY_SIZES)
    config = json.loads((export / "config.json").read_text())
    assert config["backbone"]["body"] == description and config["backbone"]["gluon_model"] == model
    net = _load(export)
    stem = net.backbone.body  # the IntermediateLayerGetter over the body
    assert hasattr(stem, "data_bn") == description["stem"]["data_bn"]
    stage4 = net.roi_heads.box_head.layer4 if layout == "c4" else stem.layer4  # C4: in the box head; FPN: C5
    assert hasattr(stage4, "post_bn") == description["tail_bn"]  # v2's final BN + ReLU run with stage 4
    if source == "caffe":  # BGR weights: the data BN (holding the undone input fold) reads RGB like conv1
        assert np.allclose(config["input"]["image_mean"], [123.68 / 255, 116.779 / 255, 103.939 / 255])


def test_config_records_classes_settings_input_convention_and_frozen_bn(c4, fpn):
    bundle, export, _ = c4
    config = json.loads((export / "config.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert config["classes"] == CLASSES and config["layout"] == "c4"
    assert config["gluoncv_settings"] == manifest["detector"]["settings"]
    assert config["backbone"]["freeze_at"] == 2 and config["backbone"]["trainable_layers"] == 3
    assert config["backbone"]["bn_eps"] == 1e-5 and np.float32(config["backbone"]["bn_running_var"]) + np.float32(1e-5) == 1
    assert config["input"]["range"] == "01"  # imagenet weights: torchvision's own mean/std on RGB 0..1
    assert np.allclose(config["input"]["image_mean"], [0.485, 0.456, 0.406])
    assert np.allclose(config["input"]["image_std"], [0.229, 0.224, 0.225])
    assert config["rpn"]["bbox_xform_clip"] is None and config["rpn"]["channels"] == 1024
    assert len(config["rpn"]["cell_anchors"]) == 1 and len(config["rpn"]["cell_anchors"][0]) == 15
    fpn_config = json.loads((fpn[1] / "config.json").read_text())
    assert fpn_config["input"]["range"] == "255"
    assert np.allclose(fpn_config["input"]["image_mean"], [0.485 * 255, 0.456 * 255, 0.406 * 255])
    assert fpn_config["rpn"]["bbox_xform_clip"] == 4.14 and fpn_config["rpn"]["strides"] == [4, 8, 16, 32, 64]
    assert fpn_config["provenance"]["kind"] == "detector" and fpn_config["provenance"]["detector_params_sha256"]


def _recheck(bundle: Path, model, sizes: list[tuple[int, int]]) -> dict:
    from converters.writers.torchvision_detector import load_gluon
    from converters.writers.torchvision_detector_check import CheckOptions, run_check

    return run_check(load_gluon(bundle), model, CheckOptions(sizes=sizes))


def _nudged(export: Path):
    """The export with one stage-3 conv scaled by 1.001: a model that computes something else."""
    import torch

    model = _load(export)
    with torch.no_grad():
        model.backbone.body.layer3[0].conv1.weight.mul_(1.001)
    return model


def test_levels_are_judged_against_gluoncv_in_float64_so_bn_eps_zero_is_refused_though_inside_1e_4(c4):
    from torchvision.models.detection._utils import overwrite_eps

    bundle, export, _ = c4
    model = _load(export)
    overwrite_eps(model, 0.0)  # what torchvision's detection builders do to pretrained backbones: the pitfall
    check = _recheck(bundle, model, SIZES[1:])
    image = check["images"][0]
    assert not check["passed"] and "at most" in check["summary"]
    assert image["backbone"]["max_rel"] < 1e-4  # a fixed 1e-4 would have passed the backbone ...
    assert image["backbone"]["float64"]["worst_rms_ratio"] > 10  # ... but 10x further from float64 than one-ulp moves
    assert not image["backbone"]["passed"] and not image["roi_heads"]["passed"]


def test_missing_detection_partners_are_judged_against_the_export_run_in_float64(c4):
    import torch

    from bbadapt.verify import images
    from converters.writers.torchvision_detector import load_gluon
    from converters.writers.torchvision_detector_check import CheckOptions, Float64Twin, ImageCheck, detections_opinion

    bundle, export, _ = c4
    gluon, raw = load_gluon(bundle), images.photos(SIZES[1], limit=1)[0]  # 64x80: fewer proposals, quicker
    model = _load(export)
    twin = Float64Twin(model)
    with torch.no_grad():
        run = ImageCheck(gluon, model, raw, CheckOptions(), twin)
        ours, _ = run.gluon_detections()
        same = detections_opinion(ours, run.torch_detections(model, run.x_tv),
                                  run.torch_detections(twin.model(), run.x_tv.double()))
    assert same["passed"] and same["gluoncv_vs_export_fp64"]["count_a"] > 0
    assert same["export_fp32_vs_fp64"]["max_abs_box_diff_px"] > 0  # float32 rounding, measured, not assumed zero
    check = _recheck(bundle, _nudged(export), SIZES[1:])  # the same judge, end to end, on a model that differs
    other = check["images"][0]["detections"]["float64"]
    assert not other["passed"] and other["gluoncv_vs_export_fp64"]["unmatched"] > 0
    assert not check["passed"] and "detections judged against the float64 export: 64x80 failed" in check["summary"]


def test_the_yardstick_moves_the_float64_twin_in_place_by_one_ulp_and_gives_it_back_bit_for_bit(c4):
    """One float64 copy serves the twin and both yardstick draws: each draw moves every number by exactly one
    float32 ulp in its own seeded directions (the numbers a fresh copy moved would get), and the twin is
    restored exactly, since the float64 opinion on detections runs it afterwards."""
    import copy

    import torch

    from bbadapt.verify.yardstick import SEED, nudge, ulp
    from converters.writers.torchvision_detector_check import Float64Twin

    _, export, _ = c4
    model = _load(export)
    twin = Float64Twin(model)
    clean = {n: t.detach().clone() for n, t in twin.model().state_dict().items()}
    draws = [{n: t.detach().clone() for n, t in moved.state_dict().items()} for moved in twin.nudged()]
    assert len(draws) == 2
    fresh = copy.deepcopy(model).double()  # what a fresh copy moved in the same order gets, for the first draw
    rng = np.random.RandomState(SEED)
    for name, tensor in sorted([*fresh.named_parameters(), *fresh.named_buffers()], key=lambda t: t[0]):
        if tensor.is_floating_point():
            expected = nudge(tensor.detach().numpy(), rng)
            assert np.array_equal(draws[0][name].numpy(), expected), name
    weight = "backbone.body.layer3.0.conv1.weight"
    step = np.abs(draws[1][weight].numpy() - clean[weight].numpy())
    assert np.array_equal(step, ulp(clean[weight].numpy())) and not torch.equal(draws[0][weight], draws[1][weight])
    after = twin.model().state_dict()
    assert all(torch.equal(after[n], clean[n]) for n in clean)  # given back, bit for bit
    assert all(torch.equal(after[n], t.double()) for n, t in model.state_dict().items() if t.is_floating_point())


def test_the_float64_opinion_runs_its_box_head_in_chunks_of_rois_and_detects_the_same(c4):
    """The float64 full forward feeds its box head ROI_CHUNK RoIs at a time (memory), which computes each RoI alone:
    the same detections up to float64 summation order, and the model is given back unchanged."""
    import torch

    from bbadapt.verify import images
    from converters.writers.torchvision_detector_check import ROI_CHUNK, Float64Twin, ImageCheck, roi_chunked

    _, export, _ = c4
    model = _load(export)
    twin = Float64Twin(model).model()
    x = torch.from_numpy(images.photos(SIZES[0], limit=1)[0][0] / 255.0).double()
    with torch.no_grad():
        whole = ImageCheck.torch_detections(twin, x)
        assert len(twin.rpn(*_transformed_for(twin, x))[0][0]) > 2 * ROI_CHUNK  # several chunks
        head = twin.roi_heads.box_head
        with roi_chunked(twin) as chunked:
            parts = ImageCheck.torch_detections(chunked, x)
        assert twin.roi_heads.box_head is head
    assert whole[1].size > 0 and all(a.shape == b.shape for a, b in zip(whole, parts, strict=True))
    assert all(np.allclose(a, b, rtol=1e-12, atol=1e-9) for a, b in zip(whole, parts, strict=True))


def _transformed_for(model, x):
    images = model.transform([x])[0]
    return images, model.backbone(images.tensors)


def test_a_check_size_too_small_for_the_detector_is_one_line_and_nothing_is_written(c4, tmp_path):
    from bbadapt.platform.errors import OptionError
    from converters.writers.torchvision_detector import export as export_bundle

    bundle, _, _ = c4
    with pytest.raises(OptionError, match=r"^GluonCV's detector cannot run at the check size 48x64 \(180 anchors, fewer "
                                          r"than the 300 proposals its RPN keeps\); choose a larger size$"):  # 3x4 x 15
        export_bundle(bundle, tmp_path / "tv", sizes=[(48, 64)])
    assert list(tmp_path.iterdir()) == []


def test_a_check_that_would_not_fit_in_memory_is_refused_in_one_line_before_anything_is_written(c4, tmp_path):
    """Estimated from the detector's graphs before any image is allocated, as convert's check is (verify/budget.py):
    through the API at sizes far beyond memory, and through the CLI at the default sizes on a machine that has
    256 MB left (available_bytes patched in the CLI's process, the one thing that differs)."""
    import subprocess

    from bbadapt.platform.errors import ResourceError
    from converters.writers.torchvision_detector import export as export_bundle
    from converters.writers.torchvision_detector import load_gluon
    from converters.writers.torchvision_detector_check import check_bytes, default_sizes
    from tests.cli.test_cli_errors import assert_refused

    bundle, _, _ = c4
    with pytest.raises(ResourceError, match=r"^the torchvision export's check at 100000x100000 needs about [0-9.]+ GB "
                                            r"of memory and [0-9.]+ GB is available; choose smaller sizes"):
        export_bundle(bundle, tmp_path / "tv", sizes=[(100000, 100000)])
    assert list(tmp_path.iterdir()) == []
    gluon = load_gluon(bundle)
    small, big = check_bytes(gluon, [(64, 80)]), check_bytes(gluon, default_sizes(gluon.settings))
    assert 2**20 < small < big < check_bytes(gluon, [(1000, 1000)])  # grows with the largest image
    cli = ("import sys\nimport bbadapt.verify.budget as budget\nbudget.available_bytes = lambda: 256 * 2**20\n"
           "from bbadapt.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "tv"
    result = subprocess.run([sys.executable, "-c", cli, "export", str(bundle), "--torchvision", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    line = assert_refused(result, 1, tmp_path=tmp_path, out=out, mentions=("needs about", "0.2 GB is available"))
    h, w = max(default_sizes(gluon.settings), key=lambda size: size[0] * size[1])  # the detector's normal size
    assert f"torchvision export's check at {h}x{w} needs about" in line


def test_a_body_the_description_does_not_build_is_refused_and_nothing_is_written(tmp_path):
    from bbadapt.platform.errors import ModelError

    bundle = _bundle(tmp_path, "c4", source=None, model="resnet18_v1b_0.89")  # pruned: its own channel counts
    with pytest.raises(ModelError, match=r"does not take its tensors \(a pruned variant\?\): Error\(s\) in loading state_dict"):
        _export(bundle, tmp_path / "export", "01")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frcnn-c4"]


def test_bgr_weights_get_conv1_channels_reversed_and_the_caffe_mean_in_rgb_order():
    from bbadapt.core.spec import PRESETS
    from converters.writers.torchvision_detector import image_normalization, rgb_first_conv

    caffe = PRESETS["caffe"]  # x = raw[B, G, R] - (103.939, 116.779, 123.68)
    weight = np.random.RandomState(0).normal(size=(8, 3, 7, 7))
    rgb = rgb_first_conv(weight, caffe)
    assert np.array_equal(rgb[:, 0], weight[:, 2]) and np.array_equal(rgb[:, 2], weight[:, 0])
    mean, std = image_normalization(caffe, "01")
    assert np.allclose(mean, [123.68 / 255, 116.779 / 255, 103.939 / 255]) and np.allclose(std, [1 / 255] * 3)
    # the composition is the source convention: conv1(normalize(rgb01)) == conv1_bgr(caffe(raw))
    raw = np.random.RandomState(1).uniform(0, 255, size=(1, 3, 4, 4))
    torch_side = (raw[0] / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    source_side = caffe.normalize(raw, dtype="float64")[0]
    assert np.allclose(np.einsum("ochw,chw->o", rgb[:, :, :4, :4], torch_side),
                       np.einsum("ochw,chw->o", weight[:, :, :4, :4], source_side))
    assert image_normalization(caffe, "255")[0] == [123.68, 116.779, 103.939]


def test_the_runtime_loads_and_detects_with_torch_alone(fpn, tmp_path):
    _, export, _ = fpn
    script = (
        "import sys\n"
        "for banned in ('mxnet', 'gluoncv', 'bbadapt', 'converters'): sys.modules[banned] = None\n"
        f"sys.path.insert(0, {str(export)!r})\n"
        "import torch, frcnn_runtime\n"
        f"model = frcnn_runtime.load({str(export)!r}, 'cpu')\n"
        "torch.manual_seed(0)\n"
        "out = model([torch.rand(3, 96, 128) * 255])[0]\n"
        "print(type(model).__mro__[1].__name__, len(out['boxes']), sorted(set(out['labels'].tolist())) <= [1, 2])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    name, count, labels_ok = result.stdout.split()
    assert name == "FasterRCNN" and int(count) > 0 and labels_ok == "True"


def test_three_sgd_steps_give_finite_falling_loss(c4):
    import torch

    from bbadapt.verify import images

    _, export, _ = c4
    model = _load(export)
    model.train()
    raw, _ = images.photos((128, 160), limit=1)
    image = torch.from_numpy((raw[0] / 255).astype(np.float32))
    target = {"boxes": torch.tensor([[20.0, 16.0, 120.0, 110.0]]), "labels": torch.tensor([1])}
    model.transform.min_size, model.transform.max_size = (128,), 1000  # keep the photo's size
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.backbone.body.layer1.parameters())  # freeze_at 2: stem + stage 1
    assert all(p.requires_grad for p in model.backbone.body.layer2.parameters())
    optimizer = torch.optim.SGD(trainable, lr=1e-4, momentum=0.9)  # random backbones give activations ~100: small steps
    losses = []
    for _ in range(3):
        torch.manual_seed(0)  # the same anchor and RoI samples every step: the loss is one function
        loss = sum(model([image], [target]).values())
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 10.0)
        optimizer.step()
    assert all(math.isfinite(v) for v in losses)
    assert losses[2] < losses[1] < losses[0], losses


def test_an_existing_output_is_kept_without_force_and_nothing_partial_is_left(c4, tmp_path):
    from converters.writers.torchvision_detector import export as export_bundle

    bundle, _, _ = c4
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputError, match="already exists"):
        export_bundle(bundle, out, sizes=SIZES)
    with pytest.raises(OutputError, match="not a torchvision detector export"):
        export_bundle(bundle, out, force=True, sizes=SIZES)
    assert (out / "mine.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_the_cli_sends_a_detector_to_the_detector_writer_and_refuses_an_unknown_input_range(c4, tmp_path):
    from tests.cli.test_cli_errors import assert_refused, run_cli

    bundle, _, _ = c4
    out = tmp_path / "tv"
    result = run_cli("export", bundle, "--torchvision", out, "--torchvision-input", "0..1", cwd=tmp_path,
                     mxnet_home=tmp_path / "home")
    assert_refused(result, 2, tmp_path=tmp_path, out=out, mentions=("input range",))
