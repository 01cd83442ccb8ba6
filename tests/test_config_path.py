"""One path to an algorithm: `build_algorithm(config.algorithm, ...)` builds exactly what the
Python preset of the same name builds, for every name and option the config accepts.

Each case names the config fields it sets and the preset call a notebook would write; the two
algorithms run the same cohorts with the same keys and must reach bit-identical server states
(params, optimizer state, client-local store), and their samplers must draw the same clients
and examples from the same numpy generator. Cases that set a field to the preset's default
call the preset without it, so a preset default drifting from the config's is caught too.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedjax_cv import algorithms
from fedjax_cv.algorithms import ClientObjective
from fedjax_cv.algorithms.registry import ALGORITHMS, build_algorithm
from fedjax_cv.config_base import base_config
from tests import linear_problem as lp
from tests import norm_problem as bn
from tests.configs_loader import override

LR = 0.05  # the config's default client learning rate
PRIOR = np.array([0.4, 0.3, 0.2, 0.1], np.float32)


def algorithm_config(overrides: dict):
    return override(base_config().algorithm, overrides)


# id -> (config fields, preset from a loss function, problem)
CASES = {
    "fedavg": ({}, lambda f: algorithms.fedavg(f, LR), "linear"),
    "fedavg_client_momentum_decay_epochs": (
        {"client.momentum": 0.9, "client.weight_decay": 1e-3, "local_epochs": 2},
        lambda f: algorithms.fedavg(
            f, LR, client_momentum=0.9, client_weight_decay=1e-3, local_epochs=2
        ),
        "linear",
    ),
    "fedavg_server_lr": (
        {"server.learning_rate": 0.7},
        lambda f: algorithms.fedavg(f, LR, server_learning_rate=0.7),
        "linear",
    ),
    "fedavgm_preset_defaults": (
        {"name": "fedavgm", "server.momentum": 0.9},
        lambda f: algorithms.fedavgm(f, LR),
        "linear",
    ),
    "fedavgm_lr_momentum": (
        {"name": "fedavgm", "server.momentum": 0.5, "server.learning_rate": 0.8},
        lambda f: algorithms.fedavgm(f, LR, server_learning_rate=0.8, server_momentum=0.5),
        "linear",
    ),
    "fedopt_preset_defaults": (
        {"name": "fedopt", "server.learning_rate": 1e-2},
        lambda f: algorithms.fedopt(f, LR),
        "linear",
    ),
    "fedopt_adam_b1_b2_eps": (
        {
            "name": "fedopt",
            "server.optimizer": "adam",
            "server.learning_rate": 0.03,
            "server.b1": 0.8,
            "server.b2": 0.95,
            "server.eps": 1e-4,
        },
        lambda f: algorithms.fedopt(
            f,
            LR,
            server_optimizer_name="adam",
            server_learning_rate=0.03,
            b1=0.8,
            b2=0.95,
            eps=1e-4,
        ),
        "linear",
    ),
    "fedopt_yogi": (
        {
            "name": "fedopt",
            "server.optimizer": "yogi",
            "server.learning_rate": 0.03,
            "server.b1": 0.85,
            "server.b2": 0.97,
            "server.eps": 1e-2,
        },
        lambda f: algorithms.fedopt(
            f,
            LR,
            server_optimizer_name="yogi",
            server_learning_rate=0.03,
            b1=0.85,
            b2=0.97,
            eps=1e-2,
        ),
        "linear",
    ),
    "fedopt_adagrad": (
        {
            "name": "fedopt",
            "server.optimizer": "adagrad",
            "server.learning_rate": 0.03,
            "server.eps": 1e-2,
        },
        lambda f: algorithms.fedopt(
            f, LR, server_optimizer_name="adagrad", server_learning_rate=0.03, eps=1e-2
        ),
        "linear",
    ),
    "fedopt_client_momentum_decay_epochs": (
        {
            "name": "fedopt",
            "server.learning_rate": 1e-2,
            "client.momentum": 0.5,
            "client.weight_decay": 1e-2,
            "local_epochs": 3,
        },
        lambda f: algorithms.fedopt(
            f, LR, client_momentum=0.5, client_weight_decay=1e-2, local_epochs=3
        ),
        "linear",
    ),
    "fedprox_preset_defaults": (
        {"name": "fedprox", "client.proximal_mu": 0.01},
        lambda f: algorithms.fedprox(f, LR),
        "linear",
    ),
    "fedprox_mu_momentum": (
        {"name": "fedprox", "client.proximal_mu": 0.3, "client.momentum": 0.9},
        lambda f: algorithms.fedprox(f, LR, proximal_mu=0.3, client_momentum=0.9),
        "linear",
    ),
    "fedir": ({"name": "fedir"}, lambda f: algorithms.fedir(f, LR, class_prior=PRIOR), "linear"),
    "fedavg_importance_weighting": (
        {"client.importance_weighting": True},
        lambda f: algorithms.fedir(f, LR, class_prior=PRIOR),
        "linear",
    ),
    "fedvc": (
        {"name": "fedvc", "virtual_client_size": 8},
        lambda f: algorithms.fedvc(f, LR, virtual_client_size=8),
        "linear",
    ),
    "fedavg_size_proportional_mean": (
        {"client_sampling": "size_proportional", "aggregation": "mean"},
        lambda f: algorithms.fedavg(
            f, LR, client_sampler=algorithms.size_proportional_clients(), aggregation="mean"
        ),
        "linear",
    ),
    "fedavgm_fedir_fedvc": (
        {
            "name": "fedavgm",
            "server.momentum": 0.5,
            "client.importance_weighting": True,
            "virtual_client_size": 8,
        },
        lambda f: algorithms.fedavgm(
            f,
            LR,
            server_momentum=0.5,
            objective=ClientObjective(class_prior=PRIOR),
            **algorithms.virtual_clients(8),
        ),
        "linear",
    ),
    "fedavg_lr_multipliers": (
        {"client.lr_multipliers": ("^b$=0.5",)},
        lambda f: algorithms.fedavg(
            f, LR, lr_multipliers=algorithms.parse_multipliers(("^b$=0.5",))
        ),
        "linear",
    ),
    "fedavg_strategy_vmap": (
        {"strategy": "vmap"},
        lambda f: algorithms.fedavg(f, LR, strategy="vmap"),
        "linear",
    ),
    "fedbn": ({"name": "fedbn"}, lambda f: algorithms.fedbn(f, LR), "batchnorm"),
    "fednova_client_momentum": (
        {"name": "fednova", "client.momentum": 0.9},
        lambda f: algorithms.fednova(f, LR, client_momentum=0.9),
        "linear",
    ),
    "scaffold": (
        {"name": "scaffold"},
        lambda f: algorithms.scaffold(f, LR, num_clients=lp.NUM_CLIENT_IDS),
        "linear",
    ),
    "fedavg_batch_stats_local": (
        {"batch_stats": "local", "local_params": ""},
        lambda f: algorithms.fedavg(f, LR, local=algorithms.ClientLocal(model_state=True)),
        "batchnorm",
    ),
    "fedavg_batch_stats_average": ({}, lambda f: algorithms.fedavg(f, LR), "batchnorm"),
}


def test_every_algorithm_name_has_a_case():
    names = {CASES[case][0].get("name", "fedavg") for case in CASES}
    assert names == set(ALGORITHMS)


def problem(kind: str):
    """(loss_fn, params, model_state, cohorts): three rounds' cohorts of unequal clients."""
    if kind == "linear":
        cohorts = [lp.make_cohort(seed=s, sizes=[8, 20, 5]) for s in range(3)]
        return lp.loss_fn, lp.initial_params(), None, cohorts
    params, model_state = bn.initial_variables()
    cohorts = [bn.make_cohort(seed=s, sizes=[12, 20, 5]) for s in range(3)]
    return bn.loss_fn, params, model_state, cohorts


