"""Detection datasets: what gets loaded, checked against independent readers of the same real files.

The real data is 40 photos of the raccoon VOC set shipped in tests/data (see its NOTICE). Broken or
inconsistent copies are made in ``tmp_path``. References: gluoncv's own ``VOCDetection``
(the loader gluoncv's training script uses), a plain ElementTree parse of the XML, and
gluoncv's own Faster R-CNN transforms with their default ImageNet normalization.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from gluoncv.data import VOCDetection
from gluoncv.data.transforms import image as gimage
from gluoncv.data.transforms.presets.rcnn import FasterRCNNDefaultValTransform

from bbadapt.core.spec import PRESETS, parse_spec
from bbadapt.engines.gluon.datasets import (
    COCOSet,
    open_dataset,
    parse_dataset,
    spec_transforms,
    transform_normalization,
)
from bbadapt.platform.errors import DatasetError, OptionError

RACCOON = Path(__file__).resolve().parents[2] / "data" / "raccoon_voc"
VOC2017 = RACCOON / "VOC2017"
CLASSES = ["raccoon"]


def voc_subset(root: Path, train: list[int], val: list[int] = ()) -> Path:
    """A small writable copy of the raccoon set (VOC layout, no VOC<year> level)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in [*train, *val]:
        shutil.copy(VOC2017 / "Annotations" / f"raccoon-{i}.xml", root / "Annotations")
        shutil.copy(VOC2017 / "JPEGImages" / f"raccoon-{i}.jpg", root / "JPEGImages")
    (root / "ImageSets/Main/train.txt").write_text("".join(f"raccoon-{i}\n" for i in train))
    (root / "ImageSets/Main/val.txt").write_text("".join(f"raccoon-{i}\n" for i in val))
    return root


def coco_from_voc(voc_root: Path, names: list[str], out: Path, category: str = "raccoon") -> Path:
    """A COCO annotation file for the same images and boxes (1-based inclusive VOC corners -> x, y, w, h)."""
    images, annotations = [], []
    for image_id, name in enumerate(names, start=7):
        root = ET.parse(voc_root / "Annotations" / f"{name}.xml").getroot()
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": int(root.findtext("size/width")),
                       "height": int(root.findtext("size/height"))})
        for obj in root.iter("object"):
            x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 3, "iscrowd": 0,
                                "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], "area": (x2 - x1 + 1) * (y2 - y1 + 1)})
    out.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 3, "name": category}]}))
    return out


def xml_boxes(path: Path) -> np.ndarray:
    root = ET.parse(path).getroot()
    return np.array([[float(o.findtext(f"bndbox/{k}")) - 1 for k in ("xmin", "ymin", "xmax", "ymax")]
                     for o in root.iter("object")], dtype=np.float32)


# --------------------------------------------------------------------------- VOC


def test_voc_split_sizes_and_labels_match_the_xml_files():
    train = open_dataset(f"voc:{RACCOON}", CLASSES, "train")
    val = open_dataset(f"voc:{RACCOON}", CLASSES, "val")
    listed = (VOC2017 / "ImageSets/Main/train.txt").read_text().split()
    assert (len(train), len(val)) == (len(listed), len((VOC2017 / "ImageSets/Main/val.txt").read_text().split()))
    for i in (0, 17, len(train) - 1):
        label = train.label(i)
        assert train.image_path(i).stem == listed[i]
        np.testing.assert_array_equal(label[:, :4], xml_boxes(VOC2017 / "Annotations" / f"{listed[i]}.xml"))
        assert set(label[:, 4]) == {0.0} and set(label[:, 5]) == {0.0}


