"""Sources: real datasets (skipped without them), tiny hand-made ones, tfds under mock_data."""

import importlib.util
import io
import os
import pickle
import shutil
import subprocess
import tarfile
import textwrap
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedjax_cv.data import cache as cache_lib
from fedjax_cv.data import sources
from tests import real_data

DATA = real_data.DATA
CIFAR_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _real(relative: str) -> Path:
    return real_data.require(relative)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("decode_cache")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # decoded CIFAR and MNIST take 400 MB


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def cifar(cache_dir):
    archive = _real("cifar10-images.tar.gz")
    # One pass over the archive decodes both splits; the second call is a cache hit.
    return {
        split: sources.image_folder(archive, split, cache_dir=cache_dir)
        for split in ("train", "test")
    }


def test_cifar10(cifar):
    for split, total in (("train", 50_000), ("test", 10_000)):
        source = cifar[split]
        assert len(source) == total
        assert source.class_names == CIFAR_CLASSES
        np.testing.assert_array_equal(np.bincount(source.labels), [total // 10] * 10)
        stacked = source.images.stacked()
        assert stacked.shape == (total, 32, 32, 3) and stacked.dtype == np.uint8
        # CIFAR-10's mean pixel is about 120.7 (per-channel 125.3, 123.0, 113.9).
        assert 115 < stacked[::7].mean() < 127
    example = cifar["test"][0]
    assert example["label"] == 0 and example["image"].shape == (32, 32, 3)


def test_cifar10_pixels_match_the_archive(cifar):
    archive = _real("cifar10-images.tar.gz")
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.name == "cifar10/" + "test/" + cifar["test"].paths[0]:
                expected = np.asarray(Image.open(tar.extractfile(member)).convert("RGB"))
                break
    np.testing.assert_array_equal(cifar["test"][0]["image"], expected)


def test_cifar10_second_load_is_a_cache_hit(cifar, cache_dir, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(cache_lib, "decode_many", no_decoding)
    again = sources.image_folder(_real("cifar10-images.tar.gz"), "train", cache_dir=cache_dir)
    np.testing.assert_array_equal(again.labels, cifar["train"].labels)


def test_mnist(cache_dir):
    archive = _real("mnist-images.tar.gz")
    for split, total in (("train", 60_000), ("test", 10_000)):
        source = sources.image_folder(archive, split, cache_dir=cache_dir)
        assert len(source) == total
        assert source.class_names == tuple(str(d) for d in range(10))
        assert np.bincount(source.labels).sum() == total and np.bincount(source.labels).min() > 0
        stacked = source.images.stacked()
        assert stacked.shape == (total, 28, 28, 1)
        # MNIST's mean pixel is 0.1307 * 255 = 33.3.
        assert 31 < stacked[::7].mean() < 36


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_coco128_boxes(cache_dir, split):
    root = _real("coco128")
    source = sources.yolo_detection(root, split, cache_dir=cache_dir)
    assert len(source) == 128
    assert len(source.class_names) == 80 and source.class_names[0] == "person"
    label_dir = root / "object_detection" / "labels" / split
    for index, image_id in enumerate(source.image_ids):
        label_file = label_dir / f"{image_id}.txt"
        lines = (
            [ln for ln in label_file.read_text().splitlines() if ln.strip()]
            if label_file.exists()
            else []
        )
        assert len(source.boxes[index]) == len(lines) == len(source.box_labels[index])
        boxes = source.boxes[index]
        assert np.all((boxes >= 0) & (boxes <= 1))
        assert np.all(boxes[:, :2] <= boxes[:, 2:])  # ymin <= ymax, xmin <= xmax
        if lines:
            assert source.box_labels[index][0] == int(lines[0].split()[0])
    assert source.num_boxes == sum(len(b) for b in source.boxes) > 0
    image = source[0]["image"]
    assert image.ndim == 3 and image.shape[2] == 3 and max(image.shape[:2]) == 640


def test_coco128_boxes_match_yolo_by_hand(cache_dir):
    root = _real("coco128")
    source = sources.yolo_detection(root, "train2017", cache_dir=cache_dir)
    label_file = root / "object_detection" / "labels" / "train2017" / f"{source.image_ids[0]}.txt"
    _, xc, yc, w, h = (float(v) for v in label_file.read_text().split()[:5])
    expected = [yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2]
    np.testing.assert_allclose(source.boxes[0][0], np.clip(expected, 0, 1), atol=1e-6)


def test_bccd_boxes(cache_dir):
    root = _real("bccd/BCCD")
    for split, total in (("train", 205), ("val", 87), ("test", 72)):
        source = sources.voc_detection(root, split, cache_dir=cache_dir)
        assert len(source) == total
        assert source.class_names == ("Platelets", "RBC", "WBC")
        for index, image_id in enumerate(source.image_ids):
            objects = ElementTree.parse(root / "Annotations" / f"{image_id}.xml").findall("object")
            assert len(source.boxes[index]) == len(objects)
            boxes = source.boxes[index]
            assert np.all((boxes >= 0) & (boxes <= 1))
            assert np.all(boxes[:, :2] <= boxes[:, 2:])
        assert source[0]["image"].shape == (480, 640, 3)


@pytest.mark.parametrize("unlabeled", ["ignore", "background"])
def test_coco128_masks(cache_dir, unlabeled):
    root = _real("coco128")
    config_ids = sorted(
        sources.read_yaml_class_names(root / "semantic_segmentation" / "config.yaml", "classes")
    )
    for split in ("train2017", "val2017"):
        source = sources.mask_segmentation(root, split, unlabeled=unlabeled, cache_dir=cache_dir)
        assert len(source) == 100
        expected_classes = len(config_ids) - (1 if unlabeled == "ignore" else 0)
        assert source.num_classes == expected_classes
        for index in range(0, len(source), 9):
            mask = source.mask(index)
            allowed = mask < source.num_classes
            if unlabeled == "ignore":
                allowed |= mask == sources.IGNORE_LABEL
            assert allowed.all()
            assert mask.shape == source[index]["image"].shape[:2]
    # Independent remap of one mask: sparse id -> its rank among the labelled ids.
    mask_file = root / "semantic_segmentation" / "masks" / "val2017" / f"{source.image_ids[0]}.png"
    raw = np.asarray(Image.open(mask_file))
    labelled = [i for i in config_ids if i != 0]
    if unlabeled == "ignore":
        expected = np.vectorize(lambda v: 255 if v == 0 else labelled.index(v))(raw)
    else:
        expected = np.vectorize(lambda v: 0 if v == 0 else labelled.index(v) + 1)(raw)
    np.testing.assert_array_equal(source.mask(0), expected)
    assert all(np.all(p < source.num_classes) for p in source.classes_present)


# --------------------------------------------------------------------------- tiny folders


def _save(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)
    return array


def _pixels(seed: int, shape=(6, 5, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def tiny_folder(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """tiny/{train,test}/{cat,dog}/*.png with known pixels; one grayscale class folder."""
    root = tmp_path / "tiny"
    pixels = {
        "train/cat/b.png": _save(root / "train/cat/b.png", _pixels(0)),
        "train/cat/a.png": _save(root / "train/cat/a.png", _pixels(1)),
        "train/dog/z.png": _save(root / "train/dog/z.png", _pixels(2)),
        "train/emu/g.png": _save(root / "train/emu/g.png", _pixels(3, (4, 4, 1))),
        "test/dog/y.png": _save(root / "test/dog/y.png", _pixels(4)),
    }
    (root / "train/cat/notes.txt").write_text("not an image, ignored")
    return root, pixels


def test_image_folder_by_hand(tiny_folder, tmp_path):
    root, pixels = tiny_folder
    source = sources.image_folder(root, "train", cache_dir=tmp_path / "cache")
    assert source.class_names == ("cat", "dog", "emu")
    assert source.paths == ("cat/a.png", "cat/b.png", "dog/z.png", "emu/g.png")
    np.testing.assert_array_equal(source.labels, [0, 0, 1, 2])
    for index, path in enumerate(source.paths):
        np.testing.assert_array_equal(source[index]["image"], pixels[f"train/{path}"])
    assert source[3]["image"].shape == (4, 4, 1)  # grayscale keeps one channel
    assert source.images.uniform_shape is None


def test_sources_pickle_by_location(tiny_folder, tmp_path):
    root, _ = tiny_folder
    source = sources.image_folder(root, "train", cache_dir=tmp_path / "cache")
    payload = pickle.dumps(source.images)
    assert len(payload) < 1000  # grain workers re-map the files instead of copying pixels
    restored = pickle.loads(pickle.dumps(source))
    for index in range(len(source)):
        np.testing.assert_array_equal(restored[index]["image"], source[index]["image"])


def test_image_folder_class_names_pin_ids(tiny_folder, tmp_path):
    root, _ = tiny_folder
    source = sources.image_folder(
        root, "test", class_names=["cat", "dog", "emu"], cache_dir=tmp_path / "cache"
    )
    np.testing.assert_array_equal(source.labels, [1])
    with pytest.raises(ValueError, match=r"class folder 'dog' is not in class_names"):
        sources.image_folder(root, "test", class_names=["cat"], cache_dir=tmp_path / "cache")


def test_image_folder_tar_matches_folder(tiny_folder, tmp_path):
    root, pixels = tiny_folder
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        # Members out of order, under a top folder, as real archives may be.
        for name in sorted(pixels, reverse=True):
            tar.add(root / name, arcname=f"tiny/{name}")
    from_tar = sources.image_folder(archive, "train", cache_dir=tmp_path / "cache")
    from_folder = sources.image_folder(root, "train", cache_dir=tmp_path / "cache")
    assert from_tar.paths == from_folder.paths
    np.testing.assert_array_equal(from_tar.labels, from_folder.labels)
    for index in range(len(from_tar)):
        np.testing.assert_array_equal(from_tar[index]["image"], from_folder[index]["image"])
    assert len(sources.image_folder(archive, "test", cache_dir=tmp_path / "cache")) == 1
    with pytest.raises(
        FileNotFoundError, match=r"split='val' is not in .*found splits: test, train"
    ):
        sources.image_folder(archive, "val", cache_dir=tmp_path / "cache")


def test_cache_invalidated_by_changed_file(tiny_folder, tmp_path):
    root, pixels = tiny_folder
    cache = tmp_path / "cache"
    first = sources.image_folder(root, "test", cache_dir=cache)
    np.testing.assert_array_equal(first[0]["image"], pixels["test/dog/y.png"])
    changed = _save(root / "test/dog/y.png", _pixels(9))
    stat = (root / "test/dog/y.png").stat()
    os.utime(root / "test/dog/y.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = sources.image_folder(root, "test", cache_dir=cache)
    np.testing.assert_array_equal(second[0]["image"], changed)
    assert len(list(cache.iterdir())) == 2  # two entries; the old one is never rewritten


def test_resize_at_decode_time(tiny_folder, tmp_path):
    root, _ = tiny_folder
    source = sources.image_folder(root, "train", image_size=(8, 9), cache_dir=tmp_path / "c")
    assert source.images.shapes[:, :2].tolist() == [[8, 9]] * 4


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_image_folder_errors(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=r"data\.root='.*missing' does not exist") as error:
        sources.image_folder(tmp_path / "missing", "train", cache_dir=cache)
    _one_line(error)
    (tmp_path / "empty/train/cat").mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"has no image files under .*empty/train/<class>"
    ) as error:
        sources.image_folder(tmp_path / "empty", "train", cache_dir=cache)
    _one_line(error)
    with pytest.raises(FileNotFoundError, match=r"split='val': no folder .*found train") as error:
        sources.image_folder(tmp_path / "empty", "val", cache_dir=cache)
    _one_line(error)
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"is a file but not a tar archive") as error:
        sources.image_folder(tmp_path / "plain.txt", "train", cache_dir=cache)
    _one_line(error)


def _jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_pixels(seed, (32, 32, 3))).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content",
    [b"this is not a jpeg", _jpeg_bytes()[:200], b""],
    ids=["garbage", "truncated", "empty"],
)
def test_corrupt_image_names_the_file(tmp_path, content):
    _save(tmp_path / "data/train/cat/good.jpg", _pixels(0))
    (tmp_path / "data/train/cat/broken.jpg").write_bytes(content)
    with pytest.raises(ValueError, match=r"broken\.jpg: cannot decode image") as error:
        sources.image_folder(tmp_path / "data", "train", cache_dir=tmp_path / "cache")
    _one_line(error)
    assert not list((tmp_path / "cache").glob("*/key.json"))  # nothing half-built was kept


def test_corrupt_member_of_an_archive_names_it(tmp_path):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        for name, payload in (("train/cat/ok.jpg", _jpeg_bytes()), ("train/cat/bad.jpg", b"xx")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match=r"bad\.tar:train/cat/bad\.jpg: cannot decode"):
        sources.image_folder(archive, "train", cache_dir=tmp_path / "cache")


def test_process_pool_decodes_like_one_thread(tmp_path):
    items = [(f"img{i}.png", _png_bytes(i)) for i in range(1100)]
    spec = cache_lib.DecodeSpec()
    pooled = list(cache_lib.decode_many(items, spec, num_files=None, num_workers=2))
    inline = list(cache_lib.decode_many(items, spec, num_workers=1))
    assert len(pooled) == len(inline) == 1100
    assert all(np.array_equal(a, b) for a, b in zip(pooled, inline, strict=True))
    items[700] = ("img700.png", b"corrupt")
    with pytest.raises(ValueError, match=r"img700\.png: cannot decode image"):
        list(cache_lib.decode_many(items, spec, num_files=None, num_workers=2))


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_pixels(seed, (4, 4, 3))).save(buffer, "PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- tiny YOLO


def _yolo_root(tmp_path: Path, labels: dict[str, str], names: str) -> Path:
    root = tmp_path / "yolo"
    for stem in ("a", "b", "c"):
        _save(root / f"images/train/{stem}.jpg", _pixels(0, (10, 20, 3)))
    for stem, text in labels.items():
        path = root / f"object_detection/labels/train/{stem}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "object_detection").mkdir(parents=True, exist_ok=True)
    (root / "object_detection/config.yaml").write_text(f"path: .\n{names}\nother: 1\n")
    return root


@pytest.mark.parametrize(
    "names",
    ["names:\n  0: cat\n  1: dog  # comment", "names: ['cat', dog]", "names:\n  - cat\n  - 'dog'"],
    ids=["mapping", "inline", "block-list"],
)
def test_yolo_by_hand(tmp_path, names):
    root = _yolo_root(tmp_path, {"a": "1 0.5 0.5 0.5 1.0\n\n0 0.25 0.25 0.5 0.5\n"}, names)
    source = sources.yolo_detection(root, "train", cache_dir=tmp_path / "cache")
    assert source.class_names == ("cat", "dog")
    assert source.image_ids == ("a", "b", "c")
    np.testing.assert_allclose(source.boxes[0], [[0, 0.25, 1, 0.75], [0, 0, 0.5, 0.5]])
    np.testing.assert_array_equal(source.box_labels[0], [1, 0])
    assert source.boxes[1].shape == (0, 4) and source.box_labels[1].shape == (0,)  # no file
    assert source.num_boxes == 2 and source[0]["image"].shape == (10, 20, 3)


@pytest.mark.parametrize(
    "text, match",
    [
        ("0 0.5 0.5 0.1 0.1\n2 0.5 0.5 0.1 0.1\n", r"a\.txt:2: class id '2' is out of range; must"),
        ("-1 0.5 0.5 0.1 0.1\n", r"a\.txt:1: class id '-1' is out of range"),
        ("0 0.9 0.5 0.4 0.1\n", r"a\.txt:1: box .* reaches outside \[0, 1\]"),
        ("0 0.5 0.5 1.2 0.1\n", r"a\.txt:1: box .* reaches outside \[0, 1\]"),
        ("0 0.5 0.5 0.1\n", r"a\.txt:1: has 4 fields; must be 'class x_center"),
        ("0 0.5 0.5 0.1 nan\n", r"a\.txt:1: box .* reaches outside"),
    ],
)
def test_yolo_errors_name_file_and_line(tmp_path, text, match):
    root = _yolo_root(tmp_path, {"a": text}, "names: [cat, dog]")
    with pytest.raises(ValueError, match=match) as error:
        sources.yolo_detection(root, "train", cache_dir=tmp_path / "cache")
    _one_line(error)


def test_yolo_missing_split_and_config(tmp_path):
    root = _yolo_root(tmp_path, {}, "names: [cat]")
    with pytest.raises(FileNotFoundError, match=r"split='val': no folder .*found \['train'\]"):
        sources.yolo_detection(root, "val", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml: class-name config is missing"):
        sources.yolo_detection(root, "train", config="nope.yaml", cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------- tiny VOC


def _voc_root(tmp_path: Path, objects: str) -> Path:
    root = tmp_path / "voc"
    _save(root / "JPEGImages/x.jpg", _pixels(0, (10, 20, 3)))
    _save(root / "JPEGImages/y.jpg", _pixels(1, (10, 20, 3)))
    (root / "Annotations").mkdir()
    (root / "Annotations/x.xml").write_text(
        f"<annotation><size><width>20</width></size>{objects}</annotation>"
    )
    (root / "Annotations/y.xml").write_text(
        "<annotation><object><name>zebra</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>"
    )
    (root / "ImageSets/Main").mkdir(parents=True)
    (root / "ImageSets/Main/train.txt").write_text("x\n")
    (root / "ImageSets/Main/test.txt").write_text("y\n")
    return root


def _voc_object(name: str, box: tuple[int, int, int, int], difficult: int = 0) -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
        f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def test_voc_by_hand(tmp_path):
    root = _voc_root(
        tmp_path, _voc_object("cat", (1, 1, 20, 10)) + _voc_object("ant", (11, 6, 15, 8), 1)
    )
    source = sources.voc_detection(root, "train", cache_dir=tmp_path / "cache")
    assert source.class_names == ("ant", "cat", "zebra")  # every split's classes, sorted
    # 1-based pixels: (v - 1) / size, as tfds does.
    np.testing.assert_allclose(source.boxes[0], [[0, 0, 0.9, 0.95], [0.5, 0.5, 0.7, 0.7]])
    np.testing.assert_array_equal(source.box_labels[0], [1, 0])
    np.testing.assert_array_equal(source.difficult[0], [False, True])


@pytest.mark.parametrize(
    "objects, class_names, match",
    [
        (_voc_object("cow", (1, 1, 2, 2)), ["cat"], r"x\.xml: object 0 has class 'cow'; must be"),
        (_voc_object("cat", (1, 1, 21, 2)), None, r"x\.xml: object 0 box .* outside the 20x10"),
        (_voc_object("cat", (5, 1, 4, 2)), None, r"x\.xml: object 0 box .* outside"),
        ("<object><name>cat</name></object>", None, r"x\.xml: object 0 lacks a name or a numeric"),
        ("<object>", None, r"x\.xml: not valid XML"),
    ],
)
def test_voc_errors(tmp_path, objects, class_names, match):
    root = _voc_root(tmp_path, objects)
    with pytest.raises(ValueError, match=match) as error:
        sources.voc_detection(root, "train", class_names=class_names, cache_dir=tmp_path / "c")
    _one_line(error)


def test_voc_missing_split(tmp_path):
    root = _voc_root(tmp_path, "")
    with pytest.raises(
        FileNotFoundError, match=r"split='val': .* found splits \['test', 'train'\]"
    ):
        sources.voc_detection(root, "val", cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------- tiny masks


def _mask_root(tmp_path: Path, mask: np.ndarray, image_shape=(3, 4, 3)) -> Path:
    root = tmp_path / "seg"
    _save(root / "images/train/m.jpg", _pixels(0, image_shape))
    _save(root / "semantic_segmentation/masks/train/m.png", mask[..., None])
    (root / "semantic_segmentation/config.yaml").write_text(
        "train:\n  images: x\nclasses:\n  0: unlabeled\n  5: cat\n  9: dog\n  7: bird\n"
    )
    return root


MASK = np.asarray([[0, 5, 5, 9], [9, 9, 0, 0], [5, 5, 5, 5]], np.uint8)


def test_masks_by_hand(tmp_path):
    root = _mask_root(tmp_path, MASK)
    ignore = sources.mask_segmentation(root, "train", cache_dir=tmp_path / "cache")
    assert ignore.class_names == ("cat", "bird", "dog")  # sparse ids 5, 7, 9
    np.testing.assert_array_equal(ignore.mask(0), [[255, 0, 0, 2], [2, 2, 255, 255], [0, 0, 0, 0]])
    np.testing.assert_array_equal(ignore.classes_present[0], [0, 2])
    background = sources.mask_segmentation(
        root, "train", unlabeled="background", cache_dir=tmp_path / "cache"
    )
    assert background.class_names == ("unlabeled", "cat", "bird", "dog")
    np.testing.assert_array_equal(background[0]["mask"], [[0, 1, 1, 3], [3, 3, 0, 0], [1] * 4])


def test_mask_errors(tmp_path):
    unmapped = MASK.copy()
    unmapped[1, 1] = 6
    root = _mask_root(tmp_path / "a", unmapped)
    with pytest.raises(ValueError, match=r"m\.png: pixel value 6 has no class mapping") as error:
        sources.mask_segmentation(root, "train", cache_dir=tmp_path / "cache")
    _one_line(error)
    root = _mask_root(tmp_path / "b", MASK, image_shape=(4, 4, 3))
    with pytest.raises(ValueError, match=r"m\.png: mask is 4x3 but its image is 4x4"):
        sources.mask_segmentation(root, "train", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"unlabeled='skip' is not allowed"):
        sources.mask_segmentation(root, "train", unlabeled="skip", cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------- tiny CSV


def test_natural_clients_csv(tmp_path):
    for stem in ("p0", "p1", "p2", "p3"):
        _save(tmp_path / "images" / f"{stem}.png", _pixels(int(stem[1]), (3, 3, 3)))
    (tmp_path / "split.csv").write_text(
        "user_id,image_id,class\nu9,p0,3\nu2,p1,1\nu9,p2,0\nu5,p3,3\n"
    )
    natural = sources.natural_clients_csv(
        tmp_path / "split.csv",
        tmp_path / "images",
        client_column="user_id",
        path_column="image_id",
        label_column="class",
        path_suffix=".png",
        cache_dir=tmp_path / "cache",
    )
    assert natural.client_ids == ("u9", "u2", "u5")
    assert [c.tolist() for c in natural.clients] == [[0, 2], [1], [3]]
    np.testing.assert_array_equal(natural.source.labels, [3, 1, 0, 3])
    assert natural.source.num_classes == 4
    np.testing.assert_array_equal(natural.source[2]["image"], _pixels(2, (3, 3, 3)))


def test_natural_clients_csv_errors(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "bad.csv").write_text("user,path,label\n")
    with pytest.raises(ValueError, match=r"bad\.csv: no column 'client_id'; found"):
        sources.natural_clients_csv(tmp_path / "bad.csv", tmp_path / "images")
    (tmp_path / "gone.csv").write_text("client_id,path,label\nc,nothere.png,cat\n")
    with pytest.raises(FileNotFoundError, match=r"gone\.csv:2: image .*nothere\.png is missing"):
        sources.natural_clients_csv(tmp_path / "gone.csv", tmp_path / "images")


# --------------------------------------------------------------------------- tfds


@pytest.fixture
def mock_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        yield tfds


@pytest.mark.parametrize("name, shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))])
def test_tfds_classification(mock_tfds, name, shape):
    source = sources.tfds_source(name, "train")
    assert len(source) == 6 and source.num_classes == 10 and source.task == "classification"
    example = source[0]
    assert example["image"].shape == shape and example["image"].dtype == np.uint8
    assert source.labels.shape == (6,) and np.all(source.labels < 10)


def test_tfds_detection(mock_tfds):
    source = sources.tfds_source("voc/2007", "train")
    assert source.task == "detection" and source.num_classes == 20
    example = source[0]
    assert example["boxes"].ndim == 2 and example["boxes"].shape[1] == 4
    assert example["box_labels"].dtype == np.int32
    assert len(source.box_labels) == 6
    with pytest.raises(ValueError, match=r"detection dataset; use box_labels"):
        _ = source.labels


def test_tfds_errors(mock_tfds):
    with pytest.raises(
        ValueError, match=r"data\.name='no_such_dataset' is not in the tfds catalog"
    ) as error:
        sources.tfds_source("no_such_dataset", "train")
    _one_line(error)
    if importlib.util.find_spec("tensorflow") is None:
        with pytest.raises(
            ValueError, match=r"data\.name='coco/2017': its tfds builder needs TensorFlow"
        ):
            sources.tfds_source("coco/2017", "train")


def test_tfds_unprepared_data_dir(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(
        FileNotFoundError, match=r"tfds 'mnist' split 'train' is not prepared"
    ) as error:
        sources.tfds_source("mnist", "train", data_dir=tmp_path)
    _one_line(error)


def test_no_tensorflow_imported(tmp_path):
    """Reading the tfds catalog (`tfds.data_source`) and the training loop never import
    TensorFlow. TensorFlow is not installed here, so `import tensorflow` cannot succeed and the
    check of sys.modules alone could never fail: a stand-in `tensorflow` package first on the
    path of a fresh interpreter lets every attempt succeed, as an installed TensorFlow would,
    and records where it came from."""
    import sys

    assert "tensorflow" not in sys.modules
    pytest.importorskip("tensorflow_datasets")
    stand_in = tmp_path / "path" / "tensorflow"
    stand_in.mkdir(parents=True)
    record = tmp_path / "tensorflow_imported_from.txt"
    (stand_in / "__init__.py").write_text(
        "import pathlib, traceback\n"
        f"pathlib.Path({str(record)!r}).write_text(''.join(traceback.format_stack()))\n"
    )
    script = textwrap.dedent(
        """
        import sys
        import fedjax_cv.data.inspect, fedjax_cv.data.registry, fedjax_cv.train
        import tensorflow_datasets as tfds
        from fedjax_cv.data import sources
        with tfds.testing.mock_data(num_examples=3):
            for name in ("mnist", "voc/2007"):
                assert len(sources.tfds_source(name, "train")[0]) > 0
        assert "tensorflow" not in sys.modules
        print("read without tensorflow")
        """
    )
    path = os.pathsep.join(filter(None, [str(stand_in.parent), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
    )
    assert not record.exists(), f"tensorflow imported from:\n{record.read_text()[-3000:]}"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read without tensorflow" in result.stdout
