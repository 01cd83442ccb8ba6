"""The aggregation pipeline in rounds: robust aggregators, norm bounding, DP-FedAvg and attacks
against numpy on the least-squares problem; every stage equal on every strategy and on 8
sharded devices (whose padded clients must never vote); the accountant against dp-accounting
called directly; bad settings refused in one line."""

from __future__ import annotations

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from fedjax_cv import algorithms
from fedjax_cv.algorithms import aggregation, attacks, robust
from fedjax_cv.algorithms.registry import build_algorithm, build_pipeline, dp_accountant
from fedjax_cv.config_base import base_config
from fedjax_cv.validation import ConfigError, validate_config
from tests import linear_problem as lp
from tests.xla import assert_results_agree, sharded_path_results

LR = 0.1
STRATEGIES = ("vmap", "sequential", "host")
ATTACKERS = np.array([True, False, False, True, False, False])


def cohort(attackers=None):
    """Six equal clients (weights alike, so every aggregator's vote counts the same)."""
    c = lp.make_cohort(num_clients=6, num_steps=2, batch=4, seed=3)
    if attackers is not None:
        c = c.replace(clients=c.clients.replace(attacker=np.asarray(attackers)))
    return c


def client_deltas(c) -> np.ndarray:
    """Each client's delta by hand (numpy SGD), flattened as [w..., b]: [clients, DIM + 1]."""
    params = lp.initial_params()
    rows = []
    for k in range(c.num_clients):
        final = lp.local_sgd(params, c, k, LR)
        rows.append(
            np.concatenate([final["w"] - params["w"], [float(final["b"]) - float(params["b"])]])
        )
    return np.stack(rows)


def one_round(pipeline, c, strategy="vmap", mesh=None, key=0, **options):
    algorithm = algorithms.fedavg(
        lp.loss_fn, LR, pipeline=pipeline, strategy=strategy, mesh=mesh, **options
    )
    state = algorithm.init(lp.initial_params())
    state, metrics = algorithm.apply(state, c, jax.random.key(key))
    state = jax.device_get(state)
    return state, jax.device_get(metrics)


def applied_delta(state) -> np.ndarray:
    params = lp.initial_params()
    return np.concatenate(
        [state.params["w"] - params["w"], [float(state.params["b"]) - float(params["b"])]]
    )


def pipeline_of(aggregator="mean", stages=(), denominator=None, **options):
    return aggregation.Pipeline(
        stages=tuple(stages),
        aggregator=robust.get_aggregator(aggregator, robust.AggregatorOptions(**options)),
        denominator=denominator,
    )


def clip_rows(rows: np.ndarray, bound: float) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.where(norms > bound, rows * bound / norms, rows)


# ------------------------------------------------------------------------------------------
# Each stage against numpy.


def test_median_round_is_numpy_median_of_the_client_deltas():
    c = cohort()
    state, metrics = one_round(pipeline_of("median"), c)
    np.testing.assert_allclose(
        applied_delta(state), np.median(client_deltas(c), axis=0), rtol=1e-5, atol=1e-6
    )
    assert metrics["aggregator_num_votes"] == 6


def test_trimmed_mean_round_is_scipy_trim_mean_of_the_client_deltas():
    c = cohort()
    state, _ = one_round(pipeline_of("trimmed_mean", trim_fraction=0.2), c)
    expected = scipy.stats.trim_mean(client_deltas(c), 0.2, axis=0)
    np.testing.assert_allclose(applied_delta(state), expected, rtol=1e-5, atol=1e-6)


def test_norm_bound_round_averages_the_clipped_deltas():
    c = cohort()
    rows = client_deltas(c)
    bound = float(np.median(np.linalg.norm(rows, axis=1)))  # about half the clients clipped
    state, metrics = one_round(pipeline_of(stages=[aggregation.norm_bound(bound)]), c)
    np.testing.assert_allclose(
        applied_delta(state), clip_rows(rows, bound).mean(0), rtol=1e-5, atol=1e-7
    )
    expected_fraction = np.mean(np.linalg.norm(rows, axis=1) > bound)
    np.testing.assert_allclose(metrics["norm_clipped"], expected_fraction)