def test_voc_labels_equal_gluoncv_vocdetection_on_the_whole_set():
    class Raccoon(VOCDetection):
        CLASSES = ["raccoon"]

    for split in ("train", "val"):
        reference = Raccoon(root=str(RACCOON), splits=[(2017, split)])
        ours = open_dataset(f"voc:{RACCOON}", CLASSES, split)
        assert len(ours) == len(reference)
        for i in range(len(ours)):
            np.testing.assert_array_equal(ours.label(i), reference._label_cache[i])
        np.testing.assert_allclose(ours.get_im_aspect_ratio(),
                                   [w / h for w, h in (reference._im_shapes[i] for i in range(len(reference)))])
    img, label = ours[3]
    ref_img, ref_label = reference[3]
    assert img.dtype == np.uint8 and img.shape == ref_img.shape
    np.testing.assert_array_equal(img.asnumpy(), ref_img.asnumpy())


def test_voc_dir_may_be_the_devkit_folder_itself(tmp_path):
    nested = open_dataset(f"voc:{RACCOON}", CLASSES, "val")
    direct = open_dataset(f"voc:{VOC2017}", CLASSES, "val")
    assert [direct.image_path(i) for i in range(len(direct))] == [nested.image_path(i) for i in range(len(nested))]


def test_labels_index_the_bundles_class_list_not_the_datasets():
    data = open_dataset(f"voc:{RACCOON}", ["dog", "raccoon", "cat"], "val")
    assert data.classes == ("dog", "raccoon", "cat")
    assert {float(v) for i in range(len(data)) for v in data.label(i)[:, 4]} == {1.0}


# --------------------------------------------------------------------------- COCO


def test_coco_json_written_from_the_voc_annotations_loads_the_same_boxes(tmp_path):
    names = (VOC2017 / "ImageSets/Main/val.txt").read_text().split()[:12]
    ann = coco_from_voc(VOC2017, names, tmp_path / "val.json")
    coco = open_dataset(f"coco:{ann}:{VOC2017 / 'JPEGImages'}", CLASSES)
    voc = open_dataset(f"voc:{RACCOON}", CLASSES, "val")
    assert isinstance(coco, COCOSet) and len(coco) == len(names)
    for i in range(len(names)):
        assert coco.image_path(i) == voc.image_path(i)
        np.testing.assert_allclose(coco.label(i), voc.label(i))
    np.testing.assert_allclose(coco.get_im_aspect_ratio(), voc.get_im_aspect_ratio()[:len(names)])
    img, label = coco.transform(lambda im, lb: (im.shape, lb.shape))[2]
    assert img == voc[2][0].shape and label == voc.label(2).shape


def test_coco_images_default_to_the_json_directory_and_crowd_boxes_are_left_out(tmp_path):
    root = voc_subset(tmp_path / "voc", [1, 2, 3])
    ann = coco_from_voc(root, ["raccoon-1", "raccoon-2", "raccoon-3"], root / "JPEGImages" / "ann.json")
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["iscrowd"] = 1
    ann.write_text(json.dumps(doc))
    data = open_dataset(f"coco:{ann}", CLASSES)
    assert len(data) == 3 and len(data.label(0)) == len(xml_boxes(root / "Annotations/raccoon-1.xml")) - 1
    assert len(open_dataset(f"coco:{ann}", CLASSES, drop_empty=True)) == 2


# --------------------------------------------------------------------------- the tensor the detector gets


@pytest.mark.parametrize("spec", ["imagenet", "rgb255", "bgr255", "caffe"])
def test_transforms_produce_exactly_the_bundles_input_spec(spec):
    """gluoncv's val transform, fed the derived mean/std, gives ``spec.normalize(resized raw image)``."""
    data = open_dataset(f"voc:{RACCOON}", CLASSES, "val")
    img, label = data[0]
    x, _, _ = spec_transforms(parse_spec(spec), 128, 256, train=False)(img, label)
    resized = gimage.resize_short_within(img, 128, 256, interp=1).asnumpy().transpose(2, 0, 1)[None]
    expected = PRESETS[spec].normalize(resized)[0]
    np.testing.assert_allclose(x.asnumpy(), expected, rtol=1e-6, atol=1e-4 * np.abs(expected).max())


