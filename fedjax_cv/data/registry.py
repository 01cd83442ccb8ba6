"""Datasets by name: `build_dataset(config.data, seed)` -> FederatedDataset."""

from __future__ import annotations

import functools
import inspect
import pathlib
from collections.abc import Callable

import numpy as np

from fedjax_cv.data import augment, shapes, sources
from fedjax_cv.data import cache as cache_lib
from fedjax_cv.data import partition as partition_lib
from fedjax_cv.data.federated import FederatedDataset
from fedjax_cv.data.partition import PARTITIONERS, make_partition

DatasetBuilder = Callable[..., FederatedDataset]


def partition_params(partition_config) -> dict:
    """The keyword arguments of `data.partition` that its partitioner takes.

    Every config carries `alpha`; partitioners without that parameter simply ignore it.
    """
    if partition_config.name not in PARTITIONERS:
        raise ValueError(
            f"data.partition.name={partition_config.name!r} is unknown; known: "
            f"{', '.join(sorted(PARTITIONERS))}"
        )
    accepted = inspect.signature(PARTITIONERS[partition_config.name]).parameters
    return {k: v for k, v in partition_config.items() if k != "name" and k in accepted}


def shapes_dataset(data_config, seed: int) -> FederatedDataset:
    """The embedded `shapes` data: labels drawn first, partitioned, then every client's
    examples rendered in that client's style; the test split mixes all styles."""
    rng = np.random.default_rng([seed, 0x54A9E5])
    num_classes = data_config.num_classes
    train_labels = rng.integers(0, num_classes, data_config.num_train_examples).astype(np.int32)
    test_labels = rng.integers(0, num_classes, data_config.num_test_examples).astype(np.int32)
    clients = make_partition(
        data_config.partition.name,
        train_labels,
        data_config.num_clients,
        seed,
        **partition_params(data_config.partition),
    )
    train_styles = np.zeros(len(train_labels), np.int64)
    for k, members in enumerate(clients):
        train_styles[members] = k
    test_styles = rng.integers(0, data_config.num_clients, len(test_labels))
    render = dict(seed=seed, image_size=data_config.image_size, num_classes=num_classes)
    train = shapes.render(train_labels, train_styles, **render)
    test = shapes.render(test_labels, test_styles, **render)
    return FederatedDataset(
        name="shapes",
        train={"image": train.images, "label": train.labels},
        test={"image": test.images, "label": test.labels},
        clients=tuple(clients),
        num_classes=num_classes,
        class_names=shapes.SHAPE_NAMES[:num_classes],
    )


# Archives of the catalog's image folders as the shared data folder names them.
_IMAGE_FOLDER_FILES = {"cifar10": "cifar10-images.tar.gz", "mnist": "mnist-images.tar.gz"}


def locate(root: str, name: str) -> pathlib.Path:
    """`root` itself when it is the dataset (a folder or archive), else its entry for `name`."""
    path = pathlib.Path(root)
    for candidate in (path / _IMAGE_FOLDER_FILES.get(name, name), path / name):
        if candidate.exists():
            return candidate
    if path.exists() and (path.is_file() or (path / "train").is_dir()):
        return path
    raise FileNotFoundError(
        f"data.root={root!r} holds no {name} data; must be a folder with "
        f"{_IMAGE_FOLDER_FILES.get(name, name)}, or the image folder / archive itself"
    )


def image_folder_dataset(data_config, seed: int) -> FederatedDataset:
    """A `<split>/<class>/<file>` folder or archive: train split partitioned, test held out."""
    path = locate(data_config.root, data_config.name)
    cache_dir = data_config.get("cache_dir") or None
    train = sources.image_folder(path, "train", cache_dir=cache_dir)
    test = sources.image_folder(path, "test", class_names=train.class_names, cache_dir=cache_dir)
    train_images = train.stacked_images()
    test_images = test.stacked_images(train_images.shape[1:], like="the train images")
    clients = make_partition(
        data_config.partition.name,
        train.labels,
        data_config.num_clients,
        seed,
        **partition_params(data_config.partition),
    )
    return FederatedDataset(
        name=data_config.name,
        train={"image": train_images, "label": train.labels},
        test={"image": test_images, "label": test.labels},
        clients=tuple(clients),
        num_classes=train.num_classes,
        class_names=train.class_names,
    )


