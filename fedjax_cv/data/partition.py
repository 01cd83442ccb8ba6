"""Federated partitions of a labelled split, and the statistics that describe them.

A partitioner is a pure function of the labels, the number of clients and a seed; it returns
one index array per client into the split, and every example lands in exactly one client.
Partitioners resolve by name through `PARTITIONERS`. Labels are either one integer per example
(classification) or one integer array per example (the box classes of a detection image, the
classes present in a segmentation mask): "multi-label" below.

A `Partition` records a partition with its seed, parameters and statistics, and round-trips
exactly through `partition.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Partitioner = Callable[..., list[np.ndarray]]
Labels = np.ndarray | Sequence[np.ndarray] | Sequence[int]


# --------------------------------------------------------------------------- validation


def _check_common(labels: Labels, num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients <= 0:
        raise ValueError(
            f"data.num_clients={num_clients!r} is not allowed; must be a positive integer"
        )
    if num_clients > len(labels):
        raise ValueError(
            f"data.num_clients={num_clients} is more than the {len(labels)} examples to split; "
            "must be at most the number of examples"
        )


def _check_alpha(alpha: float) -> None:
    if not _is_real(alpha) or not 0 < alpha < math.inf:
        raise ValueError(f"data.partition.alpha={alpha!r} is not allowed; must be > 0")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive_int(value: Any, field: str, upper: int | None = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(
            f"data.partition.{field}={value!r} is not allowed; must be a positive integer"
        )
    if upper is not None and value > upper:
        raise ValueError(
            f"data.partition.{field}={value!r} is not allowed; must be at most {upper}{why}"
        )


def is_multilabel(labels: Labels) -> bool:
    """True for one label array per example, False for one integer per example."""
    if isinstance(labels, np.ndarray):
        return labels.dtype == object
    return len(labels) > 0 and np.ndim(labels[0]) > 0


def _single_labels(labels: Labels, name: str) -> np.ndarray:
    if is_multilabel(labels):
        raise ValueError(
            f"data.partition.name={name!r} needs one label per example; for multi-label "
            "(detection, segmentation) data use lda_multilabel or fedcv_detection"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or np.any(labels < 0):
        raise ValueError(
            f"labels of dtype {labels.dtype} and shape {labels.shape} are not allowed for "
            f"{name!r}; must be one non-negative integer per example"
        )
    return labels


def _label_sets(labels: Labels) -> list[np.ndarray]:
    """The distinct classes of each example, sorted."""
    if not is_multilabel(labels):
        return [np.asarray([label], np.int64) for label in _single_labels(labels, "labels")]
    sets = [np.unique(np.asarray(example, np.int64)) for example in labels]
    if any(len(s) and s[0] < 0 for s in sets):
        raise ValueError("labels contain a negative class id; must be non-negative integers")
    return sets


# --------------------------------------------------------------------------- partitioners


def iid(labels: Labels, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffles the examples and deals them into `num_clients` near-equal parts."""
    _check_common(labels, num_clients)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    alpha: float,
    client_size: int | None = None,
    class_prior: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """Hsu, Qi and Brown (2019, 2020), appendix B.1.

    Client k draws q_k ~ Dir(alpha * p), p the class prior (the split's label frequencies by
    default), then draws `client_size` examples one class at a time from q_k without
    replacement. A class exhausted along the way is removed and q_k renormalised over the rest.
    Large alpha gives identical clients; alpha -> 0 gives one class per client.
    """
    labels = _single_labels(labels, "dirichlet")
    _check_common(labels, num_clients)
    _check_alpha(alpha)
    num_classes = int(labels.max()) + 1
    if client_size is None:
        client_size = len(labels) // num_clients
    if client_size <= 0 or client_size * num_clients > len(labels):
        raise ValueError(
            f"data.partition.client_size={client_size!r} is not allowed; must be in "
            f"[1, {len(labels) // num_clients}] for {num_clients} clients of {len(labels)} examples"
        )
    counts = np.bincount(labels, minlength=num_classes)
    prior = counts / counts.sum() if class_prior is None else np.asarray(class_prior, float)
    if prior.shape != (num_classes,) or np.any(prior < 0) or not np.isclose(prior.sum(), 1.0):
        raise ValueError(
            f"data.partition.class_prior has shape {prior.shape} or does not sum to 1; "
            f"must be {num_classes} non-negative numbers summing to 1"
        )
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    taken = np.zeros(num_classes, dtype=np.int64)
    # Dir(alpha * p) with tiny alpha underflows to all-zero draws; the floor keeps q_k a
    # distribution without changing it measurably.
    concentration = np.maximum(alpha * prior, 1e-300)
    clients = []
    for _ in range(num_clients):
        q = rng.dirichlet(concentration)
        want = np.zeros(num_classes, dtype=np.int64)
        remaining = client_size
        while remaining > 0:
            available = counts - taken - want
            weights = np.where(available > 0, q, 0.0)
            if weights.sum() <= 0:  # q_k has no mass left on available classes
                weights = (available > 0).astype(float)
            draws = rng.multinomial(remaining, weights / weights.sum())
            granted = np.minimum(draws, available)
            want += granted
            remaining -= int(granted.sum())
        parts = [pools[c][taken[c] : taken[c] + want[c]] for c in range(num_classes)]
        taken += want
        clients.append(np.sort(np.concatenate(parts)))
    return clients


