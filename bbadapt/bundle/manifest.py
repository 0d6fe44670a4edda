"""A bundle's ``manifest.json``: written with every output, read with one-line errors, and the
test of whether a directory is a bbadapt output at all (``--force`` replaces nothing else).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from bbadapt.bundle.schema import (
    BACKBONE_PARAMS,
    KINDS,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    OUTPUT_FILES,
    SCHEMA_VERSION,
    BundleManifest,
    read_small,
)
from bbadapt.platform import atomic
from bbadapt.platform.errors import OutputError

PARAMS = BACKBONE_PARAMS  # the name this module always exported
__all__ = ["KINDS", "MANIFEST", "MAX_MANIFEST_BYTES", "OUTPUT_FILES", "PARAMS", "SCHEMA_VERSION", "BundleManifest",
           "ownership_problem", "check_params", "read_manifest", "refuse_existing", "staged_output", "store_manifest",
           "versions", "write_manifest"]


def ownership_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a bbadapt output that ``--force`` may replace, or None.

    Recognised by content, not by a file name: the manifest must parse as a bbadapt manifest,
    and every entry must be a file bbadapt writes. Training checkpoints are refused too: they
    are hours of work that a re-conversion must not delete by accident.
    """
    if not directory.is_dir():
        return "it is not a directory"
    names = {p.name for p in directory.iterdir()}
    if not names:
        return None
    try:
        data = json.loads(read_small(directory / MANIFEST))
    except (OSError, ValueError, RecursionError):
        return f"it is not a bbadapt output (no readable {MANIFEST}); choose another --out"
    if not (isinstance(data, dict) and isinstance(data.get("schema_version"), int) and data.get("kind") in KINDS
            and isinstance(data.get("versions"), dict) and "bbadapt" in data["versions"]):
        return f"its {MANIFEST} is not a bbadapt manifest; choose another --out"
    if "checkpoints" in names:
        return "it holds training checkpoints (checkpoints/); move them away first"
    foreign = sorted(names - OUTPUT_FILES)
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"it holds files bbadapt did not write ({listed}); move them away or choose another --out"
    return None


def refuse_existing(out: Path, force: bool) -> None:
    """Fail before minutes of work when the output could not be written at the end."""
    atomic.check_target(atomic.resolve_target(out), force, ownership_problem)


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """A staging directory that becomes the output ``out`` only when the block succeeds."""
    with atomic.staged_directory(out, force, ownership_problem) as stage:
        yield stage


def versions() -> dict:
    import mxnet
    import numpy

    from bbadapt import __version__

    found = {"bbadapt": __version__, "mxnet": mxnet.__version__, "numpy": numpy.__version__,
             "python": platform.python_version()}
    try:
        from importlib.metadata import version

        found["gluoncv"] = version("gluoncv")
    except Exception:  # noqa: BLE001 - gluoncv is optional for gluon-only models
        pass
    return found


def write_manifest(directory: Path, manifest: BundleManifest | dict) -> BundleManifest:
    """Write a new bundle's ``manifest.json``, stamped with this schema version, the time and the versions.

    ``manifest``: the typed manifest, or its fields as a dict (validated here, named by the
    file it becomes). Returns what was written.
    """
    path = Path(directory) / MANIFEST
    if isinstance(manifest, dict):
        manifest = BundleManifest.from_dict({"schema_version": SCHEMA_VERSION, **manifest}, str(path))
    stamped = manifest.replace(schema_version=SCHEMA_VERSION, created=datetime.now(UTC).isoformat(timespec="seconds"),
                               versions=versions())
    return store_manifest(directory, stamped)


def store_manifest(directory: Path, manifest: BundleManifest) -> BundleManifest:
    """Write ``manifest`` as it is (a checkpoint keeps its bundle's creation stamp); returns it read from there."""
    (Path(directory) / MANIFEST).write_text(manifest.to_json())
    return manifest.replace(directory=Path(directory))


def read_manifest(directory: str | os.PathLike, require_params: bool = True) -> BundleManifest:
    """The manifest of a bundle, typed and validated, with one-line errors for anything unusable.

    ``require_params=False`` accepts a directory without the backbone parameters (a
    detector checkpoint holds only the manifest and ``detector.params``). The old dict form:
    ``read_manifest(d).to_dict()``.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise OutputError(f"no bbadapt output at {directory}")
    if not path.is_file():
        raise OutputError(f"{directory} is not a bbadapt output ({MANIFEST} missing)")
    manifest = BundleManifest.from_json(path).replace(directory=directory)
    if require_params:
        check_params(manifest)
    return manifest


def check_params(manifest: BundleManifest) -> BundleManifest:
    """``manifest`` when its bundle holds the backbone parameters it names, else one line."""
    if not manifest.backbone_params_path.is_file():
        raise OutputError(f"{manifest.directory} lacks its parameters file {manifest.params_file}")
    return manifest