# name: (folder under data.root, loader, train split, test split)
_DETECTION = {
    "coco128": ("coco128", sources.yolo_detection, "train2017", "val2017"),
    "bccd": ("bccd/BCCD", sources.voc_detection, "train", "test"),
}


def detection_dataset(data_config, seed: int) -> FederatedDataset:
    """Boxes in the coco128 (YOLO txt) or BCCD (PASCAL VOC XML) layout, partitioned by the
    classes of each image's boxes (multi-label partitioners: fedcv_detection, lda_multilabel)."""
    folder, load, train_split, test_split = _DETECTION[data_config.name]
    params = _checked_partition_params(data_config)
    path = locate(data_config.root, folder)
    cache_dir = data_config.get("cache_dir") or None
    train = load(path, train_split, cache_dir=cache_dir)
    test = load(path, test_split, class_names=train.class_names, cache_dir=cache_dir)
    return _detection_sources(data_config, seed, train, test, params)


def coco_detection_dataset(data_config, seed: int) -> FederatedDataset:
    """COCO, or any dataset, in the YOLO txt layout of Ultralytics' exports, at `data.root`:
    `<images_dir>/<split>/<id>.jpg` and `<labels_dir>/<split>/<id>.txt` (defaults "images" and
    "labels"), splits `data.train_split` (partitioned, default "train2017") and
    `data.test_split` (default "val2017"). Class names: the `names:` entry of
    `data.names_file` (a YAML, relative to the root or absolute), or by default the 80 COCO
    classes."""
    params = _checked_partition_params(data_config)
    names_file = data_config.get("names_file", "")
    class_names = None if names_file else sources.COCO_CLASSES
    load = functools.partial(
        sources.yolo_detection,
        pathlib.Path(data_config.root),
        images_dir=data_config.get("images_dir", "images"),
        labels_dir=data_config.get("labels_dir", "labels"),
        config=names_file,
        cache_dir=data_config.get("cache_dir") or None,
    )
    train = load(data_config.get("train_split", "train2017"), class_names=class_names)
    test = load(data_config.get("test_split", "val2017"), class_names=train.class_names)
    return _detection_sources(data_config, seed, train, test, params)


def locate_voc_detection(root: str, year: str = "") -> pathlib.Path:
    """The VOC folder holding Annotations and ImageSets/Main: `root` itself, or
    `root/VOCdevkit/VOC<year>` (with no year: VOC2012, else VOC2007)."""
    path = pathlib.Path(root)
    years = (year,) if year else ("2012", "2007")
    candidates = [path] + [path / "VOCdevkit" / f"VOC{y}" for y in years]
    for candidate in candidates:
        if (candidate / "ImageSets" / "Main").is_dir() and (candidate / "Annotations").is_dir():
            return candidate
    raise FileNotFoundError(
        f"data.root={root!r} holds no PASCAL VOC detection data; must be a VOC folder (with "
        f"Annotations and ImageSets/Main) or a folder holding VOCdevkit/VOC{years[0]}"
    )


def voc_detection_dataset(data_config, seed: int) -> FederatedDataset:
    """PASCAL VOC detection (`sources.voc_detection`) at `data.root`, a VOC folder or one
    holding VOCdevkit/VOC<data.year>: splits of ImageSets/Main, `data.train_split`
    (partitioned, default "trainval") and `data.test_split` (default "test", VOC2007's; VOC2012
    has "val"). Class names are those of every annotation file, sorted: VOC's 20 classes."""
    params = _checked_partition_params(data_config)
    path = locate_voc_detection(data_config.root, str(data_config.get("year", "")))
    cache_dir = data_config.get("cache_dir") or None
    train = sources.voc_detection(
        path, data_config.get("train_split", "trainval"), cache_dir=cache_dir
    )
    test = sources.voc_detection(
        path,
        data_config.get("test_split", "test"),
        class_names=train.class_names,
        cache_dir=cache_dir,
    )
    return _detection_sources(data_config, seed, train, test, params)


