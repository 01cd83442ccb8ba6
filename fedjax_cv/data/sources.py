"""Image datasets as random-access sources of numpy examples: local formats and the tfds catalog.

Local formats are decoded once into the cache of `fedjax_cv.data.cache` and memory-mapped after;
annotations are parsed (and validated) on every load, which is cheap. Conventions, used by every
source and everywhere else in fedjax_cv:

- image: uint8 [H, W, C], C = 1 for grayscale files and 3 for all others.
- label, box_labels: int32 class ids; `class_names[i]` names id i.
- boxes: float32 [N, 4] as (ymin, xmin, ymax, xmax) normalised to [0, 1] by the image height
  and width: the convention of tfds' BBoxFeature, so catalog and local detection data agree.
- mask: uint8 [H, W] of contiguous class ids, `IGNORE_LABEL` (255) where no loss applies.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import re
import tarfile
import xml.etree.ElementTree as ElementTree
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from xml.parsers import expat

import numpy as np
from PIL import Image

from fedjax_cv.data import cache as cache_lib
from fedjax_cv.data.partition import natural

IGNORE_LABEL = 255
# YOLO files store six decimals, so a box touching the border can overshoot it by 5e-7.
_YOLO_TOLERANCE = 1e-5
_UNLABELED_CHOICES = ("ignore", "background")

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- source records


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationSource:
    """Images with one class each; `labels` is the [N] int32 array partitioners take."""

    images: cache_lib.ImageStore
    labels: np.ndarray
    class_names: tuple[str, ...]
    paths: tuple[str, ...]  # where each example came from, for messages and natural ids
    origin: str = ""  # the folder `paths` are relative to, or the archive holding them
    archive_split: str | None = None  # in an archive: the split folder `paths` are under

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}

    def file_of(self, index: int) -> str:
        """The file of example `index`: a path, or `archive:member` (found by reading the
        archive, so for messages only)."""
        if self.archive_split is not None:
            member = _archive_member(Path(self.origin), self.archive_split, self.paths[index])
            return f"{self.origin}:{member}"
        return f"{self.origin}/{self.paths[index]}" if self.origin else self.paths[index]

    def stacked_images(
        self, shape: Sequence[int] | None = None, like: str = "the others"
    ) -> np.ndarray:
        """All images as one [N, H, W, C] array, every image of `shape` (default: the shape
        most images have, said as `like`); else a ValueError naming the first file of another
        shape."""
        shapes = self.images.shapes
        if shape is None and len(shapes):
            values, counts = np.unique(shapes, axis=0, return_counts=True)
            shape = values[np.argmax(counts)]
        odd = np.flatnonzero(np.any(shapes != np.asarray(shape), axis=1)) if len(shapes) else []
        if len(odd):
            raise ValueError(
                f"{self.file_of(int(odd[0]))}: image is {_hwc(shapes[odd[0]])} (HxWxC), "
                f"{like} are {_hwc(shape)} ({len(odd)} of {len(shapes)} images differ); every "
                "image must have one shape"
            )
        return self.images.stacked()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True, eq=False)
class DetectionSource:
    """Images with any number of boxes each; `box_labels` is what multi-label partitioners take."""

    images: cache_lib.ImageStore
    boxes: tuple[np.ndarray, ...]  # [N_i, 4] float32 (ymin, xmin, ymax, xmax) in [0, 1]
    box_labels: tuple[np.ndarray, ...]  # [N_i] int32
    difficult: tuple[np.ndarray, ...]  # [N_i] bool, PASCAL VOC's flag; False elsewhere
    class_names: tuple[str, ...]
    image_ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {
            "image": self.images[index],
            "boxes": self.boxes[index],
            "box_labels": self.box_labels[index],
            "difficult": self.difficult[index],
        }

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(labels) for labels in self.box_labels))


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentationSource:
    """Images with a class-index mask each, remapped through `lookup` on access."""

    images: cache_lib.ImageStore
    raw_masks: cache_lib.ImageStore  # the file's values, [H, W, 1]
    lookup: np.ndarray  # uint8 [256]: file value -> contiguous id or IGNORE_LABEL
    class_names: tuple[str, ...]
    image_ids: tuple[str, ...]
    classes_present: tuple[np.ndarray, ...]  # contiguous ids in each mask, ignore excluded
    # int64 [N, num_classes]: pixels of each class in each mask, ignore excluded
    label_counts: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "mask": self.mask(index)}

    def mask(self, index: int) -> np.ndarray:
        return self.lookup[self.raw_masks[index][..., 0]]

    @property
    def masks(self) -> Masks:
        """The masks as a random-access sequence, for a dataset's `mask` key."""
        return Masks(self.raw_masks, self.lookup)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True, eq=False)
class Masks:
    """Random access to uint8 [H, W] masks of contiguous ids: file values through `lookup`.

    Pickles as its two fields, so a store travels by location (see `ImageStore`).
    """

    raw_masks: cache_lib.ImageStore  # [H, W, 1] file values
    lookup: np.ndarray  # uint8 [256]

    def __len__(self) -> int:
        return len(self.raw_masks)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.lookup[self.raw_masks[index][..., 0]]


