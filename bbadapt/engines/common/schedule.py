"""The learning-rate schedule both engines train with: the default lr per image, warmup, steps.

GluonCV's Faster R-CNN recipe (``train_faster_rcnn.py``: 0.01 for 8 images) and torchvision's
detection reference (``references/detection/train.py``: 0.02 for 16 images, 8 GPUs x 2) agree
on the linear scaling rule's 0.00125 per image in a step; both engines default to it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

LR_PER_IMAGE = 0.00125
WARMUP_ITERS = 100
# A detector whose backbone weights are random starts with R-CNN losses of 10-20 (logits of random
# stage-4 features); at GluonCV's lr without warmup the loss quadrupled in one step before settling
# (measured, resnet18_v1b, short side 192), and at 0.01 it diverged: a quarter of it, warmed up longer.
RANDOM_LR_FACTOR = 0.25
RANDOM_WARMUP_ITERS = 200
LOSSES = ("rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box")  # the four losses, in the order both engines log them
LOSS_LIMIT = 1e4  # a Faster R-CNN loss (normalised per positive) beyond this has exploded, not learned
WEIGHT_GROWTH_LIMIT = 10.0  # trainable weights' global L2 norm vs the run's start: beyond this, exploded


def resolve_batch_size(config, devices: int, workers: int):
    """``config`` with an unset ``batch_size`` made one image per device per worker (``devices x workers``).

    An explicit value keeps its global-batch meaning (and its divisibility rule); the default works
    under any launcher (``horovodrun -np N``, ``torchrun --nproc_per_node N``) without the user doing
    that sum. Both engines call it once their devices and workers are known.
    """
    if config.batch_size is not None:
        return config
    return replace(config, batch_size=devices * workers)


def default_schedule(batch_size: int, random_weights: bool) -> tuple[float, int, str]:
    """(lr, warmup iterations, why) when the user gives neither ``--lr`` nor ``--warmup``."""
    lr = LR_PER_IMAGE * batch_size
    if random_weights:
        return (lr * RANDOM_LR_FACTOR, RANDOM_WARMUP_ITERS,
                f"{RANDOM_LR_FACTOR:g} x GluonCV's {LR_PER_IMAGE:g} per image: the bundle's weights are random")
    return lr, WARMUP_ITERS, f"GluonCV's {LR_PER_IMAGE:g} per image x batch size {batch_size}"


def resolve_schedule(config, random_weights: bool, stored: Optional[dict] = None):
    """``config`` (a ``TrainConfig``) with ``lr``/``warmup_iters`` filled in (from the resumed run, else the
    defaults), and a note. ``random_weights``: the detector's backbone weights are random."""
    stored = stored or {}
    lr, warmup, why = default_schedule(config.batch_size or 1, random_weights)  # None: resolve_batch_size's job
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


def learning_rate(config, epoch: int, batch: int) -> float:
    """The lr at ``batch`` of ``epoch``: linear warmup from ``warmup_factor`` over the first
    ``warmup_iters`` iterations of epoch 0 (as gluoncv's script), times ``lr_decay`` per step passed.

    A pure function of the position, so a resumed run continues the schedule exactly.
    """
    lr = config.lr * config.lr_decay ** sum(1 for s in config.lr_steps if epoch >= s)
    if epoch == 0 and config.warmup_iters and batch < config.warmup_iters:
        alpha = batch / config.warmup_iters
        lr *= config.warmup_factor * (1 - alpha) + alpha
    return lr