def test_adaptive_norm_bound_moves_by_the_geometric_step():
    c = cohort()
    rows = client_deltas(c)
    bound = 0.5 * float(np.min(np.linalg.norm(rows, axis=1)))  # every client clipped
    stage = aggregation.adaptive_norm_bound(bound, target_quantile=0.5, learning_rate=0.2)
    state, metrics = one_round(pipeline_of(stages=[stage]), c)
    np.testing.assert_allclose(applied_delta(state), clip_rows(rows, bound).mean(0), rtol=1e-5)
    # b = 0 unclipped: C exp(-0.2 (0 - 0.5))
    np.testing.assert_allclose(state.aggregation["norm_bound"].bound, bound * math.exp(0.1), 1e-6)
    assert metrics["norm_clipped"] == 1.0


def test_dp_without_noise_and_with_an_infinite_clip_is_fedavg_bit_for_bit():
    c = cohort()
    dp = aggregation.dp_gaussian(0.0, math.inf, expected_clients=6)
    private, _ = one_round(pipeline_of(stages=[dp], denominator=6.0), c, aggregation="mean")
    plain, _ = one_round(None, c, aggregation="mean")
    jax.tree.map(np.testing.assert_array_equal, private.params, plain.params)


def test_dp_clipping_is_exact_and_the_sum_is_divided_by_the_expected_count():
    c = cohort()
    rows = client_deltas(c)
    clip = 0.5 * float(np.min(np.linalg.norm(rows, axis=1)))
    dp = aggregation.dp_gaussian(0.0, clip, expected_clients=8)
    state, metrics = one_round(pipeline_of(stages=[dp], denominator=8.0), c, aggregation="mean")
    np.testing.assert_allclose(
        applied_delta(state), clip_rows(rows, clip).sum(0) / 8, rtol=1e-5, atol=1e-8
    )
    assert metrics["dp_clipped_fraction"] == 1.0


