"""Robust aggregators: what the server makes of a round's client deltas when some may be hostile.

Every aggregator takes the round's client deltas stacked as a pytree with leaves
`[clients, ...]` and `weights [clients]`, and returns the aggregate (leaves `[...]`) and a dict
of scalar metrics. A client of weight 0 (padding, a dropped or non-finite client) is no vote:
whatever its delta holds, NaN included, changes nothing. Except for `weighted_mean` and
`geometric_median`, which weigh clients by `weights`, every real client is one vote, as in the
papers and in numpy: the coordinate median and the trimmed mean are those of the real
clients' values.

All functions are pure and jit-able. Hyperparameters (trim fraction, number of Byzantine
clients, number of Weiszfeld iterations) are Python numbers, static under jit; the number of
real clients n is only known at run time and enters as a traced value, so shapes never depend
on it. A real client's delta must be finite (the client program already gives a non-finite
client weight 0).

Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?") is a client-side
transform, not an aggregator: the pipeline's `norm_bound` and `adaptive_norm_bound` stages
(`fedjax_cv.algorithms.aggregation`) clip each delta before any aggregator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]
# (deltas with leaves [clients, ...], weights [clients]) -> (aggregate, metrics)
AggregateFn = Callable[[Any, jax.Array], tuple[Any, Metrics]]


def _real(weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    real = weights > 0
    return real, jnp.sum(real.astype(jnp.int32))


def _per_client(mask: jax.Array, leaf: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - 1))


def _zero_absent(deltas, real: jax.Array):
    """Deltas with every absent client's values replaced by 0 (NaN * 0 would be NaN)."""
    return jax.tree.map(lambda x: jnp.where(_per_client(real, x), x, jnp.zeros_like(x)), deltas)


def weighted_mean(deltas, weights: jax.Array) -> tuple[Any, Metrics]:
    """The mean of the client deltas weighted by `weights`: FedAvg's aggregate, stacked.

    The engine computes the same as a streamed sum; this form is the reference, and what a
    round that stacks its deltas anyway uses.
    """
    real, num_votes = _real(weights)
    weights = jnp.where(real, weights, 0.0).astype(jnp.float32)
    denominator = jnp.where(num_votes > 0, jnp.sum(weights), 1.0)
    clean = _zero_absent(deltas, real)
    mean = jax.tree.map(
        lambda x: (jnp.tensordot(weights, x.astype(jnp.float32), axes=1) / denominator).astype(
            x.dtype
        ),
        clean,
    )
    return mean, {"aggregator_num_votes": num_votes.astype(jnp.float32)}


def _sorted_real_values(x: jax.Array, real: jax.Array) -> jax.Array:
    """x sorted along the client axis with the absent clients' values (+inf) sorted last, so
    positions [0, n) hold the n real clients' values in order."""
    x = x.astype(jnp.float32)
    return jnp.sort(jnp.where(_per_client(real, x), x, jnp.inf), axis=0)


def coordinate_median(deltas, weights: jax.Array) -> tuple[Any, Metrics]:
    """Coordinate-wise median of the real clients (Yin et al. 2018); with an even count the
    mean of the two middle values, as `np.median`. No real client: zeros."""
    real, num_votes = _real(weights)
    low, high = jnp.maximum(num_votes - 1, 0) // 2, num_votes // 2  # equal for odd n

    def median(x):
        ordered = _sorted_real_values(x, real)
        a = jax.lax.dynamic_index_in_dim(ordered, low, axis=0, keepdims=False)
        b = jax.lax.dynamic_index_in_dim(ordered, high, axis=0, keepdims=False)
        value = jnp.where(num_votes % 2 == 1, a, (a + b) / 2)
        return jnp.where(num_votes > 0, value, 0.0).astype(x.dtype)

    return jax.tree.map(median, deltas), {"aggregator_num_votes": num_votes.astype(jnp.float32)}


def check_trim_fraction(trim_fraction: float) -> None:
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(
            f"algorithm.aggregator.trim_fraction={trim_fraction!r} is not allowed; "
            "must be in [0, 0.5)"
        )


