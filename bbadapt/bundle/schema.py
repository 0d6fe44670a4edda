"""The typed contract of every file bbadapt writes and reads back.

Why one module: a bundle's ``manifest.json`` is read by the check, the detector loader, training,
evaluation and every exporter, and a second engine will read it too. Each of them used to
re-interpret a raw JSON dict with its own defaults; here the file is validated once, into frozen
dataclasses, and every default and file name is written down once.

* :class:`BundleManifest` - ``manifest.json`` of a bundle (kind ``backbone`` or ``detector``) and
  of a training checkpoint (the bundle's manifest plus a :class:`CheckpointSection`);
* :class:`DetectorSection` - its ``detector`` section (what ``convert --detector`` built);
* :class:`CheckpointSection` - its ``checkpoint`` section (what ``bbadapt train`` writes);
* :class:`TorchvisionExport` - ``config.json`` of ``bbadapt export --torchvision`` for a detector.

``from_json`` (or ``from_dict``) validates: an unknown kind, a missing or mistyped field is one
:class:`~bbadapt.platform.errors.OutputError` line naming the file and the field. ``to_json`` is the
only writer. Free-form parts (the weights provenance, the check summary, the plan records, the
detector's settings) stay JSON values the type carries as they are, with typed accessors for what
readers read; keys this bbadapt does not know are kept in ``extra`` and written back unchanged.

The values inside are plain JSON objects: treat them as read-only (``to_dict`` returns copies).
The layout on disk is schema version 1, unchanged: every version-1 file written before this
module reads into the same object.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bbadapt.platform.errors import OutputError

SCHEMA_VERSION = 1
KINDS = ("backbone", "detector")

# ---------------------------------------------------------------- file names

MANIFEST = "manifest.json"
BACKBONE_PARAMS = "backbone.params"
DETECTOR_PARAMS = "detector.params"
REPORT_JSON, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"
REPORTS = (REPORT_JSON, REPORT_MD, REPORT_HTML)
TRAINER_STATES = "trainer.states"
TRAIN_LOG = "train.log.jsonl"
CHECKPOINTS = "checkpoints"  # the directory ``bbadapt train`` writes under a bundle
LAST, BEST = "last", "best"  # relative links in it, naming an epoch directory
EPOCH_PREFIX = "epoch-"  # epoch directories: epoch-0001 (epochs count from 1)


def epoch_name(epoch: int) -> str:
    """The checkpoint directory of ``epoch`` (counted from 1)."""
    return f"{EPOCH_PREFIX}{epoch:04d}"
# Every name bbadapt writes inside an output or checkpoint directory. A directory holding anything
# else is not replaced by --force: bbadapt never deletes a file it did not write.
OUTPUT_FILES = frozenset({MANIFEST, BACKBONE_PARAMS, DETECTOR_PARAMS, *REPORTS, TRAINER_STATES, TRAIN_LOG})

TORCHVISION_FORMAT = "bbadapt-torchvision-faster-rcnn"
TORCHVISION_FORMAT_VERSION = 1
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_RUNTIME = "frcnn_runtime.py"
EXPORT_CHECK = "check.json"
EXPORT_FILES = frozenset({EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_RUNTIME, EXPORT_CHECK, "__pycache__"})

MAX_MANIFEST_BYTES = 64 << 20  # a manifest is kilobytes; a bigger file is not one
DEFAULT_TOLERANCE = 1e-5  # the check's tolerance when a manifest records none (as ``bbadapt check`` judges)
DEFAULT_WEIGHTS_KIND = "pretrained"  # a manifest without weights provenance: zoo weights, made again on a recheck


# ---------------------------------------------------------------- reading JSON with one-line errors


def read_small(path: str | os.PathLike) -> str:
    """The text of a file that must be manifest-sized (a bigger one is refused before it is parsed)."""
    with open(path, "rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError("too large")
    return data.decode("utf-8")


def parse_json(source: str | os.PathLike, where: Optional[str] = None) -> tuple[Any, str]:
    """(parsed JSON, name for messages) of a file path or JSON text; one line when it is not JSON.

    A :class:`~pathlib.Path` (or ``os.PathLike``) is read; a ``str`` is JSON text, named ``where``.
    """
    if isinstance(source, os.PathLike):
        where = where or str(source)
        try:
            text = read_small(source)
        except OSError as exc:
            raise OutputError(f"cannot read {where}: {exc.strerror or exc}") from None
        except (ValueError, UnicodeDecodeError):
            raise OutputError(f"{where} is not valid JSON (or larger than a manifest can be)") from None
    else:
        text, where = source, where or MANIFEST
    try:
        return json.loads(text), where
    except RecursionError:
        raise OutputError(f"{where} is nested too deeply to be a bbadapt manifest (damaged bundle)") from None
    except ValueError:
        raise OutputError(f"{where} is not valid JSON (or larger than a manifest can be)") from None


_MISSING = object()
_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
          list: "a list"}


def _is(value: Any, kind: type) -> bool:
    """JSON typing: an integer is no bool, a number may be an integer."""
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


class _Fields:
    """Takes typed fields out of one JSON object; every refusal is one line naming the file and the field."""

    def __init__(self, data: Any, where: str, prefix: str = "", lacks: Optional[str] = None) -> None:
        self.where, self.prefix, self.used = where, prefix, set()
        self.lacks = lacks or f"{where} lacks {{key!r}}"  # today's wording for a missing key
        if not isinstance(data, dict):
            if prefix:
                raise OutputError(f"{where}: {prefix.rstrip('.')} must be an object, not {_json_type(data)}")
            raise OutputError(f"{where} is not a bbadapt manifest (not a JSON object)")
        self.data = data

    def take(self, key: str, kind: type | tuple, default: Any = _MISSING, optional: bool = False) -> Any:
        """``data[key]`` checked to be ``kind`` (None allowed when ``optional``); ``default`` when absent."""
        self.used.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise OutputError(self.lacks.format(key=key))
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (value is None and optional) or any(_is(value, k) for k in kinds):
            return value
        expected = " or ".join(_NAMES.get(k, k.__name__) for k in kinds) + (" or null" if optional else "")
        raise OutputError(f"{self.where}: {self.prefix}{key} must be {expected}, not {_json_type(value)}")

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """A list of strings, as a tuple."""
        value = self.take(key, list, default)
        if value is default and default is not _MISSING:
            return value
        if not all(isinstance(v, str) for v in value):
            raise OutputError(f"{self.where}: {self.prefix}{key} must be a list of strings")
        return tuple(value)

    def file_name(self, key: str, default: str) -> str:
        """A file name inside the bundle: a manifest must never make bbadapt read or write outside it."""
        self.used.add(key)
        name = self.data.get(key, default)
        if not (isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")):
            raise OutputError(f"{self.where}: {self.prefix}{key} {name!r} is not a file name inside the bundle; refused")
        return name

    def extra(self) -> dict:
        """The keys this bbadapt does not read, kept as they are."""
        return {k: copy.deepcopy(v) for k, v in self.data.items() if k not in self.used}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "true/false"), (str, "a string"), (int, "an integer"), (float, "a number"),
                       (dict, "an object"), (list, "a list")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _drop_none(items: dict) -> dict:
    return {k: v for k, v in items.items() if v is not None}


def _dump(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


# ---------------------------------------------------------------- detector section


@dataclass(frozen=True)
class DetectorSection:
    """``manifest["detector"]``: the Faster R-CNN ``convert --detector`` built on the adapted backbone.

    ``family`` None: the manifest's own family (older bundles record it only there); ``input``
    None: the manifest's target spec; ``backbone_layout`` None: discovered again from the net.
    """

    classes: tuple[str, ...]
    layout: str
    freeze_at: int
    settings: dict
    params_file: str = DETECTOR_PARAMS
    params_sha256: Optional[str] = None
    family: Optional[str] = None
    seed: int = 0
    input: Optional[dict] = None
    backbone_layout: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST) -> DetectorSection:
        f = _Fields(data, where, "detector.", lacks=f"{where}: the detector section lacks {{key!r}}")
        params_file = f.file_name("params_file", DETECTOR_PARAMS)  # before anything else: a hostile name is refused first
        return cls(classes=f.strings("classes"), layout=f.take("layout", str), freeze_at=f.take("freeze_at", int),
                   settings=dict(f.take("settings", dict)), params_file=params_file,
                   params_sha256=f.take("params_sha256", str, None, optional=True),
                   family=f.take("family", str, None), seed=f.take("seed", int, 0),
                   input=f.take("input", dict, None, optional=True),
                   backbone_layout=f.take("backbone_layout", dict, None, optional=True), extra=f.extra())

    def to_dict(self) -> dict:
        fixed = {"family": self.family, "classes": list(self.classes), "layout": self.layout, "freeze_at": self.freeze_at,
                 "settings": copy.deepcopy(self.settings), "backbone_layout": copy.deepcopy(self.backbone_layout),
                 "seed": self.seed, "params_file": self.params_file, "params_sha256": self.params_sha256,
                 "input": copy.deepcopy(self.input)}
        return {**copy.deepcopy(self.extra), **_drop_none(fixed)}


# ---------------------------------------------------------------- checkpoint section


@dataclass(frozen=True)
class CheckpointSection:
    """``manifest["checkpoint"]``: where a training run stood when it wrote this checkpoint.

    ``config`` is the run's :class:`~bbadapt.engines.gluon.options.TrainConfig` as JSON (a resumed
    run must match it); epochs count from 1.
    """

    epoch: int
    iteration: int
    config: dict
    val_map: Optional[float] = None
    best_map: Optional[float] = None
    val_metric: Optional[str] = None
    dataset: Optional[str] = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST) -> CheckpointSection:
        f = _Fields(data, where, "checkpoint.", lacks=f"{where}: the checkpoint section lacks {{key!r}}")
        return cls(epoch=f.take("epoch", int), iteration=f.take("iteration", int), config=dict(f.take("config", dict)),
                   val_map=f.take("val_map", float, None, optional=True), best_map=f.take("best_map", float, None, optional=True),
                   val_metric=f.take("val_metric", str, None, optional=True), dataset=f.take("dataset", str, None, optional=True),
                   extra=f.extra())

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "iteration": self.iteration, "val_map": self.val_map, "best_map": self.best_map,
                **_drop_none({"val_metric": self.val_metric, "dataset": self.dataset}),
                "config": copy.deepcopy(self.config), **copy.deepcopy(self.extra)}

    def config_value(self, key: str, default: Any = None) -> Any:
        """One setting of the run (``short_side``, ``lr`` ...), or ``default`` when the run did not record it."""
        return self.config.get(key, default)


# ---------------------------------------------------------------- weights provenance


@dataclass(frozen=True)
class WeightsProvenance:
    """``manifest["weights"]``: how the original weights were made or found, as the reader that read them
    recorded it (free-form: each format adds its own keys). The accessors are what a re-check reads."""

    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.data)

    @property
    def kind(self) -> str:
        """``pretrained``, ``random`` or ``file`` (zoo weights when nothing is recorded)."""
        return str(self.data.get("kind", DEFAULT_WEIGHTS_KIND))

    @property
    def path(self) -> Optional[str]:
        """The weights file given to ``convert --weights`` (kind ``file``)."""
        return self.data.get("path")

    @property
    def files(self) -> dict:
        """{path at conversion: sha256} of every file the conversion read ({} for zoo weights)."""
        return dict(self.data.get("files") or {})

    @property
    def sha256(self) -> Optional[str]:
        return self.data.get("sha256")

    @property
    def seed(self) -> int:
        """The seed of random weights (0 when none is recorded)."""
        return int(self.data.get("seed", 0))

    @property
    def format(self) -> Optional[str]:
        return self.data.get("format")

    def model_for(self, model: str) -> Optional[str]:
        """The architecture argument the conversion was given with the file (``arch_arg``, maybe None), else ``model``."""
        return self.data["arch_arg"] if "arch_arg" in self.data else model


# ---------------------------------------------------------------- the bundle manifest


@dataclass(frozen=True)
class BundleManifest:
    """``manifest.json`` of a bundle or a training checkpoint.

    Written by ``convert`` (kind ``backbone``, or ``detector`` with a :class:`DetectorSection`)
    and copied into every checkpoint with a :class:`CheckpointSection` added. ``directory`` is
    where it was read from (None for one built in memory); it is no part of the file.
    """

    model: str
    source: dict  # InputSpec.to_dict() of what the original weights expect
    target: dict  # ... of what the adapted network takes
    plan: tuple  # the applied rewrite steps, as records (bbadapt.core.plan.from_records reads them)
    kind: str = "backbone"
    schema_version: int = SCHEMA_VERSION
    created: Optional[str] = None
    arch: Optional[dict] = None  # {"zoo": name} or {"builder": name, "kwargs": {...}}; None: the zoo model ``model``
    family: str = ""
    input_size: Any = None
    weights: Optional[dict] = None  # provenance, free-form: kind, path, sha256, files, seed, format ...
    fold_requested: Optional[str] = None
    fold: Optional[str] = None
    bn: str = ""
    exact: Optional[bool] = None
    health: tuple = ()
    graph: Optional[dict] = None
    params_file: str = BACKBONE_PARAMS
    params_sha256: Optional[str] = None
    check: Optional[dict] = None  # summary of the conversion's check, free-form: passed, worst_max_rel, tolerance
    detector: Optional[DetectorSection] = None
    checkpoint: Optional[CheckpointSection] = None
    versions: Optional[dict] = None
    extra: dict = field(default_factory=dict)
    directory: Optional[Path] = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------ reading and writing

    @classmethod
    def from_json(cls, source: str | os.PathLike, where: Optional[str] = None) -> BundleManifest:
        """Parse and validate ``manifest.json`` (a path) or its text (``where`` names it in messages)."""
        data, where = parse_json(source, where)
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST) -> BundleManifest:
        if not isinstance(data, dict):
            raise OutputError(f"{where} is not a bbadapt manifest (not a JSON object)")
        version = data.get("schema_version")
        if not _is(version, int):
            raise OutputError(f"{where} has no valid schema_version")
        if version > SCHEMA_VERSION:
            raise OutputError(f"{where} has schema version {version}; this bbadapt reads up to {SCHEMA_VERSION} (upgrade bbadapt)")
        f = _Fields(data, where)
        f.used.add("schema_version")
        kind = f.take("kind", str, "backbone")
        if kind not in KINDS:
            raise OutputError(f"{where}: kind {kind!r} is not one bbadapt writes ({', '.join(KINDS)})")
        model = f.take("model", str)
        source, target, plan = f.take("source", object), f.take("target", object), f.take("plan", object)
        _check_specs(where, source, target)  # today's messages: "invalid source spec", "unusable arch record" ...
        arch = _checked_arch(where, f.take("arch", object, None, optional=True))
        if not isinstance(plan, list) or not all(isinstance(step, dict) for step in plan):
            raise OutputError(f"{where} has a malformed plan")
        params_file = f.file_name("params_file", BACKBONE_PARAMS)
        detector = data.get("detector")
        f.used.add("detector")
        detector = None if detector is None else DetectorSection.from_dict(detector, where)
        checkpoint = data.get("checkpoint")
        f.used.add("checkpoint")
        checkpoint = None if checkpoint is None else CheckpointSection.from_dict(checkpoint, where)
        return cls(model=model, source=copy.deepcopy(source), target=copy.deepcopy(target), plan=tuple(copy.deepcopy(plan)),
                   kind=kind, schema_version=version, created=f.take("created", str, None, optional=True), arch=arch,
                   family=f.take("family", str, "", optional=True) or "", input_size=copy.deepcopy(f.take("input_size", object, None)),
                   weights=copy.deepcopy(f.take("weights", dict, None, optional=True)),
                   fold_requested=f.take("fold_requested", str, None, optional=True),
                   fold=f.take("fold", str, None, optional=True), bn=f.take("bn", str, "", optional=True) or "",
                   exact=f.take("exact", bool, None, optional=True),
                   health=tuple(copy.deepcopy(f.take("health", list, [], optional=True) or [])),
                   graph=copy.deepcopy(f.take("graph", dict, None, optional=True)), params_file=params_file,
                   params_sha256=f.take("params_sha256", str, None, optional=True),
                   check=copy.deepcopy(f.take("check", dict, None, optional=True)), detector=detector, checkpoint=checkpoint,
                   versions=copy.deepcopy(f.take("versions", dict, None, optional=True)),
                   extra=f.extra())

    def to_dict(self) -> dict:
        """The manifest as today's JSON object (what ``read_manifest`` returned before the schema)."""
        head = {"schema_version": self.schema_version, "created": self.created, "kind": self.kind, "model": self.model,
                "arch": self.arch, "family": self.family, "input_size": self.input_size, "weights": self.weights,
                "source": self.source, "target": self.target, "fold_requested": self.fold_requested, "fold": self.fold,
                "bn": self.bn, "exact": self.exact, "plan": list(self.plan), "health": list(self.health), "graph": self.graph,
                "params_file": self.params_file, "params_sha256": self.params_sha256, "check": self.check}
        out = copy.deepcopy(_drop_none(head))
        if self.detector is not None:
            out["detector"] = self.detector.to_dict()
        out.update(copy.deepcopy(self.extra))
        if self.versions is not None:
            out["versions"] = copy.deepcopy(self.versions)
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint.to_dict()
        return out

    def to_json(self) -> str:
        """The text of ``manifest.json``: the one way bbadapt writes a manifest."""
        return _dump(self.to_dict())

    def replace(self, **changes: Any) -> BundleManifest:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ what readers ask

    @property
    def model_name(self) -> str:
        """The zoo name of the architecture (``arch.zoo``), else the model the manifest names."""
        return str((self.arch or {}).get("zoo") or self.model or "")

    @property
    def arch_record(self) -> dict:
        """What :func:`bbadapt.core.architectures.rebuild` builds: the ``arch`` record, else the zoo model ``model``."""
        return copy.deepcopy(self.arch) if self.arch else {"zoo": self.model}

    def source_spec(self):
        from bbadapt.core.spec import InputSpec

        return InputSpec.from_dict(self.source)

    def target_spec(self):
        from bbadapt.core.spec import InputSpec

        return InputSpec.from_dict(self.target)

    @property
    def holds_detector(self) -> bool:
        """A detector bundle or checkpoint (older bundles may say kind ``backbone`` and hold a detector section)."""
        return self.kind == "detector" or self.detector is not None

    @property
    def is_checkpoint(self) -> bool:
        return self.checkpoint is not None

    @property
    def detector_family(self) -> str:
        """The family the detector was built for: its section's, else the manifest's."""
        if self.detector is not None and self.detector.family is not None:
            return self.detector.family
        return self.family

    def detector_input_spec(self):
        """The spec the detector takes: its section's ``input``, else the manifest's target."""
        from bbadapt.core.spec import InputSpec

        return InputSpec.from_dict((self.detector.input if self.detector else None) or self.target)

    @property
    def provenance(self) -> WeightsProvenance:
        """The weights provenance, with typed accessors (empty when the manifest records none)."""
        return WeightsProvenance(copy.deepcopy(self.weights or {}))

    @property
    def random_weights(self) -> bool:
        """The backbone's weights are seeded random ones (training starts gentler)."""
        return self.provenance.kind == "random"

    @property
    def check_tolerance(self) -> float:
        """The tolerance the conversion was judged with (a re-check judges the same way)."""
        return float((self.check or {}).get("tolerance", DEFAULT_TOLERANCE))

    def path_of(self, name: str) -> Path:
        """``name`` inside the directory the manifest was read from."""
        if self.directory is None:
            raise OutputError(f"this manifest of {self.model} was not read from a bundle directory")
        return self.directory / name

    @property
    def backbone_params_path(self) -> Path:
        return self.path_of(self.params_file)

    @property
    def detector_params_path(self) -> Path:
        if self.detector is None:
            raise OutputError(f"{self.path_of(MANIFEST)} holds no detector section")
        return self.path_of(self.detector.params_file)

    @property
    def classes(self) -> list[str]:
        """The detector's class names ([] for a backbone)."""
        return list(self.detector.classes) if self.detector else []


