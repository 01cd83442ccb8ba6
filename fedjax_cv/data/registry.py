"""Datasets by name: `build_dataset(config.data, seed)` -> FederatedDataset."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np

from fedjax_cv.data import shapes
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


DATASETS: dict[str, DatasetBuilder] = {"shapes": shapes_dataset}


def build_dataset(data_config, seed: int) -> FederatedDataset:
    if data_config.name not in DATASETS:
        raise ValueError(
            f"data.name={data_config.name!r} is unknown; known: {', '.join(sorted(DATASETS))}"
        )
    return DATASETS[data_config.name](data_config, seed)
