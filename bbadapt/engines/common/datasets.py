"""The detection datasets both engines read: ``voc:DIR`` and ``coco:ANNOTATIONS.json[:IMAGES]``, with no mxnet.

Each dataset is a list of records: ``image_path(i)``, ``size(i)`` (width, height) and
``label(i)``, a float32 array of rows ``[xmin, ymin, xmax, ymax, class_id, difficult]`` in
pixel coordinates (gluoncv's conventions: VOC's 1-based XML corners minus 1; COCO
``[x, y, w, h]`` becomes ``[x, y, x + w - 1, y + h - 1]``, so one box written either way
loads identically). The MXNet engine wraps them as gluon datasets
(:mod:`bbadapt.engines.gluon.datasets`); the torch engine reads the images with PIL.

Class ids index the *detector's* classes, not the dataset's own list, so a dataset is always
opened against a detector. Every annotation is validated when the dataset is opened (before
any training starts), and each problem is one line naming the file: a box outside its image
or degenerate, a class the detector does not know (or a detector made for other classes), a
missing or unreadable image, an empty annotation set. gluoncv's own ``VOCDetection`` logs a
warning and silently drops such boxes, and drops unknown classes without a word; a training
run built on that would quietly learn from less than the user thinks.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bbadapt.platform.errors import DatasetError, OptionError

FORMATS = {"voc": "voc:DIR (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt; DIR or DIR/VOC<year>)",
           "coco": "coco:ANNOTATIONS.json[:IMAGES_DIR] (images default to the JSON's directory)"}
DECODE_CHECK_LIMIT = 20000  # sets up to this many images get every image decoded when opened
BOX_TOLERANCE = 1.0  # px a COCO box may overhang its image (float rounding in exporters); clipped, never more


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``--dataset`` value."""

    kind: str
    path: Path
    images: Path | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + (f":{self.images}" if self.images else "")


def parse_dataset(text: str) -> DatasetSpec:
    """``voc:DIR`` or ``coco:ANNOTATIONS.json[:IMAGES_DIR]``; unknown prefixes are usage errors."""
    kind, sep, rest = str(text).partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in FORMATS or not rest:
        raise OptionError(f"unknown dataset {text!r}; use {' or '.join(FORMATS.values())}")
    if kind == "voc":
        return DatasetSpec("voc", Path(rest))
    ann, sep, images = rest.partition(":")
    return DatasetSpec("coco", Path(ann), Path(images) if sep and images else None)


def open_dataset(spec: str | DatasetSpec, classes: Sequence[str], split: str = "train", *,
                 drop_empty: bool = False):
    """Open and fully validate a dataset against ``classes`` (the bundle's, in order).

    ``split`` names the VOC image set (``ImageSets/Main/<split>.txt``); a COCO file is one
    split (pass another file for validation). ``drop_empty`` leaves out images without
    boxes (training needs at least one box per image; evaluation keeps them, since false
    positives there count).
    """
    spec = parse_dataset(spec) if isinstance(spec, str) else spec
    classes = tuple(classes)
    if spec.kind == "voc":
        data = VOCSet(spec.path, classes, split)
    else:
        data = COCOSet(spec.path, spec.images, classes)
    if drop_empty:
        data.keep([i for i in range(len(data)) if len(data.label(i))])
    if len(data) == 0:
        raise DatasetError(f"{spec}: no {'annotated ' if drop_empty else ''}images in "
                           f"{'split ' + repr(split) if spec.kind == 'voc' else 'the annotation file'}")
    return data


class _Checks:
    """Validation and access shared by both formats (mixed into the dataset classes)."""

    _classes: tuple[str, ...]
    _sizes: list[tuple[int, int]]  # (width, height) per item

    @property
    def classes(self) -> tuple[str, ...]:
        """The bundle's class names: label column 4 indexes this."""
        return self._classes

    def class_id(self, name: str, where: str) -> int:
        if name not in self._classes:
            raise DatasetError(f"{where}: class {name!r} is not one of the bundle's classes "
                               f"({', '.join(self._classes)}); was the bundle made for other classes?")
        return self._classes.index(name)

    @staticmethod
    def check_box(box: Sequence[float], width: int, height: int, where: str) -> None:
        x1, y1, x2, y2 = box
        if not all(np.isfinite(box)):
            raise DatasetError(f"{where}: box {_fmt(box)} has a non-finite coordinate")
        if not (x1 < x2 and y1 < y2):
            raise DatasetError(f"{where}: degenerate box {_fmt(box)} (needs xmin < xmax and ymin < ymax)")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise DatasetError(f"{where}: box {_fmt(box)} lies outside the {width}x{height} image")

    @staticmethod
    def image_size(path: Path, where: str, decode: bool = True) -> tuple[int, int]:
        """(width, height) of an image; a missing, unreadable or truncated image is one line.

        ``decode``: also decode the pixels (JPEGs at 1/8 scale, a few ms each), because mxnet's
        decoder fills a truncated JPEG with grey without a word; large sets skip this.
        """
        from PIL import Image, ImageFile, UnidentifiedImageError

        if not path.is_file():
            raise DatasetError(f"{where}: image {path} is missing")
        lenient = ImageFile.LOAD_TRUNCATED_IMAGES  # importing gluoncv.data sets it to True, process-wide
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with Image.open(path) as im:
                size = im.size
                if decode:
                    im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                    im.load()
                return size
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DatasetError(f"{where}: image {path} is unreadable ({exc})") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = lenient

    def get_im_aspect_ratio(self) -> list[float]:
        """width/height per image (gluoncv's bucket sampler groups images by it)."""
        return [w / h for w, h in self._sizes]

    def size(self, idx: int) -> tuple[int, int]:
        return self._sizes[idx]


