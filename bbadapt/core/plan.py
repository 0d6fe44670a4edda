"""The rewrite plan: typed steps, what applying them found out, and their JSON form.

A plan names structural paths of the *original* net and no values, so it can be replayed
on a freshly built net to recreate an adapted structure (that is how a bundle reloads). The
manifest stores each step as one JSON object: the step's own fields (``op`` first) followed
by what applying it recorded (:class:`StepResult`), e.g.::

    {"op": "input_bn", "bn": "features.0", "conv": "features.1", "form": "affine", "exact": true}

That JSON is the format of bbadapt 0.1.0 bundles, unchanged. The handlers that execute the
steps live in :mod:`bbadapt.core.rewrite`; this module holds no mxnet code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar, Union

from bbadapt.platform.errors import ModelError


class PlanStepError(ModelError):
    """A plan step that is not one bbadapt writes (a damaged or foreign manifest)."""


@dataclass(frozen=True)
class _Step:
    """Shared JSON plumbing: ``op`` first, then the fields in declaration order; ``_optional`` ones only when set."""

    op: ClassVar[str]
    _optional: ClassVar[tuple[str, ...]] = ()
    _nullable: ClassVar[tuple[str, ...]] = ()

    @property
    def reads_bn(self) -> str | None:
        """The BatchNorm whose statistics this step consumes (its health is worth a look)."""
        return getattr(self, "bn", None)

    def to_dict(self) -> dict:
        out: dict = {"op": self.op}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name not in self._optional:
                out[f.name] = value
        return out

    @classmethod
    def from_fields(cls, record: dict) -> _Step:
        values = {}
        for f in fields(cls):
            value = record.get(f.name)
            if f.name not in record and f.name not in cls._optional and f.name not in cls._nullable:
                raise PlanStepError(f"{cls.op} step lacks {f.name!r}")
            if value is None and (f.name in cls._optional or f.name in cls._nullable):
                values[f.name] = None
                continue
            want = bool if f.name == "fix_gamma" else str
            if not isinstance(value, want):
                raise PlanStepError(f"{cls.op} step has a non-{want.__name__} {f.name!r}")
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class Fuse(_Step):
    """Fold the BatchNorm ``bn`` into the conv ``conv`` that feeds it; the BN becomes an Identity."""

    op: ClassVar[str] = "fuse"
    conv: str
    bn: str


@dataclass(frozen=True)
class Affine(_Step):
    """Replace ``bn`` by a FrozenAffine (``why``: the reason it could not fuse, when fusing was asked)."""

    op: ClassVar[str] = "affine"
    _optional: ClassVar[tuple[str, ...]] = ("why",)
    bn: str
    why: str | None = None


@dataclass(frozen=True)
class GlobalStats(_Step):
    """Replace ``bn`` by an equal BatchNorm that always uses its running statistics."""

    op: ClassVar[str] = "global_stats"
    bn: str


@dataclass(frozen=True)
class FoldIntoBN(_Step):
    """Fold the input map into the data BatchNorm ``bn`` read by ``conv`` (exact).

    ``form``: the data BN becomes ``affine`` (FrozenAffine) or ``global-stats`` (a BatchNorm;
    ``fix_gamma`` pins the choice the first application made, so replays build the same block).
    """

    op: ClassVar[str] = "input_bn"
    _optional: ClassVar[tuple[str, ...]] = ("fix_gamma",)
    bn: str
    conv: str
    form: str
    fix_gamma: bool | None = None

    def __post_init__(self) -> None:
        if self.form not in ("affine", "global-stats"):
            raise PlanStepError(f"input_bn step has an unknown form {self.form!r}")


@dataclass(frozen=True)
class InsertInputAffine(_Step):
    """Put a FrozenAffine carrying the input map in front of the first conv ``conv`` (exact)."""

    op: ClassVar[str] = "input_insert"
    conv: str


@dataclass(frozen=True)
class FoldIntoConv(_Step):
    """Fold the input map (through the data BN ``absorb_bn``, if any) into the first conv's weights and bias.

    Exact only when the shift is zero: the zero padding is black afterwards, the mean colour before.
    """

    op: ClassVar[str] = "input_conv"
    _nullable: ClassVar[tuple[str, ...]] = ("absorb_bn",)
    conv: str
    absorb_bn: str | None

    @property
    def reads_bn(self) -> str | None:
        return self.absorb_bn


PlanStep = Union[Fuse, Affine, GlobalStats, FoldIntoBN, InsertInputAffine, FoldIntoConv]
STEP_TYPES: dict[str, type] = {cls.op: cls for cls in (Fuse, Affine, GlobalStats, FoldIntoBN, InsertInputAffine,
                                                           FoldIntoConv)}
INPUT_STEPS = (FoldIntoBN, InsertInputAffine, FoldIntoConv)


@dataclass(frozen=True)
class StepResult:
    """What applying one step found out; recorded beside the step, never written into it.

    ``exact``: whether an input step reproduces the original everywhere (None for BN steps);
    ``max_abs_shift``: the input shift a conv fold put into the bias; ``fix_gamma``: the form
    an ``input_bn`` global-stats fold chose; ``health``: a note on the BN the step read.
    """

    exact: bool | None = None
    max_abs_shift: float | None = None
    fix_gamma: bool | None = None
    health: dict | None = None

    def to_dict(self) -> dict:
        """The keys the manifest records (health is stored apart, under ``health``)."""
        recorded = {"fix_gamma": self.fix_gamma, "exact": self.exact, "max_abs_shift": self.max_abs_shift}
        return {k: v for k, v in recorded.items() if v is not None}

    @classmethod
    def from_dict(cls, record: dict) -> StepResult:
        exact, shift, fix = record.get("exact"), record.get("max_abs_shift"), record.get("fix_gamma")
        if exact is not None and not isinstance(exact, bool):
            raise PlanStepError("step has a non-boolean 'exact'")
        if shift is not None and not (isinstance(shift, (int, float)) and not isinstance(shift, bool)
                                      and math.isfinite(shift)):
            raise PlanStepError("step has a non-numeric 'max_abs_shift'")
        return cls(exact=exact, max_abs_shift=None if shift is None else float(shift), fix_gamma=fix)


RESULT_KEYS = {"exact", "max_abs_shift"}  # fix_gamma is a field of FoldIntoBN itself


def step_from_dict(record: dict) -> PlanStep:
    """The typed step of one manifest record (result keys ignored); :class:`PlanStepError` if it is not one."""
    if not isinstance(record, dict):
        raise PlanStepError(f"a step is a {type(record).__name__}, not an object")
    op = record.get("op")
    cls = STEP_TYPES.get(op) if isinstance(op, str) else None
    if cls is None:
        raise PlanStepError(f"unknown plan step {op!r}")
    unknown = set(record) - {"op"} - {f.name for f in fields(cls)} - RESULT_KEYS
    if unknown:
        raise PlanStepError(f"{op} step has unknown keys {', '.join(sorted(map(str, unknown)))}")
    return cls.from_fields(record)


def from_records(records: list) -> tuple[list[PlanStep], list[StepResult]]:
    """Steps and recorded results of a manifest's ``plan`` list; the error names the step number."""
    steps, results = [], []
    for i, record in enumerate(records):
        try:
            steps.append(step_from_dict(record))
            results.append(StepResult.from_dict(record))
        except PlanStepError as exc:
            raise PlanStepError(f"step {i + 1}: {exc}") from None
    return steps, results


def to_records(steps: list[PlanStep], results: list[StepResult]) -> list[dict]:
    """The JSON form of an applied plan: each step's fields, then what applying it recorded."""
    return [{**step.to_dict(), **result.to_dict()} for step, result in zip(steps, results, strict=True)]


def input_step(steps: list[PlanStep]) -> PlanStep | None:
    """The step that folds the input normalization, if any (a plan has at most one)."""
    return next((s for s in steps if isinstance(s, INPUT_STEPS)), None)


def fold_used(steps: list[PlanStep]) -> str:
    """The fold actually used: ``conv``, ``bn`` (data BN, existing or inserted) or ``none``."""
    step = input_step(steps)
    return "conv" if isinstance(step, FoldIntoConv) else "none" if step is None else "bn"
