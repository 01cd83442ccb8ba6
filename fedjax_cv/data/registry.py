"""Datasets by name: `build_dataset(config.data, seed)` -> FederatedDataset."""

from __future__ import annotations

import inspect
import pathlib
from collections.abc import Callable

import numpy as np

from fedjax_cv.data import shapes, sources
from fedjax_cv.data.federated import FederatedDataset
from fedjax_cv.data.partition import PARTITIONERS, make_partition

DatasetBuilder = Callable[..., FederatedDataset]


def partition_params(partition_config) -> dict:
    """The keyword arguments of `data.partition` that its partitioner takes.

    Every config carries `alpha`; partitioners without that parameter simply ignore it.
    """
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
    clients = make_partition(
        data_config.partition.name,
        train.labels,
        data_config.num_clients,
        seed,
        **partition_params(data_config.partition),
    )
    return FederatedDataset(
        name=data_config.name,
        train={"image": train.images.stacked(), "label": train.labels},
        test={"image": test.images.stacked(), "label": test.labels},
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
    path = locate(data_config.root, folder)
    cache_dir = data_config.get("cache_dir") or None
    train = load(path, train_split, cache_dir=cache_dir)
    test = load(path, test_split, class_names=train.class_names, cache_dir=cache_dir)
    clients = make_partition(
        data_config.partition.name,
        train.box_labels,
        data_config.num_clients,
        seed,
        **partition_params(data_config.partition),
    )

    def examples(source):
        return {"image": source.images, "boxes": source.boxes, "box_labels": source.box_labels}

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


DATASETS: dict[str, DatasetBuilder] = {
    "coco128": detection_dataset,
    "bccd": detection_dataset,
    "shapes": shapes_dataset,
    "cifar10": image_folder_dataset,
    "mnist": image_folder_dataset,
    "image_folder": image_folder_dataset,
}


def build_dataset(data_config, seed: int) -> FederatedDataset:
    if data_config.name not in DATASETS:
        raise ValueError(
            f"data.name={data_config.name!r} is unknown; known: {', '.join(sorted(DATASETS))}"
        )
    return DATASETS[data_config.name](data_config, seed)
