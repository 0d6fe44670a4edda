"""The settings of ``bbadapt train`` and ``bbadapt evaluate`` as plain dataclasses, and the default schedule.

Kept apart from :mod:`bbadapt.detection.train` (which imports gluoncv) so that the command
line can take every option's default from these fields without importing mxnet: each
default is written once, here, for the CLI and for Python alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from bbadapt.core.errors import OptionError

# GluonCV's recipe (scripts/detection/faster_rcnn/train_faster_rcnn.py, COCO): lr 0.01 for 8 images
# per step, i.e. 0.00125 per image (the linear scaling rule), after a linear warmup from lr/3.
LR_PER_IMAGE = 0.00125
WARMUP_ITERS = 100
# A detector whose backbone weights are random starts with R-CNN losses of 10-20 (logits of random
# stage-4 features); at GluonCV's lr without warmup the loss quadrupled in one step before settling
# (measured, resnet18_v1b, short side 192), and at 0.01 it diverged: a quarter of it, warmed up longer.
RANDOM_LR_FACTOR = 0.25
RANDOM_WARMUP_ITERS = 200


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
    batch_size: int = 1  # images per step over all devices and all horovod workers (the global batch)
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

    def check(self) -> None:
        positive = {"epochs": self.epochs, "lr": 1 if self.lr is None else self.lr, "batch_size": self.batch_size,
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


def default_schedule(batch_size: int, random_weights: bool) -> tuple[float, int, str]:
    """(lr, warmup iterations, why) when the user gives neither ``--lr`` nor ``--warmup``."""
    lr = LR_PER_IMAGE * batch_size
    if random_weights:
        return (lr * RANDOM_LR_FACTOR, RANDOM_WARMUP_ITERS,
                f"{RANDOM_LR_FACTOR:g} x GluonCV's {LR_PER_IMAGE:g} per image: the bundle's weights are random")
    return lr, WARMUP_ITERS, f"GluonCV's {LR_PER_IMAGE:g} per image x batch size {batch_size}"


def resolve_schedule(config: TrainConfig, random_weights: bool, stored: Optional[dict] = None) -> tuple[TrainConfig, str]:
    """``config`` with ``lr``/``warmup_iters`` filled in (from the resumed run, else the defaults), and a note.

    ``random_weights``: the bundle's backbone weights are random (``BundleManifest.random_weights``).
    """
    stored = stored or {}
    lr, warmup, why = default_schedule(config.batch_size, random_weights)
    notes = []
    if config.lr is None:
        lr = stored.get("lr", lr)
        notes.append(f"lr {lr:g} ({'as the resumed run' if 'lr' in stored else why})")
    else:
        lr = config.lr
    if config.warmup_iters is None:
        warmup = stored.get("warmup_iters", warmup)
        notes.append(f"warmup {warmup} iterations from lr x {config.warmup_factor:.2g}"
                     f"{' (as the resumed run)' if 'warmup_iters' in stored else ''}")
    else:
        warmup = config.warmup_iters
    return replace(config, lr=float(lr), warmup_iters=int(warmup)), "; ".join(notes)


@dataclass
class EvaluateOptions:
    """What ``bbadapt evaluate`` measures: the metric, the VOC split, the image size (None: as trained)."""

    metric: str = "voc07"
    split: str = "val"
    short_side: Optional[int] = None
    max_size: Optional[int] = None
