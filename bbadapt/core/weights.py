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

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from bbadapt.core.errors import WeightsError


def structural_params(net) -> dict:
    """Structural name -> Parameter, the keys ``save_parameters`` writes."""
    return net._collect_params_with_prefix()


def ctx_of(net):
    """The context a (single-context) network's parameters live on."""
    return next(iter(net.collect_params().values())).list_ctx()[0]


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
    """Seeded random weights whose BatchNorm statistics come from real photos.

    He-normal conv/dense weights, gamma in [0.5, 1.5] and small beta (fix_gamma BNs get
    gamma != 1 on purpose: it must be ignored), then one training-mode pass over
    ``calibration`` (already normalized for the net) with momentum 0, so every running
    mean/var is the real statistic of that layer's input. Activations then have the scale
    real weights give, which is what makes an equivalence check meaningful.
    """
    import mxnet as mx
    from mxnet import autograd

    rng = np.random.RandomState(seed)
    for key, param in sorted(structural_params(net).items()):
        shape = param.shape
        if key.endswith("running_mean"):
            value = np.zeros(shape)
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
    bns = batchnorms(net)
    saved = [bn._kwargs["momentum"] for bn in bns]
    try:
        for bn in bns:
            bn._kwargs["momentum"] = 0.0
        with autograd.train_mode(), native_stderr_silenced():
            net(mx.nd.array(calibration)).wait_to_read()
    finally:
        for bn, momentum in zip(bns, saved, strict=True):
            bn._kwargs["momentum"] = momentum


@contextlib.contextmanager
def native_stderr_silenced():
    """Hide MKLDNN's per-layer log lines that training-mode pooling prints from C++."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
