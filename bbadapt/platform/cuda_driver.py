"""What the NVIDIA driver says about the GPUs, asked through ``libcuda.so.1`` with ctypes.

Why the driver API and not mxnet: the question "can mxnet-cu112 1.9.1 run kernels on this
GPU at all?" has to be answered before mxnet launches its first kernel (on a Hopper GPU
that kernel fails with "no kernel image is available for execution on the device", deep
inside a training step). ``cuDeviceGetAttribute`` answers it without running anything,
and needs neither mxnet nor the CUDA runtime. ``libcuda.so.1`` is the name the driver
always installs (the unversioned ``libcuda.so`` comes only with development packages).

:class:`GpuQuery` is the seam the tests use: anything with a ``probe()`` returning a
:class:`DriverReport` (e.g. :class:`FixedGpus`) stands in for the real :class:`CudaDriver`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Optional, Protocol

from bbadapt.platform.errors import BbadaptError

LIBCUDA = "libcuda.so.1"
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
CUDA_SUCCESS = 0
CUDA_ERROR_NO_DEVICE = 100


class DriverUnavailable(BbadaptError):
    """No usable NVIDIA driver: libcuda.so.1 absent, or cuInit failed."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as the driver numbers it (the same numbering as ``mx.gpu(i)``)."""

    index: int
    name: str
    capability: tuple[int, int]
    memory_bytes: int = 0

    @property
    def capability_text(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30


@dataclass(frozen=True)
class DriverReport:
    """The driver's CUDA version (``12.4``: the newest CUDA it runs) and its GPUs."""

    version: Optional[tuple[int, int]]
    gpus: list[GpuInfo] = field(default_factory=list)

    @property
    def version_text(self) -> str:
        return f"{self.version[0]}.{self.version[1]}" if self.version else "unknown"


class GpuQuery(Protocol):
    """Something that reports the driver and its GPUs, or raises :class:`DriverUnavailable`."""

    def probe(self) -> DriverReport: ...


@dataclass
class FixedGpus:
    """A :class:`GpuQuery` answering with a fixed report (a test, or a machine description)."""

    report: DriverReport

    def probe(self) -> DriverReport:
        return self.report


class CudaDriver:
    """The real :class:`GpuQuery`: ``cuInit``, ``cuDriverGetVersion``, ``cuDeviceGetCount``,
    ``cuDeviceGetName``, ``cuDeviceGetAttribute`` (compute capability), ``cuDeviceTotalMem_v2``.

    The report is kept after the first successful probe: GPUs do not change while a process runs.
    """

    def __init__(self, library: str = LIBCUDA):
        self.library = library
        self._report: Optional[DriverReport] = None

    def probe(self) -> DriverReport:
        if self._report is None:
            self._report = self._probe()
        return self._report

    def _probe(self) -> DriverReport:
        try:
            cuda = ctypes.CDLL(self.library)
        except OSError as exc:
            raise DriverUnavailable(f"no NVIDIA driver: {self.library} cannot be loaded "
                                    f"({str(exc).splitlines()[0] if str(exc) else 'not found'})") from None
        version = ctypes.c_int(0)
        got_version = cuda.cuDriverGetVersion(ctypes.byref(version)) == CUDA_SUCCESS
        driver_version = (version.value // 1000, version.value % 1000 // 10) if got_version else None
        status = cuda.cuInit(0)
        if status == CUDA_ERROR_NO_DEVICE:
            return DriverReport(driver_version, [])
        self._check(cuda, status, "cuInit")
        count = ctypes.c_int(0)
        self._check(cuda, cuda.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        return DriverReport(driver_version, [self._device(cuda, i) for i in range(count.value)])

    def _device(self, cuda, index: int) -> GpuInfo:
        device = ctypes.c_int(0)
        self._check(cuda, cuda.cuDeviceGet(ctypes.byref(device), index), "cuDeviceGet")
        name = ctypes.create_string_buffer(256)
        self._check(cuda, cuda.cuDeviceGetName(name, len(name), device), "cuDeviceGetName")
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        for value, attribute in ((major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                                 (minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)):
            self._check(cuda, cuda.cuDeviceGetAttribute(ctypes.byref(value), attribute, device),
                        "cuDeviceGetAttribute")
        memory = ctypes.c_size_t(0)
        self._check(cuda, cuda.cuDeviceTotalMem_v2(ctypes.byref(memory), device), "cuDeviceTotalMem")
        return GpuInfo(index, name.value.decode(errors="replace"), (major.value, minor.value), memory.value)

    @staticmethod
    def _check(cuda, status: int, call: str) -> None:
        if status == CUDA_SUCCESS:
            return
        text = ctypes.c_char_p()
        described = cuda.cuGetErrorString(status, ctypes.byref(text)) == CUDA_SUCCESS and text.value
        reason = text.value.decode(errors="replace") if described else f"error {status}"
        raise DriverUnavailable(f"the NVIDIA driver failed in {call}: {reason}")


_DEFAULT: Optional[GpuQuery] = None


def default_query() -> GpuQuery:
    """The process's one query: a :class:`CudaDriver` on ``libcuda.so.1`` (probed once), unless
    :func:`set_default_query` put another in its place."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = CudaDriver()
    return _DEFAULT


def set_default_query(query: Optional[GpuQuery]) -> Optional[GpuQuery]:
    """Answer every GPU question of this process with ``query`` (a test describing a GPU; None: the
    driver again). Returns the previous one, to put back."""
    global _DEFAULT
    previous, _DEFAULT = _DEFAULT, query
    return previous