def test_imagenet_spec_is_gluoncvs_own_default_transform_bit_for_bit():
    mean, std = transform_normalization(PRESETS["imagenet"])
    assert mean == pytest.approx((0.485, 0.456, 0.406), rel=1e-15) and std == pytest.approx((0.229, 0.224, 0.225), rel=1e-15)
    data = open_dataset(f"voc:{RACCOON}", CLASSES, "val")
    img, label = data[1]
    ours = spec_transforms(PRESETS["imagenet"], 160, 320, train=False)(img, label)
    ref = FasterRCNNDefaultValTransform(160, 320)(img, label)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a.asnumpy() if isinstance(a, mx.nd.NDArray) else a,
                                      b.asnumpy() if isinstance(b, mx.nd.NDArray) else b)


def test_rgb255_has_no_normalization_step():
    mean, std = transform_normalization(PRESETS["rgb255"])
    assert mean == (0.0, 0.0, 0.0) and std == pytest.approx((1 / 255,) * 3)


# --------------------------------------------------------------------------- bad input: one line each


def _expect(match: str, spec: str, classes=CLASSES, split="train", error=DatasetError):
    with pytest.raises(error, match=match) as info:
        open_dataset(spec, classes, split)
    assert "\n" not in str(info.value)
    return str(info.value)


def _edit_xml(root: Path, name: str, edit) -> None:
    path = root / "Annotations" / f"{name}.xml"
    tree = ET.parse(path)
    edit(tree.getroot())
    tree.write(path)


@pytest.mark.parametrize("text", ["pascal:/data", "voc", "voc:", "/data/voc", "yolo:/x"])
def test_unknown_dataset_format_is_a_usage_error(text):
    with pytest.raises(OptionError, match="unknown dataset"):
        parse_dataset(text)


def test_missing_directory_split_and_empty_split(tmp_path):
    _expect("does not exist", f"voc:{tmp_path / 'nope'}")
    _expect("not a VOC dataset", f"voc:{tmp_path}")
    root = voc_subset(tmp_path / "voc", [1, 2], [])
    _expect("no split 'test'.*found: train, val", f"voc:{root}", split="test")
    _expect("no images in split 'val'", f"voc:{root}", split="val")


def test_box_outside_the_image(tmp_path):
    root = voc_subset(tmp_path / "voc", [1, 2])
    _edit_xml(root, "raccoon-2", lambda r: r.find("object/bndbox/xmax").__setattr__("text", "5000"))
    message = _expect("raccoon-2.xml: box .* lies outside the", f"voc:{root}")
    assert "5000" in message or "4999" in message


def test_degenerate_box(tmp_path):
    root = voc_subset(tmp_path / "voc", [1, 2])
    _edit_xml(root, "raccoon-1", lambda r: r.find("object/bndbox/ymax").__setattr__("text", r.findtext("object/bndbox/ymin")))
    _expect("raccoon-1.xml: degenerate box", f"voc:{root}")


def test_class_not_in_the_bundle(tmp_path):
    root = voc_subset(tmp_path / "voc", [1, 2])
    _edit_xml(root, "raccoon-2", lambda r: r.find("object/name").__setattr__("text", "badger"))
    _expect("raccoon-2.xml: class 'badger' is not one of the bundle's classes \\(raccoon\\)", f"voc:{root}")


def test_bundle_made_for_other_classes():
    _expect("class 'raccoon' is not one of the bundle's classes \\(cat, dog\\); was the bundle made for other classes",
            f"voc:{RACCOON}", classes=["cat", "dog"])


def test_declared_size_disagreeing_with_the_image(tmp_path):
    root = voc_subset(tmp_path / "voc", [1])
    _edit_xml(root, "raccoon-1", lambda r: r.find("size/width").__setattr__("text", "999"))
    _expect("says the image is 999x417, the image is 650x417", f"voc:{root}")


