"""Detectron/Caffe2 ResNet pickles onto gluon resnetN_v1 with affine-only BatchNorm.

The pickles are written the way Detectron's ``R-50.pkl`` is (Python 2 protocol 2, latin-1
byte strings, ``{"blobs": {...}}``), with values from a calibrated random gluon net. The
judge is a Caffe2-style forward pass written here from the blob layout alone
(``conv -> x * s + b -> relu``, stride in the first 1x1, 3x3/2 max-pool with padding 1),
using MXNet only for its convolution and pooling kernels: it never touches Gluon.
"""

from __future__ import annotations

import numpy as np
import pytest

import bbadapt
from bbadapt.core.blocks import bn_constants, get_block, param_value
from bbadapt.core.spec import parse_spec
from bbadapt.platform.errors import ModelError, WeightsError
from bbadapt.verify import images
from converters import readers
from converters.readers import detectron as dt
from converters.readers import safe_pickle
from tests import py2pickle
from tests.conftest import calibrated

SPEC = parse_spec(dt.SOURCE_SPEC)


def blobs_from_gluon(net, depth: int) -> dict[str, np.ndarray]:
    """Caffe2 blobs holding the function of a gluon v1 net: every BN as AffineChannel (conv biases folded in)."""
    blobs = {}
    for prefix, conv_path, bn_path in dt.pairs(depth, net._collect_params_with_prefix()):
        conv, bn = get_block(net, conv_path), get_block(net, bn_path)
        s, t = bn_constants(bn)
        bias = param_value(conv.bias) if conv.bias is not None else 0.0
        name = "res_conv1_bn" if prefix == "conv1" else f"{prefix}_bn"
        blobs[f"{prefix}_w"] = param_value(conv.weight).astype(np.float32)
        blobs[f"{name}_s"] = s.astype(np.float32)
        blobs[f"{name}_b"] = (s * bias + t).astype(np.float32)
        blobs[f"{prefix}_w_momentum"] = np.zeros_like(blobs[f"{prefix}_w"])  # SGD state, as trained files have
    blobs["pred_w"] = net.output.weight.data().asnumpy()
    blobs["pred_b"] = net.output.bias.data().asnumpy()
    return blobs


