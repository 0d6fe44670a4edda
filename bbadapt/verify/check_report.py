"""The check report as one typed object, and the one function that decides its verdict.

A report is built in sections: the forward check (:func:`bbadapt.verify.equivalence.check`: the
probes, each with its own float64 decision, the border/interior split, the tolerance actually
used, the forward check's reasons), and, for a bundle that will train, the training check
(:func:`bbadapt.verify.gradients.training_check`). No section sets the report's ``passed``:
:func:`decide` computes it, with the banner and the reasons, from the sections, once, and every
renderer (JSON, Markdown, HTML, the CLI summary) shows that :class:`Verdict` instead of judging
again. Before this module the verdict was set by the equivalence check, overwritten after the
training check and re-derived by each renderer, so the layers could disagree.

``report.json`` keeps the version-1 fields of ``docs/report-schema.md``:
:meth:`CheckReport.to_dict` writes them (``passed``, ``verdict`` and ``reasons`` from the
verdict), and :meth:`CheckReport.from_dict` reads what any earlier bbadapt wrote back to the same
dict. Both types are also read-only mappings over that dict, so code that reads
``report["passed"]`` keeps working.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# report.json's top-level keys in the order the check writes them (docs/report-schema.md).
KEYS = ("schema_version", "passed", "verdict", "reasons", "exact", "notes", "worst_max_rel", "worst_yardstick_ratio",
        "decided_by", "tolerance", "conclusive", "source", "target", "fold", "bn", "inputs", "probes",
        "classification", "heatmap", "histogram", "model", "training")
_DERIVED = ("passed", "verdict", "reasons")  # written from the verdict, never stored in a section
TRAINING_PREFIX = "training: "  # a failing training check's reasons, as the report's reasons list them


def fmt(x: Any, spec: str = ".2e") -> str:
    """Compact scientific formatting; ``n/a`` for None or non-numbers."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return "n/a"
    return format(float(x), spec)


class _DictView(Mapping):
    """Read-only ``obj["key"]`` over :meth:`to_dict`, so readers of the old dict keep working.

    The dict is built once (the objects are frozen); mutate a copy (``dict(report)``) or use
    :func:`dataclasses.replace`, never the view.
    """

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @functools.cached_property
    def _view(self) -> dict[str, Any]:
        return self.to_dict()

    def __getitem__(self, key: str) -> Any:
        return self._view[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view)

    def __len__(self) -> int:
        return len(self._view)

    __eq__ = object.__eq__  # dataclass eq= is turned off below; Mapping's eq would compare views
    __hash__ = object.__hash__


@dataclass(frozen=True)
class Probe:
    """One probe's record (stem, stageN, output): its float32 figures, border/interior split and float64 decision.

    ``passed`` is this probe's own result (None: not judged, after an approximate fold with no
    interior); ``record`` is the whole record as written, for the tables.
    """

    name: str
    passed: bool | None
    max_abs: float | None
    max_rel: float | None
    cosine: float | None
    float64_twin: Mapping[str, Any] | None
    record: Mapping[str, Any]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Probe:
        return cls(str(d.get("name", "?")), d.get("passed"), d.get("max_abs"), d.get("max_rel"), d.get("cosine"),
                   d.get("float64_twin"), dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.record)


@dataclass(frozen=True, eq=False)
class Training(_DictView):
    """The ``training`` section: gradients of the adapted net against the frozen-BN original.

    Its result follows from what it holds: ``bn=fused`` is stated, never judged (a fused conv
    trains with another step size); an approximate fold is information; otherwise it passes when
    no weight gave a reason to fail. ``record`` holds every other field as written.
    """

    bn: str | None
    exact: bool
    reasons: tuple[str, ...]
    conclusive: bool | None
    worst_max_rel: float | None
    parameters: tuple[Mapping[str, Any], ...]
    record: Mapping[str, Any]

    @property
    def passed(self) -> bool | None:
        if self.bn == "fused" or not self.exact:
            return None
        return not self.reasons

    @property
    def word(self) -> str:
        if self.bn == "fused":
            return "NOT EQUIVALENT (fused)"
        if not self.exact:
            return "NOT JUDGED (approximate fold)"
        return "PASSED" if self.passed else "FAILED"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Training:
        """Read a training section; a stored ``passed`` that its own records contradict is refused."""
        t = cls(d.get("bn"), bool(d.get("exact", True)), tuple(d.get("reasons") or ()), d.get("conclusive"),
                d.get("worst_max_rel"), tuple(d.get("parameters") or ()),
                {k: v for k, v in d.items() if k not in ("passed", "verdict")})
        if "passed" in d and d["passed"] != t.passed:
            raise ValueError(f"the training section says passed={d['passed']!r} but its records give {t.passed!r}")
        return t

    def to_dict(self) -> dict[str, Any]:
        """The section as written since version 1: ``passed``/``verdict`` after the worst figures."""
        out: dict[str, Any] = {}
        anchor = "gradient_scale" if "gradient_scale" in self.record else "worst_max_rel"
        for key, value in self.record.items():
            out[key] = value
            if key == anchor:
                out.update(passed=self.passed, verdict=self.word)
        if "passed" not in out:
            out.update(passed=self.passed, verdict=self.word)
        return out


