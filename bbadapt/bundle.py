"""Output directories: manifest + parameters + reports, written atomically, and reloaded.

A bundle stores the adapted parameters (``save_parameters`` form) and the *plan* that
produced its structure. :func:`load_backbone` rebuilds the zoo architecture, replays the
plan to get the same block tree, then loads the parameters strictly, so a reloaded
backbone keeps its stages addressable (the detector builder needs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .errors import ModelError, OutputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "backbone.params"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB; its plan grows with the net, never to megabytes


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out`` only if the block succeeds.

    Nothing partial is ever left at ``out``: on failure the staging directory is removed;
    with ``force`` an existing ``out`` is swapped out only after the new one is complete.
    """
    out = Path(out)
    refuse_existing(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot create output {out}: {exc.strerror or exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the output should look like any directory
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    try:
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(stage, out)
    except OSError as exc:  # put things back as they were: no stage left, the old output in place
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)
        raise OutputError(f"cannot replace output {out}: {exc.strerror or exc}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory")
    if out.exists() and Path.cwd().resolve().is_relative_to(out.resolve()):
        raise OutputError(f"output {out} is (or contains) the current directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        # --force replaces an earlier output, never an unrelated directory (a typo must not delete a source tree)
        raise OutputError(f"refusing to replace {out}: it is not a bbadapt output (no {MANIFEST}); choose another --out")
    ancestor = next((p for p in Path(os.path.abspath(out)).parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise OutputError(f"cannot create output {out}: {ancestor} is not a directory")


def versions() -> dict:
    import mxnet
    import numpy

    from . import __version__

    found = {"bbadapt": __version__, "mxnet": mxnet.__version__, "numpy": numpy.__version__,
             "python": platform.python_version()}
    try:
        from importlib.metadata import version

        found["gluoncv"] = version("gluoncv")
    except Exception:  # noqa: BLE001 - gluoncv is optional for gluon-only models
        pass
    return found


def write_manifest(directory: Path, manifest: dict) -> None:
    manifest = {"schema_version": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise OutputError(f"{path} is {path.stat().st_size:,} bytes, not a bbadapt manifest (damaged bundle)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise OutputError(f"{path} is not valid JSON (damaged bundle)") from None
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
    from .spec import InputSpec

    for key in ("source", "target"):
        try:
            InputSpec.from_dict(manifest[key])
        except (KeyError, TypeError, ValueError):  # SpecError is a ValueError
            raise OutputError(f"{path} has an invalid {key} spec") from None
    if "arch" in manifest:
        from converters.base import arch_problem

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


def save_backbone(adapted, directory: Path) -> str:
    """Write the adapted parameters; returns their sha256."""
    from .weights import sha256_of

    path = directory / PARAMS
    adapted.net.save_parameters(str(path))
    return sha256_of(path)


def backbone_structure(manifest: dict, net=None):
    """The adapted backbone's block tree (values not meaningful): the architecture with the plan replayed.

    Lets a caller that brings its own parameters (a detector checkpoint) rebuild the
    structure without the bundle's ``backbone.params``.
    """
    from converters import rebuild

    from .rewrite import apply_plan
    from .spec import InputSpec

    if net is None:
        try:
            net = rebuild(manifest.get("arch") or {"zoo": manifest["model"]})
        except ModelError as exc:  # the manifest names an architecture this bbadapt cannot build
            raise OutputError(f"bundle manifest: {exc}") from None
    try:
        apply_plan(net, [dict(step) for step in manifest["plan"]], InputSpec.from_dict(manifest["source"]),
                   InputSpec.from_dict(manifest["target"]))
    except ModelError as exc:  # a step the architecture does not have: the bundle is damaged, not the arguments
        raise OutputError(f"bundle manifest: its plan does not fit the architecture: {exc}") from None
    return net


def load_backbone(directory: str | os.PathLike, ctx=None, net=None):
    """Rebuild an adapted backbone: a HybridBlock taking the bundle's target-spec input.

    The architecture comes from the manifest's ``arch`` record (a zoo name, or a builder a
    converter provides); ``net`` overrides it with an architecture built by the caller.
    """
    from .weights import load_into

    manifest = read_manifest(directory)
    net = backbone_structure(manifest, net)
    load_into(net, Path(directory) / manifest.get("params_file", PARAMS))
    if ctx is not None:
        net.collect_params().reset_ctx(ctx)
    return net
