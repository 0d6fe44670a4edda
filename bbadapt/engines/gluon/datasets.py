"""The MXNet engine's detection datasets: the shared readers of :mod:`bbadapt.engines.common.datasets` as gluon datasets.

``voc:DIR`` and ``coco:ANNOTATIONS.json[:IMAGES]`` are parsed and validated once, by the
mxnet-free readers both engines use; this module only decodes the images with mxnet and
yields what gluoncv's detection transforms expect: an RGB ``HWC uint8`` NDArray and the
float32 label rows ``[xmin, ymin, xmax, ymax, class_id, difficult]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import mxnet as mx
from mxnet.gluon.data import Dataset

from bbadapt.engines.common import datasets as records
from bbadapt.engines.common.datasets import (  # noqa: F401 - importable from here, as before
    BOX_TOLERANCE,
    DECODE_CHECK_LIMIT,
    FORMATS,
    DatasetSpec,
    parse_dataset,
)
from bbadapt.platform.errors import DatasetError


def open_dataset(spec: str | DatasetSpec, classes: Sequence[str], split: str = "train", *,
                 drop_empty: bool = False):
    """:func:`bbadapt.engines.common.datasets.open_dataset`, as a gluon dataset (see there)."""
    return _wrap(records.open_dataset(spec, classes, split, drop_empty=drop_empty))


def _wrap(reader):
    dataset = (VOCSet if reader.kind == "voc" else COCOSet).__new__(VOCSet if reader.kind == "voc" else COCOSet)
    _GluonSet.__init__(dataset, reader)
    return dataset


def read_image(path):
    """Decode an image as RGB HWC uint8; a file that stops decoding mid-run is still one line."""
    try:
        return mx.image.imread(str(path), 1)
    except mx.base.MXNetError:
        raise DatasetError(f"image {path} cannot be decoded") from None


class _GluonSet(Dataset):
    """A shared reader's records as a gluon ``Dataset`` (everything else is the reader's)."""

    def __init__(self, reader) -> None:
        self.records = reader
        self._transform = None

    def __getattr__(self, name: str):
        if name == "records":
            raise AttributeError(name)
        return getattr(self.records, name)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.records.classes

    read_image = staticmethod(read_image)

    def __getitem__(self, idx: int):
        img = read_image(self.records.image_path(idx))
        label = self.records.label(idx)
        if self._transform is not None:
            return self._transform(img, label)
        return img, label.copy()


class VOCSet(_GluonSet):
    """A VOC split (:class:`bbadapt.engines.common.datasets.VOCSet`) as a gluon dataset."""

    def __init__(self, directory: str | os.PathLike, classes: Sequence[str], split: str = "train"):
        super().__init__(records.VOCSet(directory, classes, split))


class COCOSet(_GluonSet):
    """A COCO file (:class:`bbadapt.engines.common.datasets.COCOSet`) as a gluon dataset."""

    def __init__(self, annotations, images, classes: Sequence[str]):
        super().__init__(records.COCOSet(annotations, images, classes))


def transform_normalization(spec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean``/``std`` for gluoncv's detection transforms so that they produce ``spec``'s tensor.

    Those transforms compute ``(to_tensor(img) - mean) / std`` with ``to_tensor = raw / 255``;
    a spec wants ``(raw[perm] * scale - m) / s``. Equal when ``std = s / (255 * scale)`` and
    ``mean = m / (255 * scale)``: the ImageNet spec gives gluoncv's own defaults back, and
    ``rgb255`` gives mean 0, std 1/255, i.e. the raw pixels with no normalization at all
    (float32 ``x / 255 * 255`` is within one rounding of ``x``). The channel order is applied
    separately (:func:`in_channel_order`).
    """
    k = 255.0 * spec.scale
    return tuple(m / k for m in spec.mean), tuple(s / k for s in spec.std)


def in_channel_order(transform, spec):
    """Wrap a gluoncv transform so it sees the image in ``spec``'s channel order (BGR specs)."""
    if tuple(spec.perm) == (0, 1, 2):
        return transform
    perm = mx.nd.array(spec.perm, dtype="int32")

    def reordered(img, label):
        return transform(mx.nd.take(img, perm, axis=2), label)

    return reordered


def spec_transforms(spec, short: int, max_size: int, net=None, *, train: bool, **kwargs):
    """gluoncv's Faster R-CNN train (with ``net``: RPN targets too) or val transform, feeding ``spec``."""
    from gluoncv.data.transforms.presets.rcnn import (
        FasterRCNNDefaultTrainTransform,
        FasterRCNNDefaultValTransform,
    )

    mean, std = transform_normalization(spec)
    if train:
        base = FasterRCNNDefaultTrainTransform(short, max_size, net, mean=mean, std=std, **kwargs)
    else:
        base = FasterRCNNDefaultValTransform(short, max_size, mean=mean, std=std)
    return in_channel_order(base, spec)
