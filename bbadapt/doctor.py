"""``bbadapt doctor``: what this environment can run (CPU work, GPU work) and, where not, why.

One screen (or ``--json``): Python; the mxnet distribution, version and build features;
for a CUDA build each library it needs and the file it resolved to (or the pip package to
install); the NVIDIA driver and each GPU with its verdict (see
:mod:`bbadapt.platform.devices`); horovod and how it was built; gluoncv and numpy.

Every section is gathered on its own: one that fails (mxnet cannot be imported, no
driver) is reported as such and never hides the others. ``collect`` returns plain data
(what ``--json`` prints); ``render`` turns it into lines; the CLI decides the exit code
from ``cpu_ok``, ``torch_ok`` and ``gpu``.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from typing import Optional

from bbadapt.platform import cuda_libs
from bbadapt.platform.cuda_driver import DriverUnavailable, GpuQuery, default_query
from bbadapt.platform.devices import judge

FEATURES = ("CUDA", "CUDNN", "NCCL", "MKLDNN", "DIST_KVSTORE")
PACKAGES = ("gluoncv", "numpy")
MXNET_DISTRIBUTION = re.compile(r"mxnet([-_].*)?", re.IGNORECASE)
CPU_BUILD_ADVICE = ("this mxnet is the CPU-only build: install mxnet-cu112 and the CUDA 11 libraries with "
                    "pip install -e '.[gpu]' (or make gpu-setup) on a machine with an NVIDIA GPU; see docs/gpu.md")


def collect(query: Optional[GpuQuery] = None) -> dict:
    """Everything ``doctor`` reports, as JSON-ready data. ``query``: the driver (default ``libcuda.so.1``)."""
    report = {"python": python_section(), "mxnet": mxnet_section()}
    report["cuda_libraries"] = libraries_section(report["mxnet"])
    report["driver"], report["gpus"] = gpu_section(query, _wheel_rules(report["mxnet"]))
    report["horovod"] = horovod_section()
    report["packages"] = packages_section()
    report["cpu_ok"] = report["mxnet"].get("error") is None and report["mxnet"].get("cpu_check") is True
    report["gpu"] = gpu_usability(report)
    report["torch"] = torch_section()
    report["torch_ok"] = report["torch"].get("error") is None
    return report


def python_section() -> dict:
    return {"version": platform.python_version(), "executable": sys.executable}


def mxnet_section() -> dict:
    """Installed mxnet distribution(s), version, build features; mxnet is imported (after the preload)."""
    import importlib.metadata as metadata

    names = sorted({d.metadata["Name"] for d in metadata.distributions()
                    if d.metadata["Name"] and MXNET_DISTRIBUTION.fullmatch(d.metadata["Name"])})
    section: dict = {"distributions": names, "cuda11_build": cuda_libs.cuda11_build()}
    try:
        import mxnet as mx
    except Exception as exc:  # noqa: BLE001 - a broken install is what doctor is for
        section["error"] = cuda_libs.explain_load_error(exc) or f"import mxnet failed: {cuda_libs.first_line(exc)}"
        return section
    features = mx.runtime.Features()
    section.update(version=mx.__version__, features={name: features.is_enabled(name) for name in FEATURES},
                   error=None)
    try:
        section["cpu_check"] = float(mx.nd.ones((2, 2)).sum().asscalar()) == 4.0
    except Exception as exc:  # noqa: BLE001
        section["cpu_check"] = f"a CPU operation failed: {cuda_libs.first_line(exc)}"
    if section["features"]["CUDA"]:
        try:
            section["gpus_seen"] = mx.context.num_gpus()
        except Exception as exc:  # noqa: BLE001 - e.g. "CUDA: CUDA driver version is insufficient"
            section["gpus_seen"] = 0
            section["gpu_error"] = cuda_libs.first_line(exc)
    return section


def libraries_section(mxnet: dict) -> dict:
    """For a CUDA build: each library, where it resolved (pip folder or system) or what to install."""
    build = mxnet.get("cuda11_build")
    if build is None:  # the CPU build, or an mxnet built elsewhere (NVIDIA's container) with libraries of its own
        return {"needed": False, "libraries": [], "system": [],
                "note": "not the pip mxnet-cu11x wheel" if mxnet.get("features", {}).get("CUDA") else "CPU build"}
    result = cuda_libs.preload()
    if result.build is None:  # no nvidia folder on sys.path: look where the loader looks
        result = cuda_libs.load_all(build, cuda_libs.nvidia_roots())
    libraries = [{"soname": r.library.soname, "status": r.status, "path": r.path, "required": r.library.required,
                  "package": r.library.package.requirement, "needed_by": r.library.needed_by, "error": r.error}
                 for r in result.libraries]
    system = []
    for library in cuda_libs.SYSTEM_LIBRARIES:
        path, error = cuda_libs.locate_system(library)
        system.append({"soname": library.soname, "path": path, "provider": library.provider, "error": error})
    missing = cuda_libs.missing_message(result.missing) if result.missing else None
    return {"needed": True, "libraries": libraries, "system": system, "missing": missing}


def _wheel_rules(mxnet: dict) -> bool:
    """Judge GPUs by the pip mxnet-cu11x wheel's kernels (see ``devices.wheel_kernels_apply``)?"""
    return mxnet.get("cuda11_build") is not None or not mxnet.get("features", {}).get("CUDA")


