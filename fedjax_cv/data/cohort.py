"""Cohort assembly: a round's sampled clients' examples, batched and padded.

Every random choice derives from numpy generators seeded by (seed, round, stream, client,
occurrence), so a round's cohort never depends on what ran before it and a resumed run
rebuilds exactly the cohorts an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from fedjax_cv.algorithms.attacks import Attack, choose_attackers, poison_examples
from fedjax_cv.algorithms.sampling import ClientSampler, ExampleSampler, num_steps
from fedjax_cv.data.federated import FederatedDataset
from fedjax_cv.engine.cohort import ClientInfo, Cohort

_CLIENT_STREAM = 1
EXAMPLE_STREAM = 2  # also the base of the pipeline's augmentation streams


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 with mean = std = 0.5 per channel, as FedCV: no client knows the
    population statistics."""
    return (images.astype(np.float32) / 255.0 - 0.5) / 0.5


def prepare(examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(examples)
    if "image" in out and out["image"].dtype == np.uint8:
        out["image"] = normalize_images(out["image"])
    return out


class Entry(NamedTuple):
    """One real example of a cohort: where it goes and which example it is."""

    slot: int  # the client's place in the cohort
    position: int  # its place in that client's training order (step * batch + index)
    example: int  # index into the dataset's train split
    client: int
    occurrence: int  # which copy of the client (FedVC draws clients with replacement)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which examples a round's clients train on."""

    client_ids: np.ndarray  # int64 [clients]
    occurrence: np.ndarray  # int32 [clients]
    examples: np.ndarray  # int64 [clients, slots], 0 where padded
    mask: np.ndarray  # bool [clients, slots]

    def rows(self, start: int, stop: int) -> Layout:
        """The layout of clients [start, stop) only."""
        return Layout(*(getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)))

    def entries(self) -> list[Entry]:
        slots, positions = np.nonzero(self.mask)
        return [
            Entry(int(s), int(p), int(self.examples[s, p]), int(self.client_ids[s]), int(o))
            for s, p, o in zip(slots, positions, self.occurrence[slots], strict=True)
        ]


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
    # Attacks by a fraction of each round's clients (fedjax_cv.algorithms.attacks): the host
    # picks them from (seed, round), poisons their data and flags them in `ClientInfo`.
    attack: Attack | None = None

    @property
    def num_steps(self) -> int:
        return num_steps(
            self.example_sampler, int(self.dataset.client_sizes.max()), self.batch_size
        )

    def sample_clients(self, round_index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, round_index, _CLIENT_STREAM])
        return self.client_sampler.sample(rng, self.dataset.client_sizes, self.clients_per_round)

    def layout(self, round_index: int) -> Layout:
        """Round r's clients and the examples each trains on, before any pixel is read."""
        ids = self.sample_clients(round_index)
        slots = self.num_steps * self.batch_size
        examples = np.zeros((len(ids), slots), np.int64)
        mask = np.zeros((len(ids), slots), bool)
        occurrence = np.zeros(len(ids), np.int32)
        for slot, client in enumerate(ids):
            occurrence[slot] = np.sum(ids[:slot] == client)
            rng = np.random.default_rng(
                [self.seed, round_index, EXAMPLE_STREAM, int(client), int(occurrence[slot])]
            )
            members = self.dataset.clients[client]
            chosen = members[self.example_sampler.indices(rng, len(members))][:slots]
            examples[slot, : len(chosen)] = chosen
            mask[slot, : len(chosen)] = True
        return Layout(client_ids=ids, occurrence=occurrence, examples=examples, mask=mask)

    def gather(self, round_index: int, layout: Layout) -> dict[str, np.ndarray]:
        """The layout's examples, normalised, as arrays `[clients, slots, ...]`; padded slots
        hold example 0 (their mask is False)."""
        del round_index
        return prepare({k: v[layout.examples] for k, v in self.dataset.train.items()})

    def __call__(self, round_index: int) -> Cohort:
        return self.rows(round_index)

    def rows(self, round_index: int, start: int = 0, stop: int | None = None) -> Cohort:
        """Round r's cohort restricted to its client rows [start, stop): what one process of
        many assembles (rows past the last client are left out; the process pads them).
        Sampling, augmentation and attacks draw from seeds that do not depend on the rows,
        so each row equals that row of the whole cohort."""
        layout = self.layout(round_index)
        num_clients = len(layout.client_ids)
        stop = num_clients if stop is None else min(stop, num_clients)
        start = min(start, stop)
        attacker = None
        if self.attack is not None and self.attack.active:
            attacker = choose_attackers(self.attack, self.seed, round_index, num_clients)
            attacker = attacker[start:stop]
        if (start, stop) != (0, num_clients):
            # An empty share still reads one client, so the pipeline fixes keys and shapes.
            layout = layout.rows(start, stop) if stop > start else layout.rows(0, 1)
        examples = self.gather(round_index, layout)
        if stop == start:
            layout = layout.rows(0, 0)
            examples = {key: value[:0] for key, value in examples.items()}
        ids = layout.client_ids
        if self.poisoned_clients:
            examples["image"][ids < self.poisoned_clients] = np.nan
        if attacker is not None:
            examples = poison_examples(self.attack, examples, attacker, self.dataset.num_classes)
        shape = (len(ids), self.num_steps, self.batch_size)
        info = ClientInfo(
            client_id=ids.astype(np.int32),
            occurrence=layout.occurrence,
            num_examples=self.dataset.client_sizes[ids].astype(np.float32),
            label_counts=self.dataset.label_histograms[ids].astype(np.float32),
            attacker=attacker,
        )
        return Cohort(
            examples={k: v.reshape(shape + v.shape[2:]) for k, v in examples.items()},
            mask=layout.mask.reshape(shape),
            clients=info,
        )


def test_batches(examples: dict, batch_size: int, transform=None):
    """Yields (batch, mask) over a split in order, the last batch padded to full size.

    `transform(example, rng)`, when given, maps each example first: the deterministic part of
    the training augmentation (resize, channels, box padding; see
    `fedjax_cv.data.augment.Augmentation.deterministic`), so evaluation sees inputs shaped as
    training does.
    """
    n = len(next(iter(examples.values())))
    per_example = transform is not None or not all(
        isinstance(v, np.ndarray) for v in examples.values()
    )
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        index = np.arange(start, start + batch_size) % n
        mask = np.arange(start, start + batch_size) < stop
        if not per_example:
            yield prepare({k: v[index] for k, v in examples.items()}), mask
            continue
        rows = [{k: v[int(i)] for k, v in examples.items()} for i in index]
        if transform is not None:
            rows = [transform(row, None) for row in rows]
        yield prepare({k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}), mask
