"""The raccoon photos shipped in tests/data/raccoon_voc (VOC layout, MIT; see tests/data/NOTICE), as small sets."""

from __future__ import annotations

import shutil
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "raccoon_voc" / "VOC2017"


def raccoon_voc(root: Path, train: list[int], val: list[int]) -> Path:
    """``root/VOC2017`` with photos ``raccoon-{i}`` split into ``train`` and ``val``; returns ``root``.

    The ``VOC2017`` level makes it readable both as ``voc:root`` and by gluoncv's own
    ``VOCDetection(root, splits=[(2017, split)])``.
    """
    voc = root / "VOC2017"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for i in [*train, *val]:
        shutil.copy(FIXTURE / "Annotations" / f"raccoon-{i}.xml", voc / "Annotations")
        shutil.copy(FIXTURE / "JPEGImages" / f"raccoon-{i}.jpg", voc / "JPEGImages")
    (voc / "ImageSets/Main/train.txt").write_text("".join(f"raccoon-{i}\n" for i in train))
    (voc / "ImageSets/Main/val.txt").write_text("".join(f"raccoon-{i}\n" for i in val))
    return root
