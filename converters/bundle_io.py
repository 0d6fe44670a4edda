"""What exporters share: reopen a bbadapt bundle, and write an output file atomically.

An exporter never trusts its own arithmetic: it reads what it wrote back, runs it beside
the bundle's backbone on real photos and refuses to leave a file whose function differs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bbadapt.errors import OutputError

Progress = Callable[[str], None]


@dataclass
class Bundle:
    """A reopened bundle: its manifest, adapted backbone (eager) and specs."""

    directory: Path
    manifest: dict
    adapted: object  # bbadapt.rewrite.Adapted (graph None), net fed target-spec input
    model: str  # zoo name of the architecture, or the builder record's name

    @property
    def source(self):
        return self.adapted.source

    @property
    def target(self):
        return self.adapted.target


def open_bundle(directory: str | os.PathLike) -> Bundle:
    """Rebuild a bundle's backbone (zoo name or converter ``arch`` record) with its plan and weights."""
    from bbadapt.bundle import load_backbone, read_manifest
    from bbadapt.rewrite import Adapted
    from bbadapt.spec import InputSpec

    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("kind", "backbone") != "backbone":
        raise OutputError(f"{directory} holds a {manifest['kind']}; this export takes a backbone output "
                          "(convert without --detector, or export the detector with --symbol)")
    arch = manifest.get("arch") or {}
    backbone = load_backbone(directory)  # rebuilt from the manifest's arch record, plan replayed, params loaded
    source, target = InputSpec.from_dict(manifest["source"]), InputSpec.from_dict(manifest["target"])
    adapted = Adapted(backbone, source, target, manifest.get("bn", ""), [dict(s) for s in manifest["plan"]], None,
                      manifest.get("health", []))
    model = arch.get("zoo") or manifest["model"]
    return Bundle(directory, manifest, adapted, str(model))


def refuse_existing_file(out: Path, force: bool) -> None:
    if out.is_dir():
        raise OutputError(f"{out} is a directory; give a file name")
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it")


def write_atomic(out: str | os.PathLike, write: Callable[[Path], None], force: bool = False) -> None:
    """Call ``write(tmp)`` for a sibling temp file, then rename it to ``out``; nothing left on failure."""
    out = Path(out)
    refuse_existing_file(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", suffix=out.suffix, dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    tmp = Path(name)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o666 & ~mask)  # mkstemp makes 0600; the output should look like any file
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_summary(report: dict) -> dict:
    """The part of an equivalence report an export summary carries."""
    probes = {p["name"]: {"max_abs": p["max_abs"], "max_rel": p["max_rel"],
                          "interior_max_rel": (p.get("interior") or {}).get("max_rel")} for p in report["probes"]}
    summary = {"passed": report["passed"], "worst_max_rel": report["worst_max_rel"], "tolerance": report["tolerance"],
               "exact": report.get("exact", True), "probes": probes, "inputs": len(report.get("inputs", []))}
    if not summary["exact"]:
        summary["note"] = ("the bundle's input fold is approximate (fold=conv): it differs from the exact function "
                           "near the zero-padded border, so the comparison is judged on the interior")
    return summary
