"""The device helper and the GPU preflight.

The verdicts are pinned down with :class:`FixedGpus` (a GPU described, not present). The
ctypes binding to the driver is run for real against a fake ``libcuda`` built with ``cc``
that describes an A100 and an H100, and the hook in ``load_detector`` against the process's
driver query set to a described H100: it must refuse before anything is built.
"""

from __future__ import annotations

import json

import mxnet as mx
import pytest

from bbadapt.bundle.manifest import SCHEMA_VERSION
from bbadapt.core.spec import PRESETS
from bbadapt.platform import cuda_driver
from bbadapt.platform.cuda_driver import CudaDriver, DriverReport, DriverUnavailable, FixedGpus, GpuInfo
from bbadapt.platform.devices import UnsupportedGpu, check_contexts, contexts, judge, parse_gpus, preflight
from bbadapt.platform.errors import DeviceError, OptionError

from .fake_cuda import fake_libcuda

GIB = 2**30


def one_gpu(name: str, capability: tuple[int, int], driver: tuple[int, int] = (12, 4)) -> FixedGpus:
    return FixedGpus(DriverReport(driver, [GpuInfo(0, name, capability, 24 * GIB)]))


def test_an_ampere_gpu_passes_the_preflight():
    (gpu,) = preflight([0], one_gpu("NVIDIA GeForce RTX 3090", (8, 6)))
    assert gpu.name == "NVIDIA GeForce RTX 3090"
    assert judge(gpu).text == "supported (runs the sm_86 kernels)"


@pytest.mark.parametrize("capability, kernels", [((8, 9), "sm_86"), ((8, 0), "sm_80"), ((7, 5), "sm_70"),
                                                 ((6, 1), "sm_60"), ((5, 2), "sm_50")])
def test_a_gpu_runs_the_kernels_of_its_major_version_up_to_its_minor(capability, kernels):
    verdict = judge(GpuInfo(0, "gpu", capability))
    assert verdict.supported and verdict.text == f"supported (runs the {kernels} kernels)"


def test_a_hopper_gpu_is_refused_in_one_line_saying_why_and_what_to_do():
    with pytest.raises(UnsupportedGpu) as refused:
        preflight([0], one_gpu("NVIDIA H100 80GB HBM3", (9, 0)))
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and refused.value.exit_code == 1
    assert message.startswith("GPU 0 (NVIDIA H100 80GB HBM3) is unsupported: compute capability 9.0 is newer than "
                              "the sm_50..sm_86 kernels of mxnet-cu112 1.9.1, which ships no PTX")
    assert "NVIDIA's container" in message and "bbadapt export --onnx" in message


def test_an_old_gpu_is_refused():
    with pytest.raises(UnsupportedGpu, match=r"GPU 0 \(Tesla K80\) is unsupported: compute capability 3\.5 is "
                                             r"older than sm_50"):
        preflight([0], one_gpu("Tesla K80", (3, 5)))


def test_a_blackwell_gpu_is_refused_like_hopper():
    assert not judge(GpuInfo(0, "NVIDIA B200", (10, 0))).supported
    assert not judge(GpuInfo(0, "NVIDIA GeForce RTX 5090", (12, 0))).supported


def test_only_the_requested_gpus_are_judged():
    gpus = FixedGpus(DriverReport((12, 4), [GpuInfo(0, "NVIDIA H100 PCIe", (9, 0)), GpuInfo(1, "NVIDIA A10", (8, 6))]))
    assert [g.name for g in preflight([1], gpus)] == ["NVIDIA A10"]
    with pytest.raises(UnsupportedGpu, match="GPU 0 .NVIDIA H100 PCIe."):
        preflight([1, 0], gpus)


def test_a_gpu_the_driver_does_not_have_and_an_old_driver_are_one_line():
    with pytest.raises(DeviceError, match=r"GPU 2 requested but the NVIDIA driver sees 1 GPU\(s\) \(0\.\.0\)"):
        preflight([2], one_gpu("NVIDIA A100-SXM4-40GB", (8, 0)))
    with pytest.raises(UnsupportedGpu, match="the NVIDIA driver runs CUDA up to 10.2; mxnet-cu112 needs a driver "
                                             r"for CUDA 11\.0 or newer"):
        preflight([0], one_gpu("NVIDIA A100-SXM4-40GB", (8, 0), driver=(10, 2)))