@dataclass(frozen=True)
class Verdict:
    """What the report concludes, decided by :func:`decide` and only there.

    ``kind``: ``pass`` (an exact fold proven), ``fail``, ``approx`` (an approximate fold whose
    judged interiors pass: never the exact-pass green) or ``inconclusive``. ``banner``: the
    report's last line and the HTML banner. ``reasons``: why it failed (empty when it passed).
    """

    passed: bool
    word: str
    kind: str
    reasons: tuple[str, ...]
    banner: str
    training_failed: bool


@dataclass(frozen=True, eq=False)
class CheckReport(_DictView):
    """A check report (``report.json``, docs/report-schema.md) with its sections typed.

    ``forward_reasons``: why the forward check (the probes) failed, as it found them;
    ``absent``: known keys a report read by :meth:`from_dict` did not have (older or hand-made
    reports), left out again by :meth:`to_dict`; ``extra``: keys this version does not know, kept.
    """

    exact: bool
    probes: tuple[Probe, ...]
    forward_reasons: tuple[str, ...] = ()
    tolerance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()
    worst_max_rel: float | None = None
    worst_yardstick_ratio: float | None = None
    decided_by: str | None = None
    conclusive: bool | None = None
    source: str | None = None
    target: str | None = None
    fold: str | None = None
    bn: str | None = None
    inputs: tuple[Mapping[str, Any], ...] = ()
    classification: Mapping[str, Any] | None = None
    heatmap: Mapping[str, Any] | None = None
    histogram: Mapping[str, Any] | None = None
    model: str | None = None
    training: Training | None = None
    schema_version: int = 1
    absent: frozenset[str] = frozenset()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def verdict(self) -> Verdict:
        return decide(self)

    def with_notes(self, notes: list[str] | tuple[str, ...]) -> CheckReport:
        return dataclasses.replace(self, notes=self.notes + tuple(notes))

    def to_dict(self) -> dict[str, Any]:
        """The version-1 ``report.json`` dict (NaN and inf are left to the writer)."""
        v = self.verdict
        values = {"schema_version": self.schema_version, "passed": v.passed, "verdict": v.word,
                  "reasons": list(v.reasons), "exact": self.exact, "notes": list(self.notes),
                  "worst_max_rel": self.worst_max_rel, "worst_yardstick_ratio": self.worst_yardstick_ratio,
                  "decided_by": self.decided_by, "tolerance": dict(self.tolerance), "conclusive": self.conclusive,
                  "source": self.source, "target": self.target, "fold": self.fold, "bn": self.bn,
                  "inputs": [dict(i) for i in self.inputs], "probes": [p.to_dict() for p in self.probes],
                  "classification": self.classification, "heatmap": self.heatmap, "histogram": self.histogram,
                  "model": self.model, "training": self.training.to_dict() if self.training else None}
        unset = {"model"} if self.model is None else set()  # a check not yet named (the API), as before
        unset |= {"training"} if self.training is None else set()  # backbones: no training section
        out = {k: values[k] for k in KEYS if k not in self.absent | unset}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckReport:
        """Read a report dict written by any bbadapt since schema version 1 (or built by hand for a test).

        The verdict is computed again from the sections; a stored ``passed`` that they
        contradict is refused (the file was not written by this rule), never silently flipped.
        """
        training = Training.from_dict(d["training"]) if d.get("training") else None
        reasons = tuple(d.get("reasons") or ())
        if training is not None and training.passed is False:
            reasons = tuple(r for r in reasons if not r.startswith(TRAINING_PREFIX))
        report = cls(
            exact=bool(d.get("exact", True)), probes=tuple(Probe.from_dict(p) for p in d.get("probes") or ()),
            forward_reasons=reasons, tolerance=dict(d.get("tolerance") or {}), notes=tuple(d.get("notes") or ()),
            worst_max_rel=d.get("worst_max_rel"), worst_yardstick_ratio=d.get("worst_yardstick_ratio"),
            decided_by=d.get("decided_by"), conclusive=d.get("conclusive"), source=d.get("source"),
            target=d.get("target"), fold=d.get("fold"), bn=d.get("bn"), inputs=tuple(d.get("inputs") or ()),
            classification=d.get("classification"), heatmap=d.get("heatmap"), histogram=d.get("histogram"),
            model=d.get("model"), training=training, schema_version=int(d.get("schema_version", 1)),
            absent=frozenset(k for k in KEYS if k not in d and k not in _DERIVED),
            extra={k: v for k, v in d.items() if k not in KEYS})
        if "passed" in d and bool(d["passed"]) != report.verdict.passed:
            raise ValueError(f"the report says passed={d['passed']!r} but its sections give {report.verdict.passed!r}")
        return report


