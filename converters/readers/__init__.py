"""Foreign weight formats -> (Gluon architecture, structural-name params, source input spec).

One module per format, each exposing ``FORMAT`` (a :class:`~converters.base.Format`). The
format of a file is detected from its content; ``--format`` overrides. Every converter
yields a :class:`~converters.base.Converted` and nothing else, so everything after it
(adapt, check, bundle, detector) is format-agnostic.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from bbadapt.core.architectures import rebuild
from bbadapt.core.registry import Converted
from converters.readers.base import HEAD_BYTES, Format, open_regular, require_file

# Order matters only for sniffing: the most specific signatures first.
# timm before torchvision: a timm state dict is a torchvision-named one with more (deep stems, ...), and a
# plain torchvision ResNet is left to torchvision.
FORMAT_MODULES = ("mxnet_symbol", "gluon_params", "timm", "torchvision", "keras", "detectron")

__all__ = ["Converted", "Format", "formats", "detect", "read", "rebuild", "FORMAT_MODULES"]


def formats() -> list[Format]:
    """Every format this bbadapt reads, in sniffing order."""
    found = []
    for name in FORMAT_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # a format module not present in this build
            raise
        found.extend(getattr(module, "FORMATS", (module.FORMAT,)))  # a module may read several formats
    return found


def by_name(name: str) -> Format:
    from bbadapt.platform.errors import OptionError

    known = {f.name: f for f in formats()}
    if name not in known:
        raise OptionError(f"unknown format {name!r}; known formats: {', '.join(known)} (see `bbadapt formats`)")
    return known[name]


def detect(path: str | os.PathLike) -> Format:
    """The format of ``path``, from its content (magic bytes, JSON, HDF5, zip, pickle)."""
    from bbadapt.platform.errors import WeightsError

    if Path(path).is_dir():
        return _detect_folder(Path(path))
    with open_regular(path) as f:
        head = f.read(HEAD_BYTES)
    path = Path(path)
    for fmt in formats():
        if fmt.sniff(path, head):
            return fmt
    raise WeightsError(f"cannot tell the format of {path}; pass --format (see `bbadapt formats`)")


def read(path: str | os.PathLike, fmt: str | None = None, arch: str | None = None, progress=None) -> Converted:
    """Read foreign weights; ``fmt`` overrides detection and must match the content."""
    from bbadapt.platform.errors import WeightsError

    if Path(path).is_dir():  # a format that is a folder of files (timm's save_for_hf)
        chosen = _detect_folder(Path(path))
        if fmt and fmt != chosen.name:
            raise WeightsError(f"{path} is a {chosen.name} folder, not {fmt}")
        return chosen.read(Path(path), arch=arch, progress=progress or (lambda _m: None))
    path = require_file(path)
    chosen = by_name(fmt) if fmt else detect(path)
    if fmt:
        with open_regular(path) as f:
            head = f.read(HEAD_BYTES)
        if not chosen.sniff(path, head):
            raise WeightsError(f"{path} does not look like {chosen.name} ({chosen.description}); "
                               f"detected: {_detected_name(path)}")
    return chosen.read(Path(path), arch=arch, progress=progress or (lambda _m: None))


def _detect_folder(path: Path) -> Format:
    from bbadapt.platform.errors import WeightsError

    for fmt in formats():
        if fmt.folder is not None and fmt.folder(path):
            return fmt
    readable = ", ".join(f.name for f in formats() if f.folder is not None)
    raise WeightsError(f"{path} is a directory that no format reads as a folder ({readable}: config.json with "
                       "an architecture, and model.safetensors or pytorch_model.bin); name a weights file")


def _detected_name(path: Path) -> str:
    try:
        return detect(path).name
    except Exception:  # noqa: BLE001 - only for the error message
        return "unknown"