def test_unreadable_missing_image_and_missing_annotation(tmp_path):
    root = voc_subset(tmp_path / "voc", [1, 2, 3])
    (root / "JPEGImages/raccoon-2.jpg").write_bytes(b"not a jpeg at all")
    _expect("raccoon-2.jpg is unreadable", f"voc:{root}")
    (root / "JPEGImages/raccoon-2.jpg").unlink()
    _expect("raccoon-2.jpg is missing", f"voc:{root}")
    shutil.copy(VOC2017 / "JPEGImages/raccoon-2.jpg", root / "JPEGImages")
    (root / "Annotations/raccoon-3.xml").unlink()
    _expect("raccoon-3.xml: annotation file missing", f"voc:{root}")
    (root / "Annotations/raccoon-3.xml").write_text("<annotation><object>")
    _expect("raccoon-3.xml: not valid XML", f"voc:{root}")


def test_truncated_image_is_refused_when_the_set_is_opened(tmp_path):
    """mxnet's decoder fills a truncated JPEG with grey silently; the dataset must not."""
    root = voc_subset(tmp_path / "voc", [1])
    path = root / "JPEGImages/raccoon-1.jpg"
    path.write_bytes(path.read_bytes()[:2000])  # the header still parses; the pixels do not
    img = mx.image.imread(str(path))
    assert img.shape == (417, 650, 3)  # mxnet alone would train on it
    _expect("raccoon-1.jpg is unreadable .*truncated", f"voc:{root}")


def test_images_without_boxes_are_dropped_for_training_and_an_all_empty_set_refused(tmp_path):
    root = voc_subset(tmp_path / "voc", [1, 2])
    _edit_xml(root, "raccoon-1", lambda r: [r.remove(o) for o in r.findall("object")])
    assert len(open_dataset(f"voc:{root}", CLASSES)) == 2
    assert len(open_dataset(f"voc:{root}", CLASSES, drop_empty=True)) == 1
    _edit_xml(root, "raccoon-2", lambda r: [r.remove(o) for o in r.findall("object")])
    with pytest.raises(DatasetError, match="no annotated images"):
        open_dataset(f"voc:{root}", CLASSES, drop_empty=True)


def test_coco_inconsistencies(tmp_path):
    root = voc_subset(tmp_path / "voc", [1, 2])
    images = f":{root / 'JPEGImages'}"
    ann = coco_from_voc(root, ["raccoon-1", "raccoon-2"], tmp_path / "a.json")
    good = json.loads(ann.read_text())

    def variant(change) -> str:
        doc = json.loads(json.dumps(good))
        change(doc)
        ann.write_text(json.dumps(doc))
        return f"coco:{ann}{images}"

    _expect("lies outside the 650x417 image", variant(lambda d: d["annotations"][0]["bbox"].__setitem__(2, 900)))
    _expect("degenerate box", variant(lambda d: d["annotations"][0]["bbox"].__setitem__(3, 0)))
    _expect("refers to an unknown category", variant(lambda d: d["annotations"][0].__setitem__("category_id", 99)))
    _expect("class 'dog' is not one of the bundle's classes", variant(lambda d: d["categories"][0].__setitem__("name", "dog")))
    _expect("declared 651x417", variant(lambda d: d["images"][0].__setitem__("width", 651)))
    _expect("malformed COCO entry", variant(lambda d: d["annotations"][0].pop("bbox")))
    _expect("no images in the annotation file", variant(lambda d: d.update(images=[], annotations=[])))
    ann.write_text("{not json")
    _expect("not valid JSON", f"coco:{ann}{images}")
    _expect("does not exist", f"coco:{tmp_path / 'none.json'}")
    # a box overhanging by less than a pixel (float rounding in exporters) is clipped, not refused
    variant(lambda d: d["annotations"][0]["bbox"].__setitem__(2, 650 - d["annotations"][0]["bbox"][0] + 1.5))
    assert open_dataset(f"coco:{ann}{images}", CLASSES).label(0)[0, 2] == 650