def _detection_sources(
    data_config,
    seed: int,
    train: sources.DetectionSource,
    test: sources.DetectionSource,
    params: dict,
) -> FederatedDataset:
    """A dataset of two box sources of mixed image sizes, kept as random-access stores (RGB:
    coco128 has grayscale files), its train split partitioned by its images' box classes."""
    clients = make_partition(
        data_config.partition.name, train.box_labels, data_config.num_clients, seed, **params
    )

    def examples(source):
        return {
            "image": sources.RGBImages(source.images),
            "boxes": source.boxes,
            "box_labels": source.box_labels,
        }

    return FederatedDataset(
        name=data_config.name,
        train=examples(train),
        test=examples(test),
        clients=tuple(clients),
        num_classes=train.num_classes,
        class_names=train.class_names,
        label_key="box_labels",
        task="detection",
    )


def shapes_detection_dataset(data_config, seed: int) -> FederatedDataset:
    """The embedded `shapes` data as boxes: 1 to `data.max_shapes` (default 4) shapes an
    image, of `data.num_classes` classes, none touching another, each framed by its box
    (normalised yxyx, tight around its pixels). Partitioned by the classes of each image's
    boxes (lda_multilabel, fedcv_detection, iid, ...).

    As in `shapes_segmentation_dataset`, the geometry (which does not depend on the styles)
    is rendered once in a single style to decide the partition, then the images again in
    their clients' styles; the test split mixes all styles.
    """
    num_classes = data_config.num_classes
    max_shapes = _max_shapes(data_config, default=4)
    params = _checked_partition_params(data_config)
    rng = np.random.default_rng([seed, 0xDE7EC7])
    num_train = data_config.num_train_examples
    labels = rng.integers(0, num_classes, num_train + data_config.num_test_examples)
    test_styles = rng.integers(0, data_config.num_clients, len(labels) - num_train)
    render = dict(
        seed=seed,
        image_size=data_config.image_size,
        num_classes=num_classes,
        max_shapes=max_shapes,
        overlap=False,
    )
    plain = shapes.render(labels, np.zeros(len(labels), np.int64), **render)
    _, plain_labels = _shape_boxes(plain)
    clients = tuple(
        make_partition(
            data_config.partition.name,
            plain_labels[:num_train],
            data_config.num_clients,
            seed,
            **params,
        )
    )
    styles = np.zeros(len(labels), np.int64)
    for k, members in enumerate(clients):
        styles[members] = k
    styles[num_train:] = test_styles
    styled = shapes.render(labels, styles, **render)
    boxes, box_labels = _shape_boxes(styled)
    return FederatedDataset(
        name=data_config.name,
        train={
            "image": styled.images[:num_train],
            "boxes": boxes[:num_train],
            "box_labels": box_labels[:num_train],
        },
        test={
            "image": styled.images[num_train:],
            "boxes": boxes[num_train:],
            "box_labels": box_labels[num_train:],
        },
        clients=clients,
        num_classes=num_classes,
        class_names=shapes.SHAPE_NAMES[:num_classes],
        label_key="box_labels",
        task="detection",
    )


def _shape_boxes(rendered: shapes.ShapesImages) -> tuple[tuple[np.ndarray, ...], ...]:
    """Per-image boxes [k, 4] (normalised yxyx) and classes [k] of the shapes drawn."""
    boxes = augment.xyxy_to_yxyx(rendered.boxes)
    kept = rendered.box_mask
    return (
        tuple(b[m].astype(np.float32) for b, m in zip(boxes, kept, strict=True)),
        tuple(c[m].astype(np.int32) for c, m in zip(rendered.box_classes, kept, strict=True)),
    )


def _max_shapes(data_config, default: int) -> int:
    max_shapes = data_config.get("max_shapes", default)
    if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
        raise ValueError(
            f"data.max_shapes={max_shapes!r} is not allowed; must be a positive integer"
        )
    return max_shapes


# --------------------------------------------------------------------------- segmentation


