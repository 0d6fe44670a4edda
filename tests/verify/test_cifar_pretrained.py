"""The real pretrained gluoncv CIFAR ResNets (export() files) keep their accuracy when adapted.

Ground truth from the data's provenance (bbadapt/data/NOTICE): with cifar normalization they classify 98 (v1)
and 94 (v2) of the 100 tiles correctly; fed un-normalized input, under 50.
"""

import mxnet as mx
import numpy as np
import pytest

import bbadapt
from bbadapt.core import zoo
from bbadapt.core.weights import load_into
from bbadapt.verify import images

ACCURACY = {"cifar_resnet20_v1": 0.98, "cifar_resnet20_v2": 0.94}


@pytest.fixture(scope="module", params=sorted(ACCURACY))
def pretrained(request):
    net = zoo.build(request.param)
    load_into(net, images.data_dir() / f"{request.param}-0000.params")
    return request.param, net


def _predict(net, spec, raw):
    return net(mx.nd.array(bbadapt.parse_spec(spec).normalize(raw))).asnumpy().argmax(1)


def test_the_original_pipeline_reproduces_the_published_accuracy(pretrained):
    name, net = pretrained
    tiles, labels = images.cifar_tiles()
    assert np.mean(_predict(net, "cifar", tiles) == labels) == ACCURACY[name]
    assert np.mean(_predict(net, "rgb01", tiles) == labels) < 0.5  # normalization matters


@pytest.mark.parametrize("target", ["rgb255", "bgr255", "rgb01"])
@pytest.mark.parametrize("bn", ["fused", "affine", "global-stats"])
def test_adapted_nets_agree_on_every_tile_and_keep_the_accuracy(pretrained, target, bn):
    name, net = pretrained
    tiles, labels = images.cifar_tiles()
    adapted = bbadapt.adapt(net, "cifar", target, bn=bn)
    original = _predict(net, "cifar", tiles)
    ours = _predict(adapted.net, target, tiles)
    assert np.array_equal(ours, original)
    assert np.mean(ours == labels) == ACCURACY[name]
    report = bbadapt.check(net, "cifar", adapted, options=bbadapt.CheckOptions(cifar=True, labelled=(tiles, labels)))
    assert report["passed"] and report["worst_max_rel"] <= 1e-5, report["reasons"]
    assert report["classification"]["labelled"]["accuracy_adapted"] == ACCURACY[name]