def as_report(report: CheckReport | Mapping[str, Any]) -> CheckReport:
    """The typed report, whether given one or a ``report.json`` dict."""
    return report if isinstance(report, CheckReport) else CheckReport.from_dict(report)


# ---------------------------------------------------------------- the verdict, decided once


def decide(r: CheckReport) -> Verdict:
    """The report's verdict from its sections.

    It fails when the forward check gave a reason (a probe outside the one-ulp yardstick in
    float64, non-finite outputs, an approximate fold with no interior to judge) or a probe
    failed, or when the training check failed (a detector bundle would not train like the
    original). ``fused`` and an approximate fold's training sections are stated, not judged.
    """
    forward_failed = bool(r.forward_reasons) or any(p.passed is False for p in r.probes)
    training_failed = r.training is not None and r.training.passed is False
    passed = not (forward_failed or training_failed)
    reasons = r.forward_reasons + (tuple(TRAINING_PREFIX + x for x in r.training.reasons) if training_failed else ())
    if not passed:
        kind = "fail"
    elif not r.exact:
        kind = "approx"
    elif r.conclusive is False:
        kind = "inconclusive"
    else:
        kind = "pass"
    word = "PASSED" if passed else "FAILED"
    return Verdict(passed, word, kind, reasons, _banner(r, word, training_failed), training_failed)


def tolerance_text(r: CheckReport) -> str:
    """The tolerance actually used: the one asked for, and where and why it was raised."""
    tol = r.tolerance.get("max_rel")
    raised = r.tolerance.get("raised") or {}
    if not raised:
        return f"tolerance {fmt(tol)}"
    values = [v for v in raised.values() if isinstance(v, numbers.Real)]
    top = fmt(max(values)) if values else "n/a"
    return (f"tolerance {fmt(tol)} asked, raised to {top} at {', '.join(raised)}: float32 cannot show agreement finer "
            "than the two nets' own float32 rounding there (see notes)")


def yardstick_text(r: CheckReport) -> str | None:
    """What decided the verdict, and by how much: the float64 twin's worst ratio to the one-ulp yardstick."""
    ratio = r.worst_yardstick_ratio
    if not isinstance(ratio, numbers.Real):
        return None
    limit = r.tolerance.get("yardstick_limit") or 1.0
    word = "within" if ratio <= limit else "ABOVE"
    return f"decided in float64: the adapted net's float64 twin is {word} the one-ulp yardstick (worst {ratio:.2f}x)"


def judged(r: CheckReport) -> tuple[list[str], list[str]]:
    """Names of the probes judged, and of those only reported (after an approximate fold)."""
    return ([p.name for p in r.probes if p.passed is not None], [p.name for p in r.probes if p.passed is None])


def _banner(r: CheckReport, word: str, training_failed: bool) -> str:
    """The verdict line: what decided, with the figures it rests on."""
    if training_failed and not any(p.passed is False for p in r.probes):
        return (f"FAILED  the forward check is within tolerance (worst max rel {fmt(r.worst_max_rel)}), but the "
                f"training check FAILED: the gradients of {len(r.training.reasons)} trainable weights "
                "differ from the frozen-BN original's (see Training)")
    line = _forward_line(r, word)
    if training_failed:
        line += "; the training check FAILED too (see Training)"
    if r.conclusive is False:
        line += "  INCONCLUSIVE: the original is chaotic in float32 (see notes)"
    return line


def _forward_line(r: CheckReport, word: str) -> str:
    if not r.exact:
        yes, no = judged(r)
        out = next((p for p in r.probes if p.name == "output"), None)
        return (f"{word} (APPROXIMATE fold: judged only the interiors of {', '.join(yes) or 'no probe'} against "
                f"{tolerance_text(r)}; not judged: the borders{', ' + ', '.join(no) if no else ''}; "
                f"worst max rel incl. border {fmt(r.worst_max_rel)}, final output max rel "
                f"{fmt(out.max_rel if out else None)}, cosine {fmt(out.cosine if out else None, '.3f')}: not the same "
                "function near the image border)")
    decided = yardstick_text(r)
    decided = f"; {decided}" if decided else ""
    if r.tolerance.get("raised"):
        return f"{word}  worst max rel {fmt(r.worst_max_rel)} ({tolerance_text(r)}){decided}"
    worst, tol = r.worst_max_rel, r.tolerance.get("max_rel")
    numbers_given = isinstance(worst, numbers.Real) and isinstance(tol, numbers.Real)
    op = "<=" if not numbers_given or worst <= tol else ">"
    return f"{word}  worst max rel {fmt(worst)} {op} {fmt(tol)}{decided}"
