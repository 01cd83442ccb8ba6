"""Every algorithm against hand-computed math (numpy) or an independent optax run."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from fedjax_cv import algorithms
from fedjax_cv.algorithms import ClientObjective
from tests import linear_problem as lp

STRATEGIES = ("vmap", "sequential", "host")
LR = 0.1


def run_rounds(algorithm, cohorts, params=None):
    state = algorithm.init(lp.initial_params() if params is None else params)
    history = []
    for r, cohort in enumerate(cohorts):
        state, metrics = algorithm.apply(state, cohort, jax.random.key(r))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def assert_params_close(actual, expected, atol=1e-5):
    for key in expected:
        np.testing.assert_allclose(np.asarray(actual[key]), expected[key], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fedavg_is_the_example_weighted_mean_of_client_models(strategy):
    cohort = lp.make_cohort(sizes=[8, 20, 5])
    params = lp.initial_params()
    state, (metrics,) = run_rounds(algorithms.fedavg(lp.loss_fn, LR, strategy=strategy), [cohort])
    finals = [lp.local_sgd(params, cohort, c, LR) for c in range(3)]
    delta = lp.mean_delta(params, cohort, finals, [8, 20, 5])
    assert_params_close(state.params, {k: params[k] + delta[k] for k in params})
    assert metrics["num_clients"] == 3 and metrics["num_examples"] == 24


def test_fedavgm_applies_server_momentum_to_the_pseudo_gradient():
    cohorts = [lp.make_cohort(seed=s) for s in range(3)]
    beta, server_lr = 0.7, 0.8
    algorithm = algorithms.fedavgm(
        lp.loss_fn, LR, server_learning_rate=server_lr, server_momentum=beta
    )
    state, _ = run_rounds(algorithm, cohorts)
    w = {k: np.asarray(v, np.float64) for k, v in lp.initial_params().items()}
    velocity = {k: 0.0 for k in w}
    for cohort in cohorts:
        finals = [lp.local_sgd(w, cohort, c, LR) for c in range(3)]
        delta = lp.mean_delta(w, cohort, finals, cohort.clients.num_examples)
        velocity = {k: beta * velocity[k] - delta[k] for k in w}  # pseudo-gradient = -delta
        w = {k: w[k] - server_lr * velocity[k] for k in w}
    assert_params_close(state.params, w)


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_fedopt_matches_optax_on_the_averaged_delta(name):
    cohorts = [lp.make_cohort(seed=s) for s in range(3)]
    algorithm = algorithms.fedopt(
        lp.loss_fn, LR, server_optimizer_name=name, server_learning_rate=0.05, eps=1e-3
    )
    state, _ = run_rounds(algorithm, cohorts)
    reference = {
        "adam": optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3),
        "yogi": optax.yogi(0.05, b1=0.9, b2=0.99, eps=1e-3),
        "adagrad": optax.adagrad(0.05, initial_accumulator_value=0.0, eps=1e-3),
    }[name]
    w = {k: np.asarray(v, np.float32) for k, v in lp.initial_params().items()}
    opt_state = reference.init(w)
    for cohort in cohorts:
        finals = [lp.local_sgd(w, cohort, c, LR) for c in range(3)]
        delta = lp.mean_delta(w, cohort, finals, cohort.clients.num_examples)
        gradient = {k: np.asarray(-delta[k], np.float32) for k in w}
        updates, opt_state = reference.update(gradient, opt_state, w)
        w = jax.device_get(optax.apply_updates(w, updates))
    assert_params_close(state.params, w, atol=2e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fedprox_gradient_includes_the_proximal_term(strategy):
    cohort = lp.make_cohort(num_steps=3)
    params, mu = lp.initial_params(), 0.5
    algorithm = algorithms.fedprox(lp.loss_fn, LR, proximal_mu=mu, strategy=strategy)
    state, _ = run_rounds(algorithm, [cohort])
    finals = [lp.local_sgd(params, cohort, c, LR, mu=mu) for c in range(3)]
    delta = lp.mean_delta(params, cohort, finals, cohort.clients.num_examples)
    assert_params_close(state.params, {k: params[k] + delta[k] for k in params})
    plain, _ = run_rounds(algorithms.fedavg(lp.loss_fn, LR), [cohort])
    assert not np.allclose(plain.params["w"], state.params["w"], atol=1e-6)


def test_fedir_weights_are_prior_over_client_distribution():
    prior = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    histogram = np.array([2.0, 0.0, 6.0, 2.0], np.float32)  # q = (0.2, 0, 0.6, 0.2)
    table = np.asarray(algorithms.importance_table(prior, histogram))
    np.testing.assert_allclose(table, [0.5, 0.0, 0.5, 2.0], rtol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fedir_self_normalises_the_weighted_loss_over_each_batch(strategy):
    cohort = lp.make_cohort(num_steps=2, batch=6)
    prior = np.array([0.4, 0.3, 0.2, 0.1])
    params = lp.initial_params()
    state, _ = run_rounds(
        algorithms.fedir(lp.loss_fn, LR, class_prior=prior, strategy=strategy), [cohort]
    )
    finals = []
    for c in range(3):
        q = cohort.clients.label_counts[c] / cohort.clients.label_counts[c].sum()
        table = np.where(q > 0, prior / np.where(q > 0, q, 1), 0)
        finals.append(lp.local_sgd(params, cohort, c, LR, weights=lambda y, t=table: t[y]))
    delta = lp.mean_delta(params, cohort, finals, cohort.clients.num_examples)
    assert_params_close(state.params, {k: params[k] + delta[k] for k in params})


def test_client_momentum_and_weight_decay_restart_every_round():
    cohorts = [lp.make_cohort(seed=s) for s in range(2)]
    algorithm = algorithms.fedavg(lp.loss_fn, LR, client_momentum=0.9, client_weight_decay=0.01)
    state, _ = run_rounds(algorithm, cohorts)
    w = {k: np.asarray(v, np.float64) for k, v in lp.initial_params().items()}
    for cohort in cohorts:
        finals = [lp.local_sgd(w, cohort, c, LR, momentum=0.9, weight_decay=0.01) for c in range(3)]
        delta = lp.mean_delta(w, cohort, finals, cohort.clients.num_examples)
        w = {k: w[k] + delta[k] for k in w}
    assert_params_close(state.params, w)


def test_fedvc_averages_clients_with_equal_weight():
    cohort = lp.make_cohort(sizes=[8, 100, 3])
    params = lp.initial_params()
    algorithm = algorithms.fedvc(lp.loss_fn, LR, virtual_client_size=8)
    state, _ = run_rounds(algorithm, [cohort])
    finals = [lp.local_sgd(params, cohort, c, LR) for c in range(3)]
    delta = lp.mean_delta(params, cohort, finals, [1, 1, 1])
    assert_params_close(state.params, {k: params[k] + delta[k] for k in params})


def test_composition_fedavgm_fedir_fedvc_in_one_algorithm():
    prior = np.array([0.25, 0.25, 0.25, 0.25])
    algorithm = algorithms.fedavgm(
        lp.loss_fn,
        LR,
        server_momentum=0.5,
        objective=ClientObjective(class_prior=prior),
        **algorithms.virtual_clients(8),
    )
    assert algorithm.client_sampler.name == "size_proportional"
    assert algorithm.example_sampler.count(3) == 8
    cohort = lp.make_cohort(sizes=[8, 30, 2])
    params = lp.initial_params()
    state, _ = run_rounds(algorithm, [cohort])
    finals = []
    for c in range(3):
        q = cohort.clients.label_counts[c] / cohort.clients.label_counts[c].sum()
        table = np.where(q > 0, prior / np.where(q > 0, q, 1), 0)
        finals.append(lp.local_sgd(params, cohort, c, LR, weights=lambda y, t=table: t[y]))
    delta = lp.mean_delta(params, cohort, finals, [1, 1, 1])
    # First round of momentum 0.5 with server lr 1: w - (0 * 0.5 + (-delta)) = w + delta.
    assert_params_close(state.params, {k: params[k] + delta[k] for k in params})


def test_composition_fedprox_with_fedopt():
    cohort = lp.make_cohort()
    algorithm = algorithms.fedopt(
        lp.loss_fn, LR, server_optimizer_name="adam", objective=ClientObjective(proximal_mu=0.3)
    )
    state, _ = run_rounds(algorithm, [cohort])
    params = lp.initial_params()
    finals = [lp.local_sgd(params, cohort, c, LR, mu=0.3) for c in range(3)]
    delta = lp.mean_delta(params, cohort, finals, cohort.clients.num_examples)
    reference = optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-3)
    w = {k: np.asarray(v, np.float32) for k, v in params.items()}
    updates, _ = reference.update(
        {k: np.asarray(-delta[k], np.float32) for k in w}, reference.init(w), w
    )
    assert_params_close(state.params, jax.device_get(optax.apply_updates(w, updates)))


def test_nonfinite_client_gets_zero_weight_and_is_counted():
    cohort = lp.make_cohort(sizes=[8, 8, 8])
    cohort.examples["x"][1, 0, 0, 0] = np.inf
    params = lp.initial_params()
    state, (metrics,) = run_rounds(algorithms.fedavg(lp.loss_fn, LR), [cohort])
    finals = [lp.local_sgd(params, cohort, c, LR) for c in (0, 2)]
    delta = lp.mean_delta(params, cohort, finals, [8, 8])
    assert_params_close(state.params, {k: params[k] + delta[k] for k in params})
    assert metrics["num_nonfinite_clients"] == 1


def test_invalid_hyperparameters_name_the_field():
    with pytest.raises(ValueError, match=r"algorithm\.client\.learning_rate=-0\.1"):
        algorithms.fedavg(lp.loss_fn, -0.1)
    with pytest.raises(ValueError, match=r"algorithm\.server\.momentum=1\.0"):
        algorithms.fedavgm(lp.loss_fn, 0.1, server_momentum=1.0)
    with pytest.raises(ValueError, match=r"algorithm\.client\.proximal_mu=-1"):
        algorithms.fedprox(lp.loss_fn, 0.1, proximal_mu=-1)
    with pytest.raises(ValueError, match=r"algorithm\.virtual_client_size=0"):
        algorithms.fedvc(lp.loss_fn, 0.1, virtual_client_size=0)
    with pytest.raises(ValueError, match=r"algorithm\.strategy='pmap'"):
        algorithms.fedavg(lp.loss_fn, 0.1, strategy="pmap")
