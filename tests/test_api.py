"""The notebook API (`import fedjax_cv as fcv`) builds what the config path builds.

The same dataset, initial variables, cohorts, evaluation and trained params as
`train.build_experiment` / `train_and_evaluate` for the same config; evaluation against numpy;
bad input as one ValueError line naming the field.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

import fedjax_cv as fcv
from fedjax_cv import train

REPO = pathlib.Path(__file__).resolve().parents[1]
# A tiny classification run: 6 clients of 120 shapes images, 12x12, 3 rounds of 3 clients.
DATA = dict(
    num_clients=6,
    num_train_examples=120,
    num_test_examples=40,
    image_size=12,
    partition__alpha=0.5,
)
SEED = 3


def tiny_config(**overrides):
    data = {f"data.{key.replace('__', '.')}": value for key, value in DATA.items()}
    return fcv.config(
        None,
        {
            "seed": SEED,
            "num_rounds": 3,
            "eval_every_rounds": 3,
            "checkpoint.every_rounds": 3,
            "model.name": "logistic",
            "algorithm.clients_per_round": 3,
            "algorithm.batch_size": 8,
            "algorithm.client.learning_rate": 0.1,
            "algorithm.client.momentum": 0.5,
            "eval.batch_size": 16,
            **data,
        },
        **overrides,
    )


@pytest.fixture(scope="module")
def experiment():
    return train.build_experiment(tiny_config())


@pytest.fixture(scope="module")
def data():
    return fcv.dataset("shapes", seed=SEED, **DATA)


def _tree_equal(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def test_top_level_names_are_the_api():
    assert set(fcv.__all__) >= {"config", "dataset", "model", "task", "cohorts", "evaluate"}
    for name in fcv.__all__:
        assert getattr(fcv, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fcv.nothing  # noqa: B018


def test_dataset_equals_the_config_path(experiment, data):
    expected = experiment.dataset
    assert len(data.clients) == len(expected.clients) == 6
    for mine, theirs in zip(data.clients, expected.clients, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    for split in ("train", "test"):
        for key in ("image", "label"):
            np.testing.assert_array_equal(getattr(data, split)[key], getattr(expected, split)[key])
    assert data.train["image"].shape == (120, 12, 12, 3)
    # The partition differs with alpha (the field reached the partitioner).
    other = fcv.dataset("shapes", seed=SEED, **{**DATA, "partition__alpha": 100.0})
    assert any(not np.array_equal(a, b) for a, b in zip(other.clients, data.clients, strict=True))
    # A nested field given as a dict reaches the same place as "__".
    iid = fcv.dataset(
        "shapes", seed=SEED, **{**DATA, "partition__alpha": 1.0}, partition={"name": "iid"}
    )
    assert sorted(len(c) for c in iid.clients) == [20] * 6


def test_model_is_the_config_paths_initial_model(experiment, data):
    model = fcv.model("logistic", data, seed=SEED)
    assert _tree_equal(model.params, experiment.initial_state.params)
    assert model.task.name == fcv.task(data).name == "classification"
    assert model.module == experiment.model.module
    other_seed = fcv.model("logistic", data, seed=SEED + 1)
    assert not _tree_equal(other_seed.params, model.params)


def test_evaluate_is_train_evaluate_and_numpy(experiment, data):
    model = fcv.model("logistic", data, seed=SEED)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.05, model.params
    )
    state = experiment.initial_state.replace(params=params)
    mine = fcv.evaluate(model, state, data, batch_size=16)  # 40 examples: a padded last batch
    theirs = train.evaluate(experiment, state)
    assert {f"eval/{k}": v for k, v in mine.items()} == theirs
    images = (data.test["image"].astype(np.float64) / 255.0 - 0.5) / 0.5
    logits = images.reshape(len(images), -1) @ params["Dense_0"]["kernel"].astype(np.float64)
    logits += params["Dense_0"]["bias"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    labels = data.test["label"]
    assert mine["loss"] == pytest.approx(-log_probs[np.arange(40), labels].mean(), rel=1e-5)
    assert mine["accuracy"] == pytest.approx(np.mean(logits.argmax(axis=1) == labels), abs=1e-12)


def test_cohorts_equal_the_config_paths(experiment, data):
    model = fcv.model("logistic", data, seed=SEED)
    algorithm = fcv.algorithms.fedavg(model.loss_fn, 0.1, client_momentum=0.5)
    cohorts = fcv.cohorts(data, algorithm, clients_per_round=3, batch_size=8, seed=SEED)
    for round_index in (0, 2):
        mine, theirs = cohorts(round_index), experiment.cohorts(round_index)
        assert _tree_equal(mine, theirs)
    assert mine.mask.shape[0] == 3 and mine.mask.shape[2] == 8


def test_rounds_by_hand_reach_the_command_lines_params(tmp_path, data):
    record = train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
    model = fcv.model("logistic", data, seed=SEED)
    algorithm = fcv.algorithms.fedavg(model.loss_fn, 0.1, client_momentum=0.5)
    cohorts = fcv.cohorts(data, algorithm, clients_per_round=3, batch_size=8, seed=SEED)
    state = algorithm.init(model.params, model.model_state)
    state, history = fcv.train_rounds(
        algorithm,
        state,
        cohorts,
        3,
        seed=SEED,
        evaluate_every=3,
        model=model,
        eval_batch_size=16,
        progress=False,
    )
    assert fcv.params_sha256(state.params) == record["params_sha256"]
    assert [r["round"] for r in history] == [1, 2, 3]
    assert history[-1]["eval/accuracy"] == record["eval/accuracy"]
    assert history[-1]["train/loss"] == pytest.approx(record["train/loss"], rel=1e-6)
    # Cohorts of another seed draw other clients and examples: other params.
    other_cohorts = fcv.cohorts(data, algorithm, clients_per_round=3, batch_size=8, seed=SEED + 1)
    other = algorithm.init(model.params, model.model_state)
    other, _ = fcv.train_rounds(algorithm, other, other_cohorts, 3, seed=SEED, progress=False)
    assert fcv.params_sha256(other.params) != record["params_sha256"]


def _load_config_module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location("shapes_fedavg_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_file_with_overrides_is_the_files_config():
    path = REPO / "configs" / "shapes_fedavg.py"
    config = fcv.config(f"{path}:runlocal", {"algorithm.client.momentum": 0.5}, num_rounds=2)
    expected = _load_config_module(path).get_config("runlocal")
    assert expected.num_rounds == 3 and expected.algorithm.client.momentum == 0.9
    expected.num_rounds = 2
    expected.algorithm.client.momentum = 0.5
    assert config.to_dict() == expected.to_dict()
    assert config.is_locked
    assert fcv.config().to_dict() == fcv.config(None).to_dict()


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda d: fcv.dataset("shapes", num_client=4), "data.num_client"),
        (lambda d: fcv.dataset("shapes", partition__alfa=0.1), "data.partition.alfa"),
        (lambda d: fcv.dataset("shapes", num_clients="4"), "data.num_clients"),
        (lambda d: fcv.dataset("shapes", partition__alpha=-1.0), "data.partition.alpha"),
        (lambda d: fcv.dataset("nope"), "data.name"),
        (lambda d: fcv.config(None, num_roundz=3), "num_roundz"),
        (
            lambda d: fcv.config(None, {"algorithm.client.momentum": 1.5}),
            "algorithm.client.momentum",
        ),
        (lambda d: fcv.config("configs/absent.py"), "configs/absent.py"),
        (lambda d: fcv.model("cnn_emnist", d, widht=2), "model.kwargs.widht"),
        (lambda d: fcv.model("unet", d), "model.name='unet'"),
        (
            lambda d: fcv.cohorts(d, _fedavg(d), clients_per_round=7, batch_size=8),
            "clients_per_round",
        ),
        (lambda d: fcv.cohorts(d, _fedavg(d), clients_per_round=2, batch_size=0), "batch_size"),
        (
            lambda d: fcv.train_rounds(_fedavg(d), None, lambda r: None, 1, evaluate_every=1),
            "evaluate_every",
        ),
    ],
)
def test_a_bad_field_is_one_value_error_line_naming_it(data, build, field):
    with pytest.raises(ValueError) as caught:
        build(data)
    message = str(caught.value)
    assert field in message, message
    assert "\n" not in message, message


def _fedavg(data):
    return fcv.algorithms.fedavg(lambda *a, **k: None, 0.1)