def final_state(algorithm, params, model_state, cohorts):
    state = algorithm.init(params, model_state, num_clients=lp.NUM_CLIENT_IDS)
    for r, cohort in enumerate(cohorts):
        state, _ = algorithm.apply(state, cohort, jax.random.key(r))
    return jax.device_get(state)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_and_preset_reach_the_same_server_state(case):
    overrides, preset, kind = CASES[case]
    loss_fn, params, model_state, cohorts = problem(kind)
    from_config = build_algorithm(
        algorithm_config(overrides), loss_fn, class_prior=PRIOR, num_clients=lp.NUM_CLIENT_IDS
    )
    from_preset = preset(loss_fn)
    expected = final_state(from_preset, params, model_state, cohorts)
    actual = final_state(from_config, params, model_state, cohorts)
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for field in ("params", "opt_state", "model_state", "client_local", "round"):
        jax.tree.map(
            np.testing.assert_array_equal, getattr(actual, field), getattr(expected, field)
        )
    # The rounds moved the model: equal states are not two untouched initial states.
    assert not np.array_equal(
        jax.tree.leaves(actual.params)[0], jax.tree.leaves(jax.device_get(params))[0]
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_and_preset_sample_the_same_clients_and_examples(case):
    overrides, preset, _ = CASES[case]
    from_config = build_algorithm(
        algorithm_config(overrides), lp.loss_fn, class_prior=PRIOR, num_clients=lp.NUM_CLIENT_IDS
    )
    from_preset = preset(lp.loss_fn)
    sizes = np.array([3, 40, 8, 15, 1, 22])
    assert from_config.client_sampler.name == from_preset.client_sampler.name
    assert from_config.example_sampler.name == from_preset.example_sampler.name
    for seed in range(3):
        config_ids = from_config.client_sampler.sample(np.random.default_rng(seed), sizes, 4)
        preset_ids = from_preset.client_sampler.sample(np.random.default_rng(seed), sizes, 4)
        np.testing.assert_array_equal(config_ids, preset_ids)
        for num_examples in (3, 8, 20):
            config_rng, preset_rng = np.random.default_rng(seed), np.random.default_rng(seed)
            np.testing.assert_array_equal(
                from_config.example_sampler.indices(config_rng, num_examples),
                from_preset.example_sampler.indices(preset_rng, num_examples),
            )
            assert from_config.example_sampler.count(num_examples) == (
                from_preset.example_sampler.count(num_examples)
            )


# A name alone (with the fields it cannot do without) is its preset with every default: the
# defaults live in the preset's signature only (fedopt's server learning rate 1e-2, fedavgm's
# momentum 0.9, fedprox's mu 0.01), not a second time in config_base.
BY_NAME_ALONE = {
    "fedavg": ({}, lambda f: algorithms.fedavg(f, LR)),
    "fedavgm": ({"name": "fedavgm"}, lambda f: algorithms.fedavgm(f, LR)),
    "fedopt": ({"name": "fedopt"}, lambda f: algorithms.fedopt(f, LR)),
    "fedopt_yogi": (
        {"name": "fedopt", "server.optimizer": "yogi"},
        lambda f: algorithms.fedopt(f, LR, server_optimizer_name="yogi"),
    ),
    "fedprox": ({"name": "fedprox"}, lambda f: algorithms.fedprox(f, LR)),
    "fedopt_paper": (
        {"name": "fedopt", "server.variant": "paper"},
        lambda f: algorithms.fedopt(f, LR, server_variant="paper"),
    ),
    "fedvc": (
        {"name": "fedvc", "virtual_client_size": 6},
        lambda f: algorithms.fedvc(f, LR, virtual_client_size=6),
    ),
}


@pytest.mark.parametrize("case", sorted(BY_NAME_ALONE))
def test_a_name_alone_is_its_preset_with_its_defaults(case):
    fields, preset = BY_NAME_ALONE[case]
    loss_fn, params, model_state, cohorts = problem("linear")
    from_config = build_algorithm(algorithm_config(fields), loss_fn)
    actual = final_state(from_config, params, model_state, cohorts[:2])
    expected = final_state(preset(loss_fn), params, model_state, cohorts[:2])
    jax.tree.map(np.testing.assert_array_equal, actual.params, expected.params)
    jax.tree.map(np.testing.assert_array_equal, actual.opt_state, expected.opt_state)