def test_the_driver_query_reads_name_capability_memory_and_version_through_libcuda(tmp_path):
    library = fake_libcuda(tmp_path / "libcuda-fake.so.1", [("NVIDIA A100-SXM4-40GB", 8, 0, 40 * GIB),
                                                            ("NVIDIA H100 80GB HBM3", 9, 0, 80 * GIB)])
    driver = CudaDriver(str(library))
    report = driver.probe()
    assert report.version == (12, 4) and report.version_text == "12.4"
    assert report.gpus == [GpuInfo(0, "NVIDIA A100-SXM4-40GB", (8, 0), 40 * GIB),
                           GpuInfo(1, "NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB)]
    assert driver.probe() is report  # probed once per process
    assert [g.index for g in preflight([0], driver)] == [0]
    with pytest.raises(UnsupportedGpu, match=r"GPU 1 \(NVIDIA H100 80GB HBM3\) is unsupported: compute capability 9\.0"):
        preflight([0, 1], driver)


def test_a_driver_without_devices_and_a_failing_driver(tmp_path):
    none = fake_libcuda(tmp_path / "libcuda-none.so.1", [], init_status=cuda_driver.CUDA_ERROR_NO_DEVICE)
    assert CudaDriver(str(none)).probe().gpus == []
    broken = fake_libcuda(tmp_path / "libcuda-old.so.1", [], init_status=35)
    with pytest.raises(DriverUnavailable, match="the NVIDIA driver failed in cuInit: CUDA driver version is "
                                                "insufficient for CUDA runtime version"):
        CudaDriver(str(broken)).probe()
    with pytest.raises(DriverUnavailable, match=r"no NVIDIA driver: .*libcuda-absent\.so\.1 cannot be loaded"):
        CudaDriver(str(tmp_path / "libcuda-absent.so.1")).probe()


def test_gpu_numbers_are_parsed_without_mxnet():
    assert parse_gpus("0,1") == [0, 1] and parse_gpus(" 2 ") == [2]
    assert parse_gpus(None) is None and parse_gpus(None, cpu=True) is None
    for bad in ("a", "0,0", "-1", ","):
        with pytest.raises(OptionError):
            parse_gpus(bad)
    with pytest.raises(OptionError, match="--gpus and --cpu exclude each other"):
        parse_gpus("0", cpu=True)


def test_contexts_on_the_cpu_build():
    assert contexts() == [mx.cpu()] and contexts(None, cpu=True) == [mx.cpu()]
    with pytest.raises(DeviceError, match="this mxnet sees no GPU"):
        contexts("0", query=one_gpu("NVIDIA A10", (8, 6)))


def test_load_detector_on_a_gpu_is_refused_before_anything_is_built(tmp_path):
    """The hook in load_detector: with the process's driver query describing an H100, asking for
    mx.gpu(0) is refused right after the manifest is read (the params file here is not even valid)."""
    from bbadapt.engines.gluon.detector_bundle import load_detector

    bundle = tmp_path / "frcnn"
    bundle.mkdir()
    manifest = {"schema_version": SCHEMA_VERSION, "kind": "detector", "model": "resnet18_v1b",
                "source": PRESETS["imagenet"].to_dict(), "target": PRESETS["rgb255"].to_dict(), "plan": [],
                "detector": {"classes": ["raccoon"], "layout": "c4", "freeze_at": 2, "settings": {}}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "detector.params").write_bytes(b"not parameters")
    previous = cuda_driver.set_default_query(one_gpu("NVIDIA H100 80GB HBM3", (9, 0)))
    try:
        with pytest.raises(UnsupportedGpu, match=r"GPU 0 \(NVIDIA H100 80GB HBM3\) is unsupported"):
            load_detector(bundle, ctx=mx.gpu(0))
        with pytest.raises(UnsupportedGpu):
            check_contexts([mx.cpu(), mx.gpu(0)])
        check_contexts(mx.cpu())  # nothing to check on the CPU
    finally:
        cuda_driver.set_default_query(previous)


def test_an_mxnet_built_elsewhere_is_not_judged_by_the_pip_wheels_kernels():
    """NVIDIA's container brings an MXNet with Hopper kernels: only the driver and the GPU's existence are checked."""
    hopper = one_gpu("NVIDIA H100 80GB HBM3", (9, 0))
    assert [g.name for g in preflight([0], hopper, check_capability=False)] == ["NVIDIA H100 80GB HBM3"]
    with pytest.raises(DeviceError, match="GPU 1 requested"):
        preflight([1], hopper, check_capability=False)
