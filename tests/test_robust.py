"""Robust aggregators against numpy, scipy and Flower's Krum test; every one jit-compiled.

Absent clients (weight 0) hold garbage (NaN, inf, 1e30) and sit between the real ones: they
must never count as votes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from fedjax_cv.algorithms import aggregation, robust
from tests.xla import jit

COHORT = 11  # one padded cohort size for every test: one compilation per aggregator
SHAPES = {"kernel": (3, 2), "bias": (4,)}


def random_stack(num_real: int, seed: int = 0, cohort: int = COHORT):
    """Deltas [cohort, ...] with `num_real` real clients at random positions; the others hold
    garbage and weight 0. Returns (deltas, weights, real mask)."""
    rng = np.random.default_rng(seed)
    deltas = {
        name: rng.normal(size=(cohort,) + shape).astype(np.float32)
        for name, shape in SHAPES.items()
    }
    real = np.zeros(cohort, bool)
    real[rng.choice(cohort, num_real, replace=False)] = True
    garbage = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30], np.float32)
    for leaf in deltas.values():
        absent = leaf[~real]
        absent[...] = rng.choice(garbage, absent.shape)
        leaf[~real] = absent
    weights = np.where(real, rng.uniform(0.5, 3.0, cohort), 0.0).astype(np.float32)
    return deltas, weights, real


def flat(tree, axis_size=None):
    leaves = [np.asarray(tree[name], np.float64) for name in SHAPES]
    if axis_size is None:
        return np.concatenate([x.ravel() for x in leaves])
    return np.concatenate([x.reshape(axis_size, -1) for x in leaves], axis=1)


@functools.cache
def compiled(name: str, **options):
    aggregator = robust.get_aggregator(name, robust.AggregatorOptions(**options))
    return jit(aggregator.apply)


NUM_REAL = (1, 2, 5, 6, 9, 10, 11)  # odd and even counts, none and all padding


@pytest.mark.parametrize("num_real", NUM_REAL)
def test_coordinate_median_is_numpys_over_the_real_clients(num_real):
    deltas, weights, real = random_stack(num_real, seed=num_real)
    median, metrics = compiled("median")(deltas, weights)
    for name in SHAPES:
        expected = np.median(deltas[name][real], axis=0)
        np.testing.assert_allclose(median[name], expected, rtol=1e-6, atol=1e-7)
    assert metrics["aggregator_num_votes"] == num_real


@pytest.mark.parametrize("num_real", NUM_REAL)
@pytest.mark.parametrize("trim_fraction", [0.0, 0.1, 0.2, 0.3, 0.45])
def test_trimmed_mean_is_scipys_over_the_real_clients(num_real, trim_fraction):
    deltas, weights, real = random_stack(num_real, seed=100 + num_real)
    mean, metrics = compiled("trimmed_mean", trim_fraction=trim_fraction)(deltas, weights)
    for name in SHAPES:
        expected = scipy.stats.trim_mean(deltas[name][real], trim_fraction, axis=0)
        np.testing.assert_allclose(mean[name], expected, rtol=1e-5, atol=1e-6)
    assert metrics["aggregator_num_trimmed"] == 2 * int(trim_fraction * num_real)


def test_trimmed_mean_discards_the_extremes():
    # 10 real clients, beta 0.2: the two largest and two smallest go, whatever they hold.
    values = np.array([-1e6, -5e5, 1, 2, 3, 4, 5, 6, 7e5, 1e7], np.float32)
    deltas = {"kernel": np.repeat(values[:, None, None], 3, 1).repeat(2, 2)}
    deltas["bias"] = np.zeros((10, 4), np.float32)
    deltas = {
        k: np.concatenate([v, np.full((1,) + v.shape[1:], np.nan, np.float32)])
        for k, v in deltas.items()
    }
    weights = np.r_[np.ones(10), 0.0].astype(np.float32)
    mean, _ = compiled("trimmed_mean", trim_fraction=0.2)(deltas, weights)
    np.testing.assert_allclose(mean["kernel"], np.full((3, 2), 3.5), rtol=1e-6)


@pytest.mark.parametrize("num_real", NUM_REAL)
def test_mean_is_the_weighted_mean_of_the_real_clients(num_real):
    deltas, weights, real = random_stack(num_real, seed=200 + num_real)
    mean, _ = compiled("mean")(deltas, weights)
    for name in SHAPES:
        expected = np.average(deltas[name][real], axis=0, weights=weights[real])
        np.testing.assert_allclose(mean[name], expected, rtol=1e-5, atol=1e-6)


def test_no_real_client_gives_zeros_for_every_aggregator():
    deltas, weights, _ = random_stack(0)
    for name in robust.AGGREGATORS:
        options = {"num_byzantine": 1} if "krum" in name else {}
        result, metrics = compiled(name, **options)(deltas, weights)
        for leaf in jax.tree.leaves(result):
            np.testing.assert_array_equal(leaf, 0.0)
        assert metrics["aggregator_num_votes"] == 0


# ------------------------------------------------------------------------------------------
# Krum and Multi-Krum.


# Flower's Krum test (krum_test.py, test_aggregate_fit): clients at [0.2]x4, [0.7]x4 and
# [1.0]x4, f = 1, Krum selects [0.7]x4. Flower scores models; Krum is translation-invariant,
# so the deltas from any common server model give the same choice.
FLOWER = np.array([np.full(4, v, np.float32) for v in (0.2, 0.7, 1.0)])


def test_krum_selects_flowers_golden_client():
    # Three clients are too few for f = 1 (3 <= 2f + 2): the cohort of 5 passes the static
    # check, two of its clients are garbage padding, and Krum falls back to one neighbour, as
    # Flower does.
    padded = np.insert(FLOWER, [1, 2], np.array([[np.nan] * 4, [1e30] * 4], np.float32), axis=0)
    weights = np.array([5, 0, 5, 0, 5], np.float32)
    krum = jit(functools.partial(robust.krum, num_byzantine=1))
    chosen, metrics = krum({"w": padded}, weights)
    np.testing.assert_array_equal(chosen["w"], np.full(4, 0.7, np.float32))
    assert metrics["aggregator_fallback"] == 1 and metrics["aggregator_num_votes"] == 3
    # The same clients, unpadded, with f = 0 (3 > 2): one neighbour too, same choice.
    krum = jit(functools.partial(robust.krum, num_byzantine=0))
    chosen, metrics = krum({"w": FLOWER}, np.full(3, 5, np.float32))
    np.testing.assert_array_equal(chosen["w"], np.full(4, 0.7, np.float32))
    assert metrics["aggregator_fallback"] == 0


def numpy_krum_scores(points: np.ndarray, num_byzantine: int) -> np.ndarray:
    """Blanchard et al. 2017, by the book: sum of squared distances to the n - f - 2 nearest
    (at least 1: Flower's convention when n <= 2f + 2)."""
    n = len(points)
    scores = []
    for i in range(n):
        distances = sorted(float(np.sum((points[i] - points[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(distances[: max(1, n - num_byzantine - 2)]))
    return np.array(scores)


def byzantine_stack(num_real: int, num_attackers: int, seed: int):
    """Honest clients near a common update, attackers far off (scaled x 1e4), plus garbage
    padding."""
    deltas, weights, real = random_stack(num_real, seed=seed)
    rng = np.random.default_rng(seed)
    positions = np.flatnonzero(real)
    attackers = rng.choice(positions, num_attackers, replace=False)
    for leaf in deltas.values():
        leaf[real] = 1.0 + 0.01 * leaf[real]
        leaf[attackers] *= 1e4
    return deltas, weights, real


# (4, 2): too few real clients at run time (4 <= 2f + 2) in a cohort of 11 that passes.
@pytest.mark.parametrize("num_real,num_byzantine", [(11, 2), (9, 3), (7, 1), (4, 2)])
def test_krum_and_multi_krum_equal_a_numpy_loop(num_real, num_byzantine):
    deltas, weights, real = byzantine_stack(num_real, num_byzantine, seed=num_real)
    points = flat(deltas, COHORT)[real]
    scores = numpy_krum_scores(points, num_byzantine)
    order = np.argsort(scores, kind="stable")

    chosen, _ = jit(functools.partial(robust.krum, num_byzantine=num_byzantine))(deltas, weights)
    np.testing.assert_array_equal(flat(chosen), points[order[0]])
    for num_selected in (None, 3):
        m = num_real - num_byzantine if num_selected is None else num_selected
        multi, metrics = jit(
            functools.partial(
                robust.multi_krum, num_byzantine=num_byzantine, num_selected=num_selected
            )
        )(deltas, weights)
        np.testing.assert_allclose(flat(multi), points[order[:m]].mean(axis=0), rtol=1e-5)
        assert metrics["aggregator_num_selected"] == m
        assert metrics["aggregator_fallback"] == (num_real <= 2 * num_byzantine + 2)
    computed = jit(functools.partial(robust.krum_scores, num_byzantine=num_byzantine))(
        deltas, weights
    )
    np.testing.assert_allclose(np.asarray(computed)[real], scores, rtol=1e-4)
    assert np.all(np.isinf(np.asarray(computed)[~real]))


@pytest.mark.parametrize("name", ["krum", "multi_krum"])
def test_krum_with_one_real_client_returns_it(name):
    # No neighbour to score against: every score is 0, and an absent client must not win.
    deltas, weights, real = random_stack(1, seed=5)
    chosen, metrics = compiled(name, num_byzantine=1)(deltas, weights)
    np.testing.assert_array_equal(flat(chosen), flat(deltas, COHORT)[real][0])
    assert metrics["aggregator_num_selected"] == 1


def test_krum_distances_survive_a_huge_attacker():
    # A Gram matrix (|a|^2 + |b|^2 - 2ab) in float32 would drown the honest clients' 1e-4
    # distances under the attacker's 1e12 norms.
    rng = np.random.default_rng(7)
    honest = 1.0 + 1e-2 * rng.normal(size=(6, 50)).astype(np.float32)
    deltas = {"w": np.concatenate([honest, np.full((1, 50), 1e6, np.float32)])}
    weights = np.ones(7, np.float32)
    computed = jit(robust.squared_distances)(deltas, weights)
    pairs = honest.astype(np.float64)[:, None] - honest.astype(np.float64)[None]
    np.testing.assert_allclose(computed[:6, :6], np.sum(pairs**2, axis=-1), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Geometric median.


@pytest.mark.parametrize("seed", [0, 1])
def test_geometric_median_matches_scipy_minimisation(seed):
    deltas, weights, real = random_stack(8, seed=300 + seed)
    for leaf in deltas.values():
        leaf[np.flatnonzero(real)[0]] *= 50  # an outlier pulls the mean, not the median
    median, metrics = compiled("geometric_median")(deltas, weights)
    points, alpha = flat(deltas, COHORT)[real], weights[real] / weights[real].sum()

    def objective(v):
        return np.sum(alpha * np.linalg.norm(points - v, axis=1))

    def gradient(v):
        diff = v - points
        return np.sum(alpha[:, None] * diff / np.linalg.norm(diff, axis=1)[:, None], axis=0)

    start = np.median(points, axis=0)
    best = scipy.optimize.minimize(
        objective, start, jac=gradient, method="BFGS", options={"gtol": 1e-12}
    )
    np.testing.assert_allclose(flat(median), best.x, atol=1e-4)
    np.testing.assert_allclose(metrics["aggregator_objective"], best.fun, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Norm bounding: the pipeline's client-side stages, here on each client of a stack.


def stage_round(stage, state, deltas, weights):
    """The stage's client part on every client of the stack (vmapped, as the vmap strategy
    runs it), then its server part: (deltas after the client part, new state, metrics)."""
    pipeline = aggregation.Pipeline(stages=(stage,))
    shared = {} if state is None else {stage.name: state}

    def client(delta, weight, index):
        view = aggregation.ClientView(None, jax.random.key(index), weight)
        delta, _, sums = pipeline.client(shared, delta, {}, view)
        return delta, sums

    out, sums = jax.vmap(client)(deltas, weights, jnp.arange(weights.shape[0]))
    num_votes = jnp.sum(weights > 0).astype(jnp.float32)
    view = aggregation.ServerView(jax.random.key(0), num_votes, num_votes)
    summed = jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)
    _, shared, metrics = pipeline.server(shared, None, summed, view)
    return out, shared.get(stage.name), metrics


def test_norm_bound_is_exact():
    deltas, weights, real = random_stack(8, seed=400)
    norms = np.linalg.norm(flat(deltas, COHORT), axis=1)
    bound = float(np.median(norms[real]))
    clipped, _, metrics = jit(lambda d, w: stage_round(aggregation.norm_bound(bound), None, d, w))(
        deltas, weights
    )
    after = flat(clipped, COHORT)
    for c in np.flatnonzero(real):
        if norms[c] > bound:
            np.testing.assert_allclose(np.linalg.norm(after[c]), bound, rtol=1e-6)
            np.testing.assert_allclose(
                after[c] * norms[c] / bound, flat(deltas, COHORT)[c], rtol=1e-5
            )
        else:
            for name in SHAPES:  # untouched, bit for bit
                np.testing.assert_array_equal(clipped[name][c], deltas[name][c])
    assert metrics["norm_clipped"] == pytest.approx(np.mean(norms[real] > bound))


def adaptive(initial, gamma, eta):
    return aggregation.adaptive_norm_bound(initial, target_quantile=gamma, learning_rate=eta)


def test_adaptive_bound_follows_the_geometric_quantile_update():
    deltas, weights, real = random_stack(9, seed=500)
    norms = np.linalg.norm(flat(deltas, COHORT), axis=1)[real]
    gamma, eta = 0.3, 0.2
    stage = adaptive(1.5, gamma, eta)
    step = jit(lambda state, d, w: stage_round(stage, state, d, w))
    state = stage.init(None)
    bound = 1.5
    for _ in range(3):
        _, state, metrics = step(state, deltas, weights)
        below = np.mean(norms <= bound)
        assert metrics["norm_clipped"] == pytest.approx(1 - below)
        bound = bound * np.exp(-eta * (below - gamma))
        np.testing.assert_allclose(state.bound, bound, rtol=1e-6)


def test_adaptive_bound_converges_to_the_target_quantile():
    rng = np.random.default_rng(1)
    norms = np.exp(rng.normal(size=(300, COHORT))).astype(np.float32)  # 300 rounds
    weights = np.ones(COHORT, np.float32)
    stage = adaptive(0.1, 0.7, 0.1)

    def round_(state, round_norms):
        _, state, _ = stage_round(stage, state, {"w": round_norms[:, None]}, weights)
        return state, state.bound

    _, bounds = jit(lambda s, n: jax.lax.scan(round_, s, n))(stage.init(None), norms)
    target = np.quantile(norms, 0.7)
    assert abs(np.mean(bounds[-100:]) / target - 1) < 0.1


# ------------------------------------------------------------------------------------------
# Registry and bad settings.


def test_registry_holds_the_contract_names():
    assert set(robust.AGGREGATORS) == {
        "mean",
        "median",
        "trimmed_mean",
        "krum",
        "multi_krum",
        "geometric_median",
    }
    assert robust.get_aggregator("mean").linear
    assert not any(robust.get_aggregator(n).linear for n in robust.AGGREGATORS if n != "mean")


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(name="bulyan"), r"algorithm\.aggregator\.name='bulyan' is unknown; known: mean, "),
        (dict(name="trimmed_mean", trim_fraction=0.5), r"trim_fraction=0\.5 .*\[0, 0\.5\)"),
        (dict(name="trimmed_mean", trim_fraction=-0.1), r"trim_fraction=-0\.1 "),
        (
            dict(name="krum", num_byzantine=2, cohort_size=6),
            r"num_byzantine=2 .*6 clients.*at most 1$",
        ),
        (dict(name="multi_krum", num_byzantine=1, cohort_size=4), r"num_byzantine=1 .*at most 0$"),
        (dict(name="krum", num_byzantine=-1, cohort_size=10), r"num_byzantine=-1 .*>= 0"),
        (dict(name="krum", num_byzantine=0, cohort_size=2), r"none: Krum needs at least 3 "),
    ],
)
def test_bad_settings_are_refused_in_one_line(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern) as error:
        robust.check_aggregator(**kwargs)
    assert "\n" not in str(error.value)


def test_krum_refuses_a_too_small_cohort_at_trace_time():
    deltas = {"w": jnp.zeros((4, 3))}
    with pytest.raises(ValueError, match=r"algorithm\.aggregator\.num_byzantine=1 .*4 clients"):
        jit(functools.partial(robust.krum, num_byzantine=1))(deltas, jnp.ones(4))
    robust.check_aggregator("krum", num_byzantine=1, cohort_size=5)  # 5 > 4 is fine
