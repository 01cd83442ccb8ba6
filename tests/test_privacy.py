"""DP-FedAvg pieces and the accountant: against dp-accounting called directly, the issue's
golden RDP values, exact clipping and the noise's statistics."""

from __future__ import annotations

import functools

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedjax_cv.algorithms import privacy
from tests.xla import jit

DELTA = 1e-5


def test_rdp_of_the_poisson_subsampled_gaussian_matches_the_golden_values():
    # Issue 12: q = 0.01, sigma = 2.5, 50 steps, dp-accounting 0.6.0.
    orders = [1.5, 2.5, 5, 50, 100]
    golden = [6.7058e-4, 1.0855e-3, 2.1808e-3, 2.3846e-2, 1.6742e2]
    curve = privacy.rdp_curve(2.5, orders, rounds=50, sampling_probability=0.01)
    np.testing.assert_allclose(curve, golden, rtol=5e-5)  # half a unit of the 5th digit


def direct_epsilon(
    accountant, event, neighbours=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
):
    fresh = (
        rdp.RdpAccountant(neighboring_relation=neighbours)
        if accountant == "rdp"
        else pld.PLDAccountant(neighboring_relation=neighbours)
    )
    return fresh.compose(event).get_epsilon(DELTA)


def poisson_event(noise_multiplier, q, rounds):
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, gaussian), rounds
    )


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting_called_directly(accountant):
    expected = direct_epsilon(accountant, poisson_event(1.1, 0.02, 200))
    given_q = privacy.epsilon(
        1.1, rounds=200, target_delta=DELTA, sampling_probability=0.02, accountant=accountant
    )
    from_counts = privacy.epsilon(
        1.1,
        rounds=200,
        target_delta=DELTA,
        clients_per_round=20,
        num_clients=1000,
        accountant=accountant,
    )
    assert given_q == pytest.approx(expected, rel=1e-12)
    assert from_counts == pytest.approx(expected, rel=1e-12)
    assert 0 < expected < 10


def test_fixed_size_sampling_is_replace_one_with_twice_the_sensitivity():
    # Replacing one client moves the sum of clipped updates by up to 2C: noise multiplier z/2.
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            1000, 20, dp_accounting.GaussianDpEvent(1.1 / 2)
        ),
        200,
    )
    expected = direct_epsilon("rdp", event, dp_accounting.NeighboringRelation.REPLACE_ONE)
    computed = privacy.epsilon(
        1.1,
        rounds=200,
        target_delta=DELTA,
        clients_per_round=20,
        num_clients=1000,
        sampling="fixed",
    )
    assert computed == pytest.approx(expected, rel=1e-12)


def test_epsilon_edge_cases():
    options = dict(target_delta=DELTA, sampling_probability=0.1)
    assert privacy.epsilon(0.0, rounds=10, **options) == np.inf
    assert privacy.epsilon(0.0, rounds=10, accountant="pld", **options) == np.inf
    assert privacy.epsilon(1.0, rounds=0, **options) == 0.0
    assert privacy.calibrate_noise(1.0, rounds=0, **options) == 0.0
    more = privacy.epsilon(1.0, rounds=20, **options)
    assert (
        privacy.epsilon(1.0, rounds=10, **options)
        < more
        < privacy.epsilon(0.8, rounds=20, **options)
    )


@pytest.mark.parametrize(
    "accountant,target,rounds,q,discretization",
    [("rdp", 2.0, 100, 0.05, 1e-4), ("rdp", 8.0, 20, 0.2, 1e-4), ("pld", 1.0, 30, 0.1, 1e-3)],
)
def test_calibration_round_trips_from_below(accountant, target, rounds, q, discretization):
    options = dict(
        rounds=rounds,
        target_delta=DELTA,
        sampling_probability=q,
        accountant=accountant,
        pld_discretization=discretization,
    )
    noise = privacy.calibrate_noise(target, tolerance=1e-4, **options)
    reached = privacy.epsilon(noise, **options)
    assert target * 0.995 < reached <= target
    assert privacy.epsilon(noise - 2e-4, **options) > target  # and it is the smallest such


