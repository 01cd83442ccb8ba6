"""Which clients join a round and which of their examples they train on (host side).

Both are pure functions of a numpy Generator, so the input pipeline derives one generator
from (seed, round) or (seed, round, client) and the draws never depend on iteration order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class ClientSampler(NamedTuple):
    """`sample(rng, client_sizes, cohort_size) -> client indices` (may repeat if `replace`)."""

    name: str
    sample: Callable[[np.random.Generator, np.ndarray, int], np.ndarray]


class ExampleSampler(NamedTuple):
    """`indices(rng, num_examples) -> positions` into a client's examples, in training order.

    `count(num_examples)` is how many positions `indices` returns, so the cohort's number of
    steps can be fixed ahead of time from the largest client.
    """

    name: str
    indices: Callable[[np.random.Generator, int], np.ndarray]
    count: Callable[[int], int]


def _check_cohort(client_sizes: np.ndarray, cohort_size: int) -> None:
    if not 0 < cohort_size <= len(client_sizes):
        raise ValueError(
            f"algorithm.clients_per_round={cohort_size} is not allowed; "
            f"must be in [1, {len(client_sizes)}] (the number of clients)"
        )


def uniform_clients() -> ClientSampler:
    """McMahan et al. (2017): `cohort_size` clients uniformly without replacement."""

    def sample(rng, client_sizes, cohort_size):
        _check_cohort(client_sizes, cohort_size)
        return np.sort(rng.choice(len(client_sizes), cohort_size, replace=False))

    return ClientSampler("uniform", sample)


def size_proportional_clients() -> ClientSampler:
    """Hsu, Qi and Brown (2020), FedVC: each draw picks client k with probability n_k / n.

    Draws are independent (with replacement): a large client may be drawn twice in a round and
    then acts as two virtual clients, each with its own random examples.
    """

    def sample(rng, client_sizes, cohort_size):
        _check_cohort(client_sizes, cohort_size)
        sizes = np.asarray(client_sizes, dtype=np.float64)
        return np.sort(rng.choice(len(sizes), cohort_size, replace=True, p=sizes / sizes.sum()))

    return ClientSampler("size_proportional", sample)


def local_epochs(num_epochs: int = 1) -> ExampleSampler:
    """E passes over the client's data, each in a fresh random order."""
    if not isinstance(num_epochs, int) or num_epochs <= 0:
        raise ValueError(
            f"algorithm.local_epochs={num_epochs!r} is not allowed; must be a positive integer"
        )

    def indices(rng, num_examples):
        return np.concatenate([rng.permutation(num_examples) for _ in range(num_epochs)])

    return ExampleSampler(f"local_epochs({num_epochs})", indices, lambda n: n * num_epochs)


def virtual_client(size: int) -> ExampleSampler:
    """Hsu, Qi and Brown (2020), FedVC: exactly `size` examples resampled every round.

    Without replacement when the client has at least `size` examples, with replacement
    otherwise.
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(
            f"algorithm.virtual_client_size={size!r} is not allowed; must be a positive integer"
        )

    def indices(rng, num_examples):
        return rng.choice(num_examples, size, replace=num_examples < size)

    return ExampleSampler(f"virtual_client({size})", indices, lambda n: size)


def num_steps(example_sampler: ExampleSampler, max_client_size: int, batch_size: int) -> int:
    """Steps a cohort needs so that the largest client fits."""
    return max(1, math.ceil(example_sampler.count(max_client_size) / batch_size))
