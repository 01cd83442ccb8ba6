"""Cohort assembly on grain: a round's examples fetched, augmented and normalised.

`GrainCohortBuilder` is a `CohortBuilder` with two more fields, `augmentation` and
`num_workers`, and the same output: it samples clients and examples exactly as the numpy
builder does (so with augmentation "none" the cohorts are identical), then runs one
`grain.MapDataset` over the round's flat list of (slot, position, example) entries, in batches,
map = fetch + augment + normalise, and writes the results into `[clients, steps, batch, ...]`
arrays beside the masks. train.py's prefetch thread calls it for round r + 1 while round r
trains.

Each example's augmentation draws from its own generator, seeded by (seed, round, client,
occurrence, position), so a cohort never depends on the number of workers or their timing.
A mosaic draws its three other images from the same generator, out of the same client's
examples (`ClientExamples`, the client's whole local split, as a client holds it): the
transform knows every client's example indices, so a mosaic needs nothing from the sampler
and no other client's data.

Workers are grain's prefetch threads (`ReadOptions.num_threads`), not its processes: grain
spawns worker processes afresh for every iterator, i.e. every round, and each imports JAX and
unpickles a copy of the dataset's arrays. On the 2-core development machine that made a
CIFAR-10 cohort of 5000 images take 9-13 s against 0.7 s in the calling thread. Threads share
the arrays; they pay off for large images, whose numpy work runs without the GIL, when there
are idle cores. The default, 0, runs the map in the calling thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from fedjax_cv.data.augment import Augmentation, make_augmentation
from fedjax_cv.data.cohort import EXAMPLE_STREAM, CohortBuilder, Entry, Layout, prepare

_AUGMENT_STREAM = EXAMPLE_STREAM + 1
# Batches in flight per worker thread: enough to hide a slow one, little memory.
_BUFFERED_BATCHES_PER_WORKER = 4


@dataclasses.dataclass(frozen=True, eq=False)
class ClientExamples:
    """One client's train examples as a random-access sequence of example dicts: the pool a
    mosaic draws from."""

    train: Mapping[str, Sequence[Any]] = dataclasses.field(repr=False)
    indices: np.ndarray  # the client's indices into `train`

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = int(self.indices[position])
        return {key: values[index] for key, values in self.train.items()}


@dataclasses.dataclass(frozen=True)
class ExampleTransform:
    """grain map over a batch of entries (an `Entry` of arrays): fetch each example of `train`,
    augment it with its own generator, stack, normalise.

    Elements are batches because grain spends tens of microseconds per element, as much as
    the work on a 32x32 image; the augmentation stays per example, so batching changes no
    result.
    """

    # grain names each map after its repr, and the arrays' repr costs a tenth of a second.
    train: Mapping[str, Sequence[Any]] = dataclasses.field(repr=False)
    augmentation: Augmentation
    seed: int
    round_index: int
    # Every client's indices into `train` (FederatedDataset.clients): a mosaic's pool.
    clients: Sequence[np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def generator(self, client: int, occurrence: int, position: int) -> np.random.Generator:
        return np.random.default_rng(
            [self.seed, self.round_index, _AUGMENT_STREAM, client, occurrence, position]
        )

    def example(self, index: int, client: int, occurrence: int, position: int) -> dict:
        """One example, fetched and augmented (not yet normalised)."""
        example = {key: values[index] for key, values in self.train.items()}
        rng = self.generator(client, occurrence, position) if self.augmentation.is_random else None
        pool = None
        if self.augmentation.mosaic and self.clients is not None:
            pool = ClientExamples(self.train, self.clients[client])
        return self.augmentation(example, rng, pool)

    def __call__(self, entries: Entry) -> dict[str, np.ndarray]:
        if self.augmentation.is_identity and all(
            isinstance(values, np.ndarray) for values in self.train.values()
        ):
            return prepare({key: values[entries.example] for key, values in self.train.items()})
        examples = [
            self.example(*(int(v) for v in fields))
            for fields in zip(
                entries.example, entries.client, entries.occurrence, entries.position, strict=True
            )
        ]
        return prepare({key: _stack(key, [e[key] for e in examples]) for key in examples[0]})


def _stack(key: str, values: list[Any]) -> np.ndarray:
    shapes = {np.shape(v) for v in values}
    if len(shapes) > 1:
        raise ValueError(
            f"examples have {key} of shapes {sorted(shapes)}; set data.augmentation.image_size, "
            "channels or max_boxes so that all examples of a cohort have one shape"
        )
    return np.stack(values)


@dataclasses.dataclass(frozen=True)
class GrainCohortBuilder(CohortBuilder):
    """`CohortBuilder` on a grain pipeline, with per-example augmentation.

    `dataset.train` may hold any random-access sequences (arrays, an `ImageStore`, tuples of
    per-image box arrays): only `values[i]` is used, so images of mixed sizes work once the
    augmentation resizes them (`image_size`) and pads their boxes (`max_boxes`).
    """

    augmentation: Augmentation | str | Mapping[str, Any] = "none"
    num_workers: int = 0  # grain prefetch threads; 0 runs the map in the calling thread

    def __post_init__(self):
        object.__setattr__(self, "augmentation", make_augmentation(self.augmentation))
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(
                f"data.num_workers={self.num_workers!r} is not allowed; must be an integer >= 0"
            )

    def transform(self, round_index: int) -> ExampleTransform:
        return ExampleTransform(
            train=self.dataset.train,
            augmentation=self.augmentation,
            seed=self.seed,
            round_index=round_index,
            clients=self.dataset.clients,
        )

    def examples(self, round_index: int, entries: Sequence[Entry]) -> grain.MapDataset:
        """The round's processed examples in batches of `batch_size`, in the order of
        `entries`."""
        return (
            grain.MapDataset.source(entries).batch(self.batch_size).map(self.transform(round_index))
        )

    def gather(self, round_index: int, layout: Layout) -> dict[str, np.ndarray]:
        """Runs the round's grain pipeline into arrays `[clients, slots, ...]`."""
        entries = layout.entries()
        # Padded slots hold example 0, as in CohortBuilder, through the same transform (which
        # fixes shapes and keys); their mask is False, so their content changes nothing.
        filler = self.transform(round_index)(Entry(*(np.zeros(1, np.int64) for _ in Entry._fields)))
        out = {}
        for key, value in filler.items():
            out[key] = np.empty(layout.mask.shape + value.shape[1:], value.dtype)
            out[key][...] = value[0]
        entry_slots, entry_positions = np.nonzero(layout.mask)  # the order of `entries`
        options = grain.ReadOptions(
            num_threads=self.num_workers,
            prefetch_buffer_size=_BUFFERED_BATCHES_PER_WORKER * self.num_workers,
        )
        iterator = iter(self.examples(round_index, entries).to_iter_dataset(options))
        try:
            for start, batch in zip(range(0, len(entries), self.batch_size), iterator, strict=True):
                where = slice(start, start + self.batch_size)
                for key, target in out.items():
                    value = batch[key]
                    if value.shape[1:] != target.shape[2:]:
                        raise ValueError(
                            f"examples have {key} of shape {value.shape[1:]}, example 0 "
                            f"{target.shape[2:]}; set data.augmentation.image_size, channels "
                            "or max_boxes so that all examples have one shape"
                        )
                    target[entry_slots[where], entry_positions[where]] = value
        finally:
            iterator.close()
        return out
