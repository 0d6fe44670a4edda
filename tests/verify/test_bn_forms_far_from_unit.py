"""Every frozen-BN form stays exact when the statistics are far from 0/1.

Calibrated random weights give statistics of order 1 (means ~0.5, variances ~1). Trained
nets are not so kind, so here a ResNet-18 v1 is calibrated on raw 0..255 pixels (its stem
BatchNorm then sees means of tens to hundreds and variances of 1e3..1e4) after every conv
filter was scaled by its own factor between 10**-3.5 and 10**0.5 (variances down to 1e-8:
eps dominates there). The statistics are still the real moments of the photos
(``calibrate_batchnorms``), so the network computes something sensible. Each BN form is
judged by the check and, independently, against the original run in float64.

The rule: the verdict rests on the adapted net's float64 twin, within the one-ulp yardstick
at every probe; float32 cannot show agreement finer than both nets' own float32 rounding, so a
probe where that floor exceeds the asked tolerance reports the floor as its tolerance, and
the report says so.
"""

import functools

import mxnet as mx
import numpy as np
import pytest

import bbadapt
from bbadapt.core import zoo
from bbadapt.core.rewrite import BN_MODES, clone
from bbadapt.core.spec import PRESETS
from bbadapt.core.trace import block_paths
from bbadapt.core.weights import calibrate_batchnorms, randomize
from bbadapt.verify import images
from bbadapt.verify.equivalence import CheckOptions, check, reference
from bbadapt.verify.report import render_markdown
from tests.conftest import SMALL_SIZES

SOURCE, TARGET = "rgb255", "imagenet"


@functools.lru_cache(maxsize=1)
def _net_far_from_unit():
    """ResNet-18 v1 fed raw pixels, filters rescaled per channel, statistics measured (do not mutate)."""
    net = zoo.build("resnet18_v1")
    x = PRESETS[SOURCE].normalize(images.photos((64, 64), limit=3)[0])
    randomize(net, 0, x)
    rng = np.random.RandomState(1)
    for block in block_paths(net).values():
        if isinstance(block, mx.gluon.nn.Conv2D):
            w = block.weight.data().asnumpy()
            block.weight.set_data(mx.nd.array(w * 10 ** rng.uniform(-3.5, 0.5, (len(w), 1, 1, 1))))
    calibrate_batchnorms(net, x)
    return net


@functools.lru_cache(maxsize=1)
def _reference():
    return reference(_net_far_from_unit(), SOURCE, CheckOptions(sizes=SMALL_SIZES, n_photos=1))


def _statistics(net) -> tuple[np.ndarray, np.ndarray]:
    bns = [b for b in block_paths(net).values() if isinstance(b, mx.gluon.nn.BatchNorm)]
    return (np.concatenate([b.running_mean.data().asnumpy() for b in bns]),
            np.concatenate([b.running_var.data().asnumpy() for b in bns]))


def test_the_statistics_really_are_far_from_zero_and_one():
    mean, var = _statistics(_net_far_from_unit())
    assert np.sum(np.abs(mean) > 10) >= 10  # means of tens (and hundreds, at the stem)
    assert var.min() < 1e-7 and var.max() > 1e4  # variances spanning 1e-8 .. 1e4
    assert np.sum(var < 1e-6) > 100 and np.sum(var > 1e3) >= 5


def _own_error(probe: dict) -> float:
    return probe["fp64"]["original"] / probe["ref_max_abs"]


@pytest.mark.parametrize("bn", BN_MODES)
def test_each_bn_form_matches_the_original_and_float64(bn):
    net = _net_far_from_unit()
    adapted = bbadapt.adapt(net, SOURCE, TARGET, bn=bn)
    report = check(net, SOURCE, adapted, ref=_reference())
    assert report["passed"] and report["exact"] and report["conclusive"], report["reasons"]
    for p in report["probes"]:
        assert p["float64_twin"]["within"], p["name"]
        assert p["tolerance"] == max(1e-5, p["float32_floor"])  # the rule, probe by probe
        assert p["max_rel"] <= p["float32_floor"]
    # independently of check(): the adapted net's own numbers, computed in float64, against the original in float64
    raw = images.photos((40, 44), limit=2)[0]
    original64 = clone(net, trainable=False)
    original64.cast("float64")
    truth = original64(mx.nd.array(PRESETS[SOURCE].normalize(raw, "float64"), dtype="float64")).asnumpy()
    adapted64 = clone(adapted.net, trainable=False)
    adapted64.cast("float64")
    got = adapted64(mx.nd.array(PRESETS[TARGET].normalize(raw, "float64"), dtype="float64")).asnumpy()
    scale = np.abs(truth).max()
    assert np.abs(got - truth).max() / scale <= 1e-6  # float32 representation of the folded numbers, no more


def test_where_float32_cannot_show_the_tolerance_the_floor_is_reported_and_float64_decides():
    """Asked for 1e-6, finer than these float32 runs can agree at some probes: those probes
    report their float32 floor as the tolerance, the notes and the verdict line say so, and
    the verdict rests on the float64 twin."""
    net = _net_far_from_unit()
    report = check(net, SOURCE, bbadapt.adapt(net, SOURCE, TARGET, bn="fused"), options=CheckOptions(tolerance=1e-6),
                   ref=_reference())
    noisy = {p["name"]: p["float32_floor"] for p in report["probes"] if p["float32_floor"] > 1e-6}
    assert noisy  # how many depends on the CPU's float32 kernels: all six under AVX-512 on an AMD EPYC, not under AVX2
    assert all(p["tolerance"] == max(1e-6, p["float32_floor"]) for p in report["probes"])  # the rule, probe by probe
    assert report["tolerance"]["raised"] == noisy
    assert all(_own_error(p) < p["float32_floor"] for p in report["probes"])  # the original's rounding is part of it
    assert report["passed"], report["reasons"]
    assert all(p["max_rel"] <= p["tolerance"] and p["float64_twin"]["within"] for p in report["probes"])
    assert any("cannot be shown finer than float32 rounding" in n for n in report["notes"])
    last = render_markdown(report).rstrip().splitlines()[-1]
    assert "float32 cannot show agreement finer" in last and "within the one-ulp yardstick" in last
