"""The settings of ``convert --detector``, ``bbadapt train`` and ``bbadapt evaluate`` as dataclasses, and the
default schedule.

Kept apart from :mod:`bbadapt.engines.gluon.train` and :mod:`bbadapt.engines.gluon.build` (which import
gluoncv) so that the command line can take every option's default from these fields, and refuse
a bad value, without importing mxnet: each default and each rule is written once, here, for the
CLI and for Python alike. Every object validates itself when it is made (``__post_init__``), so
an object that exists is valid and the code inward (build, detector bundle, train, evaluate)
takes it as it is and never checks it again.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Optional

from bbadapt.engines.common.schedule import (  # noqa: F401 - engine-neutral; importable from here, as before
    LR_PER_IMAGE,
    RANDOM_LR_FACTOR,
    RANDOM_WARMUP_ITERS,
    WARMUP_ITERS,
    default_schedule,
    resolve_batch_size,
    resolve_schedule,
)
from bbadapt.platform.errors import ModelError, OptionError

DETECTORS = ("faster-rcnn",)
LAYOUTS = ("c4", "fpn")
FREEZE_LEVELS = range(6)  # 0: nothing frozen ... 5: the whole backbone
METRICS = ("auto", "voc07", "voc12", "coco")  # auto: coco on COCO data, voc07 on VOC data

# gluoncv 0.10.5 model_zoo/rcnn/faster_rcnn/predefined_models.py, faster_rcnn_resnet50_v1b_voc
C4_DEFAULTS: dict = {
    "short": 600, "max_size": 1000, "nms_thresh": 0.3, "nms_topk": 400, "post_nms": 100,
    "roi_mode": "align", "roi_size": (14, 14), "strides": 16, "clip": None, "rpn_channel": 1024,
    "base_size": 16, "scales": (2, 4, 8, 16, 32), "ratios": (0.5, 1, 2), "alloc_size": (128, 128),
    "rpn_nms_thresh": 0.7, "rpn_train_pre_nms": 12000, "rpn_train_post_nms": 2000,
    "rpn_test_pre_nms": 6000, "rpn_test_post_nms": 300, "rpn_min_size": 16, "num_sample": 128,
    "pos_iou_thresh": 0.5, "pos_ratio": 0.25, "max_num_gt": 100, "per_device_batch_size": 1,
}
# ... and faster_rcnn_fpn_resnet50_v1b_coco
FPN_DEFAULTS: dict = {
    "short": 800, "max_size": 1333, "min_stage": 2, "max_stage": 6, "nms_thresh": 0.5, "nms_topk": -1,
    "post_nms": -1, "roi_mode": "align", "roi_size": (7, 7), "strides": (4, 8, 16, 32, 64), "clip": 4.14,
    "rpn_channel": 1024, "base_size": 16, "scales": (2, 4, 8, 16, 32), "ratios": (0.5, 1, 2),
    "alloc_size": (384, 384), "rpn_nms_thresh": 0.7, "rpn_train_pre_nms": 12000,
    "rpn_train_post_nms": 2000, "rpn_test_pre_nms": 6000, "rpn_test_post_nms": 1000, "rpn_min_size": 1,
    "num_sample": 512, "pos_iou_thresh": 0.5, "pos_ratio": 0.25, "max_num_gt": 100,
    "per_device_batch_size": 1,
}


def layout_defaults(layout: str) -> dict:
    """gluoncv's settings for ``layout`` (a copy: callers apply their overrides to it)."""
    return dict(C4_DEFAULTS if layout == "c4" else FPN_DEFAULTS)


def check_classes(classes: list[str]) -> None:
    if not classes:
        raise OptionError("no detector classes given; pass --classes NAME[,NAME...]")
    for name in classes:
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise OptionError(f"invalid class name {name!r}: names must be non-empty, without surrounding spaces")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise OptionError(f"duplicate class names: {', '.join(dup)}")


def check_settings(layout: str, overrides: Mapping | None) -> None:
    """Refuse setting names gluoncv's detector for ``layout`` does not have (a typo would be silently ignored)."""
    base = layout_defaults(layout)
    for key in overrides or {}:
        if key not in base:
            raise OptionError(f"unknown detector setting {key!r}; known: {', '.join(sorted(base))}")


@dataclass(frozen=True)
class DetectorOptions:
    """``bbadapt convert --detector/--classes/--layout/--freeze-at``, plus settings that the CLI does not
    expose (``overrides``: e.g. RPN/ROI sample counts, see :mod:`bbadapt.engines.gluon.build`).

    Validated once, when made: the detector kind, the class names, the layout, the freeze level
    and the names of the overrides. ``classes`` is kept as a tuple and ``overrides`` as a
    read-only mapping, so that nothing can change a validated object afterwards. What depends
    on the model (a CIFAR net cannot carry a Faster R-CNN) is :func:`require_detector_fits`,
    called once where the model is first known.
    """

    classes: tuple[str, ...] = ()
    kind: str = "faster-rcnn"
    layout: str = "c4"
    freeze_at: int = 2
    overrides: Optional[Mapping] = None

    def __post_init__(self) -> None:
        if self.kind not in DETECTORS:
            raise OptionError(f"unknown detector {self.kind!r}; bbadapt builds {', '.join(DETECTORS)}")
        classes = list(self.classes) if isinstance(self.classes, (list, tuple)) else self.classes
        check_classes(classes)
        if self.layout not in LAYOUTS:
            raise OptionError(f"unknown detector layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if not isinstance(self.freeze_at, int) or self.freeze_at not in FREEZE_LEVELS:
            raise OptionError(f"--freeze-at must be 0..5 (0: train everything, 1: freeze the stem, "
                              f"2: stem + stage 1, ..., 5: the whole backbone), got {self.freeze_at!r}")
        check_settings(self.layout, self.overrides)
        object.__setattr__(self, "classes", tuple(classes))
        if self.overrides is not None:
            object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))