@pytest.mark.parametrize(
    "call,pattern",
    [
        (
            lambda: privacy.epsilon(-0.5, rounds=1, target_delta=DELTA, sampling_probability=0.1),
            r"algorithm\.dp\.noise_multiplier=-0\.5 is not allowed; must be >= 0",
        ),
        (
            lambda: privacy.epsilon(1.0, rounds=1, target_delta=0.0, sampling_probability=0.1),
            r"algorithm\.dp\.target_delta=0\.0 is not allowed; must be in \(0, 1\)",
        ),
        (
            lambda: privacy.epsilon(1.0, rounds=1, target_delta=1.0, sampling_probability=0.1),
            r"algorithm\.dp\.target_delta=1\.0 ",
        ),
        (
            lambda: privacy.calibrate_noise(
                1.0, rounds=1, target_delta=2.0, sampling_probability=0.1
            ),
            r"algorithm\.dp\.target_delta=2\.0 ",
        ),
        (lambda: privacy.check_dp(-1.0, 1.0, DELTA), r"algorithm\.dp\.noise_multiplier=-1\.0 "),
        (lambda: privacy.check_dp(1.0, 0.0, DELTA), r"algorithm\.dp\.clip_norm=0\.0 "),
        (lambda: privacy.check_dp(1.0, 1.0, -1e-5), r"algorithm\.dp\.target_delta=-1e-05 "),
        (
            lambda: privacy.epsilon(
                1.0, rounds=1, target_delta=DELTA, sampling_probability=0.1, accountant="moments"
            ),
            r"algorithm\.dp\.accountant='moments' is unknown; known: rdp, pld",
        ),
        (
            lambda: privacy.epsilon(
                1.0,
                rounds=1,
                target_delta=DELTA,
                clients_per_round=5,
                num_clients=10,
                accountant="pld",
                sampling="fixed",
            ),
            r"accountant='pld' is not allowed with algorithm\.dp\.sampling='fixed'",
        ),
        (
            lambda: privacy.epsilon(
                1.0, rounds=1, target_delta=DELTA, clients_per_round=50, num_clients=10
            ),
            r"algorithm\.clients_per_round=50 .*data\.num_clients=10",
        ),
        (
            lambda: privacy.epsilon(1.0, rounds=1, target_delta=DELTA, sampling_probability=1.5),
            r"sampling_probability=1\.5 ",
        ),
        (
            lambda: privacy.adaptive_delta_noise_multiplier(1.0, 0.4),
            r"algorithm\.dp\.clipped_count_stddev=0\.4 .*noise_multiplier=1\.0",
        ),
    ],
)
def test_bad_settings_are_refused_in_one_line(call, pattern):
    with pytest.raises(ValueError, match=pattern) as error:
        call()
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------
# On device.


def update_tree(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": (scale * rng.normal(size=(3, 3, 2, 4))).astype(np.float32)},
        "bias": (scale * rng.normal(size=(4,))).astype(np.float32),
    }


def tree_norm(tree):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))


def test_clipping_is_exact():
    clip = jit(privacy.clip_update)
    long = update_tree(0, scale=3.0)
    norm = tree_norm(long)
    clipped, was_clipped = clip(long, norm / 4)
    assert bool(was_clipped)
    np.testing.assert_allclose(tree_norm(clipped), norm / 4, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(long), strict=True):
        np.testing.assert_allclose(np.asarray(a) * 4, b, rtol=1e-6)  # same direction
    for bound in (norm * 1.01, np.inf):  # within the bound: bit for bit
        kept, was_clipped = clip(long, bound)
        assert not bool(was_clipped)
        for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(long), strict=True):
            np.testing.assert_array_equal(a, b)