def gpu_section(query: Optional[GpuQuery], wheel_rules: bool = True) -> tuple[dict, list[dict]]:
    """The driver's version and each GPU with name, memory, compute capability and verdict.
    ``wheel_rules=False``: an mxnet built elsewhere, whose kernels bbadapt cannot judge."""
    try:
        report = (query or default_query()).probe()
    except DriverUnavailable as exc:
        return {"version": None, "error": str(exc)}, []
    gpus = []
    for gpu in report.gpus:
        verdict = judge(gpu)
        supported, text = verdict.supported, verdict.text
        if not wheel_rules:
            supported, text = True, ("not judged: this mxnet is not the pip mxnet-cu112 wheel (e.g. NVIDIA's "
                                     "container) and brings kernels of its own")
        gpus.append({"index": gpu.index, "name": gpu.name, "memory_gib": round(gpu.memory_gib, 1),
                     "capability": gpu.capability_text, "supported": supported, "verdict": text})
    return {"version": report.version_text if report.version else None, "error": None}, gpus


def horovod_section() -> dict:
    """Whether horovod is installed and how it was built (MXNet, Gloo, NCCL, MPI)."""
    try:
        import horovod
    except ImportError:
        return {"installed": False}
    section = {"installed": True, "version": getattr(horovod, "__version__", "unknown")}
    try:
        import horovod.mxnet as hvd
    except Exception as exc:  # noqa: BLE001 - built without MXNet: "extension ... has not been built"
        section.update(mxnet=False, error=cuda_libs.first_line(exc))
        return section
    section.update(mxnet=True, gloo=bool(hvd.gloo_built()), nccl=bool(hvd.nccl_built()), mpi=bool(hvd.mpi_built()))
    return section


# Run in a child process: torch is never imported beside mxnet in doctor's own process (the two loaded together
# crashed a test worker once), and a broken torch install cannot take doctor down with it.
TORCH_PROBE = """
import json
out = {}
try:
    import torch, torchvision
    from torchvision.ops import nms
    out.update(torch=torch.__version__, torchvision=torchvision.__version__, cuda_build=torch.version.cuda)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    out["cpu_check"] = nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]
    out["gpus"] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            try:
                ok = torch.ones(2, device=f"cuda:{i}").sum().item() == 2.0
                problem = None
            except Exception as exc:
                ok, problem = False, str(exc).splitlines()[0]
            out["gpus"].append(dict(index=i, name=p.name, capability=f"{p.major}.{p.minor}",
                                    memory_gib=p.total_memory / 2**30, runs=ok, problem=problem))
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
print(json.dumps(out))
"""
TORCH_MINIMUM = {"torch": (2, 4), "torchvision": (0, 19)}


def torch_section(timeout: float = 300.0) -> dict:
    """torch and torchvision (the torch engine): versions, a torchvision op on the CPU, each CUDA GPU used once."""
    try:
        probe = subprocess.run([sys.executable, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=timeout)
        section = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.stdout.strip() else {
            "error": f"the torch probe exited {probe.returncode}: {cuda_libs.first_line(probe.stderr.strip() or 'no output')}"}
    except subprocess.TimeoutExpired:
        section = {"error": f"importing torch took over {timeout:.0f} s"}
    if section.get("error", "").startswith("ModuleNotFoundError"):
        section["error"] = "not installed (pip install -e '.[torch]'; docs/training.md)"
    if section.get("error") is None:
        for name, minimum in TORCH_MINIMUM.items():
            if _release(section[name]) < minimum:
                section["error"] = f"{name} {section[name]} is older than {'.'.join(map(str, minimum))}"
                break
        else:
            if section.get("cpu_check") is not True:
                section["error"] = "torchvision.ops.nms gave a wrong result on the CPU"
    return section


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:2])


