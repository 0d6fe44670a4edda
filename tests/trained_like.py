"""Weights whose BatchNorm statistics look trained, for the verdict tests (not a user option).

Calibrated random weights (:func:`bbadapt.core.weights.randomize`) give every BatchNorm
statistics of order one. The pretrained nets do not (measured on the packaged GluonCV
CIFAR ResNets, :func:`envelope`; ``PRETRAINED_CIFAR`` below), and ImageNet ResNets go much
further: means of 30-300x their spread, gammas near 0, variances from 1e-6 to 1e4, dead
channels. Those are where folds cancel large numbers (a fused bias ``beta - mean * s``) and
float32 rounding grows, so the verdict must hold there too.

:func:`make` starts from calibrated random weights and shapes them, per regime:

* filter scales: each conv filter is scaled by ``10**u`` with ``u`` uniform in
  ``filter_decades``; recalibrating then gives variances spanning twice those decades;
* dead channels: a share of the filters set to zero (variance exactly 0; eps alone divides);
* small gammas: a share of the gammas set to 10**-k down to ``smallest_gamma`` (and some to 0);
* large means: each BatchNorm's stored mean is moved by ``d`` and its beta by ``d * s``
  (``s = gamma / sqrt(var + eps)``), with ``|mean| / spread`` drawn log-uniformly up to
  ``mean_ratio``. The network computes the same function (``(x - mean - d) * s + beta + d * s``)
  but every fold now has to cancel ``mean * s`` against ``beta``, as a trained net's does.

The statistics stay those of a real network on real photos: the moments are measured
(``calibrate_batchnorms``) after the filters changed, and only the last, function-preserving
step moves the stored means.
"""

from __future__ import annotations

from dataclasses import dataclass

import mxnet as mx
import numpy as np

from bbadapt.core.trace import block_paths
from bbadapt.core.weights import batchnorms, calibrate_batchnorms, randomize

# Measured by envelope() on the packaged pretrained GluonCV CIFAR ResNet-20 v1 / v2 (bbadapt/data):
# |mean|/sqrt(var + eps) up to 3.09 / 3.42, variances 0.0377..12.2 / 0.0413..7.86, smallest |gamma| 0.0486 /
# 0.0545 (fix_gamma BNs left out), no dead channel. docs/how-it-works.md records them.
PRETRAINED_CIFAR = {"mean_ratio": 3.42, "var_min": 0.0377, "var_max": 12.2, "gamma_min": 0.0486}

@dataclass(frozen=True)
class Regime:
    """How far from calibrated statistics :func:`make` pushes a network."""

    name: str
    mean_ratio: float  # largest |mean| / spread of the stored statistics
    filter_decades: tuple[float, float]  # log10 range of the per-filter scale
    dead_share: float  # filters set to zero
    small_gamma_share: float  # gammas set near zero
    smallest_gamma: float  # the smallest non-zero one
    zero_gammas: int  # gammas set exactly to zero, per network


REGIMES = {
    # The pretrained CIFAR envelope, pushed a decade further: means 30x their spread, variances 1e-2..1e2.
    "trained-like": Regime("trained-like", 30.0, (-1.0, 1.0), 0.01, 0.02, 1e-2, 0),
    # Past anything measured: means 300x their spread, variances 1e-6..1e4, gammas down to 1e-6 and 0.
    "extreme": Regime("extreme", 300.0, (-3.0, 2.0), 0.02, 0.05, 1e-6, 2),
}


def make(net, seed: int, calibration: np.ndarray, regime: str = "calibrated") -> None:
    """Fill ``net`` (not hybridized) with seeded weights of the named regime, calibrated on ``calibration``."""
    randomize(net, seed, calibration)
    if regime == "calibrated":
        return
    r = REGIMES[regime]
    rng = np.random.RandomState(seed + 7919)
    convs = [b for b in block_paths(net).values() if isinstance(b, mx.gluon.nn.Conv2D)]
    for conv in convs[1:]:  # the stem conv keeps its scale: the input fold is judged on sane first activations
        w = conv.weight.data().asnumpy()
        scale = 10.0 ** rng.uniform(*r.filter_decades, size=(len(w), 1, 1, 1))
        dead = rng.uniform(size=len(w)) < r.dead_share
        scale[dead] = 0.0
        conv.weight.set_data(mx.nd.array(w * scale))
    calibrate_batchnorms(net, calibration)
    bns = batchnorms(net)
    learnable = [bn for bn in bns if not bn._kwargs.get("fix_gamma", False)]
    for bn in learnable:
        gamma = bn.gamma.data().asnumpy()
        small = rng.uniform(size=gamma.shape) < r.small_gamma_share
        gamma[small] = np.sign(gamma[small]) * 10.0 ** rng.uniform(np.log10(r.smallest_gamma), -1, size=small.sum())
        bn.gamma.set_data(mx.nd.array(gamma))
    for k in rng.choice(len(learnable), size=min(r.zero_gammas, len(learnable)), replace=False):
        gamma = learnable[k].gamma.data().asnumpy()
        gamma[rng.randint(len(gamma))] = 0.0
        learnable[k].gamma.set_data(mx.nd.array(gamma))
    for bn in bns:
        _move_means(bn, rng, r.mean_ratio)


def _move_means(bn, rng: np.random.RandomState, mean_ratio: float) -> None:
    """Move the stored mean to ``|mean| / spread`` up to ``mean_ratio``, and beta with it: the same function."""
    eps = bn._kwargs.get("epsilon", 1e-5)
    mean = bn.running_mean.data().asnumpy().astype(np.float64)
    var = bn.running_var.data().asnumpy().astype(np.float64)
    gamma = np.ones_like(mean) if bn._kwargs.get("fix_gamma", False) else bn.gamma.data().asnumpy().astype(np.float64)
    s = gamma / np.sqrt(var + eps)
    spread = np.sqrt(var + eps)
    ratio = 10.0 ** rng.uniform(0.0, np.log10(mean_ratio), size=mean.shape)
    target = np.sign(rng.uniform(-1, 1, size=mean.shape)) * ratio * spread
    d = target - mean
    bn.running_mean.set_data(mx.nd.array(mean + d))
    bn.beta.set_data(mx.nd.array(bn.beta.data().asnumpy().astype(np.float64) + d * s))


def envelope(net) -> dict:
    """The BatchNorm statistics' envelope: largest |mean| / spread, variance range, smallest |gamma|, dead channels."""
    ratios, variances, gammas = [], [], []
    for bn in batchnorms(net):
        mean = bn.running_mean.data().asnumpy()
        var = bn.running_var.data().asnumpy()
        ratios.append(np.abs(mean) / np.sqrt(var + bn._kwargs.get("epsilon", 1e-5)))
        variances.append(var)
        if not bn._kwargs.get("fix_gamma", False):
            gammas.append(np.abs(bn.gamma.data().asnumpy()))
    ratio, var, gamma = np.concatenate(ratios), np.concatenate(variances), np.concatenate(gammas)
    live = var[var > 0]
    return {"mean_ratio": float(ratio.max()), "var_min": float(live.min()), "var_max": float(var.max()),
            "gamma_min_nonzero": float(gamma[gamma > 0].min()), "zero_gammas": int(np.sum(gamma == 0)),
            "dead": int(np.sum(var == 0))}
