"""The options of every command as objects, validated once, when made, by the CLI and Python alike.

``bbadapt convert`` takes a :class:`ConvertOptions` (and a :class:`DetectorOptions` for
``--detector``), ``bbadapt train`` a :class:`TrainOptions`, ``bbadapt evaluate`` an
:class:`EvaluateOptions`. Each refuses a bad value in its ``__post_init__``, with the one-line
message the CLI prints, so the command line and a Python caller meet the same rule in the same
place; the code inward (:mod:`bbadapt.pipeline`, :mod:`bbadapt.engines.gluon`) takes the objects as
they are and never checks them again. What depends on the model (a detector on a CIFAR net) is
decided once, where the model is first known: :func:`require_detector_fits`, called by
:func:`bbadapt.pipeline.convert`.

This module imports no mxnet (nor does anything it imports), so ``--help`` and every option
error stay quick; ``tests/core/test_light_imports.py`` holds it to that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Optional

from bbadapt.core.rewrite import BN_MODES, FOLDS
from bbadapt.core.spec import InputSpec, parse_spec
from bbadapt.engines.gluon.options import (
    DetectorOptions,
    EvaluateOptions,
    TrainConfig,
    TrainOptions,
    require_detector_fits,
)
from bbadapt.platform.errors import OptionError

__all__ = ["WEIGHT_KINDS", "ConvertOptions", "DetectorOptions", "EvaluateOptions", "TrainConfig", "TrainOptions",
           "check_sizes", "require_detector_fits"]

WEIGHT_KINDS = ("pretrained", "random")
MIN_SIDE = 8
MAX_SEED = 2**32 - 1


def check_sizes(sizes: Optional[Sequence]) -> Optional[tuple[tuple[int, int], ...]]:
    """Check sizes ``[(h, w), ...]`` with sides >= 8, as a tuple (None: the check's defaults)."""
    if sizes is None:
        return None
    checked = []
    for size in sizes:
        pair = isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(v, Integral) and not isinstance(v, bool) for v in size)
        if not pair or min(size) < MIN_SIDE:
            text = f"{size[0]}x{size[1]}" if pair else size
            raise OptionError(f"bad size {text!r}; use HxW[,HxW...] with sides >= {MIN_SIDE}, e.g. 224x224,129x161")
        checked.append((int(size[0]), int(size[1])))
    return tuple(checked)


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``bbadapt convert`` takes besides the model and the output directory.

    ``weights``: ``pretrained``, ``random`` or a weights file (``fmt`` overrides the sniffed
    format); ``source``: the input spec the weights expect (default: the model's own);
    ``target``: the spec you will feed; ``fold``: ``auto``/``bn``/``conv``; ``bn``: the frozen
    BatchNorm form (default ``fused``, ``affine`` with a detector); ``seed``: for random
    weights; ``force``: replace an existing output; ``images``/``sizes``/``tolerance``: the
    equivalence check (:class:`~bbadapt.verify.equivalence.CheckOptions`).

    Validated when made: the specs are parsed (``source_spec``/``target_spec`` hold the results,
    so nothing parses them again), fold and BN form, seed, tolerance and sizes checked, and
    ``--format`` refused beside ``pretrained``/``random``. ``sizes`` is kept as a tuple.
    Whether the model exists is known only with the model: :func:`bbadapt.pipeline.convert`.
    """

    weights: str = "pretrained"
    fmt: Optional[str] = None
    source: Optional[str] = None
    target: str = "rgb255"
    fold: str = "auto"
    bn: Optional[str] = None
    seed: int = 0
    force: bool = False
    images: Optional[str] = None
    sizes: Optional[Sequence[tuple[int, int]]] = None
    tolerance: float = 1e-5
    source_spec: Optional[InputSpec] = field(init=False, repr=False, compare=False, default=None)
    target_spec: InputSpec = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.weights, str) or not self.weights:
            raise OptionError(f"--weights takes pretrained, random or a weights file, got {self.weights!r}")
        if self.fmt and self.weights in WEIGHT_KINDS:
            raise OptionError(f"--format applies to a weights file, not to --weights {self.weights}")
        object.__setattr__(self, "target_spec", parse_spec(self.target))
        object.__setattr__(self, "source_spec", parse_spec(self.source) if self.source else None)
        if self.fold not in FOLDS:
            raise OptionError(f"unknown fold {self.fold!r}; choose one of {', '.join(FOLDS)}")
        if self.bn is not None and self.bn not in BN_MODES:
            raise OptionError(f"unknown BN mode {self.bn!r}; choose one of {', '.join(BN_MODES)}")
        if not isinstance(self.seed, Integral) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise OptionError(f"--seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}")
        if not isinstance(self.tolerance, Real) or not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise OptionError(f"--tolerance must be a finite number >= 0, got {self.tolerance!r}")
        object.__setattr__(self, "sizes", check_sizes(self.sizes))
