"""One device vocabulary for every command and every Python entry point: ``--gpus 0,1`` or ``--cpu``.

``train`` and ``evaluate`` (CLI and Python) say which devices to use the same way, so a user
learns it once; mxnet contexts are made here and nowhere else.
"""

from __future__ import annotations

from typing import Optional

from bbadapt.core.errors import DeviceError, OptionError


def parse_gpus(gpus: Optional[str]) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``; None or empty -> ``[]`` (the CPU)."""
    if gpus is None:
        return []
    try:
        ids = [int(g) for g in str(gpus).split(",") if g.strip()]
    except ValueError:
        raise OptionError(f"--gpus takes device numbers like 0 or 0,1, got {gpus!r}") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise OptionError(f"--gpus takes distinct device numbers like 0 or 0,1, got {gpus!r}")
    return ids


def device_choice(gpus: Optional[str], cpu: bool) -> Optional[str]:
    """``--gpus``/``--cpu`` as one value: the GPU list, or None for the CPU (they exclude each other)."""
    if gpus is not None and cpu:
        raise OptionError("--gpus and --cpu exclude each other")
    parse_gpus(gpus)
    return gpus


def contexts(gpus: Optional[str] = None, cpu: bool = False) -> list:
    """``--gpus 0,1`` -> ``[mx.gpu(0), mx.gpu(1)]``; ``--cpu`` or nothing -> ``[mx.cpu()]``.

    A GPU asked for where mxnet has none (the CPU build, or no device) is one clear line.
    """
    ids = parse_gpus(device_choice(gpus, cpu))
    import mxnet as mx

    if not ids:
        return [mx.cpu()]
    available = mx.context.num_gpus()
    if available == 0:
        raise DeviceError("GPU requested but this mxnet sees no GPU (CPU-only build, or no device): "
                          "install bbadapt[gpu] (mxnet-cu112) on a CUDA machine, or use --cpu")
    if max(ids) >= available:
        raise DeviceError(f"GPU {max(ids)} requested but mxnet sees {available} GPU(s) (0..{available - 1})")
    return [mx.gpu(i) for i in ids]
