"""Human-readable renderings of a bbadapt ``report.json``.

Adapting a backbone (folding input normalisation into the first convolution,
fusing batch norm, ...) must not change the function the network computes.
The report is the numerical proof of that: for every probe point it lists how
far the adapted activations are from the original ones, how that compares with
plain float32 rounding (the float64 ratio), and a PASSED/FAILED verdict against
the tolerance.  This module renders the report dict (schema in
``docs/report-schema.md``) as Markdown for terminals and CI logs and as one
self-contained HTML page with plots for a browser.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
import pathlib
from typing import Any

FLOOR = 1e-12  # smallest value drawn on a log axis

_COLUMNS = ["probe", "shape", "max abs", "max rel", "mean abs", "median abs", "p99 abs",
            "cosine", "border max abs", "interior max abs", "fp64 ratio", "result"]


def _fmt(x: Any, spec: str = ".2e") -> str:
    """Compact scientific formatting; ``n/a`` for None or non-numbers."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return "n/a"
    return format(float(x), spec)


def _get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...`` or None when any level is missing or null."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _row(p: dict) -> list[str]:
    return [str(p.get("name", "?")),
            "x".join(str(s) for s in p.get("shape") or []) or "n/a",
            _fmt(p.get("max_abs")), _fmt(p.get("max_rel")), _fmt(p.get("mean_abs")),
            _fmt(p.get("median_abs")), _fmt(p.get("p99_abs")), _fmt(p.get("cosine"), ".8f"),
            _fmt(_get(p, "border", "max_abs")), _fmt(_get(p, "interior", "max_abs")),
            _fmt(_get(p, "fp64", "ratio")), _RESULT[p.get("passed")]]


# None: not judged (after an approximate fold, padding differences reach these by design)
_RESULT = {True: "PASS", False: "FAIL", None: "info"}


def _header(r: dict) -> str:
    return (f"bbadapt report: model {r.get('model')}, {r.get('source')} -> {r.get('target')}, "
            f"fold={r.get('fold')}, bn={r.get('bn')}")


def _classification(r: dict) -> str | None:
    c = r.get("classification")
    if not c:
        return None
    line = (f"classification agreement on {c.get('n')} images: "
            f"top-1 {_fmt(c.get('top1_agreement'), '.1%')}, "
            f"top-5 {_fmt(c.get('top5_agreement'), '.1%')}")
    lab = c.get("labelled")
    if lab:
        line += (f"; on {lab.get('n')} labelled images: accuracy original {_fmt(lab.get('accuracy_original'), '.1%')}, "
                 f"adapted {_fmt(lab.get('accuracy_adapted'), '.1%')}, top-1 agreement {_fmt(lab.get('top1_agreement'), '.1%')}")
    return line


def _verdict(r: dict) -> str:
    line = _verdict_line(r)
    if r.get("conclusive") is False:
        line += "  INCONCLUSIVE: the original is chaotic in float32 (see notes)"
    return line


def _verdict_line(r: dict) -> str:
    passed = bool(r.get("passed"))
    word = "PASSED" if passed else "FAILED"
    tol = _fmt(_get(r, "tolerance", "max_rel"))
    if not r.get("exact", True):
        return (f"{word} (APPROXIMATE fold: stem interior judged against {tol}; "
                f"worst max rel incl. border {_fmt(r.get('worst_max_rel'))})")
    op = "<=" if passed else ">"
    if _get(r, "tolerance", "raised"):
        return f"{word}  worst max rel {_fmt(r.get('worst_max_rel'))} (tolerance {tol}, raised where the original is noisier in fp32: see notes)"
    return f"{word}  worst max rel {_fmt(r.get('worst_max_rel'))} {op} {tol}"