def test_gaussian_noise_has_the_requested_std():
    count = 200_000
    tree = {"a": np.zeros((count // 2,), np.float32), "b": np.zeros((count // 4, 2), np.float32)}
    stddev = 0.7
    noised = jit(privacy.gaussian_noise)(jax.random.key(3), tree, stddev)
    samples = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(noised)])
    # The sample std of N normals has std about sigma / sqrt(2N); the mean sigma / sqrt(N).
    assert abs(samples.std() - stddev) < 5 * stddev / np.sqrt(2 * count)
    assert abs(samples.mean()) < 5 * stddev / np.sqrt(count)
    a, b = np.asarray(noised["a"]), np.asarray(noised["b"]).ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(count / 2)  # one key per leaf
    again = jit(privacy.gaussian_noise)(jax.random.key(3), tree, stddev)
    np.testing.assert_array_equal(again["a"], noised["a"])


def test_dp_fedavg_with_no_noise_and_no_clip_is_fedavg_bit_for_bit():
    """Clip every client at infinity, sum, add noise of std 0 x inf... of std 0: the plain sum."""
    updates = [update_tree(seed) for seed in range(5)]
    updates[2]["bias"][0] = -0.0  # x + 0.0 would turn it into +0.0
    stacked = jax.tree.map(lambda *x: np.stack(x), *updates)

    def dp_sum(stack, key):
        clipped, _ = jax.vmap(privacy.clip_update, in_axes=(0, None))(stack, jnp.inf)
        total = jax.tree.map(lambda x: jnp.sum(x, axis=0), clipped)
        return privacy.gaussian_noise(key, total, privacy.noise_stddev(0.0, 1.0))

    plain = jit(lambda stack: jax.tree.map(lambda x: jnp.sum(x, axis=0), stack))(stacked)
    private = jit(dp_sum)(stacked, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(private), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
    zero = {"x": np.array([-0.0, 1.5], np.float32)}
    same = jit(privacy.gaussian_noise)(jax.random.key(1), zero, 0.0)
    np.testing.assert_array_equal(np.asarray(same["x"]).view(np.uint32), zero["x"].view(np.uint32))


def test_adaptive_clip_update_is_the_geometric_step_of_andrew_et_al():
    state = privacy.adaptive_clip_init(2.0)
    step = jit(
        functools.partial(privacy.adaptive_clip_update, target_quantile=0.6, learning_rate=0.3)
    )
    # 7 of 10 real clients unclipped, expected 10: b = 0.7.
    state, metrics = step(state, jax.random.key(0), 7.0, 10.0, 10.0)
    np.testing.assert_allclose(state.clip_norm, 2.0 * np.exp(-0.3 * (0.7 - 0.6)), rtol=1e-6)
    assert metrics["dp_unclipped_estimate"] == pytest.approx(0.7)
    # Fewer clients than expected: the count is centred, (7 - 4) / 10 + 0.5 = 0.8.
    _, metrics = step(privacy.adaptive_clip_init(2.0), jax.random.key(0), 7.0, 8.0, 10.0)
    assert metrics["dp_unclipped_estimate"] == pytest.approx(0.8)


def test_adaptive_clip_count_noise_has_the_requested_std():
    sigma_b, expected = 2.0, 40.0
    step = functools.partial(
        privacy.adaptive_clip_update, target_quantile=0.5, learning_rate=0.0, count_stddev=sigma_b
    )
    keys = jax.random.split(jax.random.key(5), 4000)
    _, metrics = jit(
        jax.vmap(lambda k: step(privacy.adaptive_clip_init(1.0), k, 20.0, 40.0, expected))
    )(keys)
    estimates = np.asarray(metrics["dp_unclipped_estimate"], np.float64)
    std = sigma_b / expected  # of b = (count - n/2 + noise) / expected + 1/2, around 0.5
    assert abs(estimates.std() - std) < 5 * std / np.sqrt(2 * len(keys))
    assert abs(estimates.mean() - 0.5) < 5 * std / np.sqrt(len(keys))


def test_adaptive_delta_noise_multiplier_keeps_the_total_privacy():
    z, sigma_b = 1.0, 2.5  # Andrew et al.: z^-2 = z_delta^-2 + (2 sigma_b)^-2
    z_delta = privacy.adaptive_delta_noise_multiplier(z, sigma_b)
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)
    assert z_delta > z
    assert privacy.adaptive_delta_noise_multiplier(0.0, 1.0) == 0.0
    assert privacy.adaptive_delta_noise_multiplier(1.0, 0.6) > 1.0  # 2 sigma_b = 1.2 > z
