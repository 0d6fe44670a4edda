"""Bundles reload into the same function, in every BN mode, with structure intact."""

import mxnet as mx
import numpy as np
import pytest

import bbadapt
from bbadapt import images
from bbadapt.pipeline import convert
from bbadapt.trace import find_stages


@pytest.mark.parametrize("bn", ["fused", "affine", "global-stats"])
@pytest.mark.parametrize("model", ["resnet18_v2", "resnet50_v1d"])
def test_a_converted_bundle_reloads_to_the_same_network(tmp_path, model, bn):
    out = tmp_path / "out"
    report, adapted = convert(model, out, weights="random", target="bgr255", bn=bn, sizes=[(48, 48)])
    assert report["passed"]
    net = bbadapt.load_backbone(out)
    raw, _ = images.photos((64, 72), limit=2)
    x = mx.nd.array(bbadapt.parse_spec("bgr255").normalize(raw))
    np.testing.assert_array_equal(net(x).asnumpy(), adapted.net(x).asnumpy())
    assert find_stages(net) == find_stages(adapted.net)  # stages stay addressable
    manifest = bbadapt.read_manifest(out)
    assert manifest["weights"]["kind"] == "random" and "NOT pretrained" in manifest["weights"]["note"]
    assert manifest["target"]["name"] == "bgr255" and manifest["bn"] == bn


def test_random_weights_are_reproducible_from_their_seed():
    from bbadapt.pipeline import load_source

    a, pa = load_source("cifar_resnet20_v1", "random", seed=3)
    b, pb = load_source("cifar_resnet20_v1", "random", seed=3)
    c, pc = load_source("cifar_resnet20_v1", "random", seed=4)
    assert pa["sha256"] == pb["sha256"] != pc["sha256"]
