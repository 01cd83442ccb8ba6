"""Client-local state: parameters and model state that each client keeps across rounds.

FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization") keeps every client's normalisation layers, their affine parameters and running
statistics, on the client: a client starts each round from its own copy of those values and the
server's copy of everything else. The server stores one copy per client (leaves
`[num_clients, ...]`, in the checkpoint), gathers the cohort's copies before a round and writes
back what each client ends with. Clients never sampled yet start from the initial values.

The server still aggregates the local leaves like any other: its copy is the (weighted) mean of
the clients' values, used only to evaluate a global model on a global test set; no client
starts from it.

On a mesh of several devices the store is split over them (`fedjax_cv.engine.store`): its rows
padded to a multiple of the devices (rows no client id reaches, never read), each device
holding one block of rows and each process only its devices' blocks; `gather` and `scatter`
move only the cohort's rows between devices.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_cv.engine import store as split_store

# The parameters of `fedjax_cv.models.norm.Norm` layers, whatever their kind.
NORM_LAYERS = r"(^|/)(BatchNorm|GroupNorm|LayerNorm)_\d+/"


class ClientLocal(NamedTuple):
    """Which values stay on the clients.

    - `params`: a regex searched in each parameter's name (path joined by '/'); '' for none.
    - `model_state`: keep the non-param collections (BatchNorm's `batch_stats`) per client
      instead of averaging them.
    """

    params: str = ""
    model_state: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.params) or self.model_state


NO_LOCAL = ClientLocal()
FEDBN = ClientLocal(params=NORM_LAYERS, model_state=True)


def select(tree, pattern: str, prefix: str = "") -> dict:
    """The leaves of a nested dict whose name matches `pattern`, in a pruned nested dict."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            sub = select(value, pattern, name + "/")
            if sub:
                out[key] = sub
        elif pattern and re.search(pattern, name):
            out[key] = value
    return out


def overlay(tree, pruned):
    """`tree` with the leaves present in `pruned` replaced by them."""
    if not pruned:
        return tree
    out = dict(tree)
    for key, value in pruned.items():
        out[key] = overlay(tree[key], value) if isinstance(value, Mapping) else value
    return out


def local_values(spec: ClientLocal, params, model_state) -> dict:
    """One client's local values: `{'params': pruned params, 'model_state': ...}`."""
    if not spec.enabled:
        return {}
    return {
        "params": select(params, spec.params),
        "model_state": model_state if spec.model_state else {},
    }


def apply_local(params, model_state, local: dict):
    """The client's starting point: the server's values overlaid with its own."""
    if "params" not in local:
        return params, model_state
    own_state = local["model_state"]
    return overlay(params, local["params"]), (own_state if own_state else model_state)


def stage_values(local: dict) -> dict:
    """A client's own state of the aggregation stages (error-feedback residuals), by stage."""
    return local.get("stages", {})


def init_store(
    spec: ClientLocal, params, model_state, num_clients: int, stages: dict | None = None
) -> dict:
    """Every client's copy of its local values, all starting from the initial ones.

    `stages`: one client's initial own state of the aggregation stages that keep one
    (`fedjax_cv.algorithms.aggregation.Pipeline.local_init`), stored under 'stages'.
    """
    values = local_values(spec, params, model_state)
    if stages:
        values = {**values, "stages": stages}
    if not values:
        return values
    if spec.enabled and not jax.tree.leaves(local_values(spec, params, model_state)):
        raise ValueError(
            f"client-local state (params regex {spec.params!r}, model_state={spec.model_state})"
            " matches nothing in this model: algorithm.local_params / algorithm.batch_stats need"
            " normalisation layers (model.norm other than 'none')"
        )
    if not isinstance(num_clients, int) or num_clients <= 0:
        raise ValueError(
            f"num_clients={num_clients!r}: an algorithm with client-local state needs "
            "init(params, model_state, num_clients=<number of clients>)"
        )
    return jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (num_clients,) + jnp.shape(x)), values
    )


def gather(store: dict, client_ids: jax.Array, mesh=None) -> dict:
    """The cohort's copies, leaves `[cohort, ...]`; padded clients get client 0's (unused).
    With a `mesh`, a store split over it stays split (`fedjax_cv.engine.store.take`)."""
    return split_store.take(store, client_ids, mesh)


def scatter(
    store: dict,
    client_ids: jax.Array,
    kept: dict,
    occurrence: jax.Array | None = None,
    mesh=None,
) -> dict:
    """Writes back what each real, finite client ended with; others leave their row as it was.

    A client drawn more than once in one cohort (FedVC) keeps the values of its written copy
    with the highest `occurrence` (ties: the later slot). Only that copy is scattered: XLA
    applies duplicate scatter indices in an unspecified order (nondeterministic on GPUs).
    With a `mesh`, a store split over it stays split (`fedjax_cv.engine.store.put`).
    """
    if not store:
        return store
    num_clients = jax.tree.leaves(store)[0].shape[0]
    write = kept["write"]
    slot = jnp.arange(client_ids.shape[0])
    rank = slot if occurrence is None else occurrence
    # [i, j]: slot j holds a written copy of slot i's client that ranks after slot i's.
    after = (rank[None, :] > rank[:, None]) | (
        (rank[None, :] == rank[:, None]) & (slot[None, :] > slot[:, None])
    )
    superseded = jnp.any(
        (client_ids[None, :] == client_ids[:, None]) & after & write[None, :], axis=1
    )
    rows = jnp.where(write & ~superseded, client_ids, num_clients)  # out of range: dropped
    return split_store.put(store, rows, kept["values"], mesh)


def kept_values(
    spec: ClientLocal, params, model_state, write: jax.Array, stages: dict | None = None
) -> dict[str, Any]:
    """What a client hands back at the end of its round (`{}` without local state)."""
    values = local_values(spec, params, model_state)
    if stages:
        values = {**values, "stages": stages}
    if not values:
        return {}
    return {"values": values, "write": write}
