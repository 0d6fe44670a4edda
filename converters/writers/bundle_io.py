"""What exporters share: reopen a bbadapt bundle, and the check figures an export summary carries.

Files are written through :func:`bbadapt.core.atomic.write_file`.

An exporter never trusts its own arithmetic: it reads what it wrote back, runs it beside
the bundle's backbone on real photos and refuses to leave a file whose function differs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bbadapt.core.errors import OutputError

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
    from bbadapt.bundle.backbone import load_adapted
    from bbadapt.bundle.manifest import read_manifest

    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("kind", "backbone") != "backbone":
        raise OutputError(f"{directory} holds a {manifest['kind']}; this export takes a backbone output "
                          "(convert without --detector, or export the detector with --symbol)")
    arch = manifest.get("arch") or {}
    adapted = load_adapted(directory, manifest)  # rebuilt from the arch record, plan replayed, params loaded
    model = arch.get("zoo") or manifest["model"]
    return Bundle(directory, manifest, adapted, str(model))


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
