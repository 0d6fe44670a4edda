"""A bundle's manifest described in words, for the check report's context sections.

The report renderers (:mod:`bbadapt.verify.report`) sit below the bundle in the import layers
and take these lines ready-made: ``write_reports(report, out, context(manifest),
weights_text(manifest))``. Moved here unchanged from ``verify/report.py`` (still reading the
manifest dict); the typed manifest schema takes over at its merge.
"""

from __future__ import annotations

from typing import Any


def weights_text(manifest: dict | None) -> str | None:
    """A sentence for weights that are not pretrained (None for real weights or no manifest)."""
    prov = (manifest or {}).get("weights") or {}
    if prov.get("kind") != "random":
        return None
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


def context(manifest: dict | None) -> list[tuple[str, list[str]]]:
    """(section, lines) from the manifest: input specs with their numbers, provenance, the plan."""
    if not manifest:
        return []
    out = [("Input specs", [f"source (what the weights expect): {_spec_text(manifest.get('source'))}",
                            f"target (what you feed): {_spec_text(manifest.get('target'))}",
                            f"fold {manifest.get('fold')} (asked: {manifest.get('fold_requested', manifest.get('fold'))}), "
                            f"BatchNorm {manifest.get('bn')}"])]
    prov = manifest.get("weights") or {}
    lines = [", ".join(f"{k} {v}" for k, v in prov.items() if k not in ("files", "sha256") and not isinstance(v, dict))]
    files = prov.get("files") or ({prov["path"]: prov.get("sha256")} if prov.get("path") else {})
    lines += [f"file {path}: sha256 {digest}" for path, digest in files.items()]
    if not files and prov.get("sha256"):
        lines.append(f"weights in memory (every parameter): sha256 {prov['sha256']}")
    if manifest.get("params_sha256"):
        lines.append(f"written {manifest.get('params_file', 'backbone.params')}: sha256 {manifest['params_sha256']}")
    out.append(("Provenance", lines))
    steps = manifest.get("plan") or []
    out.append((f"Plan ({len(steps)} steps)", [", ".join(f"{k}={v}" for k, v in step.items()) for step in steps]))
    return out
