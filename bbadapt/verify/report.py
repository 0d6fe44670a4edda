"""Human-readable renderings of a bbadapt ``report.json``.

Adapting a backbone (folding input normalisation into the first convolution,
fusing batch norm, ...) must not change the function the network computes.
The report is the numerical proof of that: for every probe point it lists how
far the adapted activations are from the original ones, how that compares with
plain float32 rounding (the float64 ratio), and a PASSED/FAILED verdict against
the tolerance.  This module renders a :class:`~bbadapt.verify.check_report.CheckReport`
(or its ``report.json`` dict, schema in ``docs/report-schema.md``) as Markdown for terminals
and CI logs and as one self-contained HTML page with plots for a browser. It decides nothing:
the verdict, its banner and its reasons come from :func:`~bbadapt.verify.check_report.decide`.
What the bundle's manifest says (specs, provenance, plan) arrives already described
(:mod:`bbadapt.bundle.describe`): this layer sits below the bundle's.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
import pathlib
from collections.abc import Mapping
from typing import Any

from bbadapt.verify import check_report
from bbadapt.verify.check_report import CheckReport, Training, as_report, fmt

FLOOR = 1e-12  # smallest value drawn on a log axis

_COLUMNS = ["probe", "shape", "max abs", "max rel", "mean abs", "median abs", "p99 abs",
            "cosine", "border max abs", "interior max abs", "fp64 ratio", "yardstick", "result"]
# What each column means; shown under the table in both renderings (every column has a legend).
LEGEND = {
    "probe": "where the two networks are compared: stem = input of the first stage, stageN = output of stage N, "
             "output = the final output",
    "shape": "per-image shape of the probed tensor at the first check size",
    "max abs": "largest |adapted - original| (both in float32, each fed its own input spec)",
    "max rel": "max abs divided by the largest |original| at this probe; compared with the tolerance",
    "mean abs": "mean |adapted - original|",
    "median abs": "median |adapted - original|",
    "p99 abs": "99th percentile of |adapted - original|",
    "cosine": "smallest per-image cosine similarity of adapted and original (1 = same direction)",
    "border max abs": "max abs error in the ring of cells whose receptive field reaches the zero padding",
    "interior max abs": "max abs error in the cells the padding cannot reach",
    "fp64 ratio": "RMS error of the adapted net in float32 against the float64 original, divided by the original "
                  "float32 net's own RMS error against it (information: float32 rounding moves with the CPU's kernels)",
    "yardstick": "the adapted net's float64 twin's error against the float64 original, as a share of the one-ulp "
                 "yardstick (the twin with every number the adaptation wrote moved by one float32 ulp), by RMS; at most "
                 "1 = the same function, decided independently of the CPU",
    "result": "PASS/FAIL: the yardstick ratio at most 1; info = not judged (the padding reaches all of it after an "
              "approximate fold)",
}


_fmt = fmt


def _get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...`` or None when any level is missing or null."""
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def _row(p: dict) -> list[str]:
    return [str(p.get("name", "?")),
            "x".join(str(s) for s in p.get("shape") or []) or "n/a",
            _fmt(p.get("max_abs")), _fmt(p.get("max_rel")), _fmt(p.get("mean_abs")),
            _fmt(p.get("median_abs")), _fmt(p.get("p99_abs")), _fmt(p.get("cosine"), ".8f"),
            _fmt(_get(p, "border", "max_abs")), _fmt(_get(p, "interior", "max_abs")),
            _fmt(_get(p, "fp64", "ratio")), _fmt(_get(p, "float64_twin", "ratio"), ".2f"), _RESULT[p.get("passed")]]


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


def tolerance_text(report: CheckReport | Mapping[str, Any]) -> str:
    """The tolerance actually used: the one asked for, and where and why it was raised."""
    return check_report.tolerance_text(as_report(report))


def yardstick_text(report: CheckReport | Mapping[str, Any]) -> str | None:
    """What decided the verdict, and by how much: the float64 twin's worst ratio to the one-ulp yardstick."""
    return check_report.yardstick_text(as_report(report))