def _fmt(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _voc_root(directory: Path, split: str) -> tuple[Path, str]:
    """The devkit folder holding ``ImageSets/Main/<split>.txt``: DIR itself or exactly one DIR/VOC<year>."""
    if not directory.is_dir():
        raise DatasetError(f"VOC dataset directory {directory} does not exist")
    if (directory / "Annotations").is_dir():
        return directory, ""
    years = sorted(p.name for p in directory.glob("VOC*") if (p / "Annotations").is_dir())
    if not years:
        raise DatasetError(f"{directory} is not a VOC dataset (no Annotations/ in it or in a VOC<year>/ folder)")
    with_split = [y for y in years if (directory / y / "ImageSets" / "Main" / f"{split}.txt").is_file()]
    if len(with_split) > 1:
        raise DatasetError(f"{directory} holds several VOC folders with a {split!r} split ({', '.join(with_split)}); "
                           f"point --dataset at one of them")
    return directory, (with_split or years)[0]


class VOCSet(_Checks):
    """A VOC devkit folder's split, read with the detector's classes and strict, one-line validation.

    Paths and labels as gluoncv's ``VOCDetection`` reads them (``Annotations/<id>.xml``,
    ``JPEGImages/<id>.jpg``, corners minus 1), with no gluoncv.
    """

    kind = "voc"

    def __init__(self, directory: str | os.PathLike, classes: Sequence[str], split: str = "train"):
        self._classes = tuple(classes)
        self._sizes = []
        self.name = f"voc:{directory}"
        root, sub = _voc_root(Path(directory), split)
        self._root = str(root)
        self._anno_path = os.path.join("{}", "Annotations", "{}.xml")
        self._image_path = os.path.join("{}", "JPEGImages", "{}.jpg")
        self._items = self._load_items([(sub, split)])
        self._label_cache = [self._load_label(i) for i in range(len(self._items))]

    def _load_items(self, splits):
        items = []
        for sub, split in splits:
            base = os.path.join(self._root, sub)
            listing = Path(base, "ImageSets", "Main", f"{split}.txt")
            if not listing.is_file():
                found = sorted(p.stem for p in listing.parent.glob("*.txt")) if listing.parent.is_dir() else []
                raise DatasetError(f"{self.name}: no split {split!r} ({listing} missing"
                                   f"{'; found: ' + ', '.join(found) if found else ''})")
            items += [(base, line.strip()) for line in listing.read_text().splitlines() if line.strip()]
        return items

    def _load_label(self, idx: int) -> np.ndarray:
        base, name = self._items[idx]
        path = Path(self._anno_path.format(base, name))
        where = str(path)
        if not path.is_file():
            raise DatasetError(f"{where}: annotation file missing (listed in the split)")
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as exc:
            raise DatasetError(f"{where}: not valid XML ({exc})") from None
        width, height = self.image_size(Path(self._image_path.format(base, name)), where,
                                        decode=len(self._items) <= DECODE_CHECK_LIMIT)
        size = (_xml_number(root, "size/width", where, None), _xml_number(root, "size/height", where, None))
        if None not in size and size != (width, height):
            raise DatasetError(f"{where}: says the image is {size[0]:g}x{size[1]:g}, the image is {width}x{height}")
        self._sizes.append((width, height))
        rows = [self._object_row(obj, width, height, where) for obj in root.iter("object")]
        return np.array(rows, dtype=np.float32).reshape(-1, 6)

    def _object_row(self, obj, width: int, height: int, where: str) -> list[float]:
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(f"{where}: an object without a <name>")
        cls = self.class_id(name, where)
        box = [_xml_number(obj, f"bndbox/{k}", where) - 1 for k in ("xmin", "ymin", "xmax", "ymax")]
        self.check_box(box, width, height, where)
        difficult = _xml_number(obj, "difficult", where, 0)
        return [*box, cls, float(difficult)]

    def __len__(self) -> int:
        return len(self._items)

    def label(self, idx: int) -> np.ndarray:
        return self._label_cache[idx]

    def image_path(self, idx: int) -> Path:
        return Path(self._image_path.format(*self._items[idx]))

    def keep(self, indices: Sequence[int]) -> None:
        """Restrict to some items (labels and sizes follow)."""
        self._items = [self._items[i] for i in indices]
        self._label_cache = [self._label_cache[i] for i in indices]
        self._sizes = [self._sizes[i] for i in indices]


def _xml_number(node, path: str, where: str, default=...):
    text = node.findtext(path)
    if text is None or not text.strip():
        if default is ...:
            raise DatasetError(f"{where}: missing <{path}>")
        return default
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{where}: <{path}> is not a number ({text.strip()!r})") from None


class COCOSet(_Checks):
    """A COCO-format annotation file (plain JSON; pycocotools only for COCO mAP).

    Crowd annotations (``iscrowd=1``) are left out of training labels, as gluoncv does.
    """

    kind = "coco"

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike | None, classes: Sequence[str]):
        self._classes = tuple(classes)
        self.annotations = Path(annotations)
        self.images_dir = Path(images) if images else self.annotations.parent
        self.name = f"coco:{self.annotations}"
        doc = self._read_json()
        self._build(doc)

    def _read_json(self) -> dict:
        if not self.annotations.is_file():
            raise DatasetError(f"COCO annotation file {self.annotations} does not exist")
        if not self.images_dir.is_dir():
            raise DatasetError(f"COCO images directory {self.images_dir} does not exist")
        try:
            doc = json.loads(self.annotations.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{self.annotations}: not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
            raise DatasetError(f"{self.annotations}: not a COCO detection file (needs lists 'images', 'annotations', 'categories')")
        return doc

    def _build(self, doc: dict) -> None:
        where = str(self.annotations)
        try:
            categories = {c["id"]: str(c["name"]).strip() for c in doc["categories"]}
            images = {im["id"]: im for im in doc["images"]}
            rows: dict = {i: [] for i in images}
            for ann in doc["annotations"]:
                if ann.get("iscrowd", 0):
                    continue
                image = images.get(ann["image_id"])
                if image is None or ann["category_id"] not in categories:
                    raise DatasetError(f"{where}: annotation {ann.get('id')} refers to an unknown "
                                       f"{'image' if image is None else 'category'}")
                at = f"{where} (annotation {ann.get('id')}, {image['file_name']})"
                rows[ann["image_id"]].append(self._row(ann, image, categories[ann["category_id"]], at))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DatasetError):
                raise
            raise DatasetError(f"{where}: malformed COCO entry ({type(exc).__name__}: {exc})") from None
        self.image_ids = sorted(images)
        self._files = [self.images_dir / images[i]["file_name"] for i in self.image_ids]
        self._labels = [np.array(rows[i], dtype=np.float32).reshape(-1, 6) for i in self.image_ids]
        self._sizes = []
        for i, path in zip(self.image_ids, self._files, strict=True):
            size = self.image_size(path, f"{where} (image {i})", decode=len(self._files) <= DECODE_CHECK_LIMIT)
            declared = (images[i].get("width"), images[i].get("height"))
            if None not in declared and tuple(declared) != size:
                raise DatasetError(f"{where}: image {i} is declared {declared[0]}x{declared[1]}, "
                                   f"{path.name} is {size[0]}x{size[1]}")
            self._sizes.append(size)
        self._check_boxes_against_files(where)

    def _row(self, ann: dict, image: dict, name: str, where: str) -> list[float]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        box = [x, y, x + w - 1, y + h - 1]
        width, height = image.get("width"), image.get("height")
        if width and height:
            box = self._clip_overhang(box, width, height)
            self.check_box(box, width, height, where)
        return [*box, self.class_id(name, where), 0.0]

    @staticmethod
    def _clip_overhang(box: list[float], width: float, height: float) -> list[float]:
        lo, hi = -BOX_TOLERANCE, BOX_TOLERANCE
        x1, y1, x2, y2 = box
        if lo <= x1 < 0:
            x1 = 0.0
        if lo <= y1 < 0:
            y1 = 0.0
        if width < x2 <= width + hi:
            x2 = float(width)
        if height < y2 <= height + hi:
            y2 = float(height)
        return [x1, y1, x2, y2]

    def _check_boxes_against_files(self, where: str) -> None:
        for label, (width, height), path in zip(self._labels, self._sizes, self._files, strict=True):
            for row in label:
                self.check_box(list(row[:4]), width, height, f"{where} ({path.name})")

    def __len__(self) -> int:
        return len(self._files)

    def label(self, idx: int) -> np.ndarray:
        return self._labels[idx]

    def image_path(self, idx: int) -> Path:
        return self._files[idx]

    def keep(self, indices: Sequence[int]) -> None:
        self.image_ids = [self.image_ids[i] for i in indices]
        self._files = [self._files[i] for i in indices]
        self._labels = [self._labels[i] for i in indices]
        self._sizes = [self._sizes[i] for i in indices]