def packages_section() -> dict:
    import importlib.metadata as metadata

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gpu_usability(report: dict) -> dict:
    """``{"usable": [GPU indices], "problem": one line or None}``: the first reason no GPU can be used."""
    mxnet, libraries, gpus = report["mxnet"], report["cuda_libraries"], report["gpus"]
    usable = [g["index"] for g in gpus if g["supported"]]
    problem = None
    if mxnet.get("error"):
        problem = mxnet["error"]
    elif libraries.get("missing"):
        problem = libraries["missing"]
    elif not mxnet["features"]["CUDA"]:
        problem = CPU_BUILD_ADVICE
    elif report["driver"].get("error"):
        problem = report["driver"]["error"]
    elif not gpus:
        problem = "the NVIDIA driver sees no GPU"
    elif not usable:
        first = gpus[0]
        problem = f"GPU {first['index']} ({first['name']}) is {first['verdict']}"
    elif mxnet.get("gpu_error") or not mxnet.get("gpus_seen"):
        problem = f"mxnet sees no GPU: {mxnet.get('gpu_error') or 'num_gpus() is 0'}"
    return {"usable": [] if problem else usable, "problem": problem}


def render(report: dict) -> list[str]:
    """The one-screen text form."""
    mx = report["mxnet"]
    lines = [f"python        {report['python']['version']} ({report['python']['executable']})"]
    dists = ", ".join(mx["distributions"]) or "none installed"
    if mx.get("error"):
        lines.append(f"mxnet         {dists}: {mx['error']}")
    else:
        flags = "  ".join(f"{k} {'on' if v else 'off'}" for k, v in mx["features"].items())
        lines.append(f"mxnet         {mx['version']} ({dists})  {flags}")
    if len(mx["distributions"]) > 1:
        lines.append(f"              WARNING: {dists} are installed together; they are the same package and "
                     "overwrite each other: keep one (a venv per build, docs/gpu.md)")
    lines += _library_lines(report["cuda_libraries"])
    driver = report["driver"]
    lines.append(f"driver        {'CUDA ' + driver['version'] if driver['version'] else 'none'}"
                 + (f": {driver['error']}" if driver.get("error") else ""))
    if not report["gpus"]:
        lines.append("GPUs          none")
    for g in report["gpus"]:
        lines.append(f"GPU {g['index']:<9} {g['name']}, {g['memory_gib']:.1f} GiB, compute capability "
                     f"{g['capability']}: {g['verdict']}")
    lines.append(f"horovod       {_horovod_text(report['horovod'])}")
    lines.append("packages      " + "  ".join(f"{k} {v or 'not installed'}" for k, v in report["packages"].items()))
    lines.append(f"CPU work      {'yes' if report['cpu_ok'] else 'NO: ' + str(mx.get('error') or mx.get('cpu_check'))}")
    gpu = report["gpu"]
    lines.append("GPU work      " + (f"yes, GPU {', '.join(map(str, gpu['usable']))}" if not gpu["problem"]
                                     else f"no: {gpu['problem']}"))
    lines.append(f"torch engine  {_torch_text(report['torch'])}")
    return lines


def _torch_text(section: dict) -> str:
    """One line: what the torch engine (train/evaluate of a torchvision export) runs on here."""
    if section.get("error"):
        return f"NO: {section['error']}"
    gpus = ", ".join(f"GPU {g['index']} {g['name']} (sm_{g['capability'].replace('.', '')}) "
                     + ("yes" if g["runs"] else f"NO: {g['problem']}") for g in section["gpus"])
    return (f"torch {section['torch']}, torchvision {section['torchvision']}: CPU yes, "
            + (gpus or "no CUDA GPU"))


def _library_lines(section: dict) -> list[str]:
    if not section["needed"]:
        return [f"CUDA libs     not checked ({section['note']})" if section["note"] != "CPU build"
                else "CUDA libs     not needed (CPU build)"]
    lines = ["CUDA libs"]
    for lib in section["libraries"]:
        if lib["status"] in ("pip", "system"):
            where = f"{lib['path']} ({lib['status']})"
        elif lib["status"] == "failed":
            where = f"FAILED to load {lib['path']}: {lib['error']}"
        else:
            where = f"missing: pip install {lib['package']}" + ("" if lib["required"] else
                                                              f" (optional: {lib['needed_by']})")
        lines.append(f"  {lib['soname']:<26} {where}")
    for lib in section["system"]:
        lines.append(f"  {lib['soname']:<26} {lib['path'] or 'missing: from ' + lib['provider']}")
    return lines


def _horovod_text(section: dict) -> str:
    if not section["installed"]:
        return "not installed (pip install 'bbadapt[horovod]' with HOROVOD_WITH_MXNET=1; docs/training.md)"
    if not section.get("mxnet"):
        return f"{section['version']}, built WITHOUT MXNet ({section.get('error', '')})"
    built = ", ".join(f"{k} {'yes' if section[k] else 'no'}" for k in ("gloo", "nccl", "mpi"))
    return f"{section['version']}, MXNet yes, {built}"