def caffe2_forward(blobs: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Detectron's ResNet (AffineChannel after every conv) from the blobs alone; returns logits."""
    import mxnet as mx

    b = {k: mx.nd.array(v) for k, v in blobs.items()}

    def conv(h, name, stride=1, pad=0):
        w = b[f"{name}_w"]
        return mx.nd.Convolution(h, w, kernel=w.shape[2:], stride=(stride, stride), pad=(pad, pad),
                                 num_filter=w.shape[0], no_bias=True)

    def affine(h, name):
        return mx.nd.broadcast_add(mx.nd.broadcast_mul(h, b[f"{name}_s"].reshape((1, -1, 1, 1))),
                                   b[f"{name}_b"].reshape((1, -1, 1, 1)))

    h = mx.nd.relu(affine(conv(mx.nd.array(x), "conv1", 2, 3), "res_conv1_bn"))
    h = mx.nd.Pooling(h, kernel=(3, 3), stride=(2, 2), pad=(1, 1), pool_type="max")
    bottleneck = "res2_0_branch2c_w" in blobs
    for stage in (2, 3, 4, 5):
        i = 0
        while f"res{stage}_{i}_branch2a_w" in blobs:
            p = f"res{stage}_{i}"
            stride = 2 if stage > 2 and i == 0 else 1
            if bottleneck:  # MSRA/Detectron: the stride sits in the first 1x1
                y = mx.nd.relu(affine(conv(h, f"{p}_branch2a", stride), f"{p}_branch2a_bn"))
                y = mx.nd.relu(affine(conv(y, f"{p}_branch2b", 1, 1), f"{p}_branch2b_bn"))
                y = affine(conv(y, f"{p}_branch2c"), f"{p}_branch2c_bn")
            else:
                y = mx.nd.relu(affine(conv(h, f"{p}_branch2a", stride, 1), f"{p}_branch2a_bn"))
                y = affine(conv(y, f"{p}_branch2b", 1, 1), f"{p}_branch2b_bn")
            if f"{p}_branch1_w" in blobs:
                h = affine(conv(h, f"{p}_branch1", stride), f"{p}_branch1_bn")
            h = mx.nd.relu(y + h)
            i += 1
    h = mx.nd.Pooling(h, global_pool=True, pool_type="avg", kernel=(1, 1)).flatten()
    return mx.nd.FullyConnected(h, b["pred_w"], b["pred_b"], num_hidden=blobs["pred_w"].shape[0]).asnumpy()


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def r50_blobs():
    return blobs_from_gluon(calibrated("resnet50_v1"), 50)


@pytest.fixture(scope="module")
def r50_pkl(r50_blobs, tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "R-50.pkl"
    path.write_bytes(py2pickle.dumps({"blobs": r50_blobs}))
    return path


def test_an_r50_pickle_converts_to_a_gluon_net_computing_the_caffe2_function(r50_blobs, r50_pkl):
    import mxnet as mx

    assert readers.detect(r50_pkl).name == "detectron"
    c = readers.read(r50_pkl)
    assert c.arch == {"builder": "gluon-resnet-v1", "kwargs": {"depth": 50, "classes": 1000}}
    assert c.source_spec == dt.SOURCE_SPEC and c.provenance["head"].startswith("from the file")
    raw = images.photos((64, 64), limit=2)[0]
    x = SPEC.normalize(raw)
    want = caffe2_forward(r50_blobs, x).astype(np.float64)
    assert rel(c.net(mx.nd.array(x)).asnumpy(), want) < 1e-5
    rebuilt = readers.rebuild(c.arch)  # what a bundle reload does: same architecture
    assert {k: p.shape for k, p in rebuilt._collect_params_with_prefix().items()} == \
           {k: p.shape for k, p in c.net._collect_params_with_prefix().items()}


def test_the_affine_batchnorm_is_exact_to_the_bit():
    import mxnet as mx
    from mxnet.gluon import nn

    from bbadapt.core.foldmath import batchnorm_for_affine, unit_variance

    rng = np.random.RandomState(0)
    s, t = rng.uniform(-3, 3, 16).astype(np.float32), rng.normal(0, 1, 16).astype(np.float32)
    bn = nn.BatchNorm(in_channels=16)
    bn.initialize()
    for key, value in batchnorm_for_affine(s, t, 1e-5).items():
        getattr(bn, key).set_data(mx.nd.array(value))
    x = rng.normal(0, 10, (2, 16, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(bn(mx.nd.array(x)).asnumpy(), x * s.reshape(1, -1, 1, 1) + t.reshape(1, -1, 1, 1))
    assert unit_variance(1e-5) + np.float32(1e-5) == np.float32(1) and unit_variance(1e-3) < unit_variance(1e-5)


def test_converted_detectron_weights_adapt_to_rgb255_and_pass_the_check(r50_pkl):
    c = readers.read(r50_pkl)
    adapted = bbadapt.adapt(c.net, c.source_spec, "rgb255", bn="fused")
    report = bbadapt.check(c.net, c.source_spec, adapted, options=bbadapt.CheckOptions(sizes=[(64, 64), (45, 53)], n_photos=1))
    assert report["passed"] and report["worst_max_rel"] < 1e-5


def test_a_backbone_only_file_gets_a_deterministic_head_and_says_so(r50_blobs, tmp_path):
    import mxnet as mx

    flat = {k: v for k, v in r50_blobs.items() if not k.startswith("pred_")}  # flat dict, no "blobs" level
    path = tmp_path / "R-50-nohead.pkl"
    path.write_bytes(py2pickle.dumps(flat))
    a, b = readers.read(path), readers.read(path)
    assert "absent" in a.provenance["head"] and "seeded" in a.provenance["head"]
    np.testing.assert_array_equal(a.net.output.weight.data().asnumpy(), b.net.output.weight.data().asnumpy())
    x = SPEC.normalize(images.photos((64, 64), limit=1)[0])
    feats = [mx.nd.array(x)]
    for block in a.net.features:
        feats.append(block(feats[-1]))
    ref = caffe2_forward({**flat, "pred_w": np.eye(2048, dtype=np.float32), "pred_b": np.zeros(2048, np.float32)}, x)
    assert rel(feats[-1].asnumpy().reshape(1, -1), ref.astype(np.float64)) < 1e-5  # the backbone is the file's


def test_a_basic_block_resnet18_layout_also_converts(tmp_path):
    import mxnet as mx

    net = calibrated("resnet18_v1")
    blobs = blobs_from_gluon(net, 18)
    path = tmp_path / "R-18.pkl"
    path.write_bytes(py2pickle.dumps({"blobs": blobs}))
    c = readers.read(path)
    assert c.arch["kwargs"]["depth"] == 18
    x = SPEC.normalize(images.photos((64, 64), limit=1)[0])
    assert rel(c.net(mx.nd.array(x)).asnumpy(), caffe2_forward(blobs, x).astype(np.float64)) < 1e-5


# ------------------------------------------------------------------ bad input


def _pkl(tmp_path, blobs, name="bad.pkl"):
    path = tmp_path / name
    path.write_bytes(py2pickle.dumps({"blobs": blobs}))
    return path


def test_missing_and_unknown_blobs_are_named(r50_blobs, tmp_path):
    blobs = dict(r50_blobs)
    del blobs["res3_1_branch2b_bn_s"]
    blobs["res3_1_branch2d_w"] = np.zeros((1,), np.float32)
    with pytest.raises(WeightsError) as err:
        readers.read(_pkl(tmp_path, blobs))
    msg = str(err.value)
    assert "1 tensors in the file match nothing (res3_1_branch2d_w)" in msg
    assert "1 parameters get no value (res3_1_branch2b_bn_s)" in msg and "\n" not in msg


def test_nan_and_truncated_files_are_refused(tmp_path):
    small = {"conv1_w": np.ones((4, 3, 7, 7), np.float32), "res_conv1_bn_s": np.ones(4, np.float32)}
    blobs = dict(small, res_conv1_bn_s=np.full(4, np.nan, np.float32))
    with pytest.raises(WeightsError, match="NaN/Inf"):
        readers.read(_pkl(tmp_path, blobs))
    data = py2pickle.dumps({"blobs": small})
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="truncated/corrupt"):
        readers.read(cut)


def test_a_malicious_pickle_named_like_detectron_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    # {"conv1_w": os.system("touch marker")}, protocol 2, as an attacker would hand-craft it
    command = f"touch {marker}".encode()
    evil = (b"\x80\x02}(U\x07conv1_wcposix\nsystem\nU" + bytes([len(command)]) + command + b"\x85Ru.")
    path = tmp_path / "R-50.pkl"
    path.write_bytes(evil)
    assert readers.detect(path).name == "detectron"
    with pytest.raises(WeightsError, match="calls posix.system.*refused"):
        readers.read(path)
    assert not marker.exists()
    import pickle

    pickle.loads(evil)  # the same bytes do run under plain pickle: the test can fail
    assert marker.exists()


def test_arch_contradictions_and_non_resnet_pickles_are_refused(r50_pkl, tmp_path):
    with pytest.raises(ModelError, match="contradicts the file.*R-50"):
        readers.read(r50_pkl, arch="resnet101_v1")
    other = tmp_path / "other.pkl"
    other.write_bytes(py2pickle.dumps({"blobs": {"conv1_w": np.zeros((2, 3, 1, 1), np.float32)}}))
    with pytest.raises(WeightsError, match="not a Detectron ResNet"):
        readers.read(other)
    assert safe_pickle.looks_like(r50_pkl.read_bytes()[:4])