def trimmed_mean(deltas, weights: jax.Array, trim_fraction: float) -> tuple[Any, Metrics]:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the floor(beta n)
    largest and smallest values of the n real clients and average the rest, as
    `scipy.stats.trim_mean`. `trim_fraction` beta in [0, 0.5) is static."""
    check_trim_fraction(trim_fraction)
    real, num_votes = _real(weights)
    cohort_size = jax.tree.leaves(deltas)[0].shape[0]
    # floor(beta * n) in float64 for every n the cohort allows, as scipy computes it: under
    # float32 beta * n can round across an integer.
    trims = jnp.asarray([int(trim_fraction * n) for n in range(cohort_size + 1)], jnp.int32)
    num_trimmed = trims[num_votes]
    num_kept = num_votes - 2 * num_trimmed
    position = jnp.arange(cohort_size)
    kept = (position >= num_trimmed) & (position < num_votes - num_trimmed)

    def mean_of_kept(x):
        ordered = _sorted_real_values(x, real)
        total = jnp.sum(jnp.where(_per_client(kept, ordered), ordered, 0.0), axis=0)
        return (total / jnp.maximum(num_kept, 1)).astype(x.dtype)

    metrics = {
        "aggregator_num_votes": num_votes.astype(jnp.float32),
        "aggregator_num_trimmed": (2 * num_trimmed).astype(jnp.float32),
    }
    return jax.tree.map(mean_of_kept, deltas), metrics


def squared_distances(deltas, weights: jax.Array) -> jax.Array:
    """[clients, clients] squared L2 distances between whole flattened client deltas.

    Computed from the differences, one row at a time (memory of one stack), not from a Gram
    matrix: |a|^2 + |b|^2 - 2 a.b cancels catastrophically in float32 when one huge (hostile)
    update sits among small honest ones, which is exactly when Krum must see the honest
    distances. Absent clients count as zero deltas here; callers mask them.
    """
    real, _ = _real(weights)
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(_zero_absent(deltas, real))]
    cohort_size = leaves[0].shape[0]

    def row(i):
        total = jnp.zeros((cohort_size,), jnp.float32)
        for x in leaves:
            diff = x - jax.lax.dynamic_index_in_dim(x, i, axis=0, keepdims=True)
            total = total + jnp.sum(jnp.square(diff).reshape(cohort_size, -1), axis=1)
        return total

    distances = jax.lax.map(row, jnp.arange(cohort_size))
    return 0.5 * (distances + distances.T)  # exactly symmetric, so ties stay ties


def check_num_byzantine(num_byzantine: int, cohort_size: int) -> None:
    """Krum needs n > 2f + 2 clients (Blanchard et al. 2017)."""
    if not (isinstance(num_byzantine, int | np.integer) and num_byzantine >= 0):
        raise ValueError(
            f"algorithm.aggregator.num_byzantine={num_byzantine!r} is not allowed; "
            "must be an integer >= 0"
        )
    if cohort_size <= 2 * num_byzantine + 2:
        allowed = (
            f"at most {(cohort_size - 3) // 2}"
            if cohort_size >= 3
            else "none: Krum needs at least 3 clients per round"
        )
        raise ValueError(
            f"algorithm.aggregator.num_byzantine={num_byzantine} is not allowed with "
            f"{cohort_size} clients per round; Krum needs clients > 2 * num_byzantine + 2, "
            f"so {allowed}"
        )


def krum_scores(deltas, weights: jax.Array, num_byzantine: int) -> jax.Array:
    """Each client's Krum score: the sum of its squared distances to its n - f - 2 nearest
    other real clients (Blanchard et al. 2017); +inf for absent clients.

    When fewer real clients than 2f + 3 remain at run time (padding, dropped clients) the
    score uses max(1, n - f - 2) neighbours (at most n - 1), Flower's convention: Krum still
    picks a real client, without its guarantee.
    """
    real, num_votes = _real(weights)
    cohort_size = real.shape[0]
    distances = squared_distances(deltas, weights)
    others = real[None, :] & real[:, None] & ~jnp.eye(cohort_size, dtype=bool)
    nearest_first = jnp.sort(jnp.where(others, distances, jnp.inf), axis=1)
    num_neighbours = jnp.minimum(jnp.maximum(num_votes - num_byzantine - 2, 1), num_votes - 1)
    counted = jnp.arange(cohort_size)[None, :] < num_neighbours
    scores = jnp.sum(jnp.where(counted, nearest_first, 0.0), axis=1)
    return jnp.where(real, scores, jnp.inf)


def _ranks(scores: jax.Array) -> jax.Array:
    """0 for the lowest score; ties ranked by client position (as np.argsort, stable)."""
    order = jnp.argsort(scores, stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))


def multi_krum(
    deltas, weights: jax.Array, num_byzantine: int, num_selected: int | None = None
) -> tuple[Any, Metrics]:
    """Multi-Krum (Blanchard et al. 2017): the plain mean of the m real clients of lowest Krum
    score; m = n - f by default (n real clients at run time), at most n, at least 1.

    The cohort size is checked at trace time (`check_num_byzantine`); if at run time fewer
    than 2f + 3 real clients remain, scores use max(1, n - f - 2) neighbours and the metric
    `aggregator_fallback` is 1 (see `krum_scores`). No real client: zeros.
    """
    real, num_votes = _real(weights)
    check_num_byzantine(num_byzantine, real.shape[0])
    scores = krum_scores(deltas, weights, num_byzantine)
    wanted = num_votes - num_byzantine if num_selected is None else num_selected
    count = jnp.clip(wanted, 1, jnp.maximum(num_votes, 1))
    selected = real & (_ranks(scores) < count)
    aggregate, _ = weighted_mean(deltas, selected.astype(jnp.float32))
    return aggregate, _krum_metrics(scores, selected, num_votes, num_byzantine)


def krum(deltas, weights: jax.Array, num_byzantine: int) -> tuple[Any, Metrics]:
    """Krum (Blanchard et al. 2017): the delta of the real client of lowest score, exactly
    (ties go to the first client). Run-time fallback as `multi_krum`."""
    real, num_votes = _real(weights)
    check_num_byzantine(num_byzantine, real.shape[0])
    scores = krum_scores(deltas, weights, num_byzantine)
    best = jnp.argmin(scores)
    chosen = jax.tree.map(
        lambda x: jnp.where(
            num_votes > 0, jax.lax.dynamic_index_in_dim(x, best, axis=0, keepdims=False), 0
        ).astype(x.dtype),
        deltas,
    )
    selected = real & (jnp.arange(real.shape[0]) == best)
    return chosen, _krum_metrics(scores, selected, num_votes, num_byzantine)


def _krum_metrics(scores, selected, num_votes, num_byzantine) -> Metrics:
    return {
        "aggregator_num_votes": num_votes.astype(jnp.float32),
        "aggregator_num_selected": jnp.sum(selected).astype(jnp.float32),
        "aggregator_fallback": (num_votes <= 2 * num_byzantine + 2).astype(jnp.float32),
        "aggregator_krum_score": jnp.where(num_votes > 0, jnp.min(scores), 0.0),
    }


def _distances_to(point, leaves) -> jax.Array:
    total = 0.0
    for p, x in zip(point, leaves, strict=True):
        total = total + jnp.sum(jnp.square(x - p[None]).reshape(x.shape[0], -1), axis=1)
    return jnp.sqrt(total)


def geometric_median(
    deltas, weights: jax.Array, num_iterations: int = 32, smoothing: float = 1e-6
) -> tuple[Any, Metrics]:
    """Weighted geometric median, argmin_v sum_k a_k |v - x_k| with a_k the normalised weights
    of the real clients, by the smoothed Weiszfeld algorithm (RFA, Pillutla et al. 2022): from
    the weighted mean, `num_iterations` fixed steps v <- sum_k b_k x_k / sum_k b_k with
    b_k = a_k / max(nu, |v - x_k|), nu = `smoothing`.

    Reports the objective sum_k a_k |v - x_k| at the result. No real client: zeros.
    """
    real, num_votes = _real(weights)
    alpha = jnp.where(real, weights, 0.0).astype(jnp.float32)
    alpha = alpha / jnp.where(num_votes > 0, jnp.sum(alpha), 1.0)
    structure = jax.tree.structure(deltas)
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(_zero_absent(deltas, real))]

    def weighted_average(beta):
        total = jnp.sum(beta)
        return [jnp.tensordot(beta, x, axes=1) / jnp.where(total > 0, total, 1.0) for x in leaves]

    def step(_, point):
        beta = alpha / jnp.maximum(smoothing, _distances_to(point, leaves))
        return weighted_average(beta)

    point = jax.lax.fori_loop(0, num_iterations, step, weighted_average(alpha))
    objective = jnp.sum(alpha * _distances_to(point, leaves))
    median = jax.tree.unflatten(
        structure,
        [p.astype(x.dtype) for p, x in zip(point, jax.tree.leaves(deltas), strict=True)],
    )
    return median, {
        "aggregator_num_votes": num_votes.astype(jnp.float32),
        "aggregator_objective": objective,
    }


# ------------------------------------------------------------------------------------------
# The registry.


class AggregatorOptions(NamedTuple):
    """Hyperparameters of the aggregators, from `config.algorithm.aggregator`; all static."""

    trim_fraction: float = 0.1
    num_byzantine: int = 0
    num_selected: int | None = None  # Multi-Krum's m; None: n - f
    num_iterations: int = 32  # Weiszfeld steps of the geometric median
    smoothing: float = 1e-6  # the geometric median's nu


class Aggregator(NamedTuple):
    """A named aggregator. `linear` ones are a weighted sum the engine may stream without
    stacking the deltas; the others need the whole stack `[clients, ...]`."""

    name: str
    linear: bool
    apply: AggregateFn


AGGREGATORS: dict[str, Callable[[AggregatorOptions], Aggregator]] = {
    "mean": lambda o: Aggregator("mean", True, weighted_mean),
    "median": lambda o: Aggregator("median", False, coordinate_median),
    "trimmed_mean": lambda o: Aggregator(
        "trimmed_mean", False, lambda d, w: trimmed_mean(d, w, o.trim_fraction)
    ),
    "krum": lambda o: Aggregator("krum", False, lambda d, w: krum(d, w, o.num_byzantine)),
    "multi_krum": lambda o: Aggregator(
        "multi_krum", False, lambda d, w: multi_krum(d, w, o.num_byzantine, o.num_selected)
    ),
    "geometric_median": lambda o: Aggregator(
        "geometric_median",
        False,
        lambda d, w: geometric_median(d, w, o.num_iterations, o.smoothing),
    ),
}


def check_aggregator(
    name: str, trim_fraction: float = 0.1, num_byzantine: int = 0, cohort_size: int | None = None
) -> None:
    """Refuses a bad aggregator config in one line naming the field, before anything runs.

    `cohort_size` is `algorithm.clients_per_round`: Krum's n > 2f + 2 is checked on it (the
    real clients of a round are only known at run time; see `krum_scores` for fewer).
    """
    if name not in AGGREGATORS:
        raise ValueError(
            f"algorithm.aggregator.name={name!r} is unknown; known: {', '.join(AGGREGATORS)}"
        )
    if name == "trimmed_mean":
        check_trim_fraction(trim_fraction)
    if name in ("krum", "multi_krum") and cohort_size is not None:
        check_num_byzantine(num_byzantine, cohort_size)


def get_aggregator(
    name: str, options: AggregatorOptions | None = None, cohort_size: int | None = None
) -> Aggregator:
    """The aggregator of that name, its options checked."""
    options = options or AggregatorOptions()
    check_aggregator(name, options.trim_fraction, options.num_byzantine, cohort_size)
    return AGGREGATORS[name](options)
