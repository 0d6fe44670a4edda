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

from bbadapt.core import atomic
from bbadapt.core.errors import OutputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "backbone.params"
KINDS = ("backbone", "detector")
# Every name bbadapt writes inside an output or checkpoint directory. A directory holding anything
# else is not replaced by --force: bbadapt never deletes a file it did not write.
OUTPUT_FILES = frozenset({MANIFEST, PARAMS, "detector.params", "report.json", "report.md", "report.html",
                          "trainer.states", "train.log.jsonl"})
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is kilobytes; a bigger file is not one


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
        data = json.loads(_read_small(directory / MANIFEST))
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


def _read_small(path: Path) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError("too large")
    return data.decode("utf-8")


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


def write_manifest(directory: Path, manifest: dict) -> None:
    manifest = {"schema_version": SCHEMA_VERSION, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                **manifest, "versions": versions()}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: str | os.PathLike, require_params: bool = True) -> dict:
    """The manifest of a bundle, with one-line errors for anything unusable.

    ``require_params=False`` accepts a directory without the backbone parameters (a
    detector checkpoint holds only the manifest and ``detector.params``).
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise OutputError(f"no bbadapt output at {directory}")
    if not path.is_file():
        raise OutputError(f"{directory} is not a bbadapt output ({MANIFEST} missing)")
    try:
        manifest = json.loads(_read_small(path))
    except RecursionError:
        raise OutputError(f"{path} is nested too deeply to be a bbadapt manifest (damaged bundle)") from None
    except (ValueError, UnicodeDecodeError):
        raise OutputError(f"{path} is not valid JSON (or larger than a manifest can be)") from None
    if not isinstance(manifest, dict):
        raise OutputError(f"{path} is not a bbadapt manifest (not a JSON object)")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise OutputError(f"{path} has no valid schema_version")
    if version > SCHEMA_VERSION:
        raise OutputError(f"{path} has schema version {version}; this bbadapt reads up to {SCHEMA_VERSION} (upgrade bbadapt)")
    for key in ("model", "source", "target", "plan"):
        if key not in manifest:
            raise OutputError(f"{path} lacks {key!r}")
    from bbadapt.core.spec import InputSpec

    for key in ("source", "target"):
        try:
            InputSpec.from_dict(manifest[key])
        except (KeyError, TypeError, ValueError):  # SpecError is a ValueError
            raise OutputError(f"{path} has an invalid {key} spec") from None
    if "arch" in manifest:
        from bbadapt.core.architectures import arch_problem

        problem = arch_problem(manifest["arch"])
        if problem:
            raise OutputError(f"{path} has an unusable arch record: it {problem}")
    if not isinstance(manifest["plan"], list) or not all(isinstance(step, dict) for step in manifest["plan"]):
        raise OutputError(f"{path} has a malformed plan")
    for key, section in (("params_file", manifest), ("detector.params_file", manifest.get("detector"))):
        name = section.get("params_file") if isinstance(section, dict) else None
        if name is not None and not (isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")):
            raise OutputError(f"{path}: {key} {name!r} is not a file name inside the bundle; refused")
    if require_params and not (directory / manifest.get("params_file", PARAMS)).is_file():
        raise OutputError(f"{directory} lacks its parameters file {manifest.get('params_file', PARAMS)}")
    return manifest


