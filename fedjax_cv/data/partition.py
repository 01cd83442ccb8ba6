"""Federated partitions of a labelled split, and the statistics that describe them.

A partitioner is a pure function of the labels, the number of clients and a seed; it returns
one index array per client into the split. Partitioners resolve by name through `PARTITIONERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Partitioner = Callable[..., list[np.ndarray]]


def _check_common(labels: np.ndarray, num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients <= 0:
        raise ValueError(
            f"data.num_clients={num_clients!r} is not allowed; must be a positive integer"
        )
    if num_clients > len(labels):
        raise ValueError(
            f"data.num_clients={num_clients} is more than the {len(labels)} examples to split; "
            "must be at most the number of examples"
        )


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffles the examples and deals them into `num_clients` near-equal parts."""
    labels = np.asarray(labels)
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
    labels = np.asarray(labels)
    _check_common(labels, num_clients)
    if not alpha > 0:
        raise ValueError(f"data.partition.alpha={alpha!r} is not allowed; must be > 0")
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


PARTITIONERS: dict[str, Partitioner] = {"iid": iid, "dirichlet": dirichlet}


def make_partition(name: str, labels: np.ndarray, num_clients: int, seed: int, **params):
    """Resolves the partitioner `name` and applies it."""
    if name not in PARTITIONERS:
        raise ValueError(
            f"data.partition.name={name!r} is unknown; known: {', '.join(sorted(PARTITIONERS))}"
        )
    return PARTITIONERS[name](labels, num_clients, seed, **params)


def label_histograms(
    labels: np.ndarray, clients: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
    """Counts of each class on each client: [num_clients, num_classes]."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[idx], minlength=num_classes) for idx in clients])


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
