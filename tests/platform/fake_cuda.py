"""Fake CUDA installs, built with the system C compiler, for the tests of the preload and the driver query.

``fake_site``: a folder laid out like a site-packages with the ``nvidia-*-cu11`` wheels and
``mxnet-cu112`` installed: ``nvidia/<folder>/lib/<soname>`` holds a tiny shared object per
library, named and sonamed as the real one, and ``mxnet_cu112-1.9.1.dist-info`` makes
``importlib.metadata`` report a CUDA build. Each object's constructor appends its soname to
the file named by ``$BBADAPT_FAKE_LOAD_LOG``, so the log is the real load order. Some of them
NEED others exactly as the real libraries do (libcublas NEEDS libcublasLt, ...), linked
without any RPATH: loading one before what it needs fails in the dynamic loader, as it
would with the real files.

``fake_libcuda``: a driver library answering ``cuInit``, ``cuDeviceGetName``,
``cuDeviceGetAttribute`` ... for the GPUs it is built with.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bbadapt.platform import cuda_libs

LOG_ENV = "BBADAPT_FAKE_LOAD_LOG"
# what each fake library NEEDS (the real dependencies among the CUDA 11 libraries)
NEEDS = {
    "libcublas.so.11": ["libcublasLt.so.11"],
    "libcusolver.so.11": ["libcublas.so.11", "libcublasLt.so.11"],
    "libcudnn_ops_train.so.8": ["libcudnn_ops_infer.so.8"],
    "libcudnn_cnn_infer.so.8": ["libcudnn_ops_infer.so.8"],
    "libcudnn_cnn_train.so.8": ["libcudnn_cnn_infer.so.8", "libcudnn_ops_train.so.8"],
    "libcudnn_adv_infer.so.8": ["libcudnn_ops_infer.so.8"],
    "libcudnn_adv_train.so.8": ["libcudnn_adv_infer.so.8", "libcudnn_ops_train.so.8"],
}

LIBRARY_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
%(externs)s
__attribute__((constructor)) static void record_load(void) {
    const char *log = getenv("%(log_env)s");
    if (!log) return;
    FILE *f = fopen(log, "a");
    if (f) { fputs("%(soname)s\n", f); fclose(f); }
}
int %(symbol)s(void) { return 1%(calls)s; }
"""


def symbol_of(soname: str) -> str:
    return "fake_" + "".join(c if c.isalnum() else "_" for c in soname)


def compile_library(target: Path, soname: str, needs: list[tuple[Path, str]] = (), source: str | None = None) -> Path:
    """``cc -shared`` a library named and sonamed ``soname``; ``needs``: (file, soname) it links against."""
    target.parent.mkdir(parents=True, exist_ok=True)
    code = source or LIBRARY_SOURCE % {
        "externs": "".join(f"int {symbol_of(s)}(void);\n" for _, s in needs),
        "log_env": LOG_ENV, "soname": soname, "symbol": symbol_of(soname),
        "calls": "".join(f" + {symbol_of(s)}()" for _, s in needs)}
    c_file = target.with_name(target.name + ".c")
    c_file.write_text(code)
    link = [arg for path, s in needs for arg in (f"-L{path.parent}", f"-l:{s}")]
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(target), f"-Wl,-soname,{soname}", str(c_file), *link],
                   check=True, capture_output=True)
    c_file.unlink()
    return target


def fake_site(root: Path, cuda_build: bool = True, leave_out: tuple[str, ...] = ()) -> Path:
    """A site folder with every library of ``cuda_libs.LIBRARIES`` except ``leave_out`` (each library
    is compiled after what it NEEDS, whatever order ``LIBRARIES`` has)."""
    libraries = {library.soname: library for library in cuda_libs.LIBRARIES}
    built: dict[str, Path] = {}

    def build(soname: str) -> Path:
        if soname not in built:
            needs = [(build(s), s) for s in NEEDS.get(soname, [])]
            target = root / "nvidia" / libraries[soname].package.folder / "lib" / soname
            built[soname] = compile_library(target, soname, needs)
        return built[soname]

    for soname in libraries:
        build(soname)
    for soname in leave_out:
        built[soname].unlink()
    if cuda_build:
        dist = root / "mxnet_cu112-1.9.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mxnet-cu112\nVersion: 1.9.1\n")
    return root


DRIVER_SOURCE = r"""
#include <string.h>
#include <stddef.h>
static const char *names[] = {%(names)s};
static const int majors[] = {%(majors)s};
static const int minors[] = {%(minors)s};
static const size_t memory[] = {%(memory)s};
int cuDriverGetVersion(int *v) { *v = %(version)d; return 0; }
int cuInit(unsigned int flags) { return %(init_status)d; }
int cuDeviceGetCount(int *n) { *n = %(count)d; return 0; }
int cuDeviceGet(int *d, int i) { if (i < 0 || i >= %(count)d) return 101; *d = i; return 0; }
int cuDeviceGetName(char *name, int len, int d) { strncpy(name, names[d], len - 1); name[len - 1] = 0; return 0; }
int cuDeviceGetAttribute(int *v, int attribute, int d) {
    if (attribute == 75) { *v = majors[d]; return 0; }
    if (attribute == 76) { *v = minors[d]; return 0; }
    return 1;
}
int cuDeviceTotalMem_v2(size_t *bytes, int d) { *bytes = memory[d]; return 0; }
int cuGetErrorString(int status, const char **text) {
    *text = status == 35 ? "CUDA driver version is insufficient for CUDA runtime version" : "unknown error";
    return 0;
}
"""


def fake_libcuda(target: Path, gpus: list[tuple[str, int, int, int]], version: int = 12040,
                 init_status: int = 0) -> Path:
    """A driver library for ``gpus`` = [(name, major, minor, memory bytes)]; ``version`` as cuDriverGetVersion."""
    fields = {
        "names": ", ".join(f'"{n}"' for n, *_ in gpus) or "0",
        "majors": ", ".join(str(g[1]) for g in gpus) or "0",
        "minors": ", ".join(str(g[2]) for g in gpus) or "0",
        "memory": ", ".join(f"{g[3]}ULL" for g in gpus) or "0",
        "version": version, "init_status": init_status, "count": len(gpus),
    }
    return compile_library(target, target.name, source=DRIVER_SOURCE % fields)
