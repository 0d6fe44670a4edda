"""Every formula bbadapt folds with, and its inverse: plain numpy, float64, no mxnet.

Everything a rewrite or a writer does to values is one of three per-channel identities.

**A BatchNorm in inference is an affine map.** With statistics ``mean``, ``var``, learnt
``gamma``, ``beta`` and the layer's own ``eps``::

    y = gamma * (x - mean) / sqrt(var + eps) + beta = x * s + t
    s = gamma / sqrt(var + eps),    t = beta - mean * s

(``fix_gamma``, Gluon's ``scale=False``, means ``gamma`` is 1 whatever is stored.) The way
back is not unique; :func:`batchnorm_for_affine` picks ``mean = 0`` and a float32 ``var``
with ``var + eps == 1`` exactly, so any BatchNorm kernel computes ``x * s + t`` to the last
bit (this is how torchvision's FrozenBatchNorm2d, Caffe2's AffineChannel or a fused BN
travel through formats that only know BatchNorm); :func:`global_stats_bn_for_affine` keeps
the layer's ``beta`` and ``var`` (and ``fix_gamma`` where possible) and solves for the rest.

**A BatchNorm after a conv fuses into it.** For ``y = BN(conv(x; W, b))``, output channel
``o``::

    W'[o] = W[o] * s[o],    b'[o] = b[o] * s[o] + t[o]

and back, where ``s`` has no zero: ``W = W' / s``, ``b = (b' - t) / s``.

**The input normalization folds into the first layer.** :func:`bbadapt.core.spec.affine_map`
gives ``x_source[c] = a[c] * x_target[perm[c]] + b[c]``. A data BatchNorm ``(s_d, t_d)``
in front composes to ``scale = s_d * a``, ``shift = s_d * b + t_d``. Then either

* the affine stays a layer of its own, reordered to act on target channels
  (:func:`to_target_order`), and the first conv's input channels are permuted to match
  (:func:`permute_conv_input`): exact everywhere; or
* it goes into the first conv (:func:`fold_input_into_conv`)::

      W'[o, j] = W[o, c] * scale[c]   with j = perm[c]
      b'[o]    = b[o] + sum_{c,h,w} W[o, c, h, w] * shift[c]

  exact only where ``shift`` is 0: the conv's zero padding is black in the new net but
  the mean colour in the original. :func:`unfold_input_from_conv` undoes it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

Perm = Sequence[int]


# ---------------------------------------------------------------- BatchNorm <-> affine


def bn_affine(gamma: np.ndarray | None, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float,
              fix_gamma: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNorm's inference function as ``x * s + t``: ``s = gamma/sqrt(var+eps)``, ``t = beta - mean*s``.

    ``fix_gamma`` ignores ``gamma`` (it is 1; may be None); ``beta`` is always used.
    """
    gamma = np.ones_like(var) if fix_gamma else gamma
    s = gamma / np.sqrt(var + float(eps))
    return s, beta - mean * s


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


