"""Getting weights into a Gluon net: parameter files, and calibrated random weights.

Two ``.params`` layouts exist in the wild for the same network:

* ``save_parameters`` form: structural names (``features.1.gamma``), independent of the
  instance prefix;
* ``export()`` / ``collect_params().save()`` form: full parameter names with the instance
  prefix (``cifarresnetv20_conv0_weight``), optionally tagged ``arg:``/``aux:``.

Both are mapped onto the structural names of the net being filled, and every mismatch is
named in the error, never skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bbadapt.platform.errors import WeightsError


def structural_params(net) -> dict:
    """Structural name -> Parameter, the keys ``save_parameters`` writes."""
    return net._collect_params_with_prefix()


def read_params_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an MXNet NDArray file into numpy arrays, with one-line errors for bad files."""
    import mxnet as mx

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file is empty: {path}")
    try:
        loaded = mx.nd.load(str(path))
    except mx.base.MXNetError:
        raise WeightsError(f"cannot read {path}: not an MXNet .params file, or truncated/corrupt") from None
    if isinstance(loaded, list) or not loaded:
        raise WeightsError(f"{path} holds no named parameters (an unnamed NDArray list?)")
    return {k: v.asnumpy() for k, v in loaded.items()}


def _strip_tag(key: str) -> str:
    return key.split(":", 1)[1] if key.startswith(("arg:", "aux:")) else key


def _name_prefix(names: list[str]) -> str:
    common = os.path.commonprefix(names)
    return common[: common.rfind("_") + 1]


def to_structural(arrays: dict[str, np.ndarray], net) -> dict[str, np.ndarray]:
    """Rename ``export()``-style keys to the net's structural names (identity when already so)."""
    params = structural_params(net)
    if set(arrays) & set(params):
        return arrays
    untagged = {_strip_tag(k): v for k, v in arrays.items()}
    file_prefix = _name_prefix(list(untagged))
    net_names = {p.name: key for key, p in params.items()}
    net_prefix = _name_prefix(list(net_names))
    renamed: dict[str, np.ndarray] = {}
    for key, value in untagged.items():
        full = net_prefix + key[len(file_prefix):]
        renamed[net_names.get(full, key)] = value
    return renamed


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def assign(net, arrays: dict[str, np.ndarray], origin: str) -> None:
    """Set every parameter of ``net`` from ``arrays``; refuse partial, mis-shaped or non-finite sets."""
    import mxnet as mx

    arrays = to_structural(arrays, net)
    params = structural_params(net)
    missing = sorted(set(params) - set(arrays))
    extra = sorted(set(arrays) - set(params))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_listing(missing)})")
        if extra:
            parts.append(f"{len(extra)} unexpected ({_listing(extra)})")
        raise WeightsError(f"{origin} does not fit this model: {'; '.join(parts)}; weights for another model?")
    wrong = [f"{k} {tuple(arrays[k].shape)} vs {params[k].shape}" for k in sorted(params)
             if tuple(arrays[k].shape) != tuple(params[k].shape)]
    if wrong:
        raise WeightsError(f"{origin} has {len(wrong)} mis-shaped parameters ({_listing(wrong, 3)}); weights for another model?")
    bad = [k for k in sorted(params) if not np.all(np.isfinite(arrays[k]))]
    if bad:
        raise WeightsError(f"{origin} has NaN/Inf values in {len(bad)} parameters ({_listing(bad)})")
    for key, param in params.items():
        param.set_data(mx.nd.array(arrays[key], dtype=param.dtype))


def load_into(net, path: str | os.PathLike) -> str:
    """Fill ``net`` from a ``.params`` file; returns the file's sha256 for the manifest."""
    assign(net, read_params_file(path), origin=str(path))
    return sha256_of(path)