def _checked_partition_params(data_config) -> dict:
    """`partition_params`, with the name and alpha checked before any data is read or made."""
    params = partition_params(data_config.partition)
    partition_lib.check_params(data_config.partition.name, params)
    return params


def _mask_clients(
    data_config, label_counts: np.ndarray, seed: int, params: dict, background: int | None
) -> tuple[np.ndarray, ...]:
    """The train split's clients, by the masks' dominant class or classes present
    (`partition.mask_labels`, which also says how `background` counts)."""
    name = data_config.partition.name
    labels = partition_lib.mask_labels(label_counts, name, background=background)
    return tuple(make_partition(name, labels, data_config.num_clients, seed, **params))


def shapes_segmentation_dataset(data_config, seed: int) -> FederatedDataset:
    """The embedded `shapes` data as masks: class 0 is the background, class c + 1 the shape c
    of `data.num_classes` shapes, up to `data.max_shapes` (default 3) shapes an image.

    As in `shapes_dataset`, the train split is partitioned before it is painted in each
    client's style, and the test split mixes all styles. A mask does not depend on the style
    (styles only colour pixels), so the masks rendered once in a single style decide the
    partition, and the images are rendered again in their clients' styles.
    """
    num_shapes = data_config.num_classes
    max_shapes = _max_shapes(data_config, default=3)
    params = _checked_partition_params(data_config)
    rng = np.random.default_rng([seed, 0x5E6A5C])
    num_train = data_config.num_train_examples
    labels = rng.integers(0, num_shapes, num_train + data_config.num_test_examples)
    test_styles = rng.integers(0, data_config.num_clients, len(labels) - num_train)
    # Train and test in one render: one random stream, so no test image repeats the geometry
    # of a train image (render seeds its stream by the number of images).
    render = dict(
        seed=seed, image_size=data_config.image_size, num_classes=num_shapes, max_shapes=max_shapes
    )
    plain = shapes.render(labels, np.zeros(len(labels), np.int64), **render)
    num_classes = num_shapes + 1
    train_counts = mask_label_counts(plain.masks[:num_train], num_classes)
    clients = _mask_clients(data_config, train_counts, seed, params, background=0)
    styles = np.zeros(len(labels), np.int64)
    for k, members in enumerate(clients):
        styles[members] = k
    styles[num_train:] = test_styles
    styled = shapes.render(labels, styles, **render)
    return FederatedDataset(
        name=data_config.name,
        train={"image": styled.images[:num_train], "mask": styled.masks[:num_train]},
        test={"image": styled.images[num_train:], "mask": styled.masks[num_train:]},
        clients=clients,
        num_classes=num_classes,
        class_names=("background",) + shapes.SHAPE_NAMES[:num_shapes],
        label_key="mask",
        task="segmentation",
        label_counts=train_counts,
    )


