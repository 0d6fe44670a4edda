"""ONNX export of adapted backbones, judged by onnxruntime against MXNet on real photos.

Needs the ``onnx`` extra and onnxruntime (installed with ``--no-deps``, see
docs/formats.md); the refusals when they are missing are tested
everywhere.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import bbadapt
from bbadapt.core.spec import PRESETS
from bbadapt.platform.errors import OutputError
from bbadapt.verify import images
from tests.conftest import calibrated


@pytest.fixture(scope="module")
def onnx():
    return pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    made = {}
    for bn in ("fused", "affine"):
        report, _ = bbadapt.convert("resnet18_v1b", root / bn, bbadapt.ConvertOptions(weights="random", bn=bn, sizes=[(64, 64)]))
        assert report["passed"]
        made[bn] = root / bn
    return made


def run_ort(ort, path_or_bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path_or_bytes) if not isinstance(path_or_bytes, bytes) else path_or_bytes,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("bn", ["fused", "affine"])  # affine: every BN is a FrozenAffine, the input fold too
def test_an_adapted_backbone_exports_and_runs_in_onnxruntime_like_mxnet(bundles, onnx, ort, tmp_path, bn):
    import mxnet as mx

    from converters.writers import onnx as onnx_out

    out = tmp_path / "r18.onnx"
    summary = onnx_out.export_bundle(bundles[bn], out, sizes=[(64, 64)])
    assert summary["check"]["passed"] and summary["check"]["runtime"].startswith("onnxruntime")
    assert summary["check"]["max_rel"] < 1e-5 and summary["input_spec"] == "rgb255"
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)] and model.ir_version == 7
    assert [i.name for i in model.graph.input] == ["data"]  # weights are initializers, not inputs
    raw = images.photos((50, 70), limit=2)[0]  # another size and batch than the export check used: dynamic axes
    net = bbadapt.load_backbone(bundles[bn])
    want = net(mx.nd.array(raw)).asnumpy().astype(np.float64)
    assert rel(run_ort(ort, out, raw.astype(np.float32)), want) < 1e-5


def test_mxnet_stamps_the_installed_onnx_opset_which_is_why_the_file_is_restamped(onnx, tmp_path):
    import mxnet as mx
    from mxnet.gluon import nn

    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, in_channels=3), nn.BatchNorm(in_channels=4))
    net.initialize()
    sym = net(mx.sym.var("data"))
    params = {p.name: p.data() for p in net.collect_params().values()}
    path = tmp_path / "raw.onnx"
    mx.onnx.export_model(sym, params, in_shapes=[(1, 3, 8, 8)], in_types=[np.float32], onnx_file_path=str(path))
    stamped = onnx.load(str(path)).opset_import[0].version
    assert stamped == onnx.defs.onnx_opset_version() != 13  # 19 with onnx 1.14.1; mxnet's translations stop at 13


def test_fix_gamma_batchnorms_export_as_mxnet_computes_them(onnx, ort, tmp_path):
    """resnet18_v2's data BN is fix_gamma with a stored gamma != 1; mx2onnx alone would use that gamma."""
    import mxnet as mx

    from bbadapt.core.rewrite import clone
    from converters.writers import onnx as onnx_out

    net = clone(calibrated("resnet18_v2"))
    assert net.features[0]._kwargs["fix_gamma"]
    x = PRESETS["imagenet"].normalize(images.photos((64, 64), limit=1)[0]).astype(np.float32)
    want = net(mx.nd.array(x)).asnumpy().astype(np.float64)
    # A stored gamma != 1, as a loaded file can hold (MXNet ignores it, and overwrites it with 1 on the next forward).
    net.features[0].gamma.set_data(mx.nd.array([1.7, 0.4, 2.5]))
    assert rel(run_ort(ort, onnx_out.to_onnx_bytes(net), x), want) < 1e-5
    sym = net(mx.sym.var("data"))  # the same export without bbadapt's gamma correction: a different function
    params = {p.name: p.data() for p in net.collect_params().values()}
    raw = tmp_path / "unpatched.onnx"
    mx.onnx.export_model(sym, params, in_shapes=[(1, 3, 64, 64)], in_types=[np.float32], onnx_file_path=str(raw),
                         dynamic=True, dynamic_input_shapes=[(None, 3, None, None)])
    model = onnx.load(str(raw))
    onnx_out.restamp(model)
    assert rel(run_ort(ort, model.SerializeToString(), x), want) > 1e-3


def test_existing_output_wrong_suffix_and_missing_runtime_leave_nothing(bundles, tmp_path, monkeypatch):
    from converters.writers import onnx as onnx_out

    existing = tmp_path / "x.onnx"
    existing.write_bytes(b"mine")
    with pytest.raises(OutputError, match="already exists"):
        onnx_out.export_bundle(bundles["fused"], existing)
    assert existing.read_bytes() == b"mine"
    with pytest.raises(OutputError, match=r"name the ONNX export \.onnx"):
        onnx_out.export_bundle(bundles["fused"], tmp_path / "x.bin")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(OutputError, match="onnxruntime.*--no-deps onnxruntime==1.16.3"):
        onnx_out.export_bundle(bundles["fused"], tmp_path / "y.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(OutputError, match=r"pip install 'bbadapt\[onnx\]'"):
        onnx_out.to_onnx_bytes(bbadapt.load_backbone(bundles["fused"]))
    assert [p.name for p in tmp_path.iterdir()] == ["x.onnx"]
