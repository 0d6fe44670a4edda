"""A bundle's manifest described in words, for the check report's context sections.

The report renderers (:mod:`bbadapt.verify.report`) sit below the bundle in the import layers
and take these lines ready-made: ``write_reports(report, out, context(manifest),
weights_text(manifest))``. They read the typed manifest (:class:`~bbadapt.bundle.schema.BundleManifest`),
so the report shows exactly what the bundle's readers see, defaults included.
"""

from __future__ import annotations

from typing import Any, Optional

from bbadapt.bundle.schema import BundleManifest


def weights_text(manifest: Optional[BundleManifest]) -> str | None:
    """A sentence for weights that are not pretrained (None for real weights or no manifest)."""
    if manifest is None or manifest.provenance.kind != "random":
        return None
    prov = manifest.provenance.to_dict()
    calibrated = f"; BatchNorm statistics calibrated on {prov['calibration']}" if prov.get("calibration") else ""
    return (f"Weights: seeded random (seed {prov.get('seed', '?')}{calibrated}), NOT pretrained. This report proves "
            "the adapted network computes the same function as the original; it says nothing about accuracy.")


def _spec_text(spec: Any) -> str:
    if not isinstance(spec, dict):
        return str(spec)

    def nums(v: Any) -> str:
        return "/".join(format(float(x), ".6g") for x in v) if isinstance(v, list) else str(v)

    return (f"{spec.get('name') or 'custom'}: order {spec.get('order')}, scale {nums([spec.get('scale', 1)])}, "
            f"mean {nums(spec.get('mean'))}, std {nums(spec.get('std'))}  (x[c] = (raw[perm[c]] * scale - mean[c]) / std[c])")


def context(manifest: Optional[BundleManifest]) -> list[tuple[str, list[str]]]:
    """(section, lines) from the manifest: input specs with their numbers, provenance, the plan."""
    if manifest is None:
        return []
    asked = manifest.fold_requested if manifest.fold_requested is not None else manifest.fold
    out = [("Input specs", [f"source (what the weights expect): {_spec_text(manifest.source)}",
                            f"target (what you feed): {_spec_text(manifest.target)}",
                            f"fold {manifest.fold} (asked: {asked}), BatchNorm {manifest.bn}"])]
    prov = manifest.provenance
    lines = [", ".join(f"{k} {v}" for k, v in prov.to_dict().items() if k not in ("files", "sha256") and not isinstance(v, dict))]
    files = prov.files or ({prov.path: prov.sha256} if prov.path else {})
    lines += [f"file {path}: sha256 {digest}" for path, digest in files.items()]
    if not files and prov.sha256:
        lines.append(f"weights in memory (every parameter): sha256 {prov.sha256}")
    if manifest.params_sha256:
        lines.append(f"written {manifest.params_file}: sha256 {manifest.params_sha256}")
    out.append(("Provenance", lines))
    steps = list(manifest.plan)
    out.append((f"Plan ({len(steps)} steps)", [", ".join(f"{k}={v}" for k, v in step.items()) for step in steps]))
    return out