def mask_label_counts(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [N, num_classes]: pixels of each class in each of masks [N, H, W], ignore
    pixels (any value >= num_classes) excluded."""
    masks = np.asarray(masks).reshape(len(masks), -1).astype(np.int64)
    offsets = np.arange(len(masks))[:, None] * (num_classes + 1)
    ids = np.minimum(masks, num_classes) + offsets  # values >= num_classes: one spare bin
    counts = np.bincount(ids.ravel(), minlength=len(masks) * (num_classes + 1))
    return counts.reshape(len(masks), num_classes + 1)[:, :num_classes]


def _source_dataset(
    data_config,
    seed: int,
    train: sources.SegmentationSource,
    test: sources.SegmentationSource,
    params: dict,
    background: int | None,
) -> FederatedDataset:
    """A dataset of two mask sources of mixed image sizes, kept as random-access stores."""
    return FederatedDataset(
        name=data_config.name,
        train={"image": sources.RGBImages(train.images), "mask": train.masks},
        test={"image": sources.RGBImages(test.images), "mask": test.masks},
        clients=_mask_clients(data_config, train.label_counts, seed, params, background),
        num_classes=train.num_classes,
        class_names=train.class_names,
        label_key="mask",
        task="segmentation",
        label_counts=train.label_counts,
    )


def coco128_segmentation_dataset(data_config, seed: int) -> FederatedDataset:
    """coco128's panoptic masks (`sources.mask_segmentation`): sparse COCO ids made
    contiguous; the unlabeled value 0 becomes the ignore label, or class 0 "background" with
    `data.unlabeled="background"`. train2017 is partitioned, val2017 is the test split."""
    unlabeled = data_config.get("unlabeled", "ignore")
    if unlabeled not in ("ignore", "background"):
        raise ValueError(
            f"data.unlabeled={unlabeled!r} is not allowed; must be 'ignore' or 'background'"
        )
    params = _checked_partition_params(data_config)
    path = locate(data_config.root, "coco128")
    cache_dir = data_config.get("cache_dir") or None
    names = sources.read_yaml_class_names(path / "semantic_segmentation" / "config.yaml", "classes")
    load = dict(unlabeled=unlabeled, class_names=names, cache_dir=cache_dir)
    train = sources.mask_segmentation(path, "train2017", **load)
    test = sources.mask_segmentation(path, "val2017", **load)
    background = 0 if unlabeled == "background" else None
    return _source_dataset(data_config, seed, train, test, params, background)


VOC_TRAIN_SPLITS = ("train", "trainaug")


def locate_voc(root: str) -> pathlib.Path:
    """The VOC2012 folder: `root` itself, or `root/VOCdevkit/VOC2012`."""
    path = pathlib.Path(root)
    for candidate in (path, path / "VOCdevkit" / "VOC2012"):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise FileNotFoundError(
        f"data.root={root!r} holds no PASCAL VOC 2012 segmentation data; must be the VOC2012 "
        "folder (with ImageSets/Segmentation) or a folder holding VOCdevkit/VOC2012"
    )


def voc_segmentation_dataset(data_config, seed: int) -> FederatedDataset:
    """PASCAL VOC 2012 segmentation (`sources.voc_segmentation`), 21 classes with background
    0: `data.train_split` ("train", 1,464 images, or "trainaug", the 10,582 of VOC + SBD that
    FedCV trains on) is partitioned, "val" is the test split."""
    train_split = data_config.get("train_split", "train")
    if train_split not in VOC_TRAIN_SPLITS:
        raise ValueError(
            f"data.train_split={train_split!r} is not allowed; must be one of "
            f"{', '.join(VOC_TRAIN_SPLITS)}"
        )
    params = _checked_partition_params(data_config)
    path = locate_voc(data_config.root)
    cache_dir = data_config.get("cache_dir") or None
    train = sources.voc_segmentation(path, train_split, cache_dir=cache_dir)
    test = sources.voc_segmentation(path, "val", cache_dir=cache_dir)
    return _source_dataset(data_config, seed, train, test, params, background=0)


DATASETS: dict[str, DatasetBuilder] = {
    "coco128": detection_dataset,
    "bccd": detection_dataset,
    "coco_detection": coco_detection_dataset,
    "voc_detection": voc_detection_dataset,
    "shapes": shapes_dataset,
    "shapes_detection": shapes_detection_dataset,
    "shapes_segmentation": shapes_segmentation_dataset,
    "coco128_segmentation": coco128_segmentation_dataset,
    "voc_segmentation": voc_segmentation_dataset,
    "cifar10": image_folder_dataset,
    "mnist": image_folder_dataset,
    "image_folder": image_folder_dataset,
}


# `data` keys outside the base config that some builders above read (`data_config.get`).
EXTRA_FIELDS = (
    "cache_dir",
    "images_dir",
    "labels_dir",
    "max_shapes",
    "names_file",
    "test_split",
    "train_split",
    "unlabeled",
    "year",
)


def build_dataset(data_config, seed: int) -> FederatedDataset:
    if data_config.name not in DATASETS:
        raise ValueError(
            f"data.name={data_config.name!r} is unknown; known: {', '.join(sorted(DATASETS))}"
        )
    with cache_lib.all_or_nothing():  # a dataset that fails to load leaves no cache entry
        return DATASETS[data_config.name](data_config, seed)
