"""Types shared by the algorithm building blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import struct

from fedjax_cv.engine.cohort import Cohort

Params = Any
ModelState = Any  # non-param model variables, e.g. {'batch_stats': ...}; {} when there are none
Batch = Any  # dict of arrays with a leading batch axis
Metrics = dict[str, jax.Array]


class LossOutput(NamedTuple):
    """What a per-example loss function returns besides the losses."""

    model_state: ModelState  # updated non-param variables (BatchNorm statistics)
    metrics: dict[str, jax.Array]  # per-example metrics [batch] to average, e.g. accuracy
    # FedIR: each example's importance weight [batch] when the loss was given `class_weights`
    # (p(y)/q_k(y) of its label; the mean over its valid pixels for masks); None otherwise.
    example_weights: jax.Array | None = None


# loss_fn(params, model_state, batch, rng) -> (per-example losses [batch], LossOutput), in
# training mode. Per-example losses let the engine mask padding and FedIR reweight examples.
# FedIR calls it with the keyword `class_weights` ([num_classes] table of p(y)/q_k(y)): the
# loss then weighs what lies inside an example (pixels of a mask, boxes of an image) and
# reports each example's weight in `LossOutput.example_weights`.
PerExampleLoss = Callable[..., tuple[jax.Array, LossOutput]]


@struct.dataclass
class ServerState:
    """The server's state between rounds."""

    params: Params
    opt_state: Any
    model_state: ModelState
    round: jax.Array  # int32: rounds applied so far
    # Each client's own copy of its local values, leaves [num_clients, ...]; {} without any
    # (see fedjax_cv.algorithms.local_state).
    client_local: Any = struct.field(default_factory=dict)
    # The aggregation stages' server-held state by stage name (adaptive clip norms); {} when
    # none keeps any (see fedjax_cv.algorithms.aggregation).
    aggregation: Any = struct.field(default_factory=dict)


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm: pure server-side functions plus its host-side samplers.

    - `init(params, model_state=None, num_clients=0) -> ServerState` (`num_clients` sizes
      the store of client-local state, FedBN; unused otherwise)
    - `apply(state, cohort, rng) -> (state, metrics)`: one round; `rng` is the round's key and
      client k trains with `fold_in(rng, client_id_k)`.
    - `client_sampler` picks a round's clients and `example_sampler` the examples each client
      trains on; the input pipeline calls them to build the cohort.
    - `host_metrics(rounds) -> dict`: what the host reports after that many rounds besides
      the round's own metrics (DP's `dp_epsilon`); None when nothing.
    """

    init: Callable[..., ServerState]
    apply: Callable[[ServerState, Cohort, jax.Array], tuple[ServerState, Metrics]]
    client_sampler: Any
    example_sampler: Any
    strategy: str
    host_metrics: Callable[[int], dict[str, float]] | None = None
