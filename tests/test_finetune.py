"""Learning-rate multipliers, frozen parameters and FedBN's client-local state."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from fedjax_cv import algorithms
from fedjax_cv.algorithms import ClientLocal
from fedjax_cv.algorithms.param_groups import freeze_except, parse_multipliers
from fedjax_cv.engine import pad_clients
from fedjax_cv.models.mobilenet_v2 import STAGES as MOBILENET_V2_STAGES
from fedjax_cv.models.weights import read_weights
from fedjax_cv.train import build_experiment, train_and_evaluate
from fedjax_cv.validation import ConfigError, validate_config
from tests import linear_problem as lp
from tests.configs_loader import load_config, override, shrink

LR = 0.1
STRATEGIES = ("vmap", "sequential", "host")


def one_round(algorithm, cohort, params=None):
    state = algorithm.init(params or lp.initial_params(), num_clients=lp.NUM_CLIENT_IDS)
    state, _ = algorithm.apply(state, cohort, jax.random.key(0))
    return jax.device_get(state)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_multiplier_scales_the_learning_rate_of_matching_parameters(strategy):
    cohort = lp.make_cohort(num_steps=3)
    params = lp.initial_params()
    algorithm = algorithms.fedavg(
        lp.loss_fn, LR, client_momentum=0.5, lr_multipliers=(("^b$", 3.0),), strategy=strategy
    )
    state = one_round(algorithm, cohort)
    finals = [lp.local_sgd(params, cohort, c, LR, momentum=0.5, lr_b=3 * LR) for c in range(3)]
    delta = lp.mean_delta(params, cohort, finals, cohort.clients.num_examples)
    for key in params:
        np.testing.assert_allclose(state.params[key], params[key] + delta[key], atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_multiplier_zero_freezes_bit_identically_under_momentum_decay_and_fedopt(strategy):
    params = lp.initial_params()
    algorithm = algorithms.fedopt(
        lp.loss_fn,
        LR,
        client_momentum=0.9,
        client_weight_decay=0.1,
        server_optimizer_name="adam",
        lr_multipliers=(("^b$", 0.0),),
        strategy=strategy,
    )
    state = algorithm.init(params)
    for r in range(3):
        state, _ = algorithm.apply(state, lp.make_cohort(seed=r), jax.random.key(r))
    state = jax.device_get(state)
    assert np.asarray(state.params["b"]).tobytes() == np.float32(params["b"]).tobytes()
    assert not np.allclose(state.params["w"], params["w"])


def test_freeze_except_keeps_only_the_head_trainable():
    ((pattern, multiplier),) = freeze_except(("pre_classifier", "classifier"))

    assert multiplier == 0.0
    assert re.search(pattern, "stem/conv/kernel")
    assert re.search(pattern, "block3/expand/norm/GroupNorm_0/scale")
    assert not re.search(pattern, "classifier/kernel")
    assert not re.search(pattern, "pre_classifier/bias")
    assert re.search(pattern, "classifier_extra/bias")  # only whole module names count


@pytest.mark.parametrize(
    "spec", ["classifier", "classifier=-1", "classifier=ten", "(unclosed=2", "=3"]
)
def test_a_bad_multiplier_spec_is_one_line_naming_the_field(spec):
    with pytest.raises(ValueError, match=r"algorithm.client.lr_multipliers\[1\]=") as error:
        parse_multipliers(("head=2", spec))
    assert "\n" not in str(error.value)


def shapes_config(**overrides):
    return override(shrink(load_config("configs/shapes_fedavg.py:runlocal")), overrides)


def test_a_frozen_backbone_is_bit_identical_after_a_round_and_the_head_moves():
    config = shapes_config(**{"model.name": "mobilenet_v2", "model.freeze": "backbone"})
    config.data.image_size = 32
    config.model.kwargs.width_multiplier = 0.25
    # One block a stage instead of the paper's 17 blocks: every kind of layer, a third of the
    # compile time.
    config.model.kwargs.stages = tuple((t, c, 1, s) for t, c, _, s in MOBILENET_V2_STAGES)
    experiment = build_experiment(config)
    before = jax.device_get(experiment.initial_state.params)
    state = experiment.initial_state
    for r in range(2):
        state, metrics = experiment.algorithm.apply(state, experiment.cohorts(r), jax.random.key(r))
    after = jax.device_get(state.params)
    assert metrics["num_nonfinite_clients"] == 0
    flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
    flat_after = jax.tree.leaves(after)
    for (path, old), new in zip(flat_before, flat_after, strict=True):
        name = jax.tree_util.keystr(path)
        if name.startswith("['classifier']"):
            assert not np.array_equal(old, new), name
        else:
            assert np.asarray(old).tobytes() == np.asarray(new).tobytes(), name


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("model.freeze", "all", "model.freeze='all' is not allowed; must be one of none, backbone"),
        ("algorithm.client.lr_multipliers", ("x=-2",), r"lr_multipliers\[0\]='x=-2'"),
        ("algorithm.batch_stats", "global", "algorithm.batch_stats='global' is unknown"),
        ("algorithm.local_params", "(bad", "algorithm.local_params='\\(bad' is not allowed"),
    ],
)
def test_bad_fine_tuning_fields_fail_validation(field, value, match):
    config = shapes_config(**{field: value})
    with pytest.raises(ConfigError, match=match):
        validate_config(config)


# FedBN: clients keep their own copy of the matching values across rounds.
LOCAL_B = ClientLocal(params="^b$")


def hand_fedbn_round(server, store, cohort):
    """Clients start from the server's w and their own b; the server aggregates both; each
    real client's b goes back to its row."""
    finals = []
    for c in range(cohort.num_clients):
        start = {"w": server["w"], "b": store[cohort.clients.client_id[c]]}
        finals.append(lp.local_sgd(start, cohort, c, LR))
    real = cohort.clients.num_examples > 0
    weights = cohort.clients.num_examples[real]
    trained = [f for f, r in zip(finals, real, strict=True) if r]
    delta = lp.mean_delta(server, cohort, trained, weights)
    server = {k: np.asarray(server[k], np.float64) + delta[k] for k in server}
    store = store.copy()
    for c in np.flatnonzero(real):
        store[cohort.clients.client_id[c]] = finals[c]["b"]
    return server, store


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fedbn_clients_start_from_their_own_local_values(strategy):
    cohorts = [lp.make_cohort(seed=0), lp.make_cohort(seed=1, sizes=[8, 3, 8])]
    algorithm = algorithms.fedavg(lp.loss_fn, LR, local=LOCAL_B, strategy=strategy)
    params = lp.initial_params()
    state = algorithm.init(params, num_clients=lp.NUM_CLIENT_IDS)
    server = {k: np.asarray(v, np.float64) for k, v in params.items()}
    store = np.full(lp.NUM_CLIENT_IDS, float(params["b"]))
    for r, cohort in enumerate(cohorts):
        state, _ = algorithm.apply(state, cohort, jax.random.key(r))
        server, store = hand_fedbn_round(server, store, cohort)
    state = jax.device_get(state)
    np.testing.assert_allclose(state.params["w"], server["w"], atol=1e-5)
    np.testing.assert_allclose(state.params["b"], server["b"], atol=1e-5)
    np.testing.assert_allclose(state.client_local["params"]["b"], store, atol=1e-5)
    untouched = np.setdiff1d(np.arange(lp.NUM_CLIENT_IDS), [0, 7, 14])
    assert np.all(state.client_local["params"]["b"][untouched] == np.float32(params["b"]))
    # The local b really differs from the aggregated one, else the test proves nothing.
    assert not np.allclose(store[[0, 7, 14]], server["b"], atol=1e-3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fedbn_padded_clients_do_not_overwrite_client_zero(strategy):
    cohort = lp.make_cohort(seed=2)
    padded = pad_clients(cohort, 5)  # padded clients carry client_id 0, like the real client 0
    algorithm = lambda: algorithms.fedavg(lp.loss_fn, LR, local=LOCAL_B, strategy=strategy)
    expected = one_round(algorithm(), cohort)
    actual = one_round(algorithm(), padded)
    np.testing.assert_allclose(
        actual.client_local["params"]["b"], expected.client_local["params"]["b"], atol=1e-6
    )
    assert actual.client_local["params"]["b"][0] != np.float32(lp.initial_params()["b"])


def test_fedbn_needs_num_clients_and_something_local():
    algorithm = algorithms.fedbn(lp.loss_fn, LR, local=LOCAL_B)
    with pytest.raises(ValueError, match="needs init\\(params, model_state, num_clients="):
        algorithm.init(lp.initial_params())
    nothing = algorithms.fedbn(lp.loss_fn, LR)  # norm layers: the linear problem has none
    with pytest.raises(ValueError, match="matches nothing in this model"):
        nothing.init(lp.initial_params(), num_clients=4)


def test_fedbn_keeps_batch_stats_and_norm_params_per_client_in_a_batchnorm_model():
    config = shapes_config(
        **{"model.name": "resnet18", "model.norm": "batch", "algorithm.name": "fedbn"}
    )
    config.model.kwargs.width = 8
    config.model.kwargs.stage_sizes = (1, 1, 1, 1)
    experiment = build_experiment(config)
    state = experiment.initial_state
    store = state.client_local
    assert set(store) == {"params", "model_state"}
    assert jax.tree.leaves(store["model_state"]["batch_stats"])
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(store)[0]]
    assert names and all("BatchNorm_0" in n for n in names)
    assert all(leaf.shape[0] == config.data.num_clients for leaf in jax.tree.leaves(store))
    cohort = experiment.cohorts(0)
    initial = jax.device_get(store)
    state, metrics = experiment.algorithm.apply(state, cohort, jax.random.key(0))
    after = jax.device_get(state.client_local)
    assert metrics["num_nonfinite_clients"] == 0
    sampled = np.unique(cohort.clients.client_id[cohort.clients.num_examples > 0])
    others = np.setdiff1d(np.arange(config.data.num_clients), sampled)
    assert len(sampled) == 3 and len(others) == 5
    for old, new in zip(jax.tree.leaves(initial), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(new[others], old[others])
    # Every sampled client trained its own statistics: its running mean left the initial 0.
    moved = [
        not np.allclose(new[sampled], old[sampled])
        for old, new in zip(
            jax.tree.leaves(initial["model_state"]),
            jax.tree.leaves(after["model_state"]),
            strict=True,
        )
    ]
    assert all(moved)


def tiny(config):
    config.num_rounds = 1
    return shrink(config, clients_per_round=2)


def test_frozen_transfer_from_a_workdir_trains_only_the_new_head(tmp_path):
    train_and_evaluate(tiny(load_config("configs/shapes_fedavg.py:runlocal")), str(tmp_path / "a"))
    spec = f"configs/shapes_finetune.py:runlocal,mode=frozen,weights={tmp_path / 'a'}"
    config = tiny(load_config(spec))
    assert (config.model.freeze, config.data.num_classes) == ("backbone", 6)
    record = train_and_evaluate(config, str(tmp_path / "b"))
    report = (tmp_path / "b" / "weights_report.txt").read_text().splitlines()
    assert report[0] == "loaded 6 tensors, re-initialised 2, 0 in the file unused"
    assert sorted(line.split(":")[0] for line in report[1:]) == [
        "re-initialised params/Dense_1/bias",
        "re-initialised params/Dense_1/kernel",
    ]
    before, after = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    assert sorted(after) == sorted(before)
    for name in before:
        if name.startswith("params/Dense_1/"):
            assert after[name].shape[-1] == 6
        else:
            assert after[name].tobytes() == before[name].tobytes(), name
    assert record["train/delta_norm"] > 0


@pytest.mark.parametrize("arg", ["mode=frozen", "mode=scratch,weights=x.npz", "mode=warm"])
def test_transfer_args_need_weights_exactly_when_they_use_them(arg):
    with pytest.raises(ValueError, match="mode="):
        load_config(f"configs/shapes_finetune.py:{arg}")
