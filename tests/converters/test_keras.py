"""Keras applications ResNets in, as Gluon nets that compute what the Keras graph computes.

Files are written with h5py in each layout Keras writes (legacy weights, legacy full model,
Keras 3 ``.weights.h5`` with and without stored layer names, ``.keras`` archives), filled
with random weights whose BN statistics are measured on real photos. The converted net is
compared with an independent numpy forward of the Keras graph (tests/keras_reference.py).
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import h5py
import mxnet as mx
import numpy as np
import pytest

import bbadapt
from bbadapt.core.rewrite import clone
from bbadapt.core.spec import PRESETS
from bbadapt.platform.errors import ModelError, WeightsError
from bbadapt.verify import images
from converters import readers
from converters.readers import keras as kconv
from tests import keras_reference as kr
from tests.conftest import SMALL_SIZES

R50 = kr.BLOCKS[50]
SIZE = (64, 64)
SPEC = {1: "caffe", 2: "tf"}


@functools.cache
def photos_nhwc(version: int) -> np.ndarray:
    raw, _ = images.photos(SIZE, limit=4)
    return PRESETS[SPEC[version]].normalize(raw).transpose(0, 2, 3, 1)


@functools.cache
def keras_weights(version: int, classes: int = 10, eps: float = 1.001e-5) -> dict:
    """ResNet50 (v1) or ResNet50V2 Keras weights, BN statistics calibrated on photos (do not mutate)."""
    return kr.calibrated_weights(version, R50, classes, photos_nhwc(version), seed=version, eps=eps)


def reference(version: int, weights: dict, eps: float = 1.001e-5) -> np.ndarray:
    return kr.Forward(weights, eps)(photos_nhwc(version), version, R50)


@functools.cache
def default_reference(version: int) -> np.ndarray:
    return reference(version, keras_weights(version))


def gluon_out(net, version: int, dtype: str = "float32") -> np.ndarray:
    return net(mx.nd.array(photos_nhwc(version).transpose(0, 3, 1, 2), dtype=dtype)).asnumpy()


def max_rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def write(path, layout: str, version: int, weights: dict, classes: int = 10, **kw) -> str:
    specs = [s for s in kr.layer_specs(version, R50, classes) if s.name in weights]  # tests may drop layers
    if layout == "legacy-weights":
        kr.write_legacy(path, specs, weights, **kw)
    elif layout == "legacy-full-model":  # Keras 3's legacy writer: no ':0', layer_names split in chunks
        kr.write_legacy(path, specs, weights, full_model=True, suffix="", keras_version="3.15.1", chunks=3, **kw)
    elif layout == "keras3-names":
        kr.write_keras3(path, specs, weights, names=True)
    elif layout == "keras3-order":
        kr.write_keras3(path, specs, weights, names=False)
    return str(path)


@functools.cache
def converted(version: int, tmp_dir: str):
    """One converted net per version, shared by the tests that do not look at the file layout."""
    return readers.read(write(f"{tmp_dir}/v{version}.h5", "legacy-weights", version, keras_weights(version)))


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("keras"))


@pytest.mark.parametrize("version, layout", [(1, "legacy-weights"), (1, "keras3-order"), (2, "legacy-full-model"),
                                             (2, "keras3-names"), (2, "keras3-order")])
def test_every_keras_layout_converts_to_the_function_of_the_keras_graph(tmp_path, version, layout):
    c = readers.read(write(tmp_path / "w.h5", layout, version, keras_weights(version)))
    assert c.provenance["keras_model"] == ("ResNet50" if version == 1 else "ResNet50V2")
    assert c.source_spec == SPEC[version] and c.arch["kwargs"] == {"blocks": R50, "classes": 10, "eps": 1.001e-5}
    assert max_rel(gluon_out(c.net, version), default_reference(version)) < 2e-4  # fp32 net vs float64 Keras graph


def float64_out(version: int, tmp_dir) -> np.ndarray:
    net64 = clone(converted(version, tmp_dir).net, trainable=False)
    net64.cast("float64")
    return gluon_out(net64, version, "float64")


def test_in_float64_the_v2_net_is_the_keras_graph(tmp_dir):
    assert max_rel(float64_out(2, tmp_dir), default_reference(2)) < 1e-10


def test_in_float64_v1_differs_only_by_the_fp32_rounding_of_folded_bn_means(tmp_dir):
    """Keras biases on convs that have none in gluon v1 go into the BN mean, stored in float32."""
    out = float64_out(1, tmp_dir)
    assert max_rel(out, default_reference(1)) < 1e-5
    folded = {k: [t.copy() for t in v] for k, v in keras_weights(1).items()}
    for conv in [n for n in folded if n == "conv1_conv" or n.endswith(("_0_conv", "_2_conv"))]:
        bn = conv[:-4] + "bn"
        folded[bn][2] = (folded[bn][2].astype(np.float64) - folded[conv][1]).astype(np.float32)
        folded[conv][1] = np.zeros_like(folded[conv][1])
    assert max_rel(out, reference(1, folded)) < 1e-10


def test_caffe_style_resnet50_of_keras_2_2_4_keeps_keras_2s_default_bn_eps(tmp_path):
    """res2a_branch2a / bn_conv1 / fc1000 names: that ResNet50 never set eps, so Keras 2's 1e-3 applies."""
    weights = keras_weights(1)
    c = readers.read(write(tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels.h5", "legacy-full-model", 1,
                              weights, caffe=True))
    assert c.provenance["naming"].startswith("Caffe-style") and c.provenance["bn_eps"] == 1e-3
    assert c.arch["kwargs"]["eps"] == 1e-3
    assert max_rel(gluon_out(c.net, 1), reference(1, weights, eps=1e-3)) < 2e-4
    assert max_rel(gluon_out(c.net, 1), default_reference(1)) > 1e-3  # the eps is not cosmetic


