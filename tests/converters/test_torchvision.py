"""torchvision ResNet state dicts in (safetensors without torch, .pth with it) and out again.

Inputs are torchvision-layout files (names and tensors as ``torchvision.models.resnetN()
.state_dict()`` has them) filled from calibrated random weights. Judges: the gluon net the
weights came from (round trips, everywhere), torch's own ops running torchvision's
architecture (where torch is installed) and torchvision itself (where it is installed).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import bbadapt
from bbadapt.core.spec import PRESETS
from bbadapt.core.weights import structural_params
from bbadapt.platform.errors import ModelError, OutputError, WeightsError
from bbadapt.verify import images
from converters import readers
from converters.readers import safetensors_io
from converters.readers import torchvision as tv
from converters.writers import torchvision as tv_out
from tests.conftest import calibrated

SIZES = [(64, 64), (45, 53)]


def torchvision_state(net) -> dict[str, np.ndarray]:
    """A gluoncv v1b net's weights under torchvision's state_dict names (BN gamma/beta are weight/bias)."""
    state = {}
    for key, param in structural_params(net).items():
        owner, _, leaf = key.rpartition(".")
        state[f"{owner}.{ {'gamma': 'weight', 'beta': 'bias'}.get(leaf, leaf)}"] = param.data().asnumpy()
        if leaf == "running_var":
            state[f"{owner}.num_batches_tracked"] = np.array(100, np.int64)
    return state


def photos(size=(64, 64), n=2) -> np.ndarray:
    return images.photos(size, limit=n)[0]


def max_rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def gluon_out(net, x) -> np.ndarray:
    import mxnet as mx

    return net(mx.nd.array(x)).asnumpy()


@pytest.fixture(scope="module")
def r18():
    return calibrated("resnet18_v1b")


@pytest.fixture(scope="module")
def r18_file(r18, tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "resnet50-looking-name.safetensors"  # the name must not matter
    safetensors_io.save(path, torchvision_state(r18), {"format": "pt"})
    return path


def test_a_torchvision_safetensors_file_becomes_the_same_gluoncv_v1b_net(r18, r18_file):
    assert readers.detect(r18_file).name == "torchvision"
    c = readers.read(r18_file)
    assert c.arch == {"zoo": "resnet18_v1b"} and c.source_spec == "imagenet"
    assert c.provenance["layout"] == {"depth": 18, "bottleneck": False, "blocks": [2, 2, 2, 2]}
    assert c.provenance["ignored"] == {"num_batches_tracked": 20} and c.provenance["container"] == "safetensors"
    x = PRESETS["imagenet"].normalize(photos())
    np.testing.assert_array_equal(gluon_out(c.net, x), gluon_out(r18, x))  # same kernels, same weights: bit-exact


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_the_depth_is_read_from_blocks_per_stage_and_block_kind(depth):
    names = set(tv.expected_shapes(depth))
    assert tv.layout(names)[0] == depth
    assert len(tv.conv_bn_pairs(depth)) == {18: 20, 34: 36, 50: 53, 101: 104, 152: 155}[depth]


def test_converted_weights_adapt_and_check_like_zoo_weights(r18_file):
    c = readers.read(r18_file)
    adapted = bbadapt.adapt(c.net, c.source_spec, "rgb255")
    report = bbadapt.check(c.net, c.source_spec, adapted, options=bbadapt.CheckOptions(sizes=SIZES, n_photos=1))
    assert report["passed"] and report["worst_max_rel"] < 1e-5


@pytest.fixture(scope="module")
def bundles(r18, tmp_path_factory):
    """Bundles of the same weights in three frozen forms (fused, global-stats, approximate conv fold)."""
    root = tmp_path_factory.mktemp("bundles")
    params = root / "r18.params"
    r18.save_parameters(str(params))
    made = {}
    for name, fold, bn in (("fused", "bn", "fused"), ("global", "bn", "global-stats"), ("convfold", "conv", "affine")):
        report, _ = bbadapt.convert("resnet18_v1b", root / name, bbadapt.ConvertOptions(weights=str(params), fold=fold, bn=bn, sizes=[(64, 64)]))
        assert report["passed"]
        made[name] = root / name
    return made


@pytest.mark.parametrize("form", ["fused", "global", "convfold"])
def test_export_then_reimport_is_the_original_function_for_source_spec_input(r18, bundles, form, tmp_path):
    out = tmp_path / "r18.safetensors"
    summary = tv_out.export_bundle(bundles[form], out, sizes=SIZES)
    assert summary["input_spec"] == "imagenet" and summary["check"]["passed"] and summary["tensors"] == 122
    tensors, metadata = safetensors_io.load(out)
    assert metadata["bbadapt.input_spec"] == "imagenet" and metadata["format"] == "pt"
    assert set(tensors) == set(tv.expected_shapes(18)) and tensors["bn1.num_batches_tracked"].dtype == np.int64
    for key in (k for k in tensors if k.endswith("running_var")):
        assert np.all(tensors[key].astype(np.float32) + np.float32(1e-5) == np.float32(1))
    again = readers.read(out)
    x = PRESETS["imagenet"].normalize(photos(SIZES[1]))
    assert max_rel(gluon_out(again.net, x), gluon_out(r18, x).astype(np.float64)) < 1e-5


def test_export_refuses_what_torchvision_cannot_hold_and_writes_nothing(bundles, tmp_path):
    v1 = tmp_path / "v1"
    bbadapt.convert("resnet18_v1", v1, bbadapt.ConvertOptions(weights="random", sizes=[(64, 64)]))
    with pytest.raises(ModelError, match="resnet18_v1 is not torchvision-compatible"):
        tv_out.export_bundle(v1, tmp_path / "x.safetensors")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"mine")
    with pytest.raises(OutputError, match="already exists"):
        tv_out.export_bundle(bundles["fused"], existing)
    assert existing.read_bytes() == b"mine"
    with pytest.raises(OutputError, match=r"\.safetensors"):
        tv_out.export_bundle(bundles["fused"], tmp_path / "x.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.safetensors", "v1"]


def test_a_bundle_whose_input_affine_was_tampered_with_is_not_exported(bundles, tmp_path):
    import shutil

    import mxnet as mx

    copy = tmp_path / "b"
    shutil.copytree(bundles["global"], copy)
    arrays = mx.nd.load(str(copy / "backbone.params"))
    key = "conv1.0.shift"  # the FrozenAffine inserted before conv1 (structural name)
    assert key in arrays
    arrays[key] += 1.0
    mx.nd.save(str(copy / "backbone.params"), arrays)
    with pytest.raises(ModelError, match="input affine does not match"):
        tv_out.export_bundle(copy, tmp_path / "x.safetensors")


# ------------------------------------------------------------------ bad input


def _write(tmp_path, state, name="bad.safetensors"):
    path = tmp_path / name
    path.write_bytes(safetensors_io.dumps(state))
    return path


def test_missing_and_extra_tensors_are_named(r18, tmp_path):
    state = torchvision_state(r18)
    del state["layer2.0.downsample.1.running_var"]
    state["layer2.0.conv9.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(WeightsError) as err:
        readers.read(_write(tmp_path, state))
    msg = str(err.value)
    assert "layer2.0.conv9.weight" in msg and "layer2.0.downsample.1.running_var" in msg and "\n" not in msg


def test_nan_is_refused(r18, tmp_path):
    for change, message in ((lambda s: s["bn1.running_var"].__setitem__(3, np.nan), "NaN/Inf"),):
        state = torchvision_state(r18)
        change(state)
        with pytest.raises(WeightsError, match=message):
            readers.read(_write(tmp_path, state))


def test_arch_must_agree_with_the_file_and_other_formats_are_not_claimed(r18_file, tmp_path):
    with pytest.raises(ModelError, match="contradicts the file.*resnet18"):
        readers.read(r18_file, arch="resnet50_v1b")
    assert readers.read(r18_file, arch="resnet18").arch == {"zoo": "resnet18_v1b"}
    with pytest.raises(WeightsError, match="does not look like detectron"):
        readers.read(r18_file, fmt="detectron")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(r18_file.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="truncated"):
        readers.read(cut, fmt="torchvision")


def test_a_resnet_that_is_not_one_of_torchvisions_is_refused_with_the_known_layouts(r18, tmp_path):
    state = {k: v for k, v in torchvision_state(r18).items() if not k.startswith("layer4.1.")}
    with pytest.raises(WeightsError, match=r"\(2, 2, 2, 1\) basic blocks.*resnet18: \(2, 2, 2, 2\)"):
        readers.read(_write(tmp_path, state))


def test_pth_without_torch_is_refused_with_a_pointer_to_safetensors(tmp_path, monkeypatch):
    path = tmp_path / "r.pth"
    path.write_bytes(tv.TORCH_LEGACY_MAGIC + b"rest")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    assert readers.detect(path).name == "torchvision"
    with pytest.raises(WeightsError, match=r"needs torch.*\.safetensors"):
        readers.read(path)


# ------------------------------------------------------------------ against torch's own ops


@pytest.fixture(scope="module")
def torch():
    from bbadapt.core.zoo import import_gluoncv

    import_gluoncv()  # gluoncv must be imported before torch >= 2 (see zoo.import_gluoncv)
    return pytest.importorskip("torch")


@pytest.mark.parametrize("zipped", [True, False])
def test_pth_files_read_through_torch_load_compute_what_torch_computes(r18, torch, tmp_path, zipped):
    from tests import torch_resnet

    state = {k: torch.from_numpy(v) for k, v in torchvision_state(r18).items()}
    path = tmp_path / "r18.pth"
    torch.save(state, str(path), _use_new_zipfile_serialization=zipped)
    assert readers.detect(path).name == "torchvision"
    c = readers.read(path)
    assert c.provenance["container"] == ("torch-zip" if zipped else "torch-legacy-pickle")
    x = PRESETS["imagenet"].normalize(photos(SIZES[1]))
    want = torch_resnet.forward(state, x).astype(np.float64)
    assert max_rel(gluon_out(c.net, x), want) < 1e-5


def test_an_exported_pth_loads_in_torch_and_computes_the_bundle_function(bundles, torch, tmp_path):
    from tests import torch_resnet

    out = tmp_path / "r18.pth"
    summary = tv_out.export_bundle(bundles["fused"], out, sizes=SIZES)
    assert summary["container"] == "pth"
    state = torch.load(str(out), weights_only=True)
    assert set(state) == set(tv.expected_shapes(18))
    raw = photos(SIZES[1])
    bundle_net = bbadapt.load_backbone(bundles["fused"])
    want = gluon_out(bundle_net, raw).astype(np.float64)  # the bundle takes rgb255
    assert max_rel(torch_resnet.forward(state, PRESETS["imagenet"].normalize(raw)), want) < 1e-5


def test_a_corrupt_pth_is_one_line(r18, torch, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save({k: torch.from_numpy(v) for k, v in torchvision_state(r18).items()}, str(path))
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cannot read .*weights_only") as err:
        readers.read(cut, fmt="torchvision")
    assert "\n" not in str(err.value)


def test_torchvisions_own_resnet50_agrees_both_ways(torch, tmp_path):
    """Runs only where torchvision is installed (not in CI: see docs/formats.md)."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet50().eval()
    with torch.no_grad():  # realistic BN statistics: random but not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    path = tmp_path / "resnet50.pth"
    torch.save(model.state_dict(), str(path))
    c = readers.read(path)
    assert c.arch == {"zoo": "resnet50_v1b"}
    x = PRESETS["imagenet"].normalize(photos((96, 96)))
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy().astype(np.float64)
    assert max_rel(gluon_out(c.net, x), want) < 1e-5
    bundle = tmp_path / "b"
    c.net.save_parameters(str(tmp_path / "w.params"))
    bbadapt.convert("resnet50_v1b", bundle, bbadapt.ConvertOptions(weights=str(tmp_path / "w.params"), sizes=[(64, 64)]))
    tv_out.export_bundle(bundle, tmp_path / "out.safetensors", sizes=[(64, 64)])
    from safetensors.torch import load_file

    fresh = models.resnet50().eval()
    fresh.load_state_dict(load_file(str(tmp_path / "out.safetensors")), strict=True)
    with torch.no_grad():
        got = fresh(torch.from_numpy(x)).numpy()
    assert max_rel(got, want) < 1e-5
    print(json.dumps({"torchvision_resnet50_in_max_rel": max_rel(gluon_out(c.net, x), want),
                      "torchvision_resnet50_out_max_rel": max_rel(got, want)}))
