"""Probe images: real photos, random noise and flat colours, as raw RGB 0..255 NCHW float64.

Real photos give realistic activations; noise covers the whole input range; flat colours
are what exposes border errors (a constant image makes the zero padding of the first conv
the only spatial structure there is).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from bbadapt.platform.errors import BbadaptError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")
FLAT_COLOURS = ((0, 0, 0), (255, 255, 255), (124, 116, 104))


def data_dir() -> Path:
    """Files shipped with the package (photos, CIFAR tiles, pretrained CIFAR ResNets)."""
    return Path(str(resources.files("bbadapt") / "data"))


def _fit(img, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop to the target aspect ratio, then resize (bilinear)."""
    from PIL import Image

    h, w = size
    iw, ih = img.size
    scale = min(iw / w, ih / h)
    cw, ch = w * scale, h * scale
    left, top = max(0.0, (iw - cw) / 2), max(0.0, (ih - ch) / 2)
    img = img.convert("RGB").resize((w, h), Image.BILINEAR, box=(left, top, min(iw, left + cw), min(ih, top + ch)))
    return np.asarray(img, dtype=np.float64).transpose(2, 0, 1)


def photo_files(directory: str | Path | None = None) -> list[Path]:
    directory = Path(directory) if directory else data_dir() / "photos"
    if not directory.is_dir():
        raise BbadaptError(f"image directory not found: {directory}")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BbadaptError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return files


def photos(size: tuple[int, int], limit: int | None = None, directory: str | Path | None = None) -> tuple[np.ndarray, list[str]]:
    """Real photos resized to ``size``: the packaged raccoon photos unless ``directory``."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    files = photo_files(directory)[:limit]
    arrays = []
    # importing gluoncv sets PIL's global LOAD_TRUNCATED_IMAGES, which silently grey-fills cut photos
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        for f in files:
            try:
                with Image.open(f) as img:
                    arrays.append(_fit(img, size))
            except (UnidentifiedImageError, OSError):
                raise BbadaptError(f"cannot read image {f}: not an image, or truncated") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    return np.stack(arrays), [f.name for f in files]


def cifar_tiles(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 100 real CIFAR-10 tiles shipped with the package: raw RGB 0..255 and labels."""
    d = data_dir() / "cifar10-tiles"
    tiles = np.load(d / "cifar10_grid_tiles.npy").astype(np.float64) * 255.0
    labels = np.load(d / "cifar10_grid_labels.npy")
    tiles = tiles.transpose(0, 3, 1, 2)
    return tiles[:limit], labels[:limit]


def noise(size: tuple[int, int], n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).uniform(0, 255, (n, 3, *size))


def flat(size: tuple[int, int], colours=FLAT_COLOURS) -> np.ndarray:
    return np.stack([np.broadcast_to(np.array(c, dtype=np.float64).reshape(3, 1, 1), (3, *size)) for c in colours])


def resize_batch(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a raw NCHW batch (used to bring CIFAR tiles or photos to a probe size)."""
    from PIL import Image

    out = []
    for img in raw:
        pil = Image.fromarray(np.clip(img.transpose(1, 2, 0), 0, 255).astype(np.uint8))
        out.append(_fit(pil, size))
    return np.stack(out)