def require_detector_fits(info, detector: DetectorOptions) -> None:
    """What a valid :class:`DetectorOptions` still needs from the model (a :class:`~bbadapt.core.zoo.ModelInfo`).

    The one model-dependent check of a detector request: :func:`bbadapt.pipeline.convert` calls
    it once, where the model's info is first known (from the zoo name, else from the weights
    file), before minutes of work. Whether the net itself can be cut into stages needs the net:
    :func:`bbadapt.engines.gluon.build.discover_layout`.
    """
    if info.is_cifar:
        raise ModelError(f"{info.name} is a CIFAR network (32x32 inputs, no stride-16/32 stages); "
                         "a Faster R-CNN needs an ImageNet-style ResNet")

@dataclass
class TrainConfig:
    """Every setting of a run; stored in each checkpoint so a resumed run continues the same schedule.

    ``lr`` and ``warmup_iters`` left at None take the defaults of :func:`default_schedule`
    (GluonCV's recipe for the batch size; gentler for random backbone weights), or on
    ``--resume`` the values the run was started with.
    """

    epochs: int = 2
    lr: Optional[float] = None
    momentum: float = 0.9
    wd: float = 1e-4
    lr_steps: tuple[int, ...] = ()  # the lr is multiplied by lr_decay after each of these epochs
    lr_decay: float = 0.1
    warmup_iters: Optional[int] = None  # linear warmup over the first iterations of epoch 1
    warmup_factor: float = 1 / 3
    # images per step over all devices and all horovod workers (the global batch); None: one image per
    # device per worker, resolved by the engine when the devices and workers are known (resolve_batch_size)
    batch_size: Optional[int] = None
    short_side: int = 600
    max_size: int = 1000
    flip_p: float = 0.5
    checkpoint_every: int = 1
    val_interval: int = 1
    log_interval: int = 10
    seed: int = 0
    hybridize: bool = True
    amp: bool = False
    num_workers: int = 0
    train_split: str = "train"
    val_split: str = "val"
    dataset: str = ""
    val_dataset: Optional[str] = None
    devices: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Validated when made, by the CLI and Python alike (:func:`~bbadapt.engines.gluon.train.train` trusts it);
        ``lr_steps`` kept sorted, as the schedule reads them."""
        self.lr_steps = tuple(sorted(self.lr_steps))
        self.check()

    def check(self) -> None:
        """The rules of every setting; runs in ``__post_init__`` (and again after any ``replace``)."""
        positive = {"epochs": self.epochs, "lr": 1 if self.lr is None else self.lr,
                    "batch_size": 1 if self.batch_size is None else self.batch_size,
                    "short_side": self.short_side, "max_size": self.max_size, "checkpoint_every": self.checkpoint_every,
                    "val_interval": self.val_interval, "log_interval": self.log_interval}
        for name, value in positive.items():
            if not value > 0:
                raise OptionError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.max_size < self.short_side:
            raise OptionError(f"--max-size ({self.max_size}) must be at least --short-side ({self.short_side})")
        warmup = 0 if self.warmup_iters is None else self.warmup_iters
        if not 0 <= self.flip_p <= 1 or warmup < 0 or self.lr_decay <= 0 or self.num_workers < 0:
            raise OptionError("flip probability must be in [0, 1]; warmup iterations, workers >= 0; lr decay > 0")


TrainOptions = TrainConfig  # the name issue 19 gives it, beside ConvertOptions and DetectorOptions


def check_metric(metric: str) -> str:
    """A metric bbadapt scores, and for ``coco`` pycocotools installed (found without importing it)."""
    if metric not in METRICS:
        raise OptionError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if metric == "coco" and importlib.util.find_spec("pycocotools") is None:
        raise OptionError("metric 'coco' needs pycocotools: pip install 'bbadapt[coco]'")
    return metric


@dataclass(frozen=True)
class EvaluateOptions:
    """What ``bbadapt evaluate`` measures: the metric, the VOC split, the image size (None: as trained).

    The metric is validated when the object is made; :func:`~bbadapt.engines.gluon.evaluate.evaluate` trusts it.
    """

    metric: str = "auto"  # COCO AP on coco: data, VOC07 mAP on voc: data (engines.common.metrics.default_metric)
    split: str = "val"
    short_side: Optional[int] = None
    max_size: Optional[int] = None

    def __post_init__(self) -> None:
        check_metric(self.metric)