@pytest.mark.parametrize("version", [1, 2])
def test_a_file_without_the_classifier_gives_the_pooled_features(tmp_path, version):
    weights = {k: v for k, v in keras_weights(version).items() if k != "predictions"}
    c = readers.read(write(tmp_path / "notop.h5", "keras3-names", version, weights, classes=0))
    assert c.arch["kwargs"]["classes"] == 0 and c.provenance["include_top"] is False
    out = gluon_out(c.net, version)
    assert out.shape == (4, 2048) and max_rel(out, reference(version, weights)) < 2e-4


def test_a_keras_archive_holds_the_same_weights_as_its_weights_file(tmp_path):
    h5 = write(tmp_path / "model.weights.h5", "keras3-names", 2, keras_weights(2))
    archive = tmp_path / "resnet50v2.keras"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("metadata.json", '{"keras_version": "3.15.1"}')
        z.write(h5, kconv.KERAS_ZIP_MEMBER)
    a, b = readers.read(archive), readers.read(h5)
    assert a.provenance["keras_version"] == "3.15.1" and a.provenance["path"].endswith(".keras")
    pa, pb = (n._collect_params_with_prefix() for n in (a.net, b.net))
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k].data().asnumpy(), pb[k].data().asnumpy()) for k in pa)


def test_version_and_depth_come_from_the_content_not_the_file_name(tmp_path):
    c = readers.read(write(tmp_path / "resnet101_weights_tf_dim_ordering_tf_kernels.h5", "legacy-weights", 2,
                              keras_weights(2)))
    assert c.provenance["keras_model"] == "ResNet50V2"
    for depth in (101, 152):
        for version in (1, 2):
            names = [s.name for s in kr.layer_specs(version, kr.BLOCKS[depth], 1000)]
            _, arch = kconv.parse_layers({n: [np.zeros(1, np.float32)] for n in names}, "x")
            assert (arch.keras_name, arch.blocks) == (f"ResNet{depth}" + ("V2" if version == 2 else ""), kr.BLOCKS[depth])
            assert kconv.keras3_layer_order(version, kr.BLOCKS[depth], True) == names  # the order-only mapping


def test_arch_argument_is_checked_against_the_content(tmp_dir):
    path = f"{tmp_dir}/v2.h5"
    converted(2, tmp_dir)
    assert readers.read(path, arch="ResNet50V2").provenance["arch_arg"] == "ResNet50V2"
    for spelling in ("resnet50_v2", "keras-resnet50v2", "RESNET50V2"):
        assert kconv._arch_arg(spelling) == (50, 2)
    assert kconv._arch_arg("resnet152") == (152, 1)
    for wrong in ("ResNet50", "resnet101v2"):
        with pytest.raises(ModelError, match="holds ResNet50V2 weights.*candidates: ResNet50, ResNet101"):
            readers.read(path, arch=wrong)
    with pytest.raises(ModelError, match="not a Keras ResNet"):
        readers.read(path, arch="vgg16")