def verdict_kind(report: CheckReport | Mapping[str, Any]) -> str:
    """``pass``, ``fail``, ``approx`` or ``inconclusive``: the banner's kind, as :func:`~bbadapt.verify.check_report.decide`
    decided it."""
    return as_report(report).verdict.kind


Context = list[tuple[str, list[str]]]  # (section title, lines): the bundle's manifest, described (bbadapt.bundle.describe)


def render_markdown(report: CheckReport | Mapping[str, Any], context: Context | None = None,
                    weights: str | None = None) -> str:
    """Render the report as GitHub Markdown; the last line is the verdict.

    ``context``: (title, lines) sections describing the bundle; ``weights``: a sentence for
    weights that are not pretrained (both from :mod:`bbadapt.bundle.describe`)."""
    typed = as_report(report)
    verdict, r = typed.verdict, typed.to_dict()
    out = [_header(r), ""]
    if weights:
        out += [f"**{weights}**", ""]
    out += ["| " + " | ".join(_COLUMNS) + " |",
            "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    out += ["| " + " | ".join(_row(p)) + " |" for p in r.get("probes") or []]
    out += ["", "Columns:"] + [f"- {name}: {meaning}" for name, meaning in LEGEND.items()]
    cls = _classification(r)
    if cls:
        out += ["", cls]
    if typed.notes:
        out += ["", "Notes:"] + [f"- {n}" for n in typed.notes]
    if typed.training:
        out += _training_markdown(typed.training)
    for title, lines in context or []:
        out += ["", f"{title}:"] + [f"- {line}" for line in lines]
    if not verdict.passed and verdict.reasons:
        out += ["", "Reasons:"] + [f"- {n}" for n in verdict.reasons]
    out += ["", verdict.banner]
    return "\n".join(out) + "\n"


_TRAINING_COLUMNS = ["parameter", "original", "mapping", "shape", "max rel", "tolerance", "fp64 ratio", "result"]
TRAINING_LEGEND = {
    "parameter": "a trainable weight of the adapted net (structural name)",
    "original": "the original's weight it came from; its gradient is taken with every BatchNorm use_global_stats=True",
    "mapping": "how the adapted gradient is brought into the original's frame before comparing (same = unchanged "
               "weight; fused = not comparable, W' = W * s)",
    "shape": "the weight's shape",
    "max rel": "largest |dL/dW adapted - dL/dW original| (float32) divided by the largest |dL/dW original|",
    "tolerance": "as for a forward probe: the asked tolerance, raised to fp64 factor x the original's own float32 "
                 "error against float64 where that is larger",
    "fp64 ratio": "RMS error of the adapted gradient against the float64 one, divided by the original float32 "
                  "gradient's own; at most the fp64 factor means plain float32 rounding",
    "result": "PASS/FAIL; info = not judged (fused, or an approximate fold); PASS (float64 twin) = the float32 "
              "gradient is off by a kink flip (see notes) and the adapted net run in float64 meets the rule",
}


def _training_row(p: dict) -> list[str]:
    return [str(p.get("name")), str(p.get("original")), str(p.get("mapping")),
            "x".join(str(s) for s in p.get("shape") or []) or "n/a", _fmt(p.get("max_rel")),
            _fmt(p.get("tolerance"), ".1e"), _fmt(_get(p, "fp64", "ratio"), ".2f"),
            "PASS (float64 twin, max rel " + _fmt(_get(p, "float64_twin", "max_rel")) + ")" if p.get("kink")
            else _RESULT[p.get("passed")]]


def training_headline(training: Training | Mapping[str, Any]) -> str:
    """One line: what the training check compared and what it found."""
    t = training if isinstance(training, Training) else Training.from_dict(training)
    image = t.get("input") or {}
    size = "x".join(str(v) for v in image.get("size") or [])
    judged = [p for p in t.get("parameters") or [] if p.get("passed") is not None]
    line = (f"training check {t.get('verdict')}: gradients of {len(t.get('parameters') or [])} trainable weights "
            f"(bn={t.get('bn')}) vs the original with frozen BatchNorm (use_global_stats=True), autograd train mode, "
            f"batch 1 ({image.get('name')}, {size}), float64 truth")
    if judged:
        line += f"; worst max rel {_fmt(t.get('worst_max_rel'))} over {len(judged)} judged"
    if t.get("conclusive") is False:
        line += "; INCONCLUSIVE where the original's own float32 gradient is chaotic (see Training notes)"
    scale = t.get("gradient_scale") or {}
    if scale:
        line += f"; largest per-channel gradient-scale ratio {_fmt(scale.get('ratio'), '.3g')}"
    return line


def _training_markdown(t: Training) -> list[str]:
    out = ["", "## Training (gradients)", "", training_headline(t), "",
           "| " + " | ".join(_TRAINING_COLUMNS) + " |", "|" + "|".join("---" for _ in _TRAINING_COLUMNS) + "|"]
    out += ["| " + " | ".join(_training_row(p)) + " |" for p in t.get("parameters") or []]
    out += ["", "Columns:"] + [f"- {name}: {meaning}" for name, meaning in TRAINING_LEGEND.items()]
    for title, items in (("Not compared", [f"{x.get('name')}: {x.get('reason')}" for x in t.get("excluded") or []]),
                         ("Training notes", t.get("notes")), ("Training reasons", t.get("reasons"))):
        if items:
            out += ["", f"{title}:"] + [f"- {i}" for i in items]
    return out


def _training_html(t: Training) -> list[str]:
    e = html.escape
    kind = {True: "pass", False: "fail", None: "approx"}[t.passed]
    parts = ['<h2 id="training">Training (gradients)</h2>',
             f'<div class="banner {kind}" id="training-verdict">{e(training_headline(t))}</div>',
             "<table><tr>" + "".join(f'<th title="{e(TRAINING_LEGEND[c])}">{e(c)}</th>' for c in _TRAINING_COLUMNS)
             + "</tr>"]
    for p in t.get("parameters") or []:
        cls = {True: "pass", False: "fail", None: "info"}[p.get("passed")]
        parts.append(f'<tr class="{cls}">' + "".join(f"<td>{e(c)}</td>" for c in _training_row(p)) + "</tr>")
    parts.append("</table>")
    parts.append("<dl>" + "".join(f"<dt>{e(n)}</dt><dd>{e(m)}</dd>" for n, m in TRAINING_LEGEND.items()) + "</dl>")
    for title, items in (("Not compared", [f"{x.get('name')}: {x.get('reason')}" for x in t.get("excluded") or []]),
                         ("Training notes", t.get("notes")), ("Training reasons", t.get("reasons"))):
        if items:
            parts.append(f"<h3>{title}</h3><ul>" + "".join(f"<li>{e(str(i))}</li>" for i in items) + "</ul>")
    return parts


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
    zeros = (hist or {}).get("zeros")
    if hist and hist.get("counts") and len(hist.get("edges") or []) == len(hist["counts"]) + 1:
        edges = np.array(hist["edges"], dtype=float)
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge")
        ax.set_xlabel("log10 |adapted - original| (non-zero errors)")
        ax.set_ylabel("count")
        ax.set_title(f"Error histogram: {hist.get('probe')}")
        if zeros is not None:
            note = f"{zeros} errors are exactly 0 (log10 undefined): not drawn"
        elif edges[0] <= math.log10(FLOOR):  # reports written before zeros were counted apart
            note = "the leftmost bar is exact zeros, drawn at 1e-12 (this report predates counting them apart)"
        else:
            note = ""
        if note:
            ax.text(0.99, 0.97, note, transform=ax.transAxes, ha="right", va="top", fontsize=8)
        plots.append(("Error histogram", _png(fig), ""))
    elif hist and zeros:
        plots.append(("Error histogram", None, f"All {zeros} errors at {hist.get('probe')} are exactly 0."))
    else:
        plots.append(("Error histogram", None, "No error histogram was recorded."))
    return plots


_BANNER_STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:3px 6px;font-family:monospace}"
                 ".banner{padding:.6em;font-weight:bold;color:#fff;margin:1em 0}"
                 ".banner.pass{background:#2e7d32}.banner.fail{background:#c62828}"
                 ".banner.approx{background:#e65100}.banner.inconclusive{background:#6d4c41}"
                 ".banner.weights{background:#fff3cd;color:#5d4037;border:2px solid #e0a800}"
                 "tr.fail td{background:#fde0e0}dt{font-weight:bold;font-family:monospace}dd{margin:0 0 .3em 1.5em}"
                 "li.mono{font-family:monospace}")


