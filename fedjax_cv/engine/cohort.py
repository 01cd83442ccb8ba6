"""The cohort: one round's sampled clients as a padded pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = Any


@struct.dataclass
class ClientInfo:
    """What a client update knows about its client besides the examples.

    `occurrence` tells apart copies of one client drawn twice in a cohort (FedVC samples
    with replacement): the k-th copy is a distinct virtual client with its own random stream.
    """

    client_id: Array  # int32
    occurrence: Array  # int32
    num_examples: Array  # float32, n_k: the client's dataset size; 0 marks a padded client
    # float32 [num_classes]: the client's label counts over its train examples (images for
    # classification, pixels for masks, boxes for detection), FedIR's q_k.
    label_counts: Array
    # bool: whether the client attacks this round (fedjax_cv.algorithms.attacks); None
    # without an attack.
    attacker: Array | None = None


@struct.dataclass
class Cohort:
    """A round's clients: example leaves `[clients, steps, batch, ...]` and their masks.

    A padded example, step or client has mask False (a padded client also has
    `num_examples == 0`); padding changes nothing in a round.
    """

    examples: Any
    mask: Array  # bool [clients, steps, batch]
    clients: ClientInfo  # leaves [clients, ...]

    @property
    def num_clients(self) -> int:
        return self.mask.shape[0]

    @property
    def num_steps(self) -> int:
        return self.mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.mask.shape[2]


def pad_clients(cohort: Cohort, num_clients: int) -> Cohort:
    """Appends padded clients (all-False mask, zero examples) up to `num_clients`."""
    extra = num_clients - cohort.num_clients
    if extra < 0:
        raise ValueError(f"cannot pad a cohort of {cohort.num_clients} clients to {num_clients}")
    if extra == 0:
        return cohort

    def pad(x):
        xp = jnp if isinstance(x, jax.Array) else np
        return xp.concatenate([x, xp.zeros((extra,) + x.shape[1:], x.dtype)])

    return jax.tree.map(pad, cohort)


def client_key(round_key: jax.Array, info: ClientInfo) -> jax.Array:
    """The client's key: fold_in(round_key, client_id), then its occurrence in the cohort."""
    return jax.random.fold_in(jax.random.fold_in(round_key, info.client_id), info.occurrence)