def sha256_of(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def batchnorms(net) -> list:
    """Every BatchNorm block in the tree (gluoncv's BN variants subclass gluon's)."""
    from mxnet.gluon import nn

    from bbadapt.core.trace import block_paths

    return [b for b in block_paths(net).values() if isinstance(b, nn.BatchNorm)]


def randomize(net, seed: int, calibration: np.ndarray) -> None:
    """Seeded random weights whose BatchNorm statistics are the real moments of photos.

    He-normal conv/dense weights, gamma in [0.5, 1.5] and small beta (fix_gamma BNs get
    gamma != 1 on purpose: it must be ignored), then :func:`calibrate_batchnorms` on
    ``calibration`` (raw images already normalized for the net). Activations then have the
    scale real weights give, and every BN fold works on statistics far from 0/1 (the mean
    part of the fold included), which is what makes an equivalence check meaningful.
    The net must not be hybridized (calibration reads each BN's input in eager mode).
    """
    import mxnet as mx

    rng = np.random.RandomState(seed)
    for key, param in sorted(structural_params(net).items()):
        shape = param.shape
        if key.endswith("running_mean"):
            value = np.zeros(shape)  # placeholders: every one is measured below
        elif key.endswith("running_var"):
            value = np.ones(shape)
        elif key.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("beta") or key.endswith("bias"):
            value = rng.normal(0.0, 0.1, shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            value = rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape)
        param.set_data(mx.nd.array(value, dtype=param.dtype))
    calibrate_batchnorms(net, calibration)


def channel_moments(x: np.ndarray, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of ``x`` in float64, two-pass.

    Biased (divide by N): the statistic of this batch, what a BatchNorm normalizes with in
    training mode. Two-pass, so a constant channel (a dead filter) gets exactly variance 0
    and its own value as mean; never negative, never NaN.
    """
    others = tuple(i for i in range(x.ndim) if i != axis)
    mean = x.mean(axis=others, dtype=np.float64)
    centred = x - np.expand_dims(mean, others)  # float64, one temporary
    np.square(centred, out=centred)
    return mean, centred.mean(axis=others)


def calibrate_batchnorms(net, calibration: np.ndarray) -> None:
    """Set every BN's running mean/var to the moments of its own input on ``calibration``.

    Why not a training-mode pass with momentum 0: MXNet 1.9.1 updates moving statistics
    only in the backward pass, so a forward in ``train_mode`` leaves them at 0/1 (this
    function's predecessor did exactly that), and its fp32 one-pass variance is poor for
    channels whose mean dwarfs their spread. Instead one inference-mode forward runs with
    a pre-hook on every BatchNorm that measures the input in float64 (:func:`channel_moments`)
    and stores it *before* that BN runs: layers are calibrated in order, and each later BN
    sees its input as the finished, calibrated net computes it. The stored values are
    those moments rounded to the parameter's dtype. Floor: none above 0; a channel with no
    variation stores variance 0 (the BN's eps keeps the division finite, and ``adapt``
    reports such channels under BN health). Deterministic: no randomness, no momentum.
    """
    import mxnet as mx
    from mxnet import autograd

    from bbadapt.core.trace import block_paths

    bns = {path: block for path, block in block_paths(net).items() if isinstance(block, mx.gluon.nn.BatchNorm)}
    measured: set[int] = set()

    def measure(bn, inputs) -> None:
        if not isinstance(inputs[0], mx.nd.NDArray):
            return  # a hybridized net being traced: symbols, no data (and no hook runs in its graph)
        mean, var = channel_moments(inputs[0].asnumpy(), bn._kwargs.get("axis", 1))
        bn.running_mean.set_data(mx.nd.array(mean, dtype=bn.running_mean.dtype))
        bn.running_var.set_data(mx.nd.array(var, dtype=bn.running_var.dtype))
        measured.add(id(bn))

    handles = [bn.register_forward_pre_hook(measure) for bn in bns.values()]
    try:
        with autograd.predict_mode():
            net(mx.nd.array(calibration))
        mx.nd.waitall()
    finally:
        for handle in handles:
            handle.detach()
    missed = [path for path, bn in bns.items() if id(bn) not in measured]
    if missed:
        raise WeightsError(f"cannot calibrate {len(missed)} BatchNorms ({_listing(missed)}): the forward pass never "
                           "reached them (a hybridized net runs no per-block hooks)")
