"""The one thing every converter yields, and the small helpers they share.

A converter reads a foreign file and returns a :class:`Converted`: a Gluon network holding
the weights under its structural names, an ``arch`` record that rebuilds the same
architecture later (for bundle reload and re-checks), the input spec the weights expect,
and provenance for the manifest. Nothing else crosses the boundary: adapt, check, bundle
and detector never know which format the weights came from.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bbadapt.errors import ModelError, WeightsError
from bbadapt.zoo import ModelInfo

HEAD_BYTES = 4096  # what sniffers see of a file


@dataclass
class Converted:
    """Weights from any source, as a Gluon net plus what is needed to rebuild and judge it."""

    net: object  # a HybridBlock, parameters allocated and filled, shapes known
    arch: dict  # {"zoo": "resnet50_v1b"} or {"builder": "converters.mod:function", "kwargs": {...}}
    info: ModelInfo  # name/family/input size for reports and the check (is_cifar, default sizes)
    provenance: dict  # {"kind": "file", "format": ..., "path": ..., "sha256": ..., ...}

    @property
    def source_spec(self) -> str:
        return self.info.source_spec


@dataclass(frozen=True)
class Format:
    """A foreign format: how to recognise it from content and how to read it."""

    name: str  # as --format takes it, e.g. "mxnet-symbol"
    description: str  # one line for `bbadapt formats`
    sniff: Callable[[Path, bytes], bool]  # (path, first HEAD_BYTES bytes) -> is it mine?
    read: Callable[..., Converted]  # read(path: Path, arch: str | None, progress) -> Converted
    extensions: tuple[str, ...] = field(default=())  # typical suffixes, for help text only


def custom_info(name: str, family: str, source_spec: str, input_size: int = 224) -> ModelInfo:
    """A :class:`ModelInfo` for an architecture a converter provides (not a zoo model)."""
    return ModelInfo(name=name, family=family, library="bbadapt", source_spec=source_spec,
                     input_size=input_size, core=True)


_BUILDERS: dict[str, Callable] = {}


def architecture_builder(func: Callable) -> Callable:
    """Mark ``func`` as an architecture builder that an ``arch`` record (a manifest) may name.

    Only marked functions can be called through :func:`rebuild`: a crafted manifest must not
    be able to call a converter's other public functions (readers, writers) either.
    """
    _BUILDERS[f"{func.__module__}:{func.__name__}"] = func
    return func


def arch_problem(arch: object) -> str | None:
    """Why ``arch`` is not a usable architecture record, or None when it is.

    Builders are looked up only inside the ``converters`` package, public functions only:
    a manifest must not be able to make bbadapt import and call arbitrary code.
    """
    if not isinstance(arch, dict):
        return "is not a record"
    if "zoo" in arch:
        return None if isinstance(arch["zoo"], str) else "has a non-string zoo name"
    module_name, _, func_name = str(arch.get("builder", "")).partition(":")
    if not (module_name.startswith("converters.") and func_name.isidentifier() and not func_name.startswith("_")):
        return f"names no builder of bbadapt's converters ({arch.get('builder')!r})"
    if not isinstance(arch.get("kwargs", {}), dict):
        return "has non-keyword builder arguments"
    return None


def rebuild(arch: dict):
    """Build (random init, shapes materialized) the architecture an ``arch`` record names."""
    from bbadapt import zoo

    problem = arch_problem(arch)
    if problem:
        raise ModelError(f"unknown architecture record: it {problem}")
    if "zoo" in arch:
        return zoo.build(arch["zoo"])
    module_name = arch["builder"].partition(":")[0]
    try:
        importlib.import_module(module_name)  # registers the module's builders
    except ImportError:
        pass
    builder = _BUILDERS.get(arch["builder"])
    if builder is None:
        raise ModelError(f"{arch['builder']} is not an architecture builder of this bbadapt")
    try:
        return builder(**dict(arch.get("kwargs", {})))
    except (TypeError, KeyError, ValueError, IndexError) as exc:  # arguments a tampered record got wrong
        raise ModelError(f"architecture record for {arch['builder']} does not fit it: {type(exc).__name__}: {exc}") from None


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, as bbadapt records it everywhere (manifest provenance, re-checks)."""
    from bbadapt.weights import sha256_of

    return sha256_of(path)


def require_file(path: str | os.PathLike) -> Path:
    """The path, if it is a non-empty readable file; else one WeightsError line."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if not path.is_file():
        raise WeightsError(f"weights path is not a file: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file is empty: {path}")
    return path


def check_tensors(arrays: dict[str, np.ndarray], origin: str) -> dict[str, np.ndarray]:
    """Refuse non-finite values and non-float32 dtypes, naming the tensors; return float32 copies.

    fp16/fp64 are refused rather than cast silently: a half-precision checkpoint cannot
    give an fp32-exact conversion, and a float64 one is unusual enough to be a mistake.
    """
    odd = sorted(k for k, v in arrays.items() if v.dtype.kind == "f" and v.dtype != np.float32)
    if odd:
        kinds = sorted({str(arrays[k].dtype) for k in odd})
        raise WeightsError(f"{origin} holds {'/'.join(kinds)} tensors ({len(odd)}, e.g. {odd[0]}); "
                           "bbadapt converts float32 weights only")
    bad = sorted(k for k, v in arrays.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v)))
    if bad:
        raise WeightsError(f"{origin} has NaN/Inf values in {len(bad)} tensors (e.g. {bad[0]})")
    return arrays


def unmatched_error(origin: str, unmatched: list[str], missing: list[str]) -> WeightsError:
    """One line naming the foreign tensors nothing mapped and the net parameters nothing filled."""
    def listing(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    parts = []
    if unmatched:
        parts.append(f"{len(unmatched)} tensors in the file match nothing ({listing(unmatched)})")
    if missing:
        parts.append(f"{len(missing)} parameters get no value ({listing(missing)})")
    return WeightsError(f"{origin}: " + "; ".join(parts))
