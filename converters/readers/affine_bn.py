"""An affine-only ("frozen") BatchNorm written into an ordinary BatchNorm, exactly.

A Gluon or torch BatchNorm in inference computes ``gamma * (x - mean) / sqrt(var + eps) + beta``.
With ``mean = 0`` and a float32 ``var`` chosen so that ``var + eps`` rounds to exactly 1.0,
that is ``gamma * x + beta`` to the last bit, for any eps the layer has: this is how a pure
per-channel affine (Caffe2's AffineChannel, torchvision's FrozenBatchNorm2d, a bbadapt
FrozenAffine or fused BN) travels through formats that only know BatchNorm.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def unit_variance(eps: float) -> np.float32:
    """The float32 ``v`` with ``float32(v) + float32(eps) == 1.0`` (so ``1/sqrt(v + eps)`` is 1)."""
    one, e = np.float32(1.0), np.float32(eps)
    v = one - e
    while v + e > one:
        v = np.nextafter(v, np.float32(0))
    while v + e < one:
        v = np.nextafter(v, one)
    if v + e != one:  # cannot happen for 0 < eps < 1, but a silent 1-ulp slip would be worse than a crash
        raise ArithmeticError(f"no float32 variance makes var + {eps} exactly 1")
    return v


def as_batchnorm(scale: np.ndarray, shift: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    """``gamma/beta/running_mean/running_var`` (Gluon names, float32) computing ``x * scale + shift``."""
    scale = np.asarray(scale, np.float32)
    return {"gamma": scale, "beta": np.asarray(shift, np.float32), "running_mean": np.zeros_like(scale),
            "running_var": np.full_like(scale, unit_variance(eps))}
