"""The one thing every converter yields, and the small helpers they share.

A converter reads a foreign file and returns a :class:`Converted`: a Gluon network holding
the weights under its structural names, an ``arch`` record that rebuilds the same
architecture later (for bundle reload and re-checks), the input spec the weights expect,
and provenance for the manifest. Nothing else crosses the boundary: adapt, check, bundle
and detector never know which format the weights came from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bbadapt.core.errors import WeightsError
from bbadapt.core.registry import Converted
from bbadapt.core.zoo import resnet_depth

HEAD_BYTES = 4096  # what sniffers see of a file


@dataclass(frozen=True)
class Format:
    """A foreign format: how to recognise it from content and how to read it."""

    name: str  # as --format takes it, e.g. "mxnet-symbol"
    description: str  # one line for `bbadapt formats`
    sniff: Callable[[Path, bytes], bool]  # (path, first HEAD_BYTES bytes) -> is it mine?
    read: Callable[..., Converted]  # read(path: Path, arch: str | None, progress) -> Converted
    extensions: tuple[str, ...] = field(default=())  # typical suffixes, for help text only


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, as bbadapt records it everywhere (manifest provenance, re-checks)."""
    from bbadapt.core.weights import sha256_of

    return sha256_of(path)


def require_file(path: str | os.PathLike) -> Path:
    """The path, if it is a non-empty readable file; else one WeightsError line."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if not path.is_file():
        raise WeightsError(f"weights path is not a file: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file is empty: {path}")
    return path


def check_tensors(arrays: dict[str, np.ndarray], origin: str) -> dict[str, np.ndarray]:
    """Refuse non-finite values and non-float32 dtypes, naming the tensors; return float32 copies.

    fp16/fp64 are refused rather than cast silently: a half-precision checkpoint cannot
    give an fp32-exact conversion, and a float64 one is unusual enough to be a mistake.
    """
    odd = sorted(k for k, v in arrays.items() if v.dtype.kind == "f" and v.dtype != np.float32)
    if odd:
        kinds = sorted({str(arrays[k].dtype) for k in odd})
        raise WeightsError(f"{origin} holds {'/'.join(kinds)} tensors ({len(odd)}, e.g. {odd[0]}); "
                           "bbadapt converts float32 weights only")
    bad = sorted(k for k, v in arrays.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v)))
    if bad:
        raise WeightsError(f"{origin} has NaN/Inf values in {len(bad)} tensors (e.g. {bad[0]})")
    return arrays


def unmatched_error(origin: str, unmatched: list[str], missing: list[str]) -> WeightsError:
    """One line naming the foreign tensors nothing mapped and the net parameters nothing filled."""
    def listing(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    parts = []
    if unmatched:
        parts.append(f"{len(unmatched)} tensors in the file match nothing ({listing(unmatched)})")
    if missing:
        parts.append(f"{len(missing)} parameters get no value ({listing(missing)})")
    return WeightsError(f"{origin}: " + "; ".join(parts))


@dataclass(frozen=True)
class ResNetNaming:
    """How a format names a ResNet's tensors: enough to read its layout off the names alone."""

    block: re.Pattern  # matches a block's tensors; groups: stage number, block index
    stages: tuple[int, ...]  # the stage numbers, in order
    stem: str  # a name every such file has
    bottleneck: str  # a name only bottleneck ResNets have
    not_resnet: str  # the error when the names are not this kind of ResNet


def read_layout(names, naming: ResNetNaming) -> tuple[int | None, bool, tuple[int, ...]]:
    """(depth, bottleneck, blocks per stage) read off tensor names; depth None when no zoo ResNet has these counts.

    WeightsError (the file's content is wrong, not an argument: exit 1) when the names are not this kind of
    ResNet at all, or its blocks are not numbered 0..n-1.
    """
    blocks: dict[int, set[int]] = {}
    for name in names:
        m = naming.block.match(name)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(blocks) != list(naming.stages) or naming.stem not in names:
        raise WeightsError(naming.not_resnet)
    counts = tuple(len(blocks[k]) for k in naming.stages)
    if any(sorted(blocks[k]) != list(range(len(blocks[k]))) for k in blocks):
        raise WeightsError(f"the ResNet blocks are not numbered 0..n-1 in every stage ({counts})")
    bottleneck = naming.bottleneck in names
    return resnet_depth(counts, bottleneck), bottleneck, counts
