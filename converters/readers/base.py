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
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from bbadapt.core.registry import Converted
from bbadapt.core.zoo import resnet_depth
from bbadapt.platform.errors import WeightsError

HEAD_BYTES = 4096  # what sniffers see of a file
MAX_FILE_BYTES = 4 << 30  # no ResNet's weights come near (ResNet-152 in float64: 0.5 GB)


@dataclass(frozen=True)
class Format:
    """A foreign format: how to recognise it from content and how to read it."""

    name: str  # as --format takes it, e.g. "mxnet-symbol"
    description: str  # one line for `bbadapt formats`
    sniff: Callable[[Path, bytes], bool]  # (path, first HEAD_BYTES bytes) -> is it mine?
    read: Callable[..., Converted]  # read(path: Path, arch: str | None, progress) -> Converted
    extensions: tuple[str, ...] = field(default=())  # typical suffixes, for help text only
    folder: Callable[[Path], bool] | None = None  # (directory) -> is it mine? For formats that are a folder of files


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, as bbadapt records it everywhere (manifest provenance, re-checks)."""
    from bbadapt.core.weights import sha256_of

    return sha256_of(path)


def open_regular(path: str | os.PathLike, what: str = "weights file", max_bytes: int = MAX_FILE_BYTES) -> BinaryIO:
    """``path`` opened for reading if it is a non-empty regular file of at most ``max_bytes``; else one WeightsError.

    Why: every file a reader opens is named by a user, directly or as a partner (the ``-0000.params``
    beside a graph, a graph beside its parameters), and any of them may be a FIFO (a plain ``open``
    blocks forever), a directory, a device, a dangling link or absurdly large. The file is opened
    without blocking and judged by ``fstat`` of what was opened (no race between a check and the
    open), then handed back as an ordinary blocking binary file.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise WeightsError(f"{what} {path} is a symbolic link to nothing ({os.readlink(path)})") from None
        raise WeightsError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise WeightsError(f"cannot open {what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WeightsError(f"{what} {path} is not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size == 0:
            raise WeightsError(f"{what} is empty: {path}")
        if st.st_size > max_bytes:
            raise WeightsError(f"{what} {path} is {st.st_size:,} bytes, more than bbadapt reads ({max_bytes:,}); refused")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a plain file"


def require_file(path: str | os.PathLike, what: str = "weights file", max_bytes: int = MAX_FILE_BYTES) -> Path:
    """The path, if :func:`open_regular` accepts it (a non-empty regular file, opened without blocking)."""
    with open_regular(path, what, max_bytes):
        return Path(path)


# bfloat16 as numpy holds it: numpy has no bfloat16, so readers keep the raw 16-bit patterns under this
# one named structured dtype and :func:`float32_tensors` widens them (exactly: bfloat16 is float32's top half).
BFLOAT16 = np.dtype([("bfloat16", "<u2")])


def dtype_name(array: np.ndarray) -> str:
    """The stored dtype of a reader's array as users know it (``bfloat16`` for :data:`BFLOAT16`)."""
    return "bfloat16" if array.dtype == BFLOAT16 else str(array.dtype)


def bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bit patterns (any 16-bit integer array) as a :data:`BFLOAT16` array, for :func:`float32_tensors`."""
    return np.ascontiguousarray(bits).view(np.uint16).astype("<u2", copy=False).view(BFLOAT16)


def numeric(array: np.ndarray) -> np.ndarray:
    """``array`` as numbers numpy can compute with: :data:`BFLOAT16` bit patterns widened to float32 (exact)."""
    if array.dtype == BFLOAT16:
        return (array.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return array


@dataclass(frozen=True)
class Float32Tensors:
    """A reader's tensors as float32, and the one note saying how they were stored (None: float32 already)."""

    arrays: dict[str, np.ndarray]
    note: str | None


def float32_tensors(arrays: dict[str, np.ndarray], origin: str) -> Float32Tensors:
    """Every reader's tensors as float32, or one WeightsError line naming the tensor that cannot be weights.

    Why one function: each format stores weights its own way (float16 checkpoints, bfloat16 from
    mixed-precision training, float64 from numpy), and the rule must be the same for all. float16 and
    bfloat16 widen exactly; float64 is rounded and the note gives the largest relative rounding, so the
    report says what the conversion cost. Integer and boolean tensors are refused: they are no trained
    float weights (a quantized or wrong file), and casting them would give a network whose check passes
    against itself. NaN/Inf (and float64 beyond float32's range) are refused as before. No numpy warning
    escapes: values are tested before anything is cast.
    """
    wrong = sorted(k for k, v in arrays.items() if v.dtype != BFLOAT16 and v.dtype.kind != "f")
    if wrong:
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise WeightsError(f"{origin}: tensor {wrong[0]} is {dtype_name(arrays[wrong[0]])}{more}; weights must be "
                           "floating point (float32, float16, bfloat16 or float64): a quantized or wrong file?")
    out: dict[str, np.ndarray] = {}
    stored: dict[str, list[str]] = {}
    worst = (0.0, "")
    bad: list[str] = []
    for name, value in arrays.items():
        kind = dtype_name(value)
        stored.setdefault(kind, []).append(name)
        if value.dtype == BFLOAT16:
            wide = numeric(value)
        elif value.dtype.itemsize > 4:
            wide64 = value.astype(np.float64, copy=False)
            if not np.all(np.isfinite(wide64)) or (wide64.size and np.abs(wide64).max() > np.finfo(np.float32).max):
                bad.append(name)
                continue
            wide = wide64.astype(np.float32)
            changed = wide.astype(np.float64) != wide64
            if changed.any():
                rel = np.abs(wide[changed].astype(np.float64) - wide64[changed]) / np.abs(wide64[changed])
                if rel.max() > worst[0]:
                    worst = (float(rel.max()), name)
        else:
            wide = value.astype(np.float32, copy=False)
        if not np.all(np.isfinite(wide)):
            bad.append(name)
            continue
        out[name] = wide
    if bad:
        bad.sort()
        raise WeightsError(f"{origin} has NaN/Inf values (or values beyond float32) in {len(bad)} tensors (e.g. {bad[0]})")
    others = {k: names for k, names in stored.items() if k != "float32"}
    if not others:
        return Float32Tensors(out, None)
    what = ", ".join(f"{k} ({len(names)} tensors)" for k, names in sorted(others.items()))
    if worst[0]:
        how = f"rounded to float32, largest relative rounding {worst[0]:.2g} (in {worst[1]})"
    else:
        how = "converted to float32 exactly (every value is representable)"
    return Float32Tensors(out, f"weights stored as {what} in {Path(origin).name}: {how}")


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
