"""The torch engine's device: the CPU, one GPU, or under torchrun the GPU of the local rank."""

from __future__ import annotations

import os
from typing import Optional

import torch

from bbadapt.platform.errors import DeviceError, OptionError


def pick_device(gpus: Optional[str]) -> torch.device:
    """``--gpus``: the GPU of this process (under torchrun, the local rank's); None: the CPU."""
    if gpus is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("GPU requested but torch sees no GPU (a CPU build of torch, or no driver); use --cpu")
    ids = [int(v) for v in str(gpus).split(",") if v.strip()]
    if "LOCAL_RANK" in os.environ:
        index = int(os.environ["LOCAL_RANK"])
    elif len(ids) > 1:
        raise OptionError("the torch engine drives one GPU per process: launch it with torchrun --nproc_per_node "
                          f"{len(ids)} ... --gpus 0 for {len(ids)} GPUs")
    else:
        index = ids[0]
    if index >= torch.cuda.device_count():
        raise DeviceError(f"GPU {index} requested but torch sees {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)