def render_html(report: CheckReport | Mapping[str, Any], context: Context | None = None,
                weights: str | None = None) -> str:
    """Render the report as one self-contained HTML page with embedded plots (no script, no external file).

    ``context`` and ``weights`` as for :func:`render_markdown`."""
    e = html.escape
    typed = as_report(report)
    verdict, report = typed.verdict, typed.to_dict()
    parts = [f"<h1>{e(_header(report))}</h1>",
             f'<div class="banner {verdict.kind}" id="verdict">{e(verdict.banner)}</div>']
    if weights:
        parts.append(f'<div class="banner weights" id="weights">{e(weights)}</div>')
    parts.append("<table><tr>" + "".join(f'<th title="{e(LEGEND[c])}">{e(c)}</th>' for c in _COLUMNS) + "</tr>")
    for p in report.get("probes") or []:
        cls = {True: "pass", False: "fail", None: "info"}[p.get("passed")]
        parts.append(f'<tr class="{cls}">' + "".join(f"<td>{e(c)}</td>" for c in _row(p)) + "</tr>")
    parts.append("</table>")
    parts.append('<h2>Columns</h2><dl id="legend">'
                 + "".join(f"<dt>{e(name)}</dt><dd>{e(meaning)}</dd>" for name, meaning in LEGEND.items()) + "</dl>")
    cls_line = _classification(report)
    if cls_line:
        parts.append(f"<p>{e(cls_line)}</p>")
    for title, items in (("Notes", typed.notes), ("Reasons", None if verdict.passed else verdict.reasons)):
        if items:
            parts.append(f"<h2>{title}</h2><ul>" + "".join(f"<li>{e(str(i))}</li>" for i in items) + "</ul>")
    if typed.training:
        parts += _training_html(typed.training)
    for title, lines in context or []:
        body = "<ul>" + "".join(f'<li class="mono">{e(line)}</li>' for line in lines) + "</ul>"
        if title.startswith("Plan"):
            body = f"<details><summary>every rewrite step</summary>{body}</details>"
        parts.append(f"<h2>{e(title)}</h2>{body}")
    for title, uri, missing in _plots(report):
        parts.append(f"<h2>{e(title)}</h2>")
        parts.append(f'<img alt="{e(title)}" src="{uri}">' if uri else f"<p>{e(missing)}</p>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{e(_header(report))}</title><style>{_BANNER_STYLE}</style></head>\n<body>\n"
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


def write_reports(report: CheckReport | Mapping[str, Any], out_dir: pathlib.Path, context: Context | None = None,
                  weights: str | None = None) -> None:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir``.

    ``context``/``weights``: what the report alone does not hold (random weights, the input
    specs' numbers, provenance, the plan), described from the bundle's manifest by
    :mod:`bbadapt.bundle.describe`. NaN and inf become null in all three files alike."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = CheckReport.from_dict(_finite(as_report(report).to_dict()))
    with open(out_dir / "report.json", "w", encoding="utf-8") as f:
        json.dump(clean.to_dict(), f, indent=2, allow_nan=False)
        f.write("\n")
    (out_dir / "report.md").write_text(render_markdown(clean, context, weights), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(clean, context, weights), encoding="utf-8")
