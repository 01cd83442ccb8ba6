"""Learning-rate schedules over rounds: factors by hand, rounds against numpy SGD at the
scheduled learning rate, and bad settings refused in one line."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedjax_cv import algorithms
from fedjax_cv.algorithms.registry import build_algorithm
from fedjax_cv.algorithms.schedules import round_schedule
from fedjax_cv.config_base import base_config
from fedjax_cv.validation import ConfigError, validate_config
from tests import linear_problem as lp

LR = 0.1
ROUNDS = 4


def factors(schedule, rounds=ROUNDS):
    return [float(schedule(np.int32(r))) for r in range(rounds)]


def test_factors_equal_the_formulas_by_hand():
    # poly: (1 - r/R)^0.9 with R = 4: exp(0.9 ln 0.75) = 0.771890, 0.5^0.9, 0.25^0.9
    expected_poly = [1.0, 0.771890, 0.535887, 0.287175]
    np.testing.assert_allclose(factors(round_schedule("poly", ROUNDS)), expected_poly, rtol=1e-5)
    np.testing.assert_allclose(
        factors(round_schedule("poly", ROUNDS, power=2.0)), [1, 0.5625, 0.25, 0.0625], rtol=1e-6
    )
    np.testing.assert_allclose(
        factors(round_schedule("linear", ROUNDS)), [1, 0.75, 0.5, 0.25], rtol=1e-6
    )
    # warm-up over 2 rounds: (r + 1) / 2 for r < 2, then the schedule's own factor
    np.testing.assert_allclose(
        factors(round_schedule("constant", ROUNDS, warmup_rounds=2)), [0.5, 1, 1, 1], rtol=1e-6
    )
    np.testing.assert_allclose(
        factors(round_schedule("linear", ROUNDS, warmup_rounds=3)),
        [1 / 3, 0.75 * 2 / 3, 0.5, 0.25],
        rtol=1e-6,
    )
    assert round_schedule("constant", ROUNDS) is None  # the plain round, unchanged


@pytest.mark.parametrize("strategy", ["vmap", "host"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_scheduled_round_trains_at_the_scaled_learning_rate(strategy, momentum):
    cohorts = [lp.make_cohort(seed=s) for s in range(ROUNDS)]
    algorithm = algorithms.fedavg(
        lp.loss_fn,
        LR,
        client_momentum=momentum,
        lr_schedule=round_schedule("linear", ROUNDS, warmup_rounds=2),
        strategy=strategy,
    )
    state = algorithm.init(lp.initial_params())
    reported = []
    for r, cohort in enumerate(cohorts):
        state, metrics = algorithm.apply(state, cohort, jax.random.key(r))
        reported.append(float(metrics["lr_factor"]))
    # by hand: round r trains at LR * f_r, f = (1/2) * 1, 1 * 0.75, 0.5, 0.25
    by_hand = [0.5, 0.75, 0.5, 0.25]
    np.testing.assert_allclose(reported, by_hand, rtol=1e-6)
    w = {k: np.asarray(v, np.float64) for k, v in lp.initial_params().items()}
    for cohort, factor in zip(cohorts, by_hand, strict=True):
        finals = [lp.local_sgd(w, cohort, c, LR * factor, momentum=momentum) for c in range(3)]
        delta = lp.mean_delta(w, cohort, finals, cohort.clients.num_examples)
        w = {k: w[k] + delta[k] for k in w}
    params = jax.device_get(state.params)
    for key in w:
        np.testing.assert_allclose(np.asarray(params[key]), w[key], atol=1e-5, rtol=1e-5)


def test_the_config_builds_the_schedule_over_the_runs_rounds():
    config = base_config()
    config.algorithm.client.learning_rate = LR
    config.algorithm.client.lr_schedule = "poly"
    config.algorithm.client.lr_power = 2.0
    algorithm = build_algorithm(config.algorithm, lp.loss_fn, num_rounds=2)
    state = algorithm.init(lp.initial_params())
    seen = []
    for r in range(2):
        state, metrics = algorithm.apply(state, lp.make_cohort(seed=r), jax.random.key(r))
        seen.append(float(metrics["lr_factor"]))
    assert seen == [1.0, 0.25]  # (1 - 0/2)^2, (1 - 1/2)^2


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("lr_schedule", "cosine", "allowed: constant, poly, linear"),
        ("lr_power", 0.0, "must be > 0"),
        ("lr_warmup_rounds", -1, "must be an integer >= 0"),
    ],
)
def test_bad_schedule_settings_are_one_line_naming_the_field(field, value, allowed):
    config = base_config()
    config.algorithm.client[field] = value
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    message = str(error.value)
    assert "\n" not in message
    assert f"algorithm.client.{field}={value!r}" in message
    assert allowed in message
