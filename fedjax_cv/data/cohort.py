"""Cohort assembly: a round's sampled clients' examples, batched and padded.

Every random choice derives from numpy generators seeded by (seed, round, stream, client,
occurrence), so a round's cohort never depends on what ran before it and a resumed run
rebuilds exactly the cohorts an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjax_cv.algorithms.sampling import ClientSampler, ExampleSampler, num_steps
from fedjax_cv.data.federated import FederatedDataset
from fedjax_cv.engine.cohort import ClientInfo, Cohort

_CLIENT_STREAM, _EXAMPLE_STREAM = 1, 2


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 with mean = std = 0.5 per channel, as FedCV: no client knows the
    population statistics."""
    return (images.astype(np.float32) / 255.0 - 0.5) / 0.5


def prepare(examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(examples)
    if "image" in out and out["image"].dtype == np.uint8:
        out["image"] = normalize_images(out["image"])
    return out


@dataclasses.dataclass(frozen=True)
class CohortBuilder:
    """Builds round r's cohort from a `FederatedDataset` and an algorithm's samplers."""

    dataset: FederatedDataset
    client_sampler: ClientSampler
    example_sampler: ExampleSampler
    clients_per_round: int
    batch_size: int
    seed: int
    # Fault injection for tests of non-finite handling: clients 0 .. n-1 train on NaN images.
    poisoned_clients: int = 0

    @property
    def num_steps(self) -> int:
        return num_steps(
            self.example_sampler, int(self.dataset.client_sizes.max()), self.batch_size
        )

    def sample_clients(self, round_index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, round_index, _CLIENT_STREAM])
        return self.client_sampler.sample(rng, self.dataset.client_sizes, self.clients_per_round)

    def __call__(self, round_index: int) -> Cohort:
        ids = self.sample_clients(round_index)
        histograms = self.dataset.label_histograms
        steps, batch = self.num_steps, self.batch_size
        slots = steps * batch
        positions = np.zeros((len(ids), slots), np.int64)
        mask = np.zeros((len(ids), slots), bool)
        occurrence = np.zeros(len(ids), np.int32)
        for slot, client in enumerate(ids):
            occurrence[slot] = np.sum(ids[:slot] == client)
            rng = np.random.default_rng(
                [self.seed, round_index, _EXAMPLE_STREAM, int(client), int(occurrence[slot])]
            )
            members = self.dataset.clients[client]
            chosen = members[self.example_sampler.indices(rng, len(members))][:slots]
            positions[slot, : len(chosen)] = chosen
            mask[slot, : len(chosen)] = True
        examples = prepare({k: v[positions] for k, v in self.dataset.train.items()})
        if self.poisoned_clients:
            poisoned = ids < self.poisoned_clients
            examples["image"][poisoned] = np.nan
        examples = {
            k: v.reshape((len(ids), steps, batch) + v.shape[2:]) for k, v in examples.items()
        }
        info = ClientInfo(
            client_id=ids.astype(np.int32),
            occurrence=occurrence,
            num_examples=self.dataset.client_sizes[ids].astype(np.float32),
            label_histogram=histograms[ids].astype(np.float32),
        )
        return Cohort(examples=examples, mask=mask.reshape(len(ids), steps, batch), clients=info)


def test_batches(examples: dict[str, np.ndarray], batch_size: int):
    """Yields (batch, mask) over a split in order, the last batch padded to full size."""
    n = len(next(iter(examples.values())))
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        index = np.arange(start, start + batch_size) % n
        mask = np.arange(start, start + batch_size) < stop
        yield prepare({k: v[index] for k, v in examples.items()}), mask