def batchnorm_for_affine(scale: np.ndarray, shift: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    """Inverse of :func:`bn_affine`: ``gamma/beta/running_mean/running_var`` (Gluon names, float32)
    computing ``x * scale + shift`` exactly (``mean = 0``, ``var + eps == 1`` in float32)."""
    scale = np.asarray(scale, np.float32)
    return {"gamma": scale, "beta": np.asarray(shift, np.float32), "running_mean": np.zeros_like(scale),
            "running_var": np.full_like(scale, unit_variance(eps))}


def can_fix_gamma(scale: np.ndarray, eps: float) -> bool:
    """Whether a ``fix_gamma`` BatchNorm (gamma = 1) can compute ``x * scale + ...``.

    Its scale is ``1/sqrt(var + eps)``: positive, and at most ``1/sqrt(eps)`` (``var >= 0``).
    """
    safe = np.where(scale == 0, 1.0, scale)
    return bool(np.all(1.0 / safe ** 2 - eps >= 0) and np.all(scale > 0))


def global_stats_bn_for_affine(scale: np.ndarray, shift: np.ndarray, beta: np.ndarray, var: np.ndarray, eps: float,
                               fix_gamma: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(gamma, beta, mean, var)`` of a BatchNorm computing ``x * scale + shift``, keeping the layer's ``beta``.

    With ``fix_gamma`` (only where :func:`can_fix_gamma`) the scale comes from the variance:
    ``gamma = 1``, ``var = 1/scale^2 - eps``; otherwise ``var`` is the layer's (made
    non-negative) and ``gamma = scale * sqrt(var + eps)``. Either way
    ``mean = (beta - shift) / scale``, so ``(x - mean) * scale + beta = x * scale + shift``.
    A zero scale keeps ``mean = 0`` and puts ``shift`` into ``beta``.
    """
    safe = np.where(scale == 0, 1.0, scale)
    mean = np.where(scale == 0, 0.0, (beta - shift) / safe)
    beta = np.where(scale == 0, shift, beta)
    if fix_gamma:
        return np.ones_like(scale), beta, mean, np.maximum(1.0 / safe ** 2 - eps, 0.0)
    var = np.abs(var)
    return scale * np.sqrt(var + eps), beta, mean, var


# ---------------------------------------------------------------- conv + BatchNorm


def fused_bias(bias: np.ndarray | float, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``b' = b * s + t``: a conv bias carried through the affine ``x * s + t`` that follows."""
    return bias * s + t


def fuse_conv_bn(weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray,
                 t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One conv computing ``conv(x; W, b) * s + t``: ``W' = W * s[o]``, ``b' = b * s + t`` (no bias: 0)."""
    return weight * s.reshape(-1, 1, 1, 1), fused_bias(0.0 if bias is None else bias, s, t)


def unfuse_conv_bn(weight: np.ndarray, bias: np.ndarray, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`fuse_conv_bn` (``s`` without zeros): ``W = W' / s``, ``b = (b' - t) / s``."""
    return weight / s.reshape(-1, 1, 1, 1), (bias - t) / s


# ---------------------------------------------------------------- input fold


def target_sources(perm: Perm) -> list[int]:
    """``inv`` with ``inv[j]`` = the source channel that target channel ``j`` feeds (``perm[inv[j]] == j``)."""
    return [list(perm).index(j) for j in range(len(perm))]


def through_data_bn(a: np.ndarray, b: np.ndarray, s_d: np.ndarray, t_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The input map followed by a data BatchNorm ``x * s_d + t_d``: ``(s_d * a, s_d * b + t_d)``."""
    return s_d * a, s_d * b + t_d


def to_target_order(values: np.ndarray, perm: Perm) -> np.ndarray:
    """Per-source-channel values re-indexed by target channel: ``out[perm[c]] = values[c]``."""
    out = np.empty_like(values)
    out[list(perm)] = values
    return out


def permute_conv_input(weight: np.ndarray, perm: Perm) -> np.ndarray:
    """A conv reading source-order channels rewritten to read target-order ones (``W'[:, perm[c]] = W[:, c]``)."""
    return weight[:, target_sources(perm)]


def unpermute_conv_input(weight: np.ndarray, perm: Perm) -> np.ndarray:
    """Inverse of :func:`permute_conv_input`: ``W[:, c] = W'[:, perm[c]]``."""
    return weight[:, list(perm)]


def fold_input_into_conv(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
                         perm: Perm) -> tuple[np.ndarray, np.ndarray]:
    """The first conv taking target input: ``conv(x_source)`` with ``x_source[c] = scale[c] * x[perm[c]] + shift[c]``.

    ``b' = b + sum W[o, c, h, w] * shift[c]``, ``W'[:, perm[c]] = W[:, c] * scale[c]``;
    exact only away from the zero padding unless ``shift`` is 0.
    """
    bias = np.zeros(weight.shape[0]) if bias is None else bias
    bias = bias + np.einsum("ochw,c->o", weight, shift)
    return permute_conv_input(weight * scale.reshape(1, -1, 1, 1), perm), bias


def unfold_input_from_conv(weight: np.ndarray, bias: np.ndarray, scale: np.ndarray, shift: np.ndarray,
                           perm: Perm) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`fold_input_into_conv` (``scale`` without zeros): the conv for source input again."""
    original = unpermute_conv_input(weight, perm) / scale.reshape(1, -1, 1, 1)
    return original, bias - np.einsum("ochw,c->o", original, shift)