def lda(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    alpha: float,
    min_client_size: int = 10,
    balance: bool = True,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """The LDA partition of FedML and FedCV (He et al. 2020, 2021), after Yurochkin et al. 2019.

    Each class in turn is split over all clients by proportions ~ Dir(alpha * 1), so client
    sizes vary. As in FedML, a client already holding n / num_clients examples gets no share of
    later classes (`balance`), and the whole draw is repeated until every client holds at
    least `min_client_size` examples.
    """
    labels = _single_labels(labels, "lda")
    _check_common(labels, num_clients)
    _check_alpha(alpha)
    groups = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    return _split_groups(groups, num_clients, seed, alpha, min_client_size, balance, max_attempts)


def lda_multilabel(
    annotations: Labels,
    num_clients: int,
    seed: int,
    alpha: float,
    min_client_size: int = 10,
    balance: bool = True,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """LDA for multi-label data (detection boxes, segmentation masks): `lda` over primary classes.

    An image's primary class is the rarest of its classes (fewest images in the split), so
    rare classes concentrate on few clients instead of vanishing under common ones; images
    without labels form a group of their own. Ties and group order are resolved by the sets
    of images a class appears in, never by class ids, so renaming classes changes nothing.
    """
    sets = _label_sets(annotations)
    _check_common(sets, num_clients)
    _check_alpha(alpha)
    primary = _rarest_class(sets)
    groups: dict[int, list[int]] = {}
    for index, cls in enumerate(primary):
        groups.setdefault(int(cls), []).append(index)
    # Each group's first image is unique to it: an order that knows nothing of class ids.
    ordered = sorted((np.asarray(g) for g in groups.values()), key=lambda g: int(g[0]))
    return _split_groups(ordered, num_clients, seed, alpha, min_client_size, balance, max_attempts)


def _rarest_class(sets: Sequence[np.ndarray]) -> np.ndarray:
    """Each image's rarest class, -1 for none, ranked by (frequency, images containing it)."""
    images_of: dict[int, list[int]] = {}
    for index, classes in enumerate(sets):
        for cls in classes:
            images_of.setdefault(int(cls), []).append(index)
    # Classes with equal keys appear in exactly the same images, so whichever wins, the
    # images grouped together are the same.
    ranking = sorted(images_of, key=lambda c: (len(images_of[c]), images_of[c]))
    rank = {cls: r for r, cls in enumerate(ranking)}
    return np.asarray(
        [min(s.tolist(), key=rank.__getitem__) if len(s) else -1 for s in sets], np.int64
    )


def _split_groups(
    groups: Sequence[np.ndarray],
    num_clients: int,
    seed: int,
    alpha: float,
    min_client_size: int,
    balance: bool,
    max_attempts: int,
) -> list[np.ndarray]:
    num_examples = sum(len(g) for g in groups)
    _check_positive_int(
        min_client_size,
        "min_client_size",
        num_examples // num_clients,
        f" ({num_examples} examples over {num_clients} clients)",
    )
    _check_positive_int(max_attempts, "max_attempts")
    rng = np.random.default_rng(seed)
    fair_share = num_examples / num_clients
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, np.int64)
        for group in groups:
            members = rng.permutation(group)
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            if balance:
                proportions = proportions * (sizes < fair_share)
            if not np.all(np.isfinite(proportions)) or proportions.sum() <= 0:
                # Tiny alpha can underflow every share to 0: give the group to one open client.
                open_clients = (
                    np.flatnonzero(sizes < fair_share) if balance else np.arange(num_clients)
                )
                proportions = np.zeros(num_clients)
                proportions[rng.choice(open_clients)] = 1.0
            cuts = (np.cumsum(proportions / proportions.sum()) * len(members)).astype(np.int64)
            for client, part in enumerate(np.split(members, cuts[:-1])):
                parts[client].append(part)
                sizes[client] += len(part)
        if sizes.min() >= min_client_size:
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise ValueError(
        f"data.partition.min_client_size={min_client_size} was not reached by any of "
        f"{max_attempts} draws at alpha={alpha}; must be smaller, or alpha larger"
    )


def shards(
    labels: np.ndarray, num_clients: int, seed: int, shards_per_client: int = 2
) -> list[np.ndarray]:
    """McMahan et al. (2017): sort by label, cut into num_clients * shards_per_client shards of
    (near) equal size, and give each client `shards_per_client` shards at random."""
    labels = _single_labels(labels, "shards")
    _check_common(labels, num_clients)
    _check_positive_int(
        shards_per_client,
        "shards_per_client",
        len(labels) // num_clients,
        f" ({len(labels)} examples over {num_clients} clients)",
    )
    num_shards = num_clients * shards_per_client
    pieces = np.array_split(np.argsort(labels, kind="stable"), num_shards)
    deal = np.random.default_rng(seed).permutation(num_shards).reshape(num_clients, -1)
    return [np.sort(np.concatenate([pieces[s] for s in hand])) for hand in deal]


def lognormal(labels: Labels, num_clients: int, seed: int, sigma: float = 1.0) -> list[np.ndarray]:
    """Size imbalance with IID labels: client sizes proportional to LogNormal(0, sigma) draws.

    Every client gets at least one example; sigma = 0 gives equal sizes.
    """
    _check_common(labels, num_clients)
    if not _is_real(sigma) or not 0 <= sigma < math.inf:
        raise ValueError(f"data.partition.sigma={sigma!r} is not allowed; must be >= 0")
    rng = np.random.default_rng(seed)
    sizes = _apportion(len(labels), rng.lognormal(0.0, float(sigma), num_clients))
    order = rng.permutation(len(labels))
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Sizes summing to `total`, each >= 1, proportional to `weights` (largest remainder)."""
    extra = total - len(weights)
    shares = weights / weights.sum() * extra
    sizes = np.floor(shares).astype(np.int64)
    leftover = extra - int(sizes.sum())
    sizes[np.argsort(-(shares - sizes), kind="stable")[:leftover]] += 1
    return sizes + 1


def fedcv_detection(annotations: Labels, num_clients: int, seed: int) -> list[np.ndarray]:
    """The object-detection partition of FedCV (He et al. 2021, App. 7.1.2; `non_iid_coco`).

    Greedy by object frequency: each of the first num_clients - 1 clients in turn takes every
    remaining image that shows the class present in the most remaining images; the last
    client takes what is left, images without boxes included. The rule is deterministic: the
    seed only breaks ties between equally frequent classes.

    Each client takes every image of its class, so the number of clients is bounded by the
    classes and how they co-occur: on BCCD, whose white blood cell shows in 204 of its 205
    train images, the first client takes 204 images and a third client gets none. Data of few,
    ubiquitous classes needs `lda_multilabel` for more clients.
    """
    sets = _label_sets(annotations)
    _check_common(sets, num_clients)
    num_classes = max((int(s[-1]) + 1 for s in sets if len(s)), default=0)
    incidence = np.zeros((len(sets), max(num_classes, 1)), bool)
    for index, classes in enumerate(sets):
        incidence[index, classes] = True
    counts = incidence.sum(axis=0)
    remaining = np.ones(len(sets), bool)
    rng = np.random.default_rng(seed)
    clients = []
    for client in range(num_clients - 1):
        if counts.max() == 0:
            raise ValueError(
                f"data.num_clients={num_clients} is too many for fedcv_detection: after "
                f"{client} clients no remaining image has a box; must be at most {client + 1}, or "
                "data.partition.name='lda_multilabel'"
            )
        tied = np.flatnonzero(counts == counts.max())
        chosen = tied[rng.integers(len(tied))] if len(tied) > 1 else tied[0]
        taken = remaining & incidence[:, chosen]
        counts -= incidence[taken].sum(axis=0)
        remaining &= ~taken
        clients.append(np.flatnonzero(taken))
    if not remaining.any():
        raise ValueError(
            f"data.num_clients={num_clients} is too many for fedcv_detection: the last client "
            f"would be empty; must be at most {num_clients - 1}, or "
            "data.partition.name='lda_multilabel'"
        )
    clients.append(np.flatnonzero(remaining))
    return clients


def natural(
    labels: Labels, num_clients: int, seed: int, client_ids: Sequence[Any] | np.ndarray
) -> list[np.ndarray]:
    """The clients the data came with (a user id per example, as in GLD-23k, Hsu et al. 2020).

    Client k holds the examples of the k-th distinct id in order of first appearance. The
    seed is unused: this partition belongs to the data.
    """
    del seed
    client_ids = np.asarray(client_ids)
    if client_ids.shape != (len(labels),):
        raise ValueError(
            f"data.partition.client_ids has shape {client_ids.shape}; must have one id per "
            f"example ({len(labels)})"
        )
    unique, first, inverse = np.unique(client_ids, return_index=True, return_inverse=True)
    if isinstance(num_clients, bool) or num_clients != len(unique):
        raise ValueError(
            f"data.num_clients={num_clients!r} does not match the data; must be {len(unique)}, "
            "the number of distinct client ids"
        )
    rank = np.empty(len(unique), np.int64)
    rank[np.argsort(first)] = np.arange(len(unique))
    client_of = rank[inverse.reshape(-1)]
    order = np.argsort(client_of, kind="stable")
    return np.split(order, np.cumsum(np.bincount(client_of, minlength=len(unique)))[:-1])


PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "lda": lda,
    "lda_multilabel": lda_multilabel,
    "shards": shards,
    "lognormal": lognormal,
    "fedcv_detection": fedcv_detection,
    "natural": natural,
}


def make_partition(name: str, labels: Labels, num_clients: int, seed: int, **params):
    """Resolves the partitioner `name` and applies it."""
    if name not in PARTITIONERS:
        raise ValueError(
            f"data.partition.name={name!r} is unknown; known: {', '.join(sorted(PARTITIONERS))}"
        )
    return PARTITIONERS[name](labels, num_clients, seed, **params)


# --------------------------------------------------------------------------- statistics


def label_histograms(labels: Labels, clients: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Counts of each class on each client: [num_clients, num_classes].

    Multi-label data counts every label (every box of a detection image).
    """
    if not is_multilabel(labels):
        labels = np.asarray(labels)
        return np.stack([np.bincount(labels[idx], minlength=num_classes) for idx in clients])
    return np.stack(
        [
            np.bincount(
                np.concatenate(
                    [np.asarray(labels[i], np.int64).ravel() for i in idx] + [[]]
                ).astype(np.int64),
                minlength=num_classes,
            )
            for idx in clients
        ]
    )


def mean_emd(histograms: np.ndarray) -> float:
    """Non-identicalness of Hsu et al. (2019): sum_k n_k/n * ||q_k - p||_1.

    q_k is client k's label distribution and p the population's; 0 for identical clients,
    at most 2.
    """
    histograms = np.asarray(histograms, dtype=np.float64)
    sizes = histograms.sum(axis=1)
    population = histograms.sum(axis=0) / sizes.sum()
    q = histograms / np.maximum(sizes, 1)[:, None]
    return float(np.sum(sizes / sizes.sum() * np.abs(q - population).sum(axis=1)))


@dataclasses.dataclass(frozen=True)
class PartitionStats:
    """What `partition.json` reports about a partition.

    num_boxes (total) and client_num_boxes are set for detection data only; there the class
    histograms and mean_emd count boxes.
    """

    num_examples: int
    client_sizes: tuple[int, ...]
    mean_emd: float
    class_histograms: tuple[tuple[int, ...], ...]  # [num_clients][num_classes]
    num_boxes: int | None = None
    client_num_boxes: tuple[int, ...] | None = None

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    @property
    def num_classes(self) -> int:
        return len(self.class_histograms[0]) if self.class_histograms else 0

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {k: _to_lists(v) for k, v in fields.items() if v is not None}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PartitionStats:
        return cls(
            num_examples=int(obj["num_examples"]),
            client_sizes=tuple(int(v) for v in obj["client_sizes"]),
            mean_emd=float(obj["mean_emd"]),
            class_histograms=tuple(tuple(int(v) for v in row) for row in obj["class_histograms"]),
            num_boxes=None if obj.get("num_boxes") is None else int(obj["num_boxes"]),
            client_num_boxes=(
                None
                if obj.get("client_num_boxes") is None
                else tuple(int(v) for v in obj["client_num_boxes"])
            ),
        )


def partition_stats(
    labels: Labels,
    clients: Sequence[np.ndarray],
    num_classes: int | None = None,
    count_boxes: bool = False,
    histograms: np.ndarray | None = None,
) -> PartitionStats:
    """Sizes, class histograms and mean EMD of `clients`; box counts when `count_boxes`.

    `histograms` [num_clients, num_classes], when given, are the class counts to report
    instead of counting `labels` (pixel counts of segmentation masks).
    """
    if histograms is None:
        multilabel = is_multilabel(labels)
        if num_classes is None:
            flat = (
                [int(np.max(x)) for x in labels if np.size(x)]
                if multilabel
                else [int(np.max(labels))]
            )
            num_classes = max(flat, default=-1) + 1
        histograms = label_histograms(labels, clients, num_classes)
    box_counts = None
    if count_boxes:
        if not is_multilabel(labels):
            raise ValueError("count_boxes needs multi-label data: the box classes of each image")
        per_image = np.asarray([np.size(x) for x in labels], np.int64)
        box_counts = tuple(int(per_image[idx].sum()) for idx in clients)
    return PartitionStats(
        num_examples=int(sum(len(idx) for idx in clients)),
        client_sizes=tuple(len(idx) for idx in clients),
        mean_emd=mean_emd(histograms) if histograms.sum() else 0.0,
        class_histograms=tuple(tuple(int(v) for v in row) for row in histograms),
        num_boxes=None if box_counts is None else int(sum(box_counts)),
        client_num_boxes=box_counts,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Partition:
    """A partition with what made it (name, seed, scalar parameters) and its statistics."""

    name: str
    seed: int
    clients: tuple[np.ndarray, ...]
    stats: PartitionStats
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return (
            (self.name, self.seed, dict(self.params), self.stats)
            == (other.name, other.seed, dict(other.params), other.stats)
            and len(self.clients) == len(other.clients)
            and all(np.array_equal(a, b) for a, b in zip(self.clients, other.clients, strict=True))
        )

    __hash__ = None  # equal partitions may hold different array objects

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "params": dict(self.params),
            "clients": [np.asarray(c).tolist() for c in self.clients],
            "stats": self.stats.to_json(),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Partition:
        return cls(
            name=str(obj.get("name", "")),
            seed=int(obj["seed"]),
            clients=tuple(np.asarray(c, np.int64) for c in obj["clients"]),
            stats=PartitionStats.from_json(obj["stats"]),
            params=dict(obj.get("params", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Writes `path` (or `path/partition.json` for a folder) atomically; returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "partition.json"
        staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        staging.write_text(json.dumps(self.to_json()))
        os.replace(staging, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Partition:
        path = Path(path)
        if path.is_dir():
            path = path / "partition.json"
        return cls.from_json(json.loads(path.read_text()))


def create_partition(
    name: str,
    labels: Labels,
    num_clients: int,
    seed: int,
    *,
    num_classes: int | None = None,
    count_boxes: bool = False,
    **params: Any,
) -> Partition:
    """`make_partition` plus statistics, as a `Partition` ready to save.

    Array-valued parameters (the client ids of `natural`) are left out of the record; the
    client index lists already hold the partition.
    """
    clients = make_partition(name, labels, num_clients, seed, **params)
    return Partition(
        name=name,
        seed=int(seed),
        clients=tuple(np.asarray(c, np.int64) for c in clients),
        stats=partition_stats(labels, clients, num_classes, count_boxes),
        params={k: v for k, v in params.items() if _is_json_scalar(v)},
    )


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_lists(v) for v in value]
    return value


# --------------------------------------------------------------------------- segmentation labels

# Partitioners that read every class of an example rather than one label per example.
MULTILABEL_PARTITIONERS = ("lda_multilabel", "fedcv_detection")


def mask_labels(label_counts: np.ndarray, name: str, background: int | None = None) -> Labels:
    """The labels that partitioner `name` takes, from segmentation masks' pixel counts.

    `label_counts` [num_examples, num_classes] holds each mask's pixels of every class, ignore
    pixels excluded. Multi-label partitioners (`MULTILABEL_PARTITIONERS`) get the classes
    present in each mask, as FedCV's LDA for segmentation does (He et al. 2021, §6.2); the
    others get each mask's dominant class, the one with the most pixels (ties: lowest id).

    The `background` class (an id, or None for data without one) counts only in masks that
    show nothing else: it covers most pixels of nearly every image (about 70% in PASCAL VOC),
    so as a candidate it would be almost every mask's dominant class and the class present in
    the most masks, and a label partition would degenerate to a partition of sizes. A mask
    without any labelled pixel has no class present and the dominant class `num_classes`, a
    group of its own.
    """
    counts = np.asarray(label_counts, np.int64)
    if counts.ndim != 2 or np.any(counts < 0):
        raise ValueError(
            f"label_counts of shape {counts.shape} is not allowed; must be non-negative pixel "
            "counts [num_examples, num_classes]"
        )
    num_classes = counts.shape[1]
    candidates = counts
    if background is not None:
        if not 0 <= background < num_classes:
            raise ValueError(
                f"background={background!r} is not a class id; must be in [0, {num_classes - 1}]"
            )
        others = np.delete(counts, background, axis=1).sum(axis=1)
        candidates = counts.copy()
        candidates[others > 0, background] = 0
    if name in MULTILABEL_PARTITIONERS:
        return [np.flatnonzero(row).astype(np.int32) for row in candidates]
    dominant = np.argmax(candidates, axis=1).astype(np.int32)
    return np.where(candidates.sum(axis=1) > 0, dominant, num_classes).astype(np.int32)


def check_params(name: str, params: Mapping[str, Any]) -> None:
    """Fails on an unknown partitioner or a bad `alpha` before any data is read for it."""
    if name not in PARTITIONERS:
        raise ValueError(
            f"data.partition.name={name!r} is unknown; known: {', '.join(sorted(PARTITIONERS))}"
        )
    if "alpha" in params:
        _check_alpha(params["alpha"])