def _check_specs(where: str, source: Any, target: Any) -> None:
    from bbadapt.core.spec import InputSpec

    for key, spec in (("source", source), ("target", target)):
        try:
            InputSpec.from_dict(spec)
        except (KeyError, TypeError, ValueError, AttributeError):  # SpecError is a ValueError
            raise OutputError(f"{where} has an invalid {key} spec") from None


def _checked_arch(where: str, arch: Any) -> Optional[dict]:
    """The ``arch`` record, refused unless the registry can build it (a manifest never names code to run)."""
    if arch is None:
        return None
    from bbadapt.core.architectures import arch_problem

    problem = arch_problem(arch)
    if problem:
        raise OutputError(f"{where} has an unusable arch record: it {problem}")
    return copy.deepcopy(arch)


def directory_of(bundle: str | os.PathLike | BundleManifest) -> Path:
    """The directory a caller named, or the one a manifest was read from (for messages)."""
    return bundle.directory if isinstance(bundle, BundleManifest) else Path(bundle)


# ---------------------------------------------------------------- the torchvision export


@dataclass(frozen=True)
class TorchvisionExport:
    """``config.json`` of a torchvision detector export: what its runtime (``frcnn_runtime.py``) builds.

    The runtime ships inside the export and reads the file without bbadapt; this type is how
    bbadapt writes it and reads it back (``--force`` recognises its own exports by it).
    ``sections``: everything else the runtime reads (backbone, input, transform, rpn, roi_heads,
    provenance ...), as written.
    """

    classes: tuple[str, ...]
    layout: str
    format: str = TORCHVISION_FORMAT
    format_version: int = TORCHVISION_FORMAT_VERSION
    runtime: str = EXPORT_RUNTIME
    sections: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, source: str | os.PathLike, where: Optional[str] = None) -> TorchvisionExport:
        data, where = parse_json(source, where or (None if isinstance(source, os.PathLike) else EXPORT_CONFIG))
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: Any, where: str = EXPORT_CONFIG) -> TorchvisionExport:
        f = _Fields(data, where)
        fmt = f.take("format", str)
        if fmt != TORCHVISION_FORMAT:
            raise OutputError(f"{where} is not a bbadapt torchvision detector export (format {fmt!r})")
        version = f.take("format_version", int)
        if version > TORCHVISION_FORMAT_VERSION:
            raise OutputError(f"{where} has format version {version}; this bbadapt reads up to "
                              f"{TORCHVISION_FORMAT_VERSION} (upgrade bbadapt)")
        return cls(format=fmt, format_version=version, runtime=f.file_name("runtime", EXPORT_RUNTIME),
                   classes=f.strings("classes"), layout=f.take("layout", str), sections=f.extra())

    def to_dict(self) -> dict:
        return {"format": self.format, "format_version": self.format_version, "runtime": self.runtime,
                "classes": list(self.classes), **_before_layout(self.sections), "layout": self.layout,
                **_after_layout(self.sections)}

    def to_json(self) -> str:
        """The text of ``config.json``: the one way bbadapt writes it."""
        return _dump(self.to_dict())

    def section(self, name: str) -> dict:
        """A copy of one section (``backbone``, ``input``, ``rpn`` ...); {} when absent."""
        value = self.sections.get(name)
        return copy.deepcopy(value) if isinstance(value, Mapping) else {}

    @property
    def architecture(self) -> str:
        """torchvision's name of the body, e.g. ``resnet18``."""
        return str(self.section("backbone").get("arch", ""))

    @property
    def input_meaning(self) -> str:
        return str(self.section("input").get("meaning", ""))


_CONFIG_HEAD = ("labels",)  # written between ``classes`` and ``layout``, as the export always did


def _before_layout(sections: dict) -> dict:
    return {k: copy.deepcopy(v) for k, v in sections.items() if k in _CONFIG_HEAD}


def _after_layout(sections: dict) -> dict:
    return {k: copy.deepcopy(v) for k, v in sections.items() if k not in _CONFIG_HEAD}
