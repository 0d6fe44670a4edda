"""``bbadapt doctor``, run as the real command line in a subprocess.

On this machine (the CPU build of mxnet, no NVIDIA driver) doctor must report the CPU as
usable (exit 0) and, with ``--gpu``, say in one line why no GPU is (exit 1). A CUDA build is
played by a fake site folder (fake libraries built with ``cc`` + an ``mxnet-cu112``
distribution record): doctor lists the file each library resolved to, or the pip package
to install. The GPU lines are rendered from GPUs described to :func:`bbadapt.doctor.collect`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bbadapt.doctor import collect, render
from bbadapt.platform.cuda_driver import DriverReport, FixedGpus, GpuInfo

from ..platform.fake_cuda import LOG_ENV, fake_site

REPO = Path(__file__).resolve().parents[2]
CPU_BUILD = "this mxnet is the CPU-only build"


def _horovod_version() -> str | None:
    try:
        return importlib.metadata.version("horovod")
    except importlib.metadata.PackageNotFoundError:
        return None


HOROVOD = _horovod_version()  # what doctor must report, whichever way this venv was set up


def doctor(*args: str, site: Path | None = None, log: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site)] * (site is not None) + [str(REPO)])}
    if log:
        env[LOG_ENV] = str(log)
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", "doctor", *args], capture_output=True, text=True,
                          env=env, cwd=REPO)


@pytest.fixture(scope="module")
def text_run() -> subprocess.CompletedProcess:
    return doctor()


@pytest.fixture(scope="module")
def json_report() -> dict:
    result = doctor("--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def line(result: subprocess.CompletedProcess, label: str) -> str:
    (found,) = [ln for ln in result.stdout.splitlines() if ln.startswith(label)]
    return found


def test_doctor_on_the_cpu_build_says_cpu_yes_gpu_no_and_exits_0(text_run):
    assert text_run.returncode == 0, text_run.stderr
    assert text_run.stderr == ""
    assert line(text_run, "python").split()[1] == platform.python_version()
    mxnet = line(text_run, "mxnet")
    assert "1.9.1 (mxnet)" in mxnet and "CUDA off" in mxnet and "CUDNN off" in mxnet and "NCCL off" in mxnet
    assert "MKLDNN on" in mxnet and "DIST_KVSTORE " in mxnet
    assert line(text_run, "CUDA libs").split(None, 2)[2] == "not needed (CPU build)"
    assert "libcuda.so.1" in line(text_run, "driver")
    assert line(text_run, "GPUs").split()[1] == "none"
    horovod = line(text_run, "horovod").split(None, 1)[1]
    if HOROVOD:  # make test installs it: MXNet and Gloo built in, no NCCL on this CPU build
        assert horovod.startswith(f"{HOROVOD}, MXNet yes, gloo yes"), horovod
    else:
        assert horovod.startswith("not installed")
    packages = line(text_run, "packages")
    assert f"gluoncv {importlib.metadata.version('gluoncv')}" in packages
    assert f"numpy {importlib.metadata.version('numpy')}" in packages
    assert line(text_run, "CPU work").split()[-1] == "yes"
    assert line(text_run, "GPU work").startswith(f"GPU work      no: {CPU_BUILD}")
    torch_line = line(text_run, "torch engine")  # torch's own __version__ carries the build: 2.14.1+cu130
    assert torch_line.startswith(f"torch engine  torch {importlib.metadata.version('torch')}")
    assert f", torchvision {importlib.metadata.version('torchvision')}" in torch_line
    assert torch_line.endswith(": CPU yes, no CUDA GPU")
    assert len(text_run.stdout.splitlines()) <= 24, "one screen"


def test_doctor_json_carries_the_same_facts(json_report):
    assert json_report["python"]["version"] == platform.python_version()
    assert json_report["mxnet"]["distributions"] == ["mxnet"] and json_report["mxnet"]["version"] == "1.9.1"
    assert set(json_report["mxnet"]["features"]) == {"CUDA", "CUDNN", "NCCL", "MKLDNN", "DIST_KVSTORE"}
    assert json_report["mxnet"]["features"]["CUDA"] is False and json_report["mxnet"]["features"]["MKLDNN"] is True
    assert json_report["cuda_libraries"]["needed"] is False
    assert json_report["driver"]["version"] is None and "libcuda.so.1" in json_report["driver"]["error"]
    assert json_report["gpus"] == [] and json_report["horovod"]["installed"] is bool(HOROVOD)
    assert json_report["packages"]["numpy"] == importlib.metadata.version("numpy")
    assert json_report["cpu_ok"] is True
    # the torch engine, probed in a child process (torch never loads beside mxnet): nms ran on the CPU
    assert json_report["torch_ok"] is True and json_report["torch"]["cpu_check"] is True
    assert json_report["torch"]["torch"].split("+")[0] == importlib.metadata.version("torch").split("+")[0]
    assert json_report["torch"]["gpus"] == []
    assert json_report["gpu"]["usable"] == [] and json_report["gpu"]["problem"].startswith(CPU_BUILD)


def test_doctor_gpu_exits_1_with_one_line_when_no_gpu_is_usable():
    result = doctor("--gpu")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (error,) = result.stderr.splitlines()
    assert error.startswith(f"bbadapt: error: no usable GPU: {CPU_BUILD}") and "pip install -e '.[gpu]'" in error
    assert "CPU work      yes" in result.stdout  # the report is still printed


def test_doctor_lists_each_cuda_library_file_or_the_package_to_install(tmp_path):
    site = fake_site(tmp_path / "site", leave_out=("libcudnn.so.8",))
    result = doctor("--json", site=site, log=tmp_path / "load.log")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mxnet"]["cuda11_build"] == "mxnet-cu112"
    libraries = {lib["soname"]: lib for lib in report["cuda_libraries"]["libraries"]}
    assert libraries["libcudart.so.11.0"]["status"] == "pip"
    assert libraries["libcudart.so.11.0"]["path"] == str(site / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.11.0")
    assert libraries["libcudnn.so.8"]["status"] == "missing"
    assert libraries["libcudnn.so.8"]["package"] == "nvidia-cudnn-cu11==8.9.6.50"
    assert [lib["soname"] for lib in report["cuda_libraries"]["system"]] == ["libcuda.so.1", "libquadmath.so.0"]
    assert "libcudnn.so.8 (pip install nvidia-cudnn-cu11==8.9.6.50)" in report["gpu"]["problem"]

    text = doctor(site=site, log=tmp_path / "load.log")
    assert "  libcudnn.so.8              missing: pip install nvidia-cudnn-cu11==8.9.6.50" in text.stdout.splitlines()
    gpu = doctor("--gpu", site=site, log=tmp_path / "load.log")
    (error,) = gpu.stderr.splitlines()
    assert gpu.returncode == 1 and "libcudnn.so.8 (pip install nvidia-cudnn-cu11==8.9.6.50)" in error


def test_each_gpu_is_shown_with_name_memory_capability_and_verdict():
    gpus = FixedGpus(DriverReport((12, 4), [GpuInfo(0, "NVIDIA A100-SXM4-40GB", (8, 0), 40 * 2**30),
                                            GpuInfo(1, "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)]))
    report = collect(gpus)
    lines = render(report)
    assert "driver        CUDA 12.4" in lines
    assert "GPU 0         NVIDIA A100-SXM4-40GB, 40.0 GiB, compute capability 8.0: supported (runs the sm_80 kernels)" \
        in lines
    (h100,) = [ln for ln in lines if ln.startswith("GPU 1")]
    assert "80.0 GiB, compute capability 9.0: unsupported: compute capability 9.0 is newer than" in h100
    assert report["gpus"][1] | {"verdict": None} == {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 80.0,
                                                     "capability": "9.0", "supported": False, "verdict": None}
    assert report["gpu"]["problem"].startswith(CPU_BUILD)  # GPUs exist, but this mxnet cannot use them


def test_gpus_under_an_mxnet_built_elsewhere_are_listed_not_judged():
    from bbadapt.doctor import gpu_section

    driver, (gpu,) = gpu_section(FixedGpus(DriverReport((12, 2), [GpuInfo(0, "NVIDIA H100 PCIe", (9, 0), 80 * 2**30)])),
                                 wheel_rules=False)
    assert driver == {"version": "12.2", "error": None}
    assert gpu["supported"] is True and gpu["verdict"].startswith("not judged: this mxnet is not the pip mxnet-cu112")
