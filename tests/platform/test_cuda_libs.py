"""The preload of the pip-installed CUDA 11 libraries, on fake installs built with ``cc``.

Each scenario runs in its own Python process (a library loaded into a process stays there,
and the preload keeps its first result): ``import bbadapt`` with the fake site folder on
``PYTHONPATH``, exactly as a user's process starts. The fake libraries record the order in
which the dynamic loader runs them; those that NEED another fail to load if it is not
loaded first (no RPATH, as the real wheels).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bbadapt.platform import cuda_libs

from .fake_cuda import LOG_ENV, NEEDS, compile_library, fake_site

REPO = Path(__file__).resolve().parents[2]
# What libmxnet.so of mxnet-cu112 1.9.1 NEEDS (readelf), and the wheel that provides each (issue 11).
NEEDED_BY_LIBMXNET = {
    "libcudart.so.11.0": "nvidia-cuda-runtime-cu11==11.8.89",
    "libcublas.so.11": "nvidia-cublas-cu11==11.11.3.6",
    "libcublasLt.so.11": "nvidia-cublas-cu11==11.11.3.6",
    "libcudnn.so.8": "nvidia-cudnn-cu11==8.9.6.50",
    "libnccl.so.2": "nvidia-nccl-cu11==2.21.5",
    "libcufft.so.10": "nvidia-cufft-cu11==10.9.0.58",
    "libcusolver.so.11": "nvidia-cusolver-cu11==11.4.1.48",
    "libcurand.so.10": "nvidia-curand-cu11==10.3.0.86",
    "libnvrtc.so.11.2": "nvidia-cuda-nvrtc-cu11==11.8.89",
    "libnvToolsExt.so.1": "nvidia-nvtx-cu11==11.8.86",
}

PRELOAD_REPORT = """
import json, sys
import bbadapt  # the preload runs here, before anything could import mxnet
from bbadapt.platform import cuda_libs
result = cuda_libs.preload()
print(json.dumps({"build": result.build, "skipped": result.skipped,
                  "libraries": [[r.library.soname, r.status, r.path, r.error] for r in result.libraries],
                  "mxnet_imported": "mxnet" in sys.modules}))
"""


@pytest.fixture(scope="module")
def full_site(tmp_path_factory) -> Path:
    return fake_site(tmp_path_factory.mktemp("site"))


def run_python(code: str, site: Path | None, log: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``code`` in a Python that sees only ``site`` and the repository (``-S``: not the venv's site-packages,
    where torch's own CUDA 13 wheels put an ``nvidia`` folder of their own)."""
    path = os.pathsep.join([str(site)] * (site is not None) + [str(REPO)])
    env = {**os.environ, "PYTHONPATH": path, LOG_ENV: str(log)}
    env.pop("LD_LIBRARY_PATH", None)  # only what a scenario sets
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=REPO)