@pytest.mark.parametrize("version", [1, 2])
def test_rebuild_makes_the_same_architecture(tmp_dir, version):
    c = converted(version, tmp_dir)
    again = readers.rebuild(c.arch)
    shapes = {k: p.shape for k, p in c.net._collect_params_with_prefix().items()}
    assert shapes == {k: p.shape for k, p in again._collect_params_with_prefix().items()}
    assert repr(again) == repr(c.net)  # eps included


@pytest.mark.parametrize("kwargs", [{"blocks": [3, 4, 6]}, {"blocks": [3, 4, 6, 3], "classes": -1},
                                    {"blocks": [3, 4, 6, 3], "eps": 0}, {"blocks": "many"}])
@pytest.mark.parametrize("builder", ["keras_resnet_v1", "keras_resnet_v2"])
def test_a_damaged_arch_record_is_one_line(builder, kwargs):
    with pytest.raises(ModelError, match="Keras ResNet"):
        readers.rebuild({"builder": f"keras-resnet-{builder.rsplit('_', 1)[1]}", "kwargs": kwargs})


@pytest.mark.parametrize("version", [1, 2])
def test_converted_nets_adapt_to_rgb255_and_pass_the_check(tmp_dir, version):
    c = converted(version, tmp_dir)
    adapted = bbadapt.adapt(c.net, c.source_spec, "rgb255")
    report = bbadapt.check(c.net, c.source_spec, adapted, options=bbadapt.CheckOptions(sizes=SMALL_SIZES, n_photos=1))
    assert report["passed"], report["reasons"]
    assert [p["name"] for p in report["probes"]] == ["stem", "stage1", "stage2", "stage3", "stage4", "output"]


def test_v2_net_stays_symbol_traceable_and_computes_the_keras_graph_hybridized(tmp_dir):
    net = clone(converted(2, tmp_dir).net)
    assert net(mx.sym.var("data")).list_outputs()
    net.hybridize(static_alloc=True)  # the explicit zero pad survives; MKLDNN may fuse ops: fp32 rounding
    assert max_rel(gluon_out(net, 2), default_reference(2)) < 2e-4


def test_the_stem_max_pool_sees_zero_padding_not_mxnet_pooling_pad(tmp_dir):
    """Where the V2 stem's conv output is negative at the border, zero padding wins the max."""
    net = converted(2, tmp_dir).net
    stem = net.features[0](mx.nd.array(photos_nhwc(2).transpose(0, 3, 1, 2)))
    ours = net.features[1](stem).asnumpy()
    mxnet_pad = mx.nd.Pooling(stem, kernel=(3, 3), stride=(2, 2), pad=(1, 1), pool_type="max").asnumpy()
    assert np.all(ours >= mxnet_pad) and (ours != mxnet_pad).any()
    assert np.array_equal(ours[:, :, 1:-1, 1:-1], mxnet_pad[:, :, 1:-1, 1:-1])


# -- bad input: one line, a bbadapt error ---------------------------------------------------

def dummy_weights(version: int, classes: int = 10, dtype=np.float32) -> dict:
    """Right names and ranks, tiny shapes: enough for every check that runs before the values."""
    return {s.name: [np.zeros((1,) * len(shape), dtype) for shape in s.shapes]
            for s in kr.layer_specs(version, R50, classes)}


