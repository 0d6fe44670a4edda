"""bbadapt: model-zoo ResNets turned into verified, detection-ready backbones.

Data flows one way: weights -> Gluon net + input spec -> :func:`adapt` -> :func:`check`
-> bundle (:func:`convert` writes one, :func:`load_backbone` reads it back).

The public names are imported on first use, so ``import bbadapt.platform.errors`` (and every CLI
argument error) does not pay for importing mxnet.
"""

from importlib import import_module

__version__ = "0.1.0"

from .platform.cuda_libs import preload as _preload_cuda_libraries  # noqa: E402

# Before anything imports mxnet: mxnet-cu112 then finds the pip-installed CUDA 11 libraries
# (bbadapt[gpu]). Nothing happens for the CPU build. See bbadapt/platform/cuda_libs.py.
_preload_cuda_libraries()

_PUBLIC = {
    "Adapted": "core.rewrite", "adapt": "core.rewrite",
    "load_backbone": "bundle.backbone", "read_manifest": "bundle.manifest", "BundleManifest": "bundle.schema",
    "load_detector": "engines.gluon.detector_bundle",
    "convert": "pipeline", "recheck": "pipeline",
    "ConvertOptions": "options", "DetectorOptions": "options", "TrainOptions": "options", "EvaluateOptions": "options",
    "check": "verify.equivalence", "CheckOptions": "verify.equivalence", "CheckReport": "verify.check_report",
    "BbadaptError": "platform.errors",
    "PRESETS": "core.spec", "InputSpec": "core.spec", "affine_map": "core.spec", "parse_spec": "core.spec",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bbadapt' has no attribute {name!r}")
