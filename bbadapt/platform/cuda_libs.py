"""Make ``mxnet-cu112`` find the CUDA 11 libraries that pip installed (``bbadapt[gpu]``).

Why this exists: ``libmxnet.so`` of mxnet-cu112 1.9.1 NEEDS libcudart.so.11.0,
libcublas(Lt).so.11, libcudnn.so.8, libnccl.so.2 ... but its RPATH is ``$ORIGIN`` only,
and the ``nvidia-*-cu11`` wheels put their libraries in ``site-packages/nvidia/<name>/lib``
with no RPATH of their own. Without ``LD_LIBRARY_PATH`` the dynamic loader finds none of
them, and ``import mxnet`` fails. The loader matches a library that is already loaded by
its soname, so loading each one by its full path, dependencies first, with
``RTLD_GLOBAL``, *before* the first ``import mxnet``, lets libmxnet.so resolve them, and
also lets the later ``dlopen("libcudnn_ops_infer.so.8")`` of cuDNN and
``dlopen("libnvrtc-builtins.so.11.8")`` of NVRTC find their parts.

``bbadapt/__init__.py`` calls :func:`preload`, so every bbadapt entry point (the CLI,
``import bbadapt``, ``import converters``) runs it before mxnet is imported. It is cheap
when there is nothing to do: without a ``nvidia`` folder on ``sys.path`` it looks at
nothing else; only then does it ask ``importlib.metadata`` whether the installed mxnet is
a CUDA 11 build (mxnet itself is never imported here). The CPU build is left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bbadapt.platform.errors import BbadaptError  # a module without imports: cheap at `import bbadapt`

# The CUDA 11 builds of mxnet this preload serves (wheel names with a CUDA 11 tag);
# bbadapt[gpu] installs mxnet-cu112.
CUDA11_BUILDS = ("mxnet-cu112", "mxnet-cu110")
GPU_EXTRA = "bbadapt[gpu]"


@dataclass(frozen=True)
class CudaPackage:
    """A pip wheel of NVIDIA's CUDA 11 libraries, pinned as in pyproject's ``[gpu]`` extra."""

    name: str
    version: str
    folder: str  # site-packages/nvidia/<folder>/lib

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


RUNTIME = CudaPackage("nvidia-cuda-runtime-cu11", "11.8.89", "cuda_runtime")
CUBLAS = CudaPackage("nvidia-cublas-cu11", "11.11.3.6", "cublas")
CUDNN = CudaPackage("nvidia-cudnn-cu11", "8.9.6.50", "cudnn")  # must stay < 9: cuDNN 9 ships libcudnn.so.9
CUFFT = CudaPackage("nvidia-cufft-cu11", "10.9.0.58", "cufft")
CURAND = CudaPackage("nvidia-curand-cu11", "10.3.0.86", "curand")
CUSOLVER = CudaPackage("nvidia-cusolver-cu11", "11.4.1.48", "cusolver")
NVRTC = CudaPackage("nvidia-cuda-nvrtc-cu11", "11.8.89", "cuda_nvrtc")
NCCL = CudaPackage("nvidia-nccl-cu11", "2.21.5", "nccl")
NVTX = CudaPackage("nvidia-nvtx-cu11", "11.8.86", "nvtx")
PACKAGES = (RUNTIME, CUBLAS, CUDNN, CUFFT, CURAND, CUSOLVER, NVRTC, NCCL, NVTX)


@dataclass(frozen=True)
class CudaLibrary:
    """One shared object mxnet-cu112 needs, and the wheel that provides it."""

    soname: str
    package: CudaPackage
    needed_by: str = "libmxnet.so"
    required: bool = True  # False: only one feature needs it, loaded when present

    def missing_text(self) -> str:
        return f"{self.soname} (pip install {self.package.requirement})"


def _cudnn_part(name: str) -> CudaLibrary:
    return CudaLibrary(f"libcudnn_{name}.so.8", CUDNN, needed_by="libcudnn.so.8 (loads it on first use)")


# Load order: every library after the ones it NEEDS (cublas needs cublasLt; cusolver needs
# cublas; cuDNN's parts need cublas and each other: ops -> cnn -> adv, infer -> train).
LIBRARIES = (
    CudaLibrary("libcudart.so.11.0", RUNTIME),
    CudaLibrary("libnvToolsExt.so.1", NVTX),
    CudaLibrary("libnvrtc-builtins.so.11.8", NVRTC, needed_by="libnvrtc.so.11.2 (MXNet's runtime fusion; "
                "MXNET_USE_FUSION=0 avoids it)", required=False),
    CudaLibrary("libnvrtc.so.11.2", NVRTC),
    CudaLibrary("libcublasLt.so.11", CUBLAS),
    CudaLibrary("libcublas.so.11", CUBLAS),
    CudaLibrary("libcufft.so.10", CUFFT),
    CudaLibrary("libcurand.so.10", CURAND),
    CudaLibrary("libcusolver.so.11", CUSOLVER),
    *(_cudnn_part(p) for p in ("ops_infer", "ops_train", "cnn_infer", "cnn_train", "adv_infer", "adv_train")),
    CudaLibrary("libcudnn.so.8", CUDNN),
    CudaLibrary("libnccl.so.2", NCCL),
)


@dataclass(frozen=True)
class SystemLibrary:
    """A library mxnet-cu112 needs that no pip wheel provides (reported by ``bbadapt doctor``)."""

    soname: str
    provider: str


SYSTEM_LIBRARIES = (
    SystemLibrary("libcuda.so.1", "the NVIDIA driver (not a pip package; install the driver for your GPU)"),
    SystemLibrary("libquadmath.so.0", "the system (e.g. apt-get install libquadmath0)"),
)


@dataclass(frozen=True)
class Resolved:
    """Where one library came from: ``pip`` (a wheel folder), ``system`` (the loader's own search),
    ``missing`` (nowhere), or ``failed`` (found but would not load: ``error`` says why)."""

    library: CudaLibrary
    status: str
    path: Optional[str] = None
    error: str = ""

    @property
    def usable(self) -> bool:
        return self.status in ("pip", "system")


@dataclass
class PreloadResult:
    """What :func:`preload` did. ``build`` is the CUDA 11 mxnet distribution found (None: nothing to do)."""

    build: Optional[str]
    libraries: list[Resolved] = field(default_factory=list)
    skipped: str = ""

    @property
    def missing(self) -> list[Resolved]:
        return [r for r in self.libraries if r.library.required and not r.usable]


class CudaLibraryError(BbadaptError):
    """A library mxnet's CUDA build needs is not installed (one line: the soname and its pip package)."""


_RESULT: Optional[PreloadResult] = None


def nvidia_roots(paths: Optional[Iterable[str]] = None) -> list[Path]:
    """The ``nvidia`` folders pip wheels install into, on ``sys.path`` order."""
    roots, seen = [], set()
    for entry in (sys.path if paths is None else paths):
        root = Path(entry or ".") / "nvidia"
        if root.is_dir() and root.resolve() not in seen:
            seen.add(root.resolve())
            roots.append(root)
    return roots


def cuda11_build() -> Optional[str]:
    """The installed CUDA 11 mxnet distribution (``mxnet-cu112``), from package metadata only."""
    import importlib.metadata as metadata  # ~0.1 s to import: only reached when an nvidia folder exists

    for name in CUDA11_BUILDS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        return name
    return None


def find(library: CudaLibrary, roots: Sequence[Path]) -> Optional[Path]:
    """The library's file in a pip wheel folder, first root first."""
    for root in roots:
        candidate = root / library.package.folder / "lib" / library.soname
        if candidate.is_file():
            return candidate
    return None


def preload(roots: Optional[Sequence[Path]] = None) -> PreloadResult:
    """Load the pip-installed CUDA 11 libraries with ``RTLD_GLOBAL``, dependencies first.

    Does nothing (and imports nothing heavy) without an ``nvidia`` folder on ``sys.path`` or
    without a CUDA 11 mxnet build. Idempotent: the first call's result is kept and returned
    again. Never raises: a missing library is recorded (see :func:`require`); ``import mxnet``
    would fail on it anyway, with the loader's own message.
    """
    global _RESULT
    if _RESULT is not None:
        return _RESULT
    roots = nvidia_roots() if roots is None else list(roots)
    if not roots:
        _RESULT = PreloadResult(None, skipped="no pip CUDA libraries (no nvidia folder on sys.path)")
        return _RESULT
    build = cuda11_build()
    if build is None:
        _RESULT = PreloadResult(None, skipped="mxnet is not a CUDA 11 build: nothing to load")
        return _RESULT
    _RESULT = load_all(build, roots)
    return _RESULT


def load_all(build: str, roots: Sequence[Path]) -> PreloadResult:
    """Load every library of :data:`LIBRARIES` in order: from a wheel folder in ``roots``, else
    through the loader's own search (a system CUDA install); record the missing ones."""
    return PreloadResult(build, [_load(lib, roots) for lib in LIBRARIES])


def _load(library: CudaLibrary, roots: Sequence[Path]) -> Resolved:
    path = find(library, roots)
    try:
        if path is not None:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            return Resolved(library, "pip", str(path))
        ctypes.CDLL(library.soname, mode=ctypes.RTLD_GLOBAL)  # LD_LIBRARY_PATH, ld.so.cache (a CUDA install)
        return Resolved(library, "system", loaded_path(library.soname))
    except OSError as exc:
        if path is None:
            return Resolved(library, "missing")
        return Resolved(library, "failed", str(path), first_line(exc))


def locate_system(library: SystemLibrary) -> tuple[Optional[str], str]:
    """(the file a system library resolves to, "") or (None, the loader's reason)."""
    try:
        ctypes.CDLL(library.soname)
    except OSError as exc:
        return None, first_line(exc)
    return loaded_path(library.soname) or library.soname, ""


def loaded_path(soname: str) -> Optional[str]:
    """The file a library already loaded into this process came from (Linux: /proc/self/maps)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and os.path.basename(parts[5]).startswith(soname):
            return parts[5]
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def missing_message(missing: Sequence[Resolved]) -> str:
    """One line: each library that is not there and the pip package that provides it."""
    parts = [r.library.missing_text() + (f": {r.error}" if r.error else "") for r in missing]
    return (f"CUDA {'library' if len(parts) == 1 else 'libraries'} missing for mxnet's CUDA build: "
            f"{'; '.join(parts)} (or pip install -e '.[gpu]')")


def require() -> PreloadResult:
    """:func:`preload`, then one-line :class:`CudaLibraryError` if a needed library is missing."""
    result = preload()
    if result.missing:
        raise CudaLibraryError(missing_message(result.missing))
    return result


def explain_load_error(exc: BaseException) -> Optional[str]:
    """The one line for an ``OSError`` of the loader that names a CUDA library bbadapt[gpu] provides
    (``libcudnn.so.8: cannot open shared object file``), else None."""
    text = first_line(exc)
    for library in LIBRARIES:
        if text.startswith(library.soname + ":") or f"{library.soname}: cannot open" in text:
            return missing_message([Resolved(library, "missing")])
    return None