def one_line_error(exc_type, path, **kw) -> str:
    with pytest.raises(exc_type) as info:
        readers.read(path, **kw)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_truncated_file_is_refused(tmp_path):
    full = write(tmp_path / "full.h5", "legacy-weights", 1, keras_weights(1))
    data = Path(full).read_bytes()
    for keep in (len(data) // 2, 4096):
        cut = tmp_path / f"cut{keep}.h5"
        cut.write_bytes(data[:keep])
        assert "truncated" in one_line_error(WeightsError, cut, fmt="keras")


def test_an_hdf5_file_that_is_not_keras_is_not_taken_for_keras(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3, np.float32)
    head = path.read_bytes()[:4096]
    assert head.startswith(kconv.HDF5_MAGIC) and not kconv.sniff(path, head)
    assert "cannot tell the format" in one_line_error(WeightsError, path)
    assert "does not look like keras" in one_line_error(WeightsError, path, fmt="keras")
    with pytest.raises(WeightsError, match="HDF5 file but not Keras weights"):
        kconv.read(path)


def test_garbage_and_other_formats_are_not_sniffed_as_keras(tmp_path):
    for name, content in (("a.zip", b"PK\x03\x04junk"), ("b.params", b"\x12\x01\x00\x00\x00\x00\x00\x00")):
        path = tmp_path / name
        path.write_bytes(content)
        assert not kconv.sniff(path, content)


def test_an_hdf5_signature_h5py_cannot_open_is_claimed_so_that_it_is_called_damaged(tmp_path):
    """Keras is the only HDF5 format: a damaged one gets 'corrupt', not 'cannot tell the format'."""
    content = b"\x89HDF\r\n\x1a\n" + b"\x00" * 100
    path = tmp_path / "junk.h5"
    path.write_bytes(content)
    assert kconv.sniff(path, content)
    assert "truncated/corrupt" in one_line_error(WeightsError, path)


def test_unknown_layers_are_listed(tmp_path):
    weights = dict(dummy_weights(1), my_head=[np.zeros((2, 2), np.float32)], aux_bn=[np.zeros(1, np.float32)] * 4)
    path = write(tmp_path / "extra.h5", "keras3-names", 1, dummy_weights(1))
    with h5py.File(path, "a") as f:
        for k, name in enumerate(("my_head", "aux_bn")):
            v = f.create_group(f"layers/dense_{k + 1}/vars")
            v.attrs["name"] = name
            for i, t in enumerate(weights[name]):
                v[str(i)] = t
    message = one_line_error(WeightsError, path)
    assert "2 tensors in the file match nothing" in message and "my_head" in message and "aux_bn" in message


def test_missing_layers_and_tensors_are_named(tmp_path):
    path = write(tmp_path / "missing.h5", "legacy-weights", 2, dummy_weights(2))
    with h5py.File(path, "a") as f:
        names = [n.decode() for n in f.attrs["layer_names"] if n.decode() not in ("conv3_block2_2_bn", "post_bn")]
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
    message = one_line_error(WeightsError, path)
    assert "2 parameters get no value" in message and "conv3_block2_2_bn" in message and "post_bn" in message

    path = write(tmp_path / "hole.h5", "legacy-weights", 2, dummy_weights(2))
    with h5py.File(path, "a") as f:
        del f["conv2_block1_0_conv/conv2_block1_0_conv/bias:0"]
    assert "conv2_block1_0_conv/bias:0" in one_line_error(WeightsError, path)

    path = write(tmp_path / "noblock.h5", "keras3-names", 1, {k: v for k, v in dummy_weights(1).items()
                                                              if not k.startswith("conv4_block3_")})
    assert "stage conv4 lacks block(s) 3" in one_line_error(WeightsError, path)


def test_wrong_shapes_are_refused_naming_the_parameter(tmp_path):
    weights = dict(keras_weights(2))
    weights["conv3_block1_1_conv"] = [weights["conv3_block1_1_conv"][0][:, :, :64]]
    path = write(tmp_path / "shape.h5", "keras3-names", 2, weights)
    assert "mis-shaped" in one_line_error(WeightsError, path)


def test_a_variable_marked_bfloat16_that_stores_no_16_bit_integers_is_a_corrupt_file(tmp_path):
    path = write(tmp_path / "b.weights.h5", "keras3-names", 1, dummy_weights(1))
    with h5py.File(path, "a") as f:
        f["layers/conv2d_5/vars/0"].attrs["dtype"] = "bfloat16"  # float32 data under a bfloat16 mark
    assert "marked bfloat16 but stores float32" in one_line_error(WeightsError, path)


def test_non_finite_values_are_refused(tmp_path):
    weights = dummy_weights(2)
    weights["conv4_block2_2_bn"][3] = np.array([np.nan], np.float32)
    path = write(tmp_path / "nan.h5", "keras3-order", 2, weights)
    assert "NaN/Inf" in one_line_error(WeightsError, path) and "conv4_block2_2_bn" in one_line_error(WeightsError, path)


def test_an_order_only_file_of_no_known_resnet_is_refused(tmp_path):
    weights = {k: v for k, v in dummy_weights(1).items() if k != "conv5_block3_3_bn"}
    specs = [s for s in kr.layer_specs(1, R50, 10) if s.name in weights]
    path = tmp_path / "odd.h5"
    kr.write_keras3(path, specs, weights, names=False)
    assert "none of ResNet50" in one_line_error(WeightsError, path)