@dataclasses.dataclass(frozen=True, eq=False)
class RGBImages:
    """Random access to uint8 [H, W, 3] images: grayscale files (decoded [H, W, 1]) are
    repeated over three channels, so photo datasets with a few grayscale files (coco128 has
    two) give one channel count."""

    images: cache_lib.ImageStore

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        image = self.images[index]
        return image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class NaturalClients:
    """A source whose examples carry their own client ids (GLD-23k, iNaturalist-User-120k)."""

    source: ClassificationSource
    example_client_ids: np.ndarray  # [N] str, one per example
    client_ids: tuple[str, ...]  # client k's id, in order of first appearance
    clients: tuple[np.ndarray, ...]  # client k's example indices


# --------------------------------------------------------------------------- image folders


def _hwc(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def image_folder(
    root: PathLike,
    split: str,
    *,
    class_names: Sequence[str] | None = None,
    cache_dir: PathLike | None = None,
    image_size: tuple[int, int] | None = None,
    num_workers: int | None = None,
) -> ClassificationSource:
    """`<root>/<split>/<class>/<file>`, or a .tar/.tar.gz holding that (maybe under one top folder).

    Class ids are the positions in `class_names`, by default the sorted names of the class
    folders that hold images (pass the names when a split may lack a class, so ids agree).
    Examples are ordered by (class, file name). `image_size` (height, width) resizes at decode
    time, for datasets of large photos.
    """
    root = _existing(root, "data.root", "an image folder or a .tar/.tar.gz of one")
    spec = cache_lib.DecodeSpec("image", tuple(image_size) if image_size else None)
    if root.is_file():
        with _reading_archive(root):
            is_tar = tarfile.is_tarfile(root)
        if not is_tar:
            raise ValueError(
                f"data.root={str(root)!r} is a file but not a tar archive; must be an image "
                "folder or a .tar/.tar.gz of one"
            )
        key = {"archive": cache_lib.fingerprint(root), "decode": spec.as_key()}
        entry = cache_lib.get_or_build(
            cache_dir,
            "image_folder_archive",
            key,
            lambda out: _build_from_tar(root, spec, num_workers, out),
        )
        splits = sorted(p.name.removesuffix(".files.json") for p in entry.glob("*.files.json"))
        if split not in splits:
            raise FileNotFoundError(
                f"split={split!r} is not in {root}; found splits: {', '.join(splits) or 'none'}"
            )
        return _open_classification(entry, class_names, split, origin=str(root), in_archive=True)
    split_dir = _split_dir(root, split)
    files = _class_files(split_dir, root)
    relative = [f"{name}/{file}" for name, file in files]
    key = {
        "folder": str(split_dir.resolve()),
        "files": cache_lib.files_digest(split_dir, relative),
        "decode": spec.as_key(),
    }

    def build(out: Path) -> None:
        items = ((str(split_dir / path), None) for path in relative)
        cache_lib.write_store(out, cache_lib.decode_many(items, spec, len(files), num_workers))
        _write_classification_meta(out, files)

    entry = cache_lib.get_or_build(cache_dir, "image_folder", key, build)
    return _open_classification(entry, class_names, origin=str(split_dir))


def _split_dir(root: Path, split: str) -> Path:
    if (root / split).is_dir():
        return root / split
    subdirs = _visible_dirs(root)
    # An extracted archive keeps its top folder: <root>/cifar10/train/...
    if len(subdirs) == 1 and (subdirs[0] / split).is_dir():
        return subdirs[0] / split
    found = [d.name for d in subdirs] or ["nothing"]
    raise FileNotFoundError(
        f"split={split!r}: no folder {root / split}; found {', '.join(found)} under {root}"
    )


def _class_files(split_dir: Path, root: Path) -> list[tuple[str, str]]:
    files = [
        (class_dir.name, file.name)
        for class_dir in _visible_dirs(split_dir)
        for file in class_dir.iterdir()
        if _is_image_name(file.name) and file.is_file()
    ]
    if not files:
        raise ValueError(
            f"data.root={str(root)!r} has no image files under {split_dir}/<class>/; must hold "
            f"files ending in {', '.join(cache_lib.IMAGE_EXTENSIONS)}"
        )
    return sorted(files)


def _build_from_tar(
    archive: Path, spec: cache_lib.DecodeSpec, num_workers: int | None, out: Path
) -> None:
    """Decodes every split of the archive in one pass: reading a .tar.gz costs as much as
    decoding it, so a second split would otherwise pay for the whole archive again."""
    files: list[tuple[str, str, str]] = []  # (split, class, file) in archive order
    with _reading_archive(archive) as where, tarfile.open(archive) as tar:

        def stream() -> Iterator[tuple[str, bytes]]:
            for member in tar:  # sequential: a gzip stream cannot seek back cheaply
                where[0] = f"in member {member.name}"
                parts = PurePosixPath(member.name).parts
                parts = parts[1:] if parts[:1] == (".",) else parts
                # <split>/<class>/<file>, or <top>/<split>/<class>/<file>
                if member.isfile() and len(parts) in (3, 4) and _is_image_name(parts[-1]):
                    files.append(parts[-3:])
                    yield f"{archive}:{member.name}", tar.extractfile(member).read()
                where[0] = f"after member {member.name}"

        cache_lib.write_store(
            out, cache_lib.decode_many(stream(), spec, None, num_workers), name="~all"
        )
    decoded = cache_lib.ImageStore.open(out, "~all")
    for split in sorted({split for split, _, _ in files}):
        order = sorted((f[1:], i) for i, f in enumerate(files) if f[0] == split)
        cache_lib.write_store(out, (decoded[i] for _, i in order), name=split)
        _write_classification_meta(out, [name for name, _ in order], split)
    for suffix in (".bin", ".index.npz"):
        (out / f"~all{suffix}").unlink()


# What reading a damaged or cut-short archive raises: gzip's EOFError, zlib.error, tarfile's
# ReadError, and OSErrors without an errno (BadGzipFile, bz2's "Invalid data stream"); an
# OSError with one (no space, permission) is the system's, not the archive's.
_ARCHIVE_ERRORS = (EOFError, OSError, tarfile.TarError, zlib.error)


def _archive_damage(error: BaseException) -> bool:
    return isinstance(error, _ARCHIVE_ERRORS) and getattr(error, "errno", None) is None


@contextlib.contextmanager
def _reading_archive(archive: Path) -> Iterator[list[str]]:
    """Turns a damaged archive's error into one line naming it and the member it was in
    (the block keeps `where[0]` up to date)."""
    where = ["at its start"]
    try:
        yield where
    except _ARCHIVE_ERRORS as error:
        if not _archive_damage(error):
            raise
        raise ValueError(
            f"{archive}: the archive is cut short or damaged {where[0]} ({error}); must be a "
            "complete .tar or .tar.gz"
        ) from None


def _archive_member(archive: Path, split: str, path: str) -> str:
    """The name of the member `<split>/<path>` (maybe under a top folder) in `archive`."""
    suffix = f"{split}/{path}"
    with contextlib.suppress(*_ARCHIVE_ERRORS), tarfile.open(archive) as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name == suffix or name.endswith(f"/{suffix}"):
                return member.name
    return suffix


def _write_classification_meta(
    out: Path, files: Sequence[tuple[str, str]], store: str = "images"
) -> None:
    (out / f"{store}.files.json").write_text(json.dumps([list(f) for f in files]))


def _open_classification(
    entry: Path,
    class_names: Sequence[str] | None,
    store: str = "images",
    *,
    origin: str = "",
    in_archive: bool = False,
) -> ClassificationSource:
    files = json.loads((entry / f"{store}.files.json").read_text())
    folders = sorted({folder for folder, _ in files})
    class_names = folders if class_names is None else list(class_names)
    ids = {name: i for i, name in enumerate(class_names)}
    unknown = [folder for folder in folders if folder not in ids]
    if unknown:
        raise ValueError(
            f"class folder {unknown[0]!r} is not in class_names; must be one of {class_names}"
        )
    return ClassificationSource(
        images=cache_lib.ImageStore.open(entry, store),
        labels=np.asarray([ids[folder] for folder, _ in files], np.int32),
        class_names=tuple(class_names),
        paths=tuple(f"{folder}/{file}" for folder, file in files),
        origin=origin,
        archive_split=store if in_archive else None,
    )


# --------------------------------------------------------------------------- YOLO boxes


# The 80 classes of COCO detection in the order of YOLO exports (ids 0-79), for YOLO-layout
# COCO folders without a names file.
COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


def yolo_detection(
    root: PathLike,
    split: str,
    *,
    class_names: Sequence[str] | None = None,
    images_dir: str = "images",
    labels_dir: str = "object_detection/labels",
    config: str = "object_detection/config.yaml",
    cache_dir: PathLike | None = None,
    num_workers: int | None = None,
) -> DetectionSource:
    """YOLO/darknet boxes, the FedVision annotation format (defaults: the coco128 layout).

    `<root>/<images_dir>/<split>/<id>.jpg` with `<root>/<labels_dir>/<split>/<id>.txt`, one box
    a line, `class x_center y_center width height` normalised to [0, 1]. An image without a
    label file has no boxes; a label file without an image is ignored. Class names come from
    the `names:` entry of `<root>/<config>` unless given.
    """
    root = _existing(root, "data.root", "a YOLO dataset folder")
    image_dir = _split_folder(root / images_dir, split)
    if class_names is None:
        names = read_yaml_class_names(root / config, "names")
        if sorted(names) != list(range(len(names))):
            raise ValueError(
                f"{root / config}: class ids {sorted(names)} are not 0..{len(names) - 1}; "
                "YOLO class ids must be contiguous from 0"
            )
        class_names = [names[i] for i in range(len(names))]
    files = _image_files(image_dir, root)
    images = _decoded_store(image_dir, files, cache_lib.DecodeSpec(), cache_dir, num_workers)
    label_dir = root / labels_dir / split
    boxes, labels = [], []
    for file in files:
        label_file = label_dir / f"{Path(file).stem}.txt"
        box, label = (
            _parse_yolo(label_file, len(class_names))
            if label_file.is_file()
            else (np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
        )
        boxes.append(box)
        labels.append(label)
    return DetectionSource(
        images=images,
        boxes=tuple(boxes),
        box_labels=tuple(labels),
        difficult=tuple(np.zeros(len(label), bool) for label in labels),
        class_names=tuple(class_names),
        image_ids=tuple(Path(file).stem for file in files),
    )


def _parse_yolo(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    boxes, labels = [], []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{line_number}"
        if len(fields) != 5:
            raise ValueError(
                f"{where}: has {len(fields)} fields; must be 'class x_center y_center width height'"
            )
        if not re.fullmatch(r"\d+", fields[0]) or int(fields[0]) >= num_classes:
            raise ValueError(
                f"{where}: class id {fields[0]!r} is out of range; must be an integer in "
                f"[0, {num_classes - 1}]"
            )
        try:
            xc, yc, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise ValueError(f"{where}: box {fields[1:]} is not four numbers") from None
        corners = (yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2)
        values = (xc, yc, w, h, *corners)
        if not all(
            math.isfinite(v) and -_YOLO_TOLERANCE <= v <= 1 + _YOLO_TOLERANCE for v in values
        ):
            raise ValueError(
                f"{where}: box (x_center, y_center, width, height) = {tuple(fields[1:])} "
                "reaches outside [0, 1]; must be normalised and inside the image"
            )
        boxes.append(np.clip(corners, 0.0, 1.0))
        labels.append(int(fields[0]))
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32)


# --------------------------------------------------------------------------- PASCAL VOC boxes


def voc_detection(
    root: PathLike,
    split: str,
    *,
    class_names: Sequence[str] | None = None,
    cache_dir: PathLike | None = None,
    num_workers: int | None = None,
) -> DetectionSource:
    """PASCAL VOC: `JPEGImages/<id>.jpg`, `Annotations/<id>.xml`, `ImageSets/Main/<split>.txt`.

    Class names are given, or discovered sorted over every annotation file (not just this
    split's, so all splits agree on ids). VOC pixel coordinates are 1-based; like tfds they
    normalise as (v - 1) / size, so the two sources of VOC give the same boxes.
    """
    root = _existing(root, "data.root", "a PASCAL VOC folder")
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        found = sorted(p.stem for p in split_file.parent.glob("*.txt")) or ["none"]
        raise FileNotFoundError(f"split={split!r}: no {split_file}; found splits {found}")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{split_file} lists no images; must list one image id a line")
    annotations = {i: _read_voc_xml(root / "Annotations" / f"{i}.xml") for i in ids}
    if class_names is None:
        discovered = {
            obj[0]
            for path in sorted((root / "Annotations").glob("*.xml"))
            for obj in (annotations[path.stem] if path.stem in annotations else _read_voc_xml(path))
        }
        class_names = sorted(discovered)
    class_ids = {name: i for i, name in enumerate(class_names)}
    image_dir = root / "JPEGImages"
    files = [_voc_image_file(image_dir, i) for i in ids]
    images = _decoded_store(image_dir, files, cache_lib.DecodeSpec(), cache_dir, num_workers)
    boxes, labels, difficult = [], [], []
    for index, image_id in enumerate(ids):
        height, width = (int(v) for v in images.shapes[index][:2])
        path = root / "Annotations" / f"{image_id}.xml"
        image_boxes = []
        for number, (name, xmin, ymin, xmax, ymax, _) in enumerate(annotations[image_id]):
            if name not in class_ids:
                raise ValueError(
                    f"{path}: object {number} has class {name!r}; must be one of "
                    f"{list(class_names)} (line {_object_line(path, number)})"
                )
            box = (xmin, ymin, xmax, ymax)
            inverted = [
                f"{axis}max < {axis}min"
                for axis, lo, hi in (("x", *box[::2]), ("y", *box[1::2]))
                if hi < lo
            ]
            if inverted:
                raise ValueError(
                    f"{path}: object {number} box (xmin, ymin, xmax, ymax) = {box} has "
                    f"{' and '.join(inverted)}, so it lies outside any image; must satisfy "
                    f"min <= max (line {_object_line(path, number)})"
                )
            if not (0 <= xmin <= xmax <= width and 0 <= ymin <= ymax <= height):
                raise ValueError(
                    f"{path}: object {number} box (xmin, ymin, xmax, ymax) = {box} lies outside "
                    f"the {width}x{height} image; must satisfy 0 <= min <= max <= size (line "
                    f"{_object_line(path, number)})"
                )
            image_boxes.append(
                ((ymin - 1) / height, (xmin - 1) / width, (ymax - 1) / height, (xmax - 1) / width)
            )
        objects = annotations[image_id]
        boxes.append(np.clip(np.asarray(image_boxes, np.float32).reshape(-1, 4), 0.0, 1.0))
        labels.append(np.asarray([class_ids[o[0]] for o in objects], np.int32))
        difficult.append(np.asarray([o[5] for o in objects], bool))
    return DetectionSource(
        images=images,
        boxes=tuple(boxes),
        box_labels=tuple(labels),
        difficult=tuple(difficult),
        class_names=tuple(class_names),
        image_ids=tuple(ids),
    )


def _read_voc_xml(path: Path) -> list[tuple[str, float, float, float, float, bool]]:
    """(name, xmin, ymin, xmax, ymax, difficult) for each object."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file is missing")
    try:
        tree = ElementTree.parse(path)
    except ElementTree.ParseError as error:  # its message names the line and column
        raise ValueError(f"{path}: not valid XML ({error})") from None
    objects = []
    for number, obj in enumerate(tree.getroot().iter("object")):
        try:
            box = obj.find("bndbox")
            coords = [float(box.find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax")]
            name = obj.find("name").text.strip()
        except (AttributeError, TypeError, ValueError):
            raise ValueError(
                f"{path}: object {number} lacks a name or a numeric bndbox "
                f"xmin/ymin/xmax/ymax; must have both (line {_object_line(path, number)})"
            ) from None
        hard = obj.find("difficult")
        objects.append((name, *coords, hard is not None and (hard.text or "").strip() == "1"))
    return objects


def _object_line(path: Path, number: int) -> int | str:
    """The line of the `number`-th <object> element of a VOC XML file, for messages (ElementTree
    keeps no line numbers; expat, which it parses with, does)."""
    lines = []
    parser = expat.ParserCreate()
    parser.StartElementHandler = lambda tag, attributes: (
        lines.append(parser.CurrentLineNumber) if tag == "object" else None
    )
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError:
        pass
    return lines[number] if number < len(lines) else "?"


def _voc_image_file(image_dir: Path, image_id: str) -> str:
    if (image_dir / f"{image_id}.jpg").is_file():
        return f"{image_id}.jpg"
    matches = [p.name for p in image_dir.glob(f"{image_id}.*") if _is_image_name(p.name)]
    if not matches:
        raise FileNotFoundError(f"{image_dir / image_id}.jpg: image is missing")
    return sorted(matches)[0]


# --------------------------------------------------------------------------- masks


def mask_segmentation(
    root: PathLike,
    split: str,
    *,
    unlabeled: str = "ignore",
    class_names: Mapping[int, str] | None = None,
    images_dir: str = "images",
    masks_dir: str = "semantic_segmentation/masks",
    config: str = "semantic_segmentation/config.yaml",
    cache_dir: PathLike | None = None,
    num_workers: int | None = None,
) -> SegmentationSource:
    """8-bit PNG class-index masks with sparse ids (defaults: the coco128 panoptic layout).

    `<root>/<masks_dir>/<split>/<id>.png` pairs with `<root>/<images_dir>/<split>/<id>.*`.
    File values are the keys of `class_names` (default: the `classes:` entry of
    `<root>/<config>`), 0 meaning unlabeled. The other ids map to contiguous ids in sorted
    order; 0 maps to IGNORE_LABEL with `unlabeled="ignore"`, or becomes class 0 (background,
    the rest shifted by one) with `unlabeled="background"`.
    """
    if unlabeled not in _UNLABELED_CHOICES:
        raise ValueError(
            f"unlabeled={unlabeled!r} is not allowed; must be 'ignore' or 'background'"
        )
    root = _existing(root, "data.root", "a folder of images and PNG masks")
    if class_names is None:
        class_names = read_yaml_class_names(root / config, "classes")
    sparse_names = dict(class_names)
    if any(not 0 <= k <= 255 for k in sparse_names):
        raise ValueError(
            f"class ids {sorted(k for k in sparse_names if not 0 <= k <= 255)} cannot appear in "
            "8-bit masks; must be in [0, 255]"
        )
    lookup, names = _mask_lookup(sparse_names, unlabeled)
    mask_dir = _split_folder(root / masks_dir, split)
    mask_files = sorted(p.name for p in mask_dir.iterdir() if p.suffix.lower() == ".png")
    if not mask_files:
        raise ValueError(f"{mask_dir} has no .png masks; must hold one <id>.png per image")
    image_dir = _split_folder(root / images_dir, split)
    image_by_stem = {Path(n).stem: n for n in sorted(os.listdir(image_dir)) if _is_image_name(n)}
    image_files = []
    for mask_file in mask_files:
        if Path(mask_file).stem not in image_by_stem:
            raise FileNotFoundError(
                f"{mask_dir / mask_file}: no image {image_dir}/{Path(mask_file).stem}.* for it"
            )
        image_files.append(image_by_stem[Path(mask_file).stem])
    images = _decoded_store(image_dir, image_files, cache_lib.DecodeSpec(), cache_dir, num_workers)
    masks = _decoded_store(
        mask_dir, mask_files, cache_lib.DecodeSpec("mask"), cache_dir, num_workers
    )
    value_counts = []
    for index, mask_file in enumerate(mask_files):
        raw = masks[index]
        if raw.shape[:2] != tuple(int(v) for v in images.shapes[index][:2]):
            raise ValueError(
                f"{mask_dir / mask_file}: mask is {raw.shape[1]}x{raw.shape[0]} but its image is "
                f"{images.shapes[index][1]}x{images.shapes[index][0]}; must match"
            )
        value_counts.append(np.bincount(raw.ravel(), minlength=256))
        values = np.flatnonzero(value_counts[-1])
        unmapped = values[lookup[values] < 0]
        if len(unmapped):
            raise ValueError(
                f"{mask_dir / mask_file}: pixel value {int(unmapped[0])} has no class mapping; "
                f"allowed values: {sorted(sparse_names)}"
            )
    return _segmentation_source(
        images, masks, lookup, names, [Path(f).stem for f in mask_files], value_counts
    )


def _segmentation_source(
    images: cache_lib.ImageStore,
    raw_masks: cache_lib.ImageStore,
    lookup: np.ndarray,
    class_names: Sequence[str],
    image_ids: Sequence[str],
    value_counts: Sequence[np.ndarray],
) -> SegmentationSource:
    """The source of validated masks, with per-class pixel counts from each mask's counts of
    file values ([256] each) and `lookup` (file value -> class id, IGNORE_LABEL or -1)."""
    num_classes = len(class_names)
    # [256, num_classes] one-hot of each file value's class: ignore and unmapped rows are 0.
    to_class = (lookup[:, None] == np.arange(num_classes)[None]).astype(np.int64)
    label_counts = np.asarray(value_counts, np.int64).reshape(-1, 256) @ to_class
    return SegmentationSource(
        images=images,
        raw_masks=raw_masks,
        lookup=np.where(lookup < 0, IGNORE_LABEL, lookup).astype(np.uint8),
        class_names=tuple(class_names),
        image_ids=tuple(image_ids),
        classes_present=tuple(np.flatnonzero(row).astype(np.int32) for row in label_counts),
        label_counts=label_counts,
    )


def _mask_lookup(sparse_names: Mapping[int, str], unlabeled: str) -> tuple[np.ndarray, list[str]]:
    """File value -> contiguous id (-1 where unmapped), and the contiguous names."""
    labelled = sorted(k for k in sparse_names if k != 0)
    lookup = np.full(256, -1, np.int64)
    if unlabeled == "ignore":
        names = [sparse_names[k] for k in labelled]
        lookup[labelled] = np.arange(len(labelled))
        if 0 in sparse_names:
            lookup[0] = IGNORE_LABEL
    else:
        names = [sparse_names.get(0, "background")] + [sparse_names[k] for k in labelled]
        lookup[labelled] = np.arange(1, len(labelled) + 1)
        lookup[0] = 0
    if len(names) >= IGNORE_LABEL:
        raise ValueError(
            f"{len(names)} classes do not fit beside the ignore label {IGNORE_LABEL}; must be "
            f"at most {IGNORE_LABEL}"
        )
    return lookup, names


# --------------------------------------------------------------------------- PASCAL VOC masks

VOC_SEGMENTATION_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
# split -> folder of its masks. trainaug: VOC 2012 train plus the SBD annotations of
# Hariharan et al. (2011), 10,582 images, the training set of DeepLab and FedCV.
VOC_SEGMENTATION_SPLITS = {
    "train": "SegmentationClass",
    "val": "SegmentationClass",
    "trainval": "SegmentationClass",
    "trainaug": "SegmentationClassAug",
}


def voc_segmentation(
    root: PathLike,
    split: str,
    *,
    class_names: Sequence[str] = VOC_SEGMENTATION_CLASSES,
    cache_dir: PathLike | None = None,
    num_workers: int | None = None,
) -> SegmentationSource:
    """PASCAL VOC 2012 segmentation: `<root>/ImageSets/Segmentation/<split>.txt` lists image
    ids (a line may also be a path, as in DeepLab's list files: its file stem is the id),
    `<root>/JPEGImages/<id>.jpg` the images, and the masks are `SegmentationClass/<id>.png`
    (palette PNGs whose indices are class ids) or, for `trainaug`, `SegmentationClassAug/<id>.png`
    (single-channel class ids).

    Mask values are class ids 0..len(class_names) - 1, or 255 for object borders and
    difficult regions, which stays IGNORE_LABEL. Every file is checked before anything is
    written to the cache: a missing image or mask, a mask of another size than its image, or
    a value that is neither a class id nor 255 fails with one line naming the file.
    """
    root = _existing(root, "data.root", "a PASCAL VOC 2012 folder")
    allowed = ", ".join(VOC_SEGMENTATION_SPLITS)
    if split not in VOC_SEGMENTATION_SPLITS:
        raise ValueError(f"split={split!r} is not a VOC segmentation split; allowed: {allowed}")
    if not 0 < len(class_names) < IGNORE_LABEL:
        raise ValueError(
            f"{len(class_names)} class names are not allowed; must be 1 to {IGNORE_LABEL - 1}, "
            f"below the ignore label {IGNORE_LABEL}"
        )
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(
            f"{split_file}: the id list of split {split!r} is missing; allowed splits: {allowed}, "
            "each listed in ImageSets/Segmentation/<split>.txt"
        )
    ids = [
        PurePosixPath(line.split()[0]).stem
        for line in split_file.read_text().splitlines()
        if line.strip()
    ]
    if not ids:
        raise ValueError(f"{split_file} lists no images; must list one image id a line")
    mask_dir = root / VOC_SEGMENTATION_SPLITS[split]
    mask_files = [f"{image_id}.png" for image_id in ids]
    for image_id, mask_file in zip(ids, mask_files, strict=True):
        if not (mask_dir / mask_file).is_file():
            raise FileNotFoundError(
                f"{mask_dir / mask_file}: mask of image {image_id!r} listed in {split_file} is "
                "missing"
            )
    image_dir = root / "JPEGImages"
    image_files = [_voc_image_file(image_dir, image_id) for image_id in ids]
    num_classes = len(class_names)
    lookup = np.full(256, -1, np.int64)
    lookup[:num_classes] = np.arange(num_classes)
    lookup[IGNORE_LABEL] = IGNORE_LABEL

    def check(path: Path, value_counts: np.ndarray, mask_hw, image_path: Path, image_hw) -> None:
        if tuple(mask_hw) != tuple(image_hw):
            raise ValueError(
                f"{path}: mask is {mask_hw[1]}x{mask_hw[0]} but its image {image_path} is "
                f"{image_hw[1]}x{image_hw[0]}; must be the same size"
            )
        values = np.flatnonzero(value_counts)
        bad = values[lookup[values] < 0]
        if len(bad):
            raise ValueError(
                f"{path}: pixel value {int(bad[0])} is not a class id; allowed: "
                f"0..{num_classes - 1} ({num_classes} classes) or {IGNORE_LABEL} (ignore)"
            )

    def check_decoded(index: int, raw: np.ndarray) -> None:
        # While the masks are decoded, before the cache entry exists: image sizes from the
        # file headers, which PIL reads without decoding the pixels.
        with Image.open(image_dir / image_files[index]) as image:
            width, height = image.size
        check(
            mask_dir / mask_files[index],
            np.bincount(raw.ravel(), minlength=256),
            raw.shape[:2],
            image_dir / image_files[index],
            (height, width),
        )

    masks = _decoded_store(
        mask_dir,
        mask_files,
        cache_lib.DecodeSpec("mask"),
        cache_dir,
        num_workers,
        check=check_decoded,
    )
    images = _decoded_store(image_dir, image_files, cache_lib.DecodeSpec(), cache_dir, num_workers)
    # Checked again from the cache: an entry built earlier may meet other images or classes.
    value_counts = []
    for index in range(len(ids)):
        value_counts.append(np.bincount(masks[index].ravel(), minlength=256))
        check(
            mask_dir / mask_files[index],
            value_counts[-1],
            masks.shapes[index][:2],
            image_dir / image_files[index],
            images.shapes[index][:2],
        )
    return _segmentation_source(images, masks, lookup, class_names, ids, value_counts)


# --------------------------------------------------------------------------- natural clients


def natural_clients_csv(
    csv_path: PathLike,
    image_root: PathLike,
    *,
    client_column: str = "client_id",
    path_column: str = "path",
    label_column: str = "label",
    path_suffix: str = "",
    class_names: Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
    cache_dir: PathLike | None = None,
    num_workers: int | None = None,
) -> NaturalClients:
    """A CSV of `client_id,path,label` rows: the layout of TFF's GLD-23k/160k and
    iNaturalist-User-120k splits (Hsu et al. 2020), whose columns are `user_id,image_id,class`
    with `path_suffix=".jpg"`.

    Examples keep the row order; clients are ordered by first appearance. Labels are integer
    class ids when every label is an integer, else names (sorted, or `class_names`).
    """
    csv_path = _existing(csv_path, "csv_path", "a CSV of client_id,path,label rows")
    image_root = _existing(image_root, "image_root", "the folder the CSV paths are relative to")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = (client_column, path_column, label_column)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{csv_path}: no column {missing[0]!r}; found {reader.fieldnames}, must have "
                f"{list(columns)}"
            )
        rows = [(r[client_column], r[path_column] + path_suffix, r[label_column]) for r in reader]
    if not rows:
        raise ValueError(f"{csv_path} has no rows; must have one row per example")
    raw_labels = [label.strip() for _, _, label in rows]
    if class_names is None and all(re.fullmatch(r"\d+", label) for label in raw_labels):
        labels = np.asarray([int(label) for label in raw_labels], np.int32)
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    else:
        class_names = list(class_names) if class_names is not None else sorted(set(raw_labels))
        ids = {name: i for i, name in enumerate(class_names)}
        for row_number, label in enumerate(raw_labels, start=2):
            if label not in ids:
                raise ValueError(
                    f"{csv_path}:{row_number}: label {label!r} is unknown; must be one of "
                    f"{class_names}"
                )
        labels = np.asarray([ids[label] for label in raw_labels], np.int32)
    paths = [path for _, path, _ in rows]
    for row_number, path in enumerate(paths, start=2):
        if not (image_root / path).is_file():
            raise FileNotFoundError(
                f"{csv_path}:{row_number}: image {image_root / path} is missing"
            )
    spec = cache_lib.DecodeSpec("image", tuple(image_size) if image_size else None)
    images = _decoded_store(image_root, paths, spec, cache_dir, num_workers)
    example_client_ids = np.asarray([client for client, _, _ in rows], dtype=str)
    order = _first_appearance(example_client_ids)
    clients = natural(labels, len(order), 0, client_ids=example_client_ids)
    return NaturalClients(
        source=ClassificationSource(
            images=images,
            labels=labels,
            class_names=tuple(class_names),
            paths=tuple(paths),
            origin=str(image_root),
        ),
        example_client_ids=example_client_ids,
        client_ids=tuple(str(c) for c in order),
        clients=tuple(clients),
    )


def _first_appearance(ids: np.ndarray) -> np.ndarray:
    unique, first = np.unique(ids, return_index=True)
    return unique[np.argsort(first)]


# --------------------------------------------------------------------------- tfds catalog


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
    """A tfds catalog dataset read through `tfds.data_source` (ArrayRecord, no TensorFlow).

    Examples come out in this module's conventions: {"image", "label"} for classification and
    {"image", "boxes", "box_labels"} for detection (tfds' bbox is already (ymin, xmin, ymax,
    xmax) normalised).
    """

    name: str
    split: str
    data_source: Sequence[Mapping[str, Any]]
    class_names: tuple[str, ...]
    task: str  # "classification" or "detection"
    label_key: str = "label"

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._convert(self.data_source[index])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """[N] int32 class ids; reads (and decodes) every example once."""
        if self.task != "classification":
            raise ValueError(f"tfds {self.name!r} is a detection dataset; use box_labels")
        return np.asarray([self.data_source[i][self.label_key] for i in range(len(self))], np.int32)

    @functools.cached_property
    def box_labels(self) -> tuple[np.ndarray, ...]:
        """Per-image [N_i] int32 box classes; reads (and decodes) every example once."""
        if self.task != "detection":
            raise ValueError(f"tfds {self.name!r} is a classification dataset; use labels")
        return tuple(
            np.asarray(self.data_source[i]["objects"]["label"], np.int32) for i in range(len(self))
        )

    def _convert(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        image = np.asarray(example["image"], np.uint8)
        if self.task == "classification":
            return {"image": image, "label": np.asarray(example[self.label_key], np.int32)}
        objects = example["objects"]
        return {
            "image": image,
            "boxes": np.asarray(objects["bbox"], np.float32).reshape(-1, 4),
            "box_labels": np.asarray(objects["label"], np.int32),
        }


def tfds_source(
    name: str, split: str, *, data_dir: PathLike | None = None, label_key: str = "label"
) -> TfdsSource:
    """`tfds.data_source(name, split=split, data_dir=data_dir)` with download off (no network).

    Works for builders that need no TensorFlow to construct (cifar10, cifar100, mnist, voc);
    tfds' coco builder imports TensorFlow, so read COCO from a YOLO export instead.
    """
    import tensorflow_datasets as tfds  # costly import, needed only here

    try:
        data_source = tfds.data_source(
            name,
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=False,
        )
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"data.name={name!r} is not in the tfds catalog; must be a catalog name such as "
            "cifar10, cifar100, mnist or voc"
        ) from None
    except ModuleNotFoundError as error:
        if error.name != "tensorflow" and "tensorflow" not in str(error):
            raise
        raise ValueError(
            f"data.name={name!r}: its tfds builder needs TensorFlow, which fedjax_cv never "
            "imports; must be a TF-free builder (cifar10, cifar100, mnist, voc) or a local format"
        ) from None
    except (AssertionError, NotImplementedError) as error:
        # tfds' ways of saying "not prepared here as array_record, and download is off"
        raise FileNotFoundError(
            f"tfds {name!r} split {split!r} is not prepared as array_record under "
            f"data_dir={None if data_dir is None else os.fspath(data_dir)!r} "
            f"({str(error).splitlines()[0].strip()}); must be built there beforehand with "
            "`tfds build --file_format=array_record`"
        ) from None
    features = data_source.dataset_info.features
    if "objects" in features:
        task, label_feature = "detection", features["objects"]["label"]
    else:
        task, label_feature = "classification", features[label_key]
    return TfdsSource(
        name=name,
        split=split,
        data_source=data_source,
        class_names=tuple(label_feature.names),
        task=task,
        label_key=label_key,
    )


# --------------------------------------------------------------------------- shared helpers


def read_yaml_class_names(path: Path, key: str) -> dict[int, str]:
    """The `key:` entry of a YOLO-style YAML as {id: name}, without needing PyYAML.

    Reads the three shapes such files use: an indented `id: name` block, an indented `- name`
    list, or an inline `[a, b]` list.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: class-name config is missing")
    lines = path.read_text().splitlines()
    entry = re.compile(rf"{re.escape(key)}\s*:(.*)$")
    start = next((i for i, line in enumerate(lines) if entry.match(line)), None)
    if start is None:
        raise ValueError(f"{path}: no top-level '{key}:' entry; must list the class names")
    match = entry.match(lines[start])
    inline = _strip_comment(match.group(1))
    if inline:
        if not (inline.startswith("[") and inline.endswith("]")):
            raise ValueError(f"{path}: '{key}: {inline}' is not a list; must be [name, ...]")
        return {i: _unquote(v) for i, v in enumerate(inline[1:-1].split(",")) if v.strip()}
    names: dict[int, str] = {}
    for line in lines[start + 1 :]:
        if line.strip() == "" or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            break
        entry = _strip_comment(line.strip())
        if entry.startswith("-"):
            names[len(names)] = _unquote(entry[1:])
        else:
            index, _, name = entry.partition(":")
            if not re.fullmatch(r"\d+", index.strip()):
                raise ValueError(f"{path}: '{entry}' under '{key}:' is not 'id: name'")
            names[int(index)] = _unquote(name)
    if not names:
        raise ValueError(f"{path}: '{key}:' is empty; must list the class names")
    return names


def _strip_comment(text: str) -> str:
    text = text.strip()
    if text[:1] in "'\"":
        return text
    return text.split(" #", 1)[0].strip()


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _existing(path: PathLike, field: str, allowed: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{field}={str(path)!r} does not exist; must be {allowed}")
    return path


def _split_folder(parent: Path, split: str) -> Path:
    if not (parent / split).is_dir():
        found = [d.name for d in _visible_dirs(parent)] if parent.is_dir() else []
        raise FileNotFoundError(
            f"split={split!r}: no folder {parent / split}; found {found or 'nothing'}"
        )
    return parent / split


def _image_files(folder: Path, root: Path) -> list[str]:
    files = sorted(n for n in os.listdir(folder) if _is_image_name(n))
    if not files:
        raise ValueError(
            f"data.root={str(root)!r} has no image files in {folder}; must hold files ending "
            f"in {', '.join(cache_lib.IMAGE_EXTENSIONS)}"
        )
    return files


def _decoded_store(
    folder: Path,
    files: Sequence[str],
    spec: cache_lib.DecodeSpec,
    cache_dir: PathLike | None,
    num_workers: int | None,
    check: Callable[[int, np.ndarray], None] | None = None,
) -> cache_lib.ImageStore:
    """Pixels of `folder/<file>` for each file, decoded once into the cache.

    `check(index, array)`, when given, sees every array as it is decoded and may raise: the
    half-built entry is then discarded, so bad input leaves nothing in the cache. A cache hit
    decodes nothing and checks nothing.
    """
    key = {
        "folder": str(folder.resolve()),
        "files": cache_lib.files_digest(folder, files),
        "decode": spec.as_key(),
    }

    def checked(arrays: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for index, array in enumerate(arrays):
            check(index, array)
            yield array

    def build(out: Path) -> None:
        items = ((str(folder / f), None) for f in files)
        arrays = cache_lib.decode_many(items, spec, len(files), num_workers)
        cache_lib.write_store(out, arrays if check is None else checked(arrays))

    return cache_lib.ImageStore.open(cache_lib.get_or_build(cache_dir, "images", key, build))


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(cache_lib.IMAGE_EXTENSIONS)