def test_dp_noise_has_std_z_c_over_the_count():
    z, clip, count = 2.0, 0.5, 4.0
    stage = aggregation.dp_gaussian(z, clip, expected_clients=count)
    pipeline = pipeline_of(stages=[stage], denominator=count)
    n = 200_000
    zeros = {"a": jnp.zeros((n // 2,)), "b": jnp.zeros((n // 2,))}
    view = aggregation.ServerView(jax.random.key(3), jnp.float32(4), jnp.float32(count))
    noised, _, _ = jax.jit(pipeline.server)({}, zeros, {"dp_unclipped": jnp.float32(4)}, view)
    values = np.concatenate([np.asarray(v) for v in noised.values()])
    sigma = z * clip / count
    # std of a sample std: sigma / sqrt(2 n); mean: sigma / sqrt(n); both at 5 sigma.
    assert abs(values.std() - sigma) < 5 * sigma / math.sqrt(2 * n)
    assert abs(values.mean()) < 5 * sigma / math.sqrt(n)
    assert abs(scipy.stats.kurtosis(values)) < 0.1  # Gaussian, not uniform (-1.2)


def test_adaptive_dp_clip_follows_the_noised_unclipped_count():
    c = cohort()
    rows = client_deltas(c)
    clip = 2.0 * float(np.max(np.linalg.norm(rows, axis=1)))  # nobody clipped: b = 1
    dp = aggregation.dp_gaussian(
        0.0, clip, adaptive=True, clip_learning_rate=0.2, target_quantile=0.5, expected_clients=6
    )
    state, metrics = one_round(pipeline_of(stages=[dp], denominator=6.0), c, aggregation="mean")
    np.testing.assert_allclose(state.aggregation["dp"].clip_norm, clip * math.exp(-0.1), 1e-6)
    np.testing.assert_allclose(applied_delta(state), rows.mean(0), rtol=1e-5)
    assert metrics["dp_unclipped_estimate"] == 1.0


@pytest.mark.parametrize(
    "name, scale, corrupt",
    [
        ("sign_flip", None, lambda r: -r),
        ("sign_flip", 4.0, lambda r: -4.0 * r),
        ("scale", None, lambda r: 10.0 * r),
        ("scale", 3.0, lambda r: 3.0 * r),
    ],
)
def test_update_attacks_corrupt_exactly_the_attackers_deltas(name, scale, corrupt):
    c = cohort(ATTACKERS)
    stage = attacks.attack_stage(attacks.Attack(name, fraction=1 / 3, scale=scale))
    state, metrics = one_round(pipeline_of(stages=[stage]), c)
    rows = client_deltas(c)
    rows[ATTACKERS] = corrupt(rows[ATTACKERS])
    np.testing.assert_allclose(applied_delta(state), rows.mean(0), rtol=1e-5, atol=1e-7)
    assert metrics["attack_clients"] == 2


def test_gaussian_attack_replaces_the_attackers_deltas_with_noise():
    c = cohort(ATTACKERS)
    stage = attacks.attack_stage(attacks.Attack("gaussian", fraction=1 / 3, stddev=3.0))
    state, _ = one_round(pipeline_of("median", stages=[stage]), c)
    honest, _ = one_round(pipeline_of("mean"), c)
    # The noise is far from the honest deltas (std 3 vs ~0.1): the mean would move a lot, the
    # median of 4 honest and 2 noise values stays between honest ones.
    rows = client_deltas(c)[~ATTACKERS]
    delta = applied_delta(state)
    assert np.all(delta >= rows.min(0) - 1e-6) and np.all(delta <= rows.max(0) + 1e-6)
    assert not np.allclose(delta, applied_delta(honest), atol=1e-6)


def test_attackers_are_an_exact_fraction_drawn_from_seed_and_round():
    attack = attacks.Attack("sign_flip", fraction=0.3)
    chosen = [attacks.choose_attackers(attack, 0, r, 10) for r in range(20)]
    assert all(c.sum() == 3 for c in chosen)
    again = [attacks.choose_attackers(attack, 0, r, 10) for r in range(20)]
    np.testing.assert_array_equal(chosen, again)
    assert len({tuple(c) for c in chosen}) > 5  # rounds draw different clients
    other_seed = [attacks.choose_attackers(attack, 1, r, 10) for r in range(20)]
    assert not np.array_equal(chosen, other_seed)
    # Each client attacks in about 30% of rounds over many rounds.
    frequency = np.mean([attacks.choose_attackers(attack, 0, r, 10) for r in range(2000)], 0)
    assert np.all(np.abs(frequency - 0.3) < 0.05)


def test_data_attacks_poison_only_the_attackers():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 4, 5, 5, 1)).astype(np.float32)  # [clients, slots, ...]
    labels = rng.integers(0, 4, (3, 4)).astype(np.int32)
    who = np.array([False, True, False])
    examples = {"image": images, "label": labels}
    flipped = attacks.poison_examples(attacks.Attack("label_flip", 1.0), examples, who, 4)
    np.testing.assert_array_equal(flipped["label"][1], 3 - labels[1])
    np.testing.assert_array_equal(flipped["label"][~who], labels[~who])
    np.testing.assert_array_equal(flipped["image"], images)
    backdoor = attacks.Attack("backdoor", 1.0, target_label=2, patch_size=2, poison_fraction=0.5)
    poisoned = attacks.poison_examples(backdoor, examples, who, 4)
    expected_images, expected_labels = images.copy(), labels.copy()
    expected_images[1, :2, -2:, -2:, :] = 1.0  # first half of client 1's slots
    expected_labels[1, :2] = 2
    np.testing.assert_array_equal(poisoned["image"], expected_images)
    np.testing.assert_array_equal(poisoned["label"], expected_labels)
    # Masks: 255 (ignore) survives a flip.
    masks = np.array([[[0, 255], [3, 1]]], np.uint8)
    np.testing.assert_array_equal(attacks.flip_labels(masks, 4), [[[3, 255], [0, 2]]])


# ------------------------------------------------------------------------------------------
# Every stage on every strategy and on 8 sharded devices.


def path_pipelines() -> dict:
    attack = attacks.attack_stage(attacks.Attack("sign_flip", fraction=1 / 3))
    noise = attacks.attack_stage(attacks.Attack("gaussian", fraction=1 / 3, stddev=0.2))
    dp = aggregation.dp_gaussian(
        1.0, 0.05, adaptive=True, clipped_count_stddev=1.0, expected_clients=6
    )
    return {
        "median": pipeline_of("median", stages=[attack]),
        "trimmed_mean": pipeline_of("trimmed_mean", trim_fraction=0.2),
        "krum": pipeline_of("krum", num_byzantine=1),
        "multi_krum": pipeline_of("multi_krum", num_byzantine=1),
        "geometric_median": pipeline_of("geometric_median", stages=[noise]),
        "adaptive_norm_bound": pipeline_of(stages=[attack, aggregation.adaptive_norm_bound(0.05)]),
        "dp_adaptive": pipeline_of(stages=[noise, dp], denominator=6.0),
    }


def path_results(strategy: str, mesh=None) -> dict[str, np.ndarray]:
    out = {}
    for name, pipeline in path_pipelines().items():
        algorithm = algorithms.fedavgm(
            lp.loss_fn, LR, pipeline=pipeline, strategy=strategy, mesh=mesh
        )
        state = algorithm.init(lp.initial_params())
        for r in range(2):
            state, _ = algorithm.apply(state, cohort(ATTACKERS), jax.random.key(r))
        state = jax.device_get(state)
        leaves = jax.tree.leaves((state.params, state.opt_state, state.aggregation))
        for i, leaf in enumerate(leaves):
            out[f"{name}/{i}"] = np.asarray(leaf)
    return out


def test_every_stage_agrees_on_every_strategy():
    results = {s: path_results(s) for s in STRATEGIES}
    assert_results_agree(results, results["vmap"])


def test_every_stage_agrees_on_eight_sharded_devices(tmp_path):
    """Six clients padded to 8 on the mesh: the two padded clients must never vote."""
    sharded = sharded_path_results("tests.test_aggregation", tmp_path / "results.npz")
    assert_results_agree(sharded, path_results("vmap"))


# ------------------------------------------------------------------------------------------
# Config: the pipeline, the accountant, bad settings.


def dp_config(**dp):
    config = base_config()
    config.algorithm.clients_per_round = 10
    config.algorithm.dp.enabled = True
    for key, value in dp.items():
        setattr(config.algorithm.dp, key, value)
    return config


def test_reported_epsilon_is_dp_accounting_called_directly():
    config = dp_config(noise_multiplier=1.3, target_delta=1e-5)
    report = dp_accountant(config.algorithm, num_clients=100)
    for rounds in (1, 10, 50):
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                100, 10, dp_accounting.GaussianDpEvent(1.3 / 2)
            ),
            rounds,
        )
        accountant = dp_accounting.rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        expected = accountant.compose(event).get_epsilon(1e-5)
        assert report(rounds)["dp_epsilon"] == pytest.approx(expected, rel=1e-12)


