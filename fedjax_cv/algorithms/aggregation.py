"""The aggregation pipeline: what happens between a client's delta and the server optimizer.

Three composable stages (DESIGN.md, Aggregation), in the spirit of optax's `chain`:

1. client-side transforms of each client's delta on its own (attacks that corrupt the delta,
   norm bounding, DP clipping, compression), run inside the client's update;
2. the aggregator: a linear one (the weighted or plain mean) is a sum over clients that the
   engine streams, memory independent of the cohort size; a robust one (median, trimmed mean,
   Krum, geometric median; `fedjax_cv.algorithms.robust`) receives the deltas stacked
   `[clients, ...]`, sharded like the cohort over the `clients` mesh axis;
3. server-side transforms of the aggregate with the round's server key (DP noise, adaptive
   clip-norm updates), in reverse order of the stages, so a stage's server part sees what its
   client part produced; then the server optimizer.

A `Stage` may have both parts. Its state lives in `ServerState.aggregation[stage.name]`
(shared with every client of a round, in the checkpoint); what one client keeps across rounds
(error-feedback residuals) lives in the engine's client-local store, `local_init` giving its
initial value. A stage's client part returns per-client sums (clipped indicators, bytes; any
pytree of float32) that add up over the round's voting clients and reach its server part,
which reports metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_cv.algorithms import privacy, robust
from fedjax_cv.algorithms.secure_aggregation import SecureAggregation
from fedjax_cv.engine.cohort import ClientInfo

Metrics = dict[str, jax.Array]
# Streams folded into a client's key for its stages, and into the round key for the server's
# draws; far above any client id or local step count, which the same keys are folded with.
STAGE_STREAM = 0x7FFFFFF0
SERVER_STREAM = 0x7FFFFFF1


class ClientView(NamedTuple):
    """What a client-side stage knows of its client."""

    info: ClientInfo
    key: jax.Array  # this stage's key for this client and round
    weight: jax.Array  # the client's aggregation weight; 0: it has no vote
    num_steps: jax.Array | None = None  # int32: the local steps the client took
    lr_factor: jax.Array | None = None  # the round's client learning-rate factor (None: 1)


class ServerView(NamedTuple):
    """What a server-side stage knows of the round."""

    key: jax.Array  # this stage's server key for the round
    num_votes: jax.Array  # float32: clients with weight > 0
    denominator: jax.Array  # float32: what the linear aggregate divides the weighted sum by


def _no_client(state, delta, own, view):
    return delta, own, {}


def _no_server(state, aggregate, sums, view):
    return aggregate, state, {}


class Stage(NamedTuple):
    """One transform of the pipeline; every function is pure and traced inside the round.

    - `init(params) -> state`: the stage's server-held state (None: it keeps none);
    - `local_init(params) -> own`: one client's own state across rounds (None: none);
    - `client(state, delta, own, view) -> (delta, own, sums)` on each client's delta;
    - `server(state, aggregate, sums, view) -> (aggregate, state, metrics)` on the aggregate,
      `sums` the client part's sums over the voting clients;
    - `gradient(state, own, grads) -> grads` (None: none) corrects the client's gradient
      before its optimizer at every local step (SCAFFOLD's g - c_i + c).
    """

    name: str
    client: Callable = _no_client
    server: Callable = _no_server
    init: Callable[[Any], Any] | None = None
    local_init: Callable[[Any], Any] | None = None
    gradient: Callable | None = None


class Pipeline(NamedTuple):
    """Client stages, an aggregator and (in reverse) the stages' server parts.

    `denominator`: None divides the linear aggregator's weighted sum by the sum of weights
    (FedAvg's weighted mean); a number divides by that fixed count, as DP-FedAvg must (the
    expected number of clients a round, so one client moves the mean by at most C / count).
    `secure`: None sums the weighted deltas in float32; a `SecureAggregation` has the linear
    aggregator sum them masked in a fixed-point ring (Bonawitz et al. 2017), decoded here.
    """

    stages: tuple[Stage, ...] = ()
    aggregator: robust.Aggregator = robust.AGGREGATORS["mean"](robust.AggregatorOptions())
    denominator: float | None = None
    secure: SecureAggregation | None = None

    @property
    def linear(self) -> bool:
        return self.aggregator.linear

    def init(self, params) -> dict:
        """Every stateful stage's server-held state by name; {} when none keeps any."""
        return {s.name: s.init(params) for s in self.stages if s.init is not None}

    def local_init(self, params) -> dict:
        """One client's initial own state of every stage that keeps one, by name."""
        return {s.name: s.local_init(params) for s in self.stages if s.local_init is not None}

    def correct_gradient(self, state: dict, own: dict, grads):
        """The stages' gradient corrections in order; the gradient itself (the same traced
        program) when no stage has one."""
        for stage in self.stages:
            if stage.gradient is not None:
                grads = stage.gradient(state.get(stage.name), own.get(stage.name), grads)
        return grads

    def client(self, state: dict, delta, own: dict, view: ClientView):
        """Runs the client parts in order: (delta, own, sums), sums zero for a client without
        a vote (a padded or non-finite one, whose delta may be garbage)."""
        own = dict(own)
        sums = {}
        stage_key = jax.random.fold_in(view.key, STAGE_STREAM)
        for index, stage in enumerate(self.stages):
            stage_view = view._replace(key=jax.random.fold_in(stage_key, index))
            delta, stage_own, stage_sums = stage.client(
                state.get(stage.name), delta, own.get(stage.name), stage_view
            )
            if stage.local_init is not None:
                own[stage.name] = stage_own
            sums.update(stage_sums)
        votes = view.weight > 0
        sums = jax.tree.map(lambda v: jnp.where(votes, jnp.asarray(v, jnp.float32), 0.0), sums)
        return delta, own, sums

    def server(self, state: dict, aggregate, sums: dict, view: ServerView):
        """Runs the server parts in reverse order: (aggregate, state, metrics)."""
        state = dict(state)
        metrics = {}
        for index in reversed(range(len(self.stages))):
            stage = self.stages[index]
            stage_view = view._replace(key=jax.random.fold_in(view.key, index))
            aggregate, stage_state, stage_metrics = stage.server(
                state.get(stage.name), aggregate, sums, stage_view
            )
            if stage.init is not None:
                state[stage.name] = stage_state
            metrics.update(stage_metrics)
        return aggregate, state, metrics

    def reduce(self, weighted_sum, weight_sum, stacked) -> tuple[Any, jax.Array, Metrics]:
        """The aggregate: the weighted sum over the denominator (linear), or the robust
        aggregator of the stacked deltas. Returns (aggregate, denominator, metrics)."""
        # Data-dependent either way, so XLA divides rather than multiplying by a rounded
        # reciprocal of a constant: DP-FedAvg without noise or clipping is FedAvg bit for bit.
        fixed = weight_sum if self.denominator is None else jnp.float32(self.denominator)
        denominator = jnp.where(weight_sum > 0, fixed, 1.0)
        if self.linear:
            metrics = {}
            if self.secure is not None:  # the masked ring sum, decoded
                weighted_sum, metrics = self.secure.decode(weighted_sum)
            return jax.tree.map(lambda d: d / denominator, weighted_sum), denominator, metrics
        aggregate, metrics = self.aggregator.apply(stacked["delta"], stacked["weight"])
        return aggregate, denominator, metrics


MEAN = Pipeline()  # FedAvg's: no stage, the weighted (or plain) mean


def server_key(round_key: jax.Array) -> jax.Array:
    """The key of what the server draws in a round (DP noise); no client's key."""
    return jax.random.fold_in(round_key, SERVER_STREAM)


# ------------------------------------------------------------------------------------------
# Stages.


def norm_bound(max_norm: float) -> Stage:
    """Each client's delta scaled down to L2 norm `max_norm` (Sun et al. 2019); reports
    `norm_clipped`, the fraction of voting clients clipped."""
    if not max_norm > 0:
        raise ValueError(
            f"algorithm.aggregator.norm_bound={max_norm!r} is not allowed; must be > 0"
        )

    def client(state, delta, own, view):
        clipped, was_clipped = privacy.clip_update(delta, max_norm)
        return clipped, own, {"norm_clipped": was_clipped}

    def server(state, aggregate, sums, view):
        fraction = sums["norm_clipped"] / jnp.maximum(view.num_votes, 1.0)
        return aggregate, state, {"norm_bound": jnp.float32(max_norm), "norm_clipped": fraction}

    return Stage("norm_bound", client=client, server=server)


@struct.dataclass
class NormBoundState:
    """The adaptive norm bound between rounds (in `ServerState.aggregation`)."""

    bound: jax.Array  # float32 scalar


def norm_bound_init(initial_bound: float) -> NormBoundState:
    if not initial_bound > 0:
        raise ValueError(
            f"algorithm.aggregator.norm_bound={initial_bound!r} is not allowed; must be > 0"
        )
    return NormBoundState(bound=jnp.asarray(initial_bound, jnp.float32))


def adaptive_norm_bound(
    initial_bound: float, target_quantile: float = 0.5, learning_rate: float = 0.2
) -> Stage:
    """`norm_bound` whose bound follows the `target_quantile` of the clients' update norms by
    Andrew et al.'s geometric step (2021), without noise: the bound is not private here."""
    norm_bound_init(initial_bound)  # checks the bound
    privacy.check_adaptive_clip(initial_bound, target_quantile, learning_rate)

    def client(state, delta, own, view):
        clipped, was_clipped = privacy.clip_update(delta, state.bound)
        return clipped, own, {"norm_clipped": was_clipped}

    def server(state, aggregate, sums, view):
        votes = jnp.maximum(view.num_votes, 1.0)
        fraction = sums["norm_clipped"] / votes
        bound = privacy.geometric_quantile_step(
            state.bound, 1.0 - fraction, target_quantile, learning_rate
        )
        bound = jnp.where(view.num_votes > 0, bound, state.bound)
        return (
            aggregate,
            state.replace(bound=bound),
            {"norm_bound": state.bound, "norm_clipped": fraction},
        )

    return Stage(
        "norm_bound",
        client=client,
        server=server,
        init=lambda params: norm_bound_init(initial_bound),
    )


def dp_gaussian(
    noise_multiplier: float,
    clip_norm: float,
    *,
    adaptive: bool = False,
    target_quantile: float = 0.5,
    clip_learning_rate: float = 0.2,
    clipped_count_stddev: float = 0.0,
    expected_clients: float = 1.0,
) -> Stage:
    """DP-FedAvg (McMahan et al. 2018): each client's delta clipped to L2 norm C; Gaussian
    noise of std z C on the sum, that is z C / count on the mean the pipeline divides by
    `expected_clients` (set `Pipeline.denominator` to it). With `adaptive`, C follows a
    quantile of the norms (Andrew et al. 2021) from a noised count of unclipped clients, and
    the delta's noise is raised so the pair costs what `noise_multiplier` alone would.
    With z = 0 and C = inf the aggregate is FedAvg's (mean aggregation) bit for bit."""
    privacy.check_noise_multiplier(noise_multiplier)
    if not clip_norm > 0:
        raise ValueError(f"algorithm.dp.clip_norm={clip_norm!r} is not allowed; must be > 0")
    delta_multiplier = noise_multiplier
    if adaptive:
        privacy.check_adaptive_clip(clip_norm, target_quantile, clip_learning_rate)
        delta_multiplier = privacy.adaptive_delta_noise_multiplier(
            noise_multiplier, clipped_count_stddev
        )

    def current_clip(state):
        return state.clip_norm if adaptive else jnp.float32(clip_norm)

    def client(state, delta, own, view):
        clipped, was_clipped = privacy.clip_update(delta, current_clip(state))
        return clipped, own, {"dp_unclipped": 1.0 - was_clipped.astype(jnp.float32)}

    def server(state, aggregate, sums, view):
        noise_key, count_key = jax.random.split(view.key)
        clip = current_clip(state)
        stddev = privacy.noise_stddev(delta_multiplier, clip) / view.denominator
        noised = privacy.gaussian_noise(noise_key, aggregate, stddev)
        metrics = {
            "dp_clip_norm": clip,
            "dp_clipped_fraction": 1.0 - sums["dp_unclipped"] / jnp.maximum(view.num_votes, 1.0),
        }
        if adaptive:
            state, adaptive_metrics = privacy.adaptive_clip_update(
                state,
                count_key,
                sums["dp_unclipped"],
                view.num_votes,
                expected_clients,
                target_quantile=target_quantile,
                learning_rate=clip_learning_rate,
                count_stddev=clipped_count_stddev,
            )
            metrics["dp_unclipped_estimate"] = adaptive_metrics["dp_unclipped_estimate"]
        return noised, state, metrics

    init = (lambda params: privacy.adaptive_clip_init(clip_norm)) if adaptive else None
    return Stage("dp", client=client, server=server, init=init)
