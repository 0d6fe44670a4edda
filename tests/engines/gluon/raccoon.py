"""The raccoon photos shipped in tests/data/raccoon_voc (VOC layout, MIT; see tests/data/NOTICE), as small sets."""

from __future__ import annotations

from pathlib import Path

from tests.engines.gluon.test_datasets import voc_subset


def raccoon_voc(root: Path, train: list[int], val: list[int]) -> Path:
    """``root/VOC2017`` with photos ``raccoon-{i}`` split into ``train`` and ``val``; returns ``root``.

    The ``VOC2017`` level makes it readable both as ``voc:root`` and by gluoncv's own
    ``VOCDetection(root, splits=[(2017, split)])``.
    """
    voc_subset(root / "VOC2017", train, val)
    return root