def render_markdown(report: dict) -> str:
    """Render the report as GitHub Markdown; the last line is the verdict."""
    out = [_header(report), "",
           "| " + " | ".join(_COLUMNS) + " |",
           "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    out += ["| " + " | ".join(_row(p)) + " |" for p in report.get("probes") or []]
    cls = _classification(report)
    if cls:
        out += ["", cls]
    if report.get("notes"):
        out += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    if not report.get("passed") and report.get("reasons"):
        out += ["", "Reasons:"] + [f"- {n}" for n in report["reasons"]]
    out += ["", _verdict(report)]
    return "\n".join(out) + "\n"


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(report: dict) -> list[tuple[str, str | None, str]]:
    """(title, data URI or None, sentence when omitted) for the three plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def clip(v: Any) -> float:
        ok = isinstance(v, numbers.Real) and math.isfinite(v)
        return max(float(v), FLOOR) if ok else FLOOR

    plots: list[tuple[str, str | None, str]] = []
    probes = report.get("probes") or []
    if probes:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = np.arange(len(probes))
        ax.bar(x - 0.25, [clip(p.get("max_rel")) for p in probes], 0.25, label="max rel")
        for off, key in ((0.0, "border"), (0.25, "interior")):
            idx = [i for i, p in enumerate(probes) if p.get(key)]
            if idx:
                ax.bar(x[idx] + off, [clip(_get(probes[i], key, "max_rel")) for i in idx],
                       0.25, label=f"{key} max rel")
        tol = _get(report, "tolerance", "max_rel")
        if isinstance(tol, numbers.Real):
            ax.axhline(clip(tol), color="red", linestyle="--", label="tolerance")
        ax.set_yscale("log")
        ax.set_xticks(x, [str(p.get("name")) for p in probes])
        ax.set_ylabel("relative error")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        plots.append(("Error per probe", _png(fig), ""))
    else:
        plots.append(("Error per probe", None, "No probes in this report."))

    hm = report.get("heatmap")
    if hm and hm.get("values"):
        fig, ax = plt.subplots(figsize=(4.5, 4))
        im = ax.imshow(np.array(hm["values"], dtype=float), cmap="viridis")
        fig.colorbar(im, ax=ax, label="mean |adapted - original|")
        ax.set_title(f"Border heatmap: {hm.get('probe')}")
        plots.append(("Border heatmap", _png(fig), ""))
    else:
        plots.append(("Border heatmap", None, "No spatial heatmap was recorded."))

    hist = report.get("histogram")
    if hist and hist.get("counts") and len(hist.get("edges") or []) == len(hist["counts"]) + 1:
        edges = np.array(hist["edges"], dtype=float)
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge")
        ax.set_xlabel("log10 |error|")
        ax.set_ylabel("count")
        ax.set_title(f"Error histogram: {hist.get('probe')}")
        plots.append(("Error histogram", _png(fig), ""))
    else:
        plots.append(("Error histogram", None, "No error histogram was recorded."))
    return plots


def render_html(report: dict) -> str:
    """Render the report as one self-contained HTML page with embedded plots."""
    e = html.escape
    passed = bool(report.get("passed"))
    parts = [f"<h1>{e(_header(report))}</h1>",
             f'<div class="banner {"pass" if passed else "fail"}">{e(_verdict(report))}</div>',
             "<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in _COLUMNS) + "</tr>"]
    for p in report.get("probes") or []:
        cls = {True: "pass", False: "fail", None: "info"}[p.get("passed")]
        parts.append(f'<tr class="{cls}">' + "".join(f"<td>{e(c)}</td>" for c in _row(p)) + "</tr>")
    parts.append("</table>")
    cls_line = _classification(report)
    if cls_line:
        parts.append(f"<p>{e(cls_line)}</p>")
    for title, items in (("Notes", report.get("notes")),
                         ("Reasons", None if passed else report.get("reasons"))):
        if items:
            parts.append(f"<h2>{title}</h2><ul>" + "".join(f"<li>{e(str(i))}</li>" for i in items) + "</ul>")
    for title, uri, missing in _plots(report):
        parts.append(f"<h2>{e(title)}</h2>")
        parts.append(f'<img alt="{e(title)}" src="{uri}">' if uri else f"<p>{e(missing)}</p>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-family:monospace}"
             ".banner{padding:.6em;font-weight:bold;color:#fff;margin:1em 0}"
             ".banner.pass{background:#2e7d32}.banner.fail{background:#c62828}"
             "tr.fail td{background:#fde0e0}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{e(_header(report))}</title><style>{style}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _finite(obj: Any) -> Any:
    """Copy of ``obj`` with NaN/inf floats replaced by None (JSON has no NaN)."""
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_reports(report: dict, out_dir: pathlib.Path) -> None:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = _finite(report)
    with open(out_dir / "report.json", "w", encoding="utf-8") as f:
        json.dump(clean, f, indent=2, allow_nan=False)
        f.write("\n")
    (out_dir / "report.md").write_text(render_markdown(clean), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(clean), encoding="utf-8")