def test_config_builds_attack_bound_dp_in_that_order_with_a_fixed_denominator():
    config = dp_config(noise_multiplier=0.5, clip_norm=2.0)
    config.algorithm.aggregator.name = "trimmed_mean"
    config.algorithm.aggregator.norm_bound = 3.0
    pipeline = build_pipeline(config.algorithm, attacks.Attack("scale", fraction=0.3))
    assert [s.name for s in pipeline.stages] == ["attack", "norm_bound", "dp", "compression"]
    assert pipeline.aggregator.name == "trimmed_mean" and not pipeline.linear
    assert pipeline.denominator == 10.0
    algorithm = build_algorithm(config.algorithm, lp.loss_fn, num_clients=50)
    assert algorithm.host_metrics(0) == {"dp_epsilon": 0.0}
    assert algorithm.host_metrics(3)["dp_epsilon"] > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"algorithm.aggregator.name": "mode"}, "algorithm.aggregator.name='mode' is unknown"),
        (
            {
                "algorithm.aggregator.name": "trimmed_mean",
                "algorithm.aggregator.trim_fraction": 0.5,
            },
            "algorithm.aggregator.trim_fraction=0.5",
        ),
        (
            {"algorithm.aggregator.name": "krum", "algorithm.aggregator.num_byzantine": 4},
            "algorithm.aggregator.num_byzantine=4",
        ),
        (
            {"algorithm.dp.enabled": True, "algorithm.dp.noise_multiplier": -1.0},
            "algorithm.dp.noise_multiplier=-1.0 is not allowed",
        ),
        (
            {"algorithm.dp.enabled": True, "algorithm.dp.target_delta": 1.0},
            "algorithm.dp.target_delta=1.0 is not allowed",
        ),
        (
            {"algorithm.dp.enabled": True, "algorithm.aggregation": "weighted"},
            "algorithm.aggregation='weighted' is not allowed with algorithm.dp.enabled",
        ),
        ({"algorithm.aggregator.norm_bound": -1.0}, "algorithm.aggregator.norm_bound=-1.0"),
    ],
)
def test_bad_aggregation_settings_are_one_line_naming_the_field(overrides, message):
    config = base_config()
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        target = config
        for part in section.split("."):
            target = getattr(target, part)
        setattr(target, field, value)
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "attack, message",
    [
        (attacks.Attack("teleport", 0.1), "attack.name='teleport' is unknown; known: none"),
        (attacks.Attack("sign_flip", 1.5), "attack.fraction=1.5 is not allowed; must be in [0, 1]"),
        (attacks.Attack("backdoor", 0.1, target_label=9), "attack.target_label=9"),
    ],
)
def test_bad_attacks_are_one_line_naming_the_field(attack, message):
    with pytest.raises(ValueError, match=None) as error:
        attacks.check_attack(attack, num_classes=4, task="classification")
    assert message in str(error.value)