def preload_in_subprocess(site: Path | None, log: Path, extra_env: dict | None = None) -> dict:
    result = run_python(PRELOAD_REPORT, site, log, extra_env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def load_log(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_import_bbadapt_loads_every_pip_library_after_what_it_needs(full_site, tmp_path):
    log = tmp_path / "load.log"
    report = preload_in_subprocess(full_site, log)
    assert report["build"] == "mxnet-cu112" and not report["mxnet_imported"]
    statuses = {soname: (status, path) for soname, status, path, _ in report["libraries"]}
    assert set(statuses) >= set(NEEDED_BY_LIBMXNET)
    for soname, (status, path) in statuses.items():
        assert status == "pip" and Path(path).parent.parent.parent == full_site / "nvidia", (soname, status, path)
        assert Path(path).name == soname
    order = load_log(log)
    assert sorted(order) == sorted(statuses), "each library is loaded exactly once"
    for library, needs in NEEDS.items():
        for needed in needs:
            assert order.index(needed) < order.index(library), f"{needed} must be loaded before {library}"


def test_preload_is_idempotent(full_site, tmp_path):
    """The second call returns the first result without looking again: the folders may even be gone."""
    site = shutil.copytree(full_site, tmp_path / "site")
    log = tmp_path / "load.log"
    code = PRELOAD_REPORT + f"""
import shutil
shutil.rmtree({str(site / 'nvidia')!r})
again = cuda_libs.preload()
assert again is result, "a second preload must not search again"
assert cuda_libs.require() is result
print("same")
"""
    result = run_python(code, site, log)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "same"
    assert sorted(load_log(log)) == sorted(lib.soname for lib in cuda_libs.LIBRARIES)


def test_the_cpu_build_loads_nothing(tmp_path):
    """Library folders present but mxnet is the CPU build: not one library is loaded."""
    site = fake_site(tmp_path / "site", cuda_build=False)
    log = tmp_path / "load.log"
    report = preload_in_subprocess(site, log)
    assert report["build"] is None and report["libraries"] == []
    assert "not a CUDA 11 build" in report["skipped"]
    assert load_log(log) == []


def test_import_bbadapt_stays_cheap_without_pip_cuda_libraries(tmp_path):
    """No nvidia folder (every CPU install): neither mxnet nor importlib.metadata is imported."""
    code = "import sys, bbadapt; print('mxnet' in sys.modules, 'importlib.metadata' in sys.modules, " \
           "bbadapt.platform.cuda_libs.preload().skipped)"
    result = run_python(code, None, tmp_path / "load.log")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["False", "False"]
    assert "no nvidia folder" in result.stdout


def test_a_missing_library_is_one_line_naming_it_and_its_pip_package(tmp_path):
    site = fake_site(tmp_path / "site", leave_out=("libcudnn.so.8", "libcublasLt.so.11"))
    log = tmp_path / "load.log"
    report = preload_in_subprocess(site, log)
    statuses = {soname: (status, error) for soname, status, _, error in report["libraries"]}
    assert statuses["libcudnn.so.8"] == ("missing", "")
    status, error = statuses["libcublas.so.11"]  # present, but what it NEEDS is not
    assert status == "failed" and "libcublasLt.so.11" in error
    code = "import bbadapt\nfrom bbadapt.platform import cuda_libs\ntry:\n    cuda_libs.require()\n" \
           "except cuda_libs.CudaLibraryError as exc:\n    print(exc)\n"
    message = run_python(code, site, log).stdout.strip()
    assert len(message.splitlines()) == 1
    assert "libcudnn.so.8 (pip install nvidia-cudnn-cu11==8.9.6.50)" in message
    assert "libcublasLt.so.11 (pip install nvidia-cublas-cu11==11.11.3.6)" in message
    assert "libcudart.so.11.0" not in message


def test_a_library_not_in_any_wheel_is_taken_from_the_system_loader(tmp_path):
    """A CUDA install on LD_LIBRARY_PATH (e.g. NVIDIA's container) serves what no wheel provides."""
    site = fake_site(tmp_path / "site", leave_out=("libnccl.so.2",))
    system = compile_library(tmp_path / "system" / "libnccl.so.2", "libnccl.so.2")
    report = preload_in_subprocess(site, tmp_path / "load.log", {"LD_LIBRARY_PATH": str(system.parent)})
    status = {soname: (s, path) for soname, s, path, _ in report["libraries"]}["libnccl.so.2"]
    assert status == ("system", str(system))


def test_the_loaders_own_error_for_a_cuda_library_becomes_the_pip_line():
    with pytest.raises(OSError) as missing:  # what `import mxnet` of mxnet-cu112 raises without the wheels
        ctypes.CDLL("libcudnn.so.8")
    assert cuda_libs.explain_load_error(missing.value) == (
        "CUDA library missing for mxnet's CUDA build: libcudnn.so.8 (pip install nvidia-cudnn-cu11==8.9.6.50) "
        "(or pip install -e '.[gpu]')")
    with pytest.raises(OSError) as other:
        ctypes.CDLL("libbbadapt-nothing.so.1")
    assert cuda_libs.explain_load_error(other.value) is None


def test_the_gpu_extra_pins_mxnet_cu112_and_every_cuda_library():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    extra = extras["gpu"]
    assert "mxnet-cu112==1.9.1" in extra
    # the MXNet side, the same in [cpu] and [gpu]: a torch-only install gets neither (numpy 2 there)
    mxnet_side = {"gluoncv==0.10.5.post0", "numpy<1.24"}
    assert set(extras["cpu"]) == {"mxnet==1.9.1"} | mxnet_side
    assert set(NEEDED_BY_LIBMXNET.values()) | {"mxnet-cu112==1.9.1"} | mxnet_side == set(extra)
    assert {lib.package.requirement for lib in cuda_libs.LIBRARIES} == set(NEEDED_BY_LIBMXNET.values())
    for library in cuda_libs.LIBRARIES:
        if library.soname in NEEDED_BY_LIBMXNET:
            assert library.package.requirement == NEEDED_BY_LIBMXNET[library.soname], library.soname
    cudnn = next(r for r in extra if r.startswith("nvidia-cudnn-cu11=="))
    assert int(cudnn.split("==")[1].split(".")[0]) < 9, "cuDNN 9 ships libcudnn.so.9, which libmxnet.so cannot use"
