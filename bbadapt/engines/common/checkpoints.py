"""The checkpoint layout both engines write under the directory they train (names from :mod:`bbadapt.bundle.schema`).

```
DIR/train.log.jsonl
DIR/checkpoints/epoch-0001/ ...     a complete detector (bundle or torchvision export) + the optimizer state
DIR/checkpoints/last -> epoch-NNNN  the latest; what --resume reads (relative link, swapped atomically)
DIR/checkpoints/best -> epoch-NNNN  the highest validation mAP so far
```
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from bbadapt.bundle.schema import BEST, CHECKPOINTS, EPOCH_PREFIX, LAST
from bbadapt.platform.atomic import point_at, remove_directory, staged_directory
from bbadapt.platform.errors import OutputError


@contextlib.contextmanager
def writing(target: Path) -> Iterator[Path]:
    """A staged checkpoint directory; a failed write (disk full ...) is one line and leaves the others intact."""
    try:
        with staged_directory(target, force=True, what="checkpoint") as stage:
            yield stage
    except OSError as exc:
        raise OutputError(f"cannot write checkpoint {target}: {exc.strerror or exc}; "
                          "the checkpoints written before are intact") from None
    except OutputError as exc:  # bbadapt.platform.atomic already made a full disk one line
        raise OutputError(f"{exc}; the checkpoints written before are intact") from None


def point_reference(root: Path, name: str, epoch_dir: Path) -> None:
    """``checkpoints/last`` or ``best`` -> ``epoch-NNNN`` (a relative link, swapped atomically)."""
    try:
        point_at(root / name, epoch_dir.name)
    except OutputError as exc:
        raise OutputError(f"{exc}; the checkpoints written before are intact") from None


def referenced(root: Path) -> set[str]:
    """Names of the epoch directories ``last`` and ``best`` point at (real directories name themselves)."""
    names = set()
    for ref in (LAST, BEST):
        path = root / ref
        if path.is_symlink():
            names.add(Path(os.readlink(path)).name)
    return names


def prune(root: Path, kept) -> None:
    """Remove epoch directories ``kept(epoch)`` refuses, unless ``last``/``best`` point at them."""
    keep = referenced(root)
    for path in root.glob(f"{EPOCH_PREFIX}*"):
        number = path.name.removeprefix(EPOCH_PREFIX)
        if number.isdecimal() and not kept(int(number)) and path.name not in keep:
            remove_directory(path)


def resume_point(directory: Path, resume: bool) -> Optional[Path]:
    """``checkpoints/last`` for ``--resume``; None for a new run, which refuses to start over earlier checkpoints."""
    checkpoints = directory / CHECKPOINTS
    if not resume:
        if checkpoints.is_dir() and any(p.name in (LAST, BEST) or p.name.startswith(EPOCH_PREFIX)
                                        for p in checkpoints.iterdir()):
            raise OutputError(f"{checkpoints} holds checkpoints of an earlier run; pass --resume to continue it, "
                              "or move them away")
        return None
    last = checkpoints / LAST
    if not last.is_dir():
        raise OutputError(f"nothing to resume: {last} does not exist")
    return last
