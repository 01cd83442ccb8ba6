"""A federated dataset: a train split cut into clients, and a held-out test split."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from fedjax_cv.data import partition as partition_lib


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
    """Examples as dicts of random-access sequences (arrays, or per-image tuples of box
    arrays); `clients[k]` indexes `train`."""

    name: str
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    clients: tuple[np.ndarray, ...]
    num_classes: int
    class_names: tuple[str, ...] = ()
    label_key: str = "label"  # per-image box classes for detection data, masks for segmentation
    task: str = "classification"  # the task plug-in that trains on it (fedjax_cv.tasks)
    # [num_train, num_classes] label counts of each train example when `train[label_key]` is
    # not a class id or a list of them (pixels of each class for masks); None: counted from it.
    label_counts: np.ndarray | None = None

    @property
    def client_sizes(self) -> np.ndarray:
        return np.array([len(c) for c in self.clients], np.int64)

    @functools.cached_property
    def label_histograms(self) -> np.ndarray:
        """[num_clients, num_classes] label counts of the train split."""
        if self.label_counts is not None:
            counts = np.asarray(self.label_counts, np.int64)
            return np.stack([counts[idx].sum(axis=0) for idx in self.clients])
        return partition_lib.label_histograms(
            self.train[self.label_key], self.clients, self.num_classes
        )

    def class_prior(self) -> np.ndarray:
        """The label distribution of the union of all clients (FedIR's p)."""
        counts = self.label_histograms.sum(axis=0).astype(np.float64)
        return counts / counts.sum()

    def partition(
        self, name: str, seed: int, params: dict | None = None
    ) -> partition_lib.Partition:
        """The train split's partition with its statistics, ready to save as partition.json."""
        stats = partition_lib.partition_stats(
            None if self.label_counts is not None else self.train[self.label_key],
            self.clients,
            self.num_classes,
            count_boxes=self.task == "detection",
            histograms=None if self.label_counts is None else self.label_histograms,
        )
        return partition_lib.Partition(
            name=name, seed=seed, clients=self.clients, stats=stats, params=dict(params or {})
        )
