"""The verdict tests' trained-like weights are what they claim: past the pretrained nets, and the same function.

``tests/trained_like.py`` is grounded in the packaged pretrained GluonCV CIFAR ResNets: its
trained-like regime must reach past their BatchNorm statistics on every axis, its extreme
regime past the shapes ImageNet ResNets are known for, and moving the stored means (with beta)
must leave the function unchanged, or the matrix would test a different network than it says.
"""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

from bbadapt.core import zoo
from bbadapt.core.rewrite import clone
from bbadapt.core.spec import parse_spec
from bbadapt.pipeline import calibration_images, load_source
from bbadapt.verify import images
from tests import trained_like


@pytest.fixture(scope="module")
def pretrained() -> dict[str, dict]:
    return {m: trained_like.envelope(load_source(m, str(images.data_dir() / f"{m}-0000.params")).net)
            for m in ("cifar_resnet20_v1", "cifar_resnet20_v2")}


def _made(regime: str, model: str = "cifar_resnet20_v1"):
    info = zoo.model_info(model)
    source = parse_spec(info.source_spec)
    net = zoo.build(model)
    raw, _ = calibration_images(info)
    trained_like.make(net, 0, source.normalize(raw), regime)
    return net


def test_the_written_down_envelope_is_the_pretrained_nets_measured_one(pretrained):
    measured = {k: max(e[k] for e in pretrained.values()) for k in ("mean_ratio", "var_max")}
    measured |= {k: min(e[k] for e in pretrained.values()) for k in ("var_min", "gamma_min_nonzero")}
    assert measured["mean_ratio"] == pytest.approx(trained_like.PRETRAINED_CIFAR["mean_ratio"], rel=0.01)
    assert measured["var_max"] == pytest.approx(trained_like.PRETRAINED_CIFAR["var_max"], rel=0.01)
    assert measured["var_min"] == pytest.approx(trained_like.PRETRAINED_CIFAR["var_min"], rel=0.01)
    assert measured["gamma_min_nonzero"] == pytest.approx(trained_like.PRETRAINED_CIFAR["gamma_min"], rel=0.01)


def test_trained_like_reaches_past_the_pretrained_nets_on_every_axis(pretrained):
    made = trained_like.envelope(_made("trained-like"))
    for real in pretrained.values():
        assert made["mean_ratio"] > 5 * real["mean_ratio"]
        assert made["var_min"] < real["var_min"] and made["var_max"] > real["var_max"]
        assert made["gamma_min_nonzero"] < real["gamma_min_nonzero"]
        assert made["dead"] > real["dead"] == 0


def test_extreme_has_the_shapes_of_trained_imagenet_nets_and_beyond():
    made = trained_like.envelope(_made("extreme"))
    assert made["mean_ratio"] > 250  # means up to 300x their spread
    assert made["var_min"] < 1e-6 and made["var_max"] > 1e4
    assert made["gamma_min_nonzero"] < 1e-5 and made["zero_gammas"] >= 1 and made["dead"] >= 3


def test_moving_the_stored_means_with_beta_keeps_the_function():
    info = zoo.model_info("cifar_resnet20_v1")
    source = parse_spec(info.source_spec)
    raw, _ = calibration_images(info)
    net = zoo.build("cifar_resnet20_v1")
    trained_like.randomize(net, 0, source.normalize(raw))
    before = clone(net, trainable=False)
    rng = np.random.RandomState(0)
    for bn in trained_like.batchnorms(net):
        trained_like._move_means(bn, rng, 300.0)
    x = source.normalize(raw[:4], "float64")
    outputs = []
    for candidate in (before, net):
        twin = clone(candidate, trainable=False)
        twin.cast("float64")
        outputs.append(twin(mx.nd.array(x, dtype="float64")).asnumpy())
    assert trained_like.envelope(net)["mean_ratio"] > 250
    # The same function up to the float32 storage of the moved numbers: 300x the spread rounds by up to
    # 300 * 2**-24 = 1.8e-5 of it per BatchNorm (measured 1.3e-5 at the output); a slip in d * s would be order 1.
    assert np.abs(outputs[1] - outputs[0]).max() <= 1e-4 * np.abs(outputs[0]).max()
