"""Calibrated random weights: every BatchNorm statistic is the real moment of its input.

``randomize`` promises seeded random weights whose running mean/var are what the packaged
photos produce at each BN. The judge is independent of the code under test: the calibrated
net is run again on the same photos (so every BN normalizes with the statistics stored
before it), each BN's input is captured, and numpy computes its per-channel mean and biased
variance in float64. Run in float32 (what was calibrated) they must equal what was stored
to float32 storage rounding; run as a float64 copy they must agree to fp32 propagation
error, so the statistics belong to the network's function, not to one rounding of it. (An
earlier version ran a training-mode forward, which in MXNet 1.9.1 updates nothing: every
statistic stayed 0/1.)
"""

import mxnet as mx
import numpy as np
import pytest

import bbadapt
from bbadapt.core import zoo
from bbadapt.core.rewrite import clone
from bbadapt.core.spec import PRESETS
from bbadapt.core.trace import block_paths
from bbadapt.core.weights import calibrate_batchnorms, randomize, structural_params
from bbadapt.platform.errors import WeightsError
from bbadapt.verify import images
from bbadapt.verify.equivalence import CheckOptions, check

FLOAT32_STORAGE = 1e-6  # relative: the moments are stored as float32 (6e-8), with margin
FP32_PROPAGATION = 1e-4  # relative: float32 vs float64 activations after 8 residual blocks at 2x2 cells


def _calibration(name: str) -> np.ndarray:
    info = zoo.model_info(name)
    raw = images.cifar_tiles(16)[0] if info.is_cifar else images.photos((64, 64), limit=3)[0]
    return PRESETS[info.source_spec].normalize(raw)


def _batchnorms(net) -> dict:
    return {p: b for p, b in block_paths(net).items() if isinstance(b, mx.gluon.nn.BatchNorm)}


def _bn_inputs(net, x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Every BatchNorm's input (as float64) when a ``dtype`` copy of ``net``, stored statistics and all, runs ``x``."""
    twin = clone(net, trainable=False)
    twin.cast(dtype)
    seen: dict[str, np.ndarray] = {}
    handles = [bn.register_forward_pre_hook(
        lambda _b, inputs, path=path: seen.setdefault(path, inputs[0].asnumpy().astype(np.float64)))
        for path, bn in _batchnorms(twin).items()]
    twin(mx.nd.array(x, dtype=dtype))
    for h in handles:
        h.detach()
    return seen


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    channels = np.swapaxes(x, 0, 1).reshape(x.shape[1], -1)
    return channels.mean(axis=1), channels.var(axis=1)


def _stored(bn) -> tuple[np.ndarray, np.ndarray]:
    return bn.running_mean.data().asnumpy(), bn.running_var.data().asnumpy()


@pytest.mark.parametrize("name", ["cifar_resnet20_v1", "resnet18_v2"])
def test_every_statistic_written_is_the_photos_moment_at_that_layer(name):
    net = zoo.build(name)
    x = _calibration(name)
    randomize(net, 0, x)
    bns = _batchnorms(net)
    for dtype, rtol in (("float32", FLOAT32_STORAGE), ("float64", FP32_PROPAGATION)):
        inputs = _bn_inputs(net, x, dtype)
        assert inputs.keys() == bns.keys() and len(bns) >= 19
        for path, bn in bns.items():
            mean, var = _stored(bn)
            true_mean, true_var = _moments(inputs[path])
            spread = np.sqrt(true_var).max() + np.abs(true_mean).max()
            np.testing.assert_allclose(mean, true_mean, rtol=0, atol=rtol * spread, err_msg=f"{dtype}: mean at {path}")
            np.testing.assert_allclose(var, true_var, rtol=rtol, err_msg=f"{dtype}: var at {path}")
            # real statistics, not the 0/1 an uncalibrated BatchNorm holds
            assert np.abs(mean).max() > 0.01 and np.abs(var - 1).max() > 0.01, path


def test_the_same_seed_gives_the_same_weights_bit_for_bit_and_another_seed_does_not():
    x = _calibration("cifar_resnet20_v1")
    nets = [zoo.build("cifar_resnet20_v1") for _ in range(3)]
    for net, seed in zip(nets, (7, 7, 8), strict=True):
        randomize(net, seed, x)
    a, b, c = ({k: p.data().asnumpy() for k, p in structural_params(n).items()} for n in nets)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["features.1.running_mean"], c["features.1.running_mean"])


def test_a_dead_filter_stores_variance_zero_and_its_constant_as_mean_and_stays_finite():
    """Floor: variance 0 for a channel with no variation (not NaN, not negative, not eps);
    the BN's eps keeps the fold finite and adapt names the channel under BN health."""
    net = zoo.build("cifar_resnet20_v1")
    x = _calibration("cifar_resnet20_v1")
    randomize(net, 0, x)
    conv = block_paths(net)["features.0"]  # the stem conv, read by the BatchNorm features.1 alone
    weight = conv.weight.data().asnumpy()
    weight[5] = 0.0
    conv.weight.set_data(mx.nd.array(weight))
    calibrate_batchnorms(net, x)
    mean, var = _stored(block_paths(net)["features.1"])
    assert var[5] == 0.0 and mean[5] == 0.0
    assert np.all(np.isfinite(var)) and np.all(var[np.arange(len(var)) != 5] > 1e-3)
    for bn in _batchnorms(net).values():
        assert all(np.all(np.isfinite(s)) and np.all(s[1] >= 0) for s in [_stored(bn)])
    adapted = bbadapt.adapt(net, "cifar", "rgb255", bn="fused")
    assert adapted.health[0]["bn"] == "features.1" and adapted.health[0]["tiny_var_channels"] == 1
    report = check(net, "cifar", adapted, options=CheckOptions(cifar=True, n_photos=1))
    assert report["passed"], report["reasons"]


def test_a_hybridized_net_is_refused_rather_than_left_uncalibrated():
    """Per-block hooks do not run inside a hybridized graph: that must not pass as calibrated."""
    net = zoo.build("cifar_resnet20_v1")
    net.hybridize()
    with pytest.raises(WeightsError, match="cannot calibrate 21 BatchNorms"):
        randomize(net, 0, _calibration("cifar_resnet20_v1"))
