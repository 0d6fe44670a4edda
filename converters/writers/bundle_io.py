"""What exporters share: reopen a bbadapt bundle, and the check figures an export summary carries.

Files are written through :func:`bbadapt.platform.atomic.write_file`.

An exporter never trusts its own arithmetic: it reads what it wrote back, runs it beside
the bundle's backbone on real photos and refuses to leave a file whose function differs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bbadapt.bundle.schema import BundleManifest
from bbadapt.platform.errors import OutputError

Progress = Callable[[str], None]


@dataclass
class Bundle:
    """A reopened bundle: its manifest, adapted backbone (eager) and specs."""

    manifest: BundleManifest  # read from the bundle directory (``manifest.directory``)
    adapted: object  # bbadapt.rewrite.Adapted (graph None), net fed target-spec input
    model: str  # zoo name of the architecture, or the builder record's name

    @property
    def directory(self) -> Path:
        return self.manifest.directory

    @property
    def source(self):
        return self.adapted.source

    @property
    def target(self):
        return self.adapted.target


def open_bundle(bundle: str | os.PathLike | BundleManifest, backbone: bool = False) -> Bundle:
    """Rebuild a bundle's backbone (zoo name or converter ``arch`` record) with its plan and weights.

    ``bundle``: its directory, or its manifest already read (not read again). A detector bundle
    holds its adapted backbone too (``backbone.params``, as converted): ``backbone=True`` takes
    that one. A training checkpoint holds only the trained detector.
    """
    from bbadapt.bundle.backbone import load_adapted
    from bbadapt.bundle.manifest import check_params, read_manifest

    manifest = bundle if isinstance(bundle, BundleManifest) else read_manifest(bundle, require_params=False)
    directory, kind = manifest.directory, manifest.kind
    if manifest.is_checkpoint:
        raise OutputError(f"{directory} is a training checkpoint (a trained detector); exporting its trained "
                          "backbone is not supported yet: export the whole detector with --symbol, or the "
                          "bundle's backbone with --backbone on the bundle directory")
    if kind != "backbone" and not (backbone and kind == "detector"):
        raise OutputError(f"{directory} holds a {kind}; export its backbone with --backbone, or the whole detector "
                          "with --symbol, or --torchvision DIR and then `export DIR --onnx` (docs/deploy.md)")
    if kind == "backbone" and backbone:
        raise OutputError(f"{directory} is a backbone bundle already; drop --backbone")
    check_params(manifest)
    adapted = load_adapted(manifest)  # rebuilt from the arch record, plan replayed, params loaded
    return Bundle(manifest, adapted, manifest.model_name)


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
