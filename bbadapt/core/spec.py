"""Input specs: what the tensor entering a network means in terms of the raw image.

A raw image is RGB with values 0..255. An :class:`InputSpec` says how a pipeline turns it
into the network input, per channel ``c``::

    x[c] = (raw[perm[c]] * scale - mean[c]) / std[c]

where ``perm`` is the identity for ``rgb`` and reverses the channels for ``bgr``.

Every fold bbadapt performs is the single affine map returned by :func:`affine_map`
(``x_source[c] = a[c] * x_target[perm[c]] + b[c]``) pushed into some layer, so this module
is the only place where spec arithmetic happens.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bbadapt.platform.errors import SpecError

ORDERS = ("rgb", "bgr")
_PERM = {"rgb": (0, 1, 2), "bgr": (2, 1, 0)}


@dataclass(frozen=True)
class InputSpec:
    """Channel order, scale and per-channel mean/std of a network's input convention."""

    order: str = "rgb"
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    name: str | None = None  # preset name, for display only

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise SpecError(f"unknown channel order {self.order!r} (expected one of: {', '.join(ORDERS)})")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise SpecError(f"mean and std need 3 values each, got {len(self.mean)} and {len(self.std)}")
        values = [self.scale, *self.mean, *self.std]
        if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
            raise SpecError("spec values must be finite numbers")
        if self.scale <= 0:
            raise SpecError(f"scale must be positive, got {self.scale}")
        if min(self.std) <= 0:
            raise SpecError(f"std must be positive, got {'/'.join(map(str, self.std))}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def perm(self) -> tuple[int, int, int]:
        """Which raw RGB channel feeds each input channel."""
        return _PERM[self.order]

    def normalize(self, raw: np.ndarray, dtype: str = "float32") -> np.ndarray:
        """Apply this spec to raw RGB 0..255 images in NCHW layout (computed in float64)."""
        raw = np.asarray(raw, dtype=np.float64)
        x = raw[:, list(self.perm)] * self.scale
        x = (x - np.array(self.mean).reshape(1, 3, 1, 1)) / np.array(self.std).reshape(1, 3, 1, 1)
        return x.astype(dtype)

    def to_string(self) -> str:
        """The spec as the command line accepts it: a preset name or the custom form."""
        if self.name:
            return self.name
        return f"order={self.order},scale={self.scale!r},mean={'/'.join(map(repr, self.mean))},std={'/'.join(map(repr, self.std))}"

    def to_dict(self) -> dict:
        return {"name": self.name, "order": self.order, "scale": self.scale, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(order=d["order"], scale=d["scale"], mean=tuple(d["mean"]), std=tuple(d["std"]), name=d.get("name"))

    def same_function(self, other: InputSpec) -> bool:
        """True when both specs map raw images to the same tensor (names aside)."""
        perm, a, b = affine_map(self, other)
        return perm == (0, 1, 2) and np.allclose(a, 1, rtol=0, atol=1e-12) and np.allclose(b, 0, rtol=0, atol=1e-12)


PRESETS: dict[str, InputSpec] = {
    "rgb255": InputSpec("rgb", 1.0, name="rgb255"),
    "bgr255": InputSpec("bgr", 1.0, name="bgr255"),
    "rgb01": InputSpec("rgb", 1 / 255, name="rgb01"),
    "imagenet": InputSpec("rgb", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), name="imagenet"),
    "caffe": InputSpec("bgr", 1.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0), name="caffe"),
    "tf": InputSpec("rgb", 1 / 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), name="tf"),
    "cifar": InputSpec("rgb", 1 / 255, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), name="cifar"),
}


def _floats(text: str, key: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split("/"))
    except ValueError:
        raise SpecError(f"{key}= needs numbers separated by '/', got {text!r}") from None


def parse_spec(text: str | InputSpec) -> InputSpec:
    """A preset name (``imagenet``) or ``order=bgr,scale=1,mean=103.9/116.8/123.7,std=1/1/1``.

    Omitted keys take the identity (rgb, scale 1, mean 0, std 1); ``scale`` also accepts
    ``1/255``-style fractions. A single mean/std value applies to all three channels.
    """
    if isinstance(text, InputSpec):
        return text
    text = text.strip()
    if text in PRESETS:
        return PRESETS[text]
    if "=" not in text:
        raise SpecError(f"unknown input spec {text!r}; presets: {', '.join(PRESETS)}, or order=..,scale=..,mean=a/b/c,std=a/b/c")
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("order", "scale", "mean", "std"):
            raise SpecError(f"bad spec field {part!r}; expected order=, scale=, mean=, std=")
        if key in fields:
            raise SpecError(f"spec field {key}= given twice")
        fields[key] = value.strip()
    order = fields.get("order", "rgb").lower()
    scale = 1.0
    if "scale" in fields:
        parts = _floats(fields["scale"], "scale")
        if len(parts) == 2 and parts[1] != 0:
            scale = parts[0] / parts[1]
        elif len(parts) == 1:
            scale = parts[0]
        else:
            raise SpecError(f"scale= needs a number or a fraction like 1/255, got {fields['scale']!r}")
    mean = _floats(fields["mean"], "mean") if "mean" in fields else (0.0,)
    std = _floats(fields["std"], "std") if "std" in fields else (1.0,)
    mean = mean * 3 if len(mean) == 1 else mean
    std = std * 3 if len(std) == 1 else std
    return InputSpec(order, scale, tuple(mean), tuple(std))  # type: ignore[arg-type]


def affine_map(source: InputSpec, target: InputSpec) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """The per-channel map with ``x_source[c] = a[c] * x_target[perm[c]] + b[c]``.

    Derivation: the target spec gives ``raw[pt[j]] = (x_t[j] * std_t[j] + mean_t[j]) / scale_t``;
    source channel ``c`` reads raw channel ``ps[c]``, found in target channel
    ``j = pt^-1[ps[c]]``. Substituting into the source formula gives ``a`` and ``b``
    (float64, so folds lose nothing here).
    """
    source, target = parse_spec(source), parse_spec(target)
    inv_t = {raw_ch: j for j, raw_ch in enumerate(target.perm)}
    perm = tuple(inv_t[raw_ch] for raw_ch in source.perm)
    std_t = np.array(target.std)[list(perm)]
    mean_t = np.array(target.mean)[list(perm)]
    a = std_t * source.scale / (target.scale * np.array(source.std))
    b = (mean_t * source.scale / target.scale - np.array(source.mean)) / np.array(source.std)
    return perm, a, b  # type: ignore[return-value]


def apply_map(x_target: np.ndarray, perm: Sequence[int], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Apply an :func:`affine_map` to an NCHW batch (used by tests and checks)."""
    x = np.asarray(x_target, dtype=np.float64)[:, list(perm)]
    return x * np.asarray(a).reshape(1, 3, 1, 1) + np.asarray(b).reshape(1, 3, 1, 1)
