"""The devices a run uses (``--gpus 0,1`` / ``--cpu``), and the preflight that refuses a GPU
mxnet-cu112 1.9.1 cannot run, before any kernel runs.

Why a preflight: the mxnet-cu112 1.9.1 wheel carries kernels compiled for sm_50, 60, 70, 80
and 86, and no PTX the driver could compile for a newer GPU. A GPU runs a kernel compiled
for its own major version and an equal or lower minor: Ampere (8.0, 8.6) and Ada (8.9 runs
the sm_86 code) work; Hopper (9.0) and newer fail at the first kernel with "no kernel image
is available for execution on the device", deep inside a training step. Asking the driver
(:mod:`bbadapt.platform.cuda_driver`) first turns that into one line that says what to do.

Every GPU path checks here: ``bbadapt train --gpus``, ``bbadapt evaluate --gpu``,
``load_detector(ctx=mx.gpu(i))``, ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from bbadapt.platform.cuda_driver import DriverReport, GpuInfo, GpuQuery, default_query
from bbadapt.platform.errors import DeviceError, OptionError

KERNEL_ARCHS = ((5, 0), (6, 0), (7, 0), (8, 0), (8, 6))  # what mxnet-cu112 1.9.1's libmxnet.so carries (no PTX)
MIN_CAPABILITY = KERNEL_ARCHS[0]
FIRST_UNSUPPORTED = (9, 0)
MIN_DRIVER = (11, 0)  # CUDA 11.x minor-version compatibility: a driver for CUDA 11.0 (>= 450.80.02) or newer
NEWER_GPU_ADVICE = ("for training use MXNet 1.9.1 from NVIDIA's container (NGC nvcr.io/nvidia/mxnet, built for "
                    "Hopper); for inference export the adapted backbone with `bbadapt export --onnx` and run it in "
                    "an ONNX runtime (see docs/gpu.md)")
OLDER_GPU_ADVICE = "use a GPU of compute capability 5.0 to 8.9, or --cpu"


class UnsupportedGpu(DeviceError):
    """A GPU (or driver) whose kernels mxnet-cu112 1.9.1 cannot run; refused before any kernel runs."""

    exit_code = 1


@dataclass(frozen=True)
class Verdict:
    """Can mxnet-cu112 1.9.1 run on this GPU, and in one clause, why (not)."""

    supported: bool
    text: str


def kernel_arch(capability: tuple[int, int]) -> Optional[tuple[int, int]]:
    """The compiled kernels a GPU of ``capability`` runs: same major, highest minor not above its own."""
    fitting = [a for a in KERNEL_ARCHS if a[0] == capability[0] and a[1] <= capability[1]]
    return max(fitting) if fitting else None


def judge(gpu: GpuInfo) -> Verdict:
    """The verdict on one GPU (pure: from its compute capability)."""
    cc = gpu.capability_text
    if gpu.capability >= FIRST_UNSUPPORTED:
        return Verdict(False, f"unsupported: compute capability {cc} is newer than the sm_50..sm_86 kernels of "
                              "mxnet-cu112 1.9.1, which ships no PTX, so no kernel can run on it; "
                              + NEWER_GPU_ADVICE)
    arch = kernel_arch(gpu.capability)
    if gpu.capability < MIN_CAPABILITY or arch is None:
        return Verdict(False, f"unsupported: compute capability {cc} is older than sm_50, the oldest kernels of "
                              f"mxnet-cu112 1.9.1; {OLDER_GPU_ADVICE}")
    return Verdict(True, f"supported (runs the sm_{arch[0]}{arch[1]} kernels)")


def wheel_kernels_apply() -> bool:
    """Do the capability rules of the pip mxnet-cu11x wheels apply to the installed mxnet?

    Yes for those wheels (and for the CPU build, where no GPU runs anyway); no for an mxnet
    with CUDA built elsewhere (NVIDIA's container, a source build): its kernels are its own.
    """
    import mxnet as mx

    from bbadapt.platform.cuda_libs import cuda11_build

    return cuda11_build() is not None or not mx.runtime.Features().is_enabled("CUDA")


def preflight(ids: Sequence[int], query: Optional[GpuQuery] = None, check_capability: bool = True) -> list[GpuInfo]:
    """Refuse, in one line and before any kernel runs, a driver or GPU among ``ids`` that
    mxnet-cu112 1.9.1 cannot run. Returns the GPUs checked. ``query``: the driver (default:
    ``libcuda.so.1``; tests pass a :class:`~bbadapt.platform.cuda_driver.FixedGpus`).
    ``check_capability=False`` (an mxnet not from the pip wheels, see :func:`wheel_kernels_apply`)
    checks only that the driver and the GPUs exist."""
    report: DriverReport = (query or default_query()).probe()
    if report.version is not None and report.version < MIN_DRIVER:
        raise UnsupportedGpu(f"the NVIDIA driver runs CUDA up to {report.version_text}; mxnet-cu112 needs a driver "
                             "for CUDA 11.0 or newer (>= 450.80.02): update the driver")
    by_index = {gpu.index: gpu for gpu in report.gpus}
    checked = []
    for i in ids:
        if i not in by_index:
            raise DeviceError(f"GPU {i} requested but the NVIDIA driver sees {len(by_index)} GPU(s)"
                              + (f" (0..{len(by_index) - 1})" if by_index else ""))
        gpu = by_index[i]
        verdict = judge(gpu)
        if check_capability and not verdict.supported:
            raise UnsupportedGpu(f"GPU {i} ({gpu.name}) is {verdict.text}")
        checked.append(gpu)
    return checked


def parse_gpus(gpus: Optional[str] = None, cpu: bool = False) -> Optional[list[int]]:
    """``--gpus 0,1`` -> ``[0, 1]``; ``--cpu`` or nothing -> None (the CPU). Needs no mxnet."""
    if gpus is None or cpu:
        if gpus and cpu:
            raise OptionError("--gpus and --cpu exclude each other")
        return None
    try:
        ids = [int(g) for g in str(gpus).split(",") if g.strip()]
    except ValueError:
        raise OptionError(f"--gpus takes device numbers like 0 or 0,1, got {gpus!r}") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise OptionError(f"--gpus takes distinct device numbers like 0 or 0,1, got {gpus!r}")
    return ids


def device_choice(gpus: Optional[str], cpu: bool) -> Optional[str]:
    """``--gpus``/``--cpu`` as one value: the GPU list, or None for the CPU (validated; they exclude each other)."""
    return None if parse_gpus(gpus, cpu) is None else gpus


def contexts(gpus: Optional[str] = None, cpu: bool = False, query: Optional[GpuQuery] = None) -> list:
    """``--gpus 0,1`` -> ``[mx.gpu(0), mx.gpu(1)]``, checked; ``--cpu`` or nothing -> ``[mx.cpu()]``.

    A GPU asked of the CPU-only mxnet, a GPU that does not exist, or one mxnet-cu112 cannot
    run (see :func:`preflight`) is one clear line.
    """
    import mxnet as mx

    ids = parse_gpus(gpus, cpu)
    if ids is None:
        return [mx.cpu()]
    if not mx.runtime.Features().is_enabled("CUDA"):
        raise DeviceError("GPU requested but this mxnet sees no GPU (CPU-only build): install bbadapt[gpu] "
                          "(mxnet-cu112) on a CUDA machine (docs/gpu.md), or use --cpu")
    preflight(ids, query, check_capability=wheel_kernels_apply())
    available = mx.context.num_gpus()
    if max(ids) >= available:
        raise DeviceError(f"GPU {max(ids)} requested but mxnet sees {available} GPU(s)"
                          + (f" (0..{available - 1})" if available else ""))
    return [mx.gpu(i) for i in ids]


def check_contexts(ctx, query: Optional[GpuQuery] = None) -> None:
    """:func:`preflight` for the GPUs among mxnet contexts (one, or a list), e.g. ``load_detector``'s."""
    listed = ctx if isinstance(ctx, (list, tuple)) else [ctx]
    ids = [c.device_id for c in listed if c is not None and c.device_type == "gpu"]
    if ids:
        preflight(ids, query, check_capability=wheel_kernels_apply())


def context_of(block):
    """The context a block's first parameter lives on (where to put its inputs)."""
    return next(iter(block.collect_params().values())).list_ctx()[0]

