"""Exact resume after SIGKILL / SIGTERM, non-finite clients, and refused mismatched resumes."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_cv import algorithms, checkpointing
from fedjax_cv import train as train_module
from fedjax_cv.data.pipeline import GrainCohortBuilder
from fedjax_cv.train import TrainingError, build_experiment, params_sha256, train_and_evaluate
from fedjax_cv.validation import ConfigError
from tests import linear_problem as lp
from tests.configs_loader import load_config, override
from tests.test_train import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import resume_check  # noqa: E402

CONFIG = "configs/shapes_fedavg.py:runlocal"
OVERRIDES = [
    "--config.model.name=logistic",
    "--config.num_rounds=24",
    "--config.checkpoint.every_rounds=2",
    "--config.eval_every_rounds=5",
    "--config.data.num_train_examples=4000",
]


@pytest.fixture(scope="module")
def reference_digest(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    subprocess.run(resume_check._command(CONFIG, workdir, OVERRIDES), check=True, cwd=ROOT)
    return resume_check._final_digest(workdir)


@pytest.mark.parametrize("sig, kill_during_save", [(signal.SIGKILL, 3 * 2), (signal.SIGTERM, 0)])
def test_interrupted_run_ends_with_the_uninterrupted_digest(
    tmp_path, reference_digest, sig, kill_during_save
):
    log = resume_check.run_with_interruptions(
        CONFIG,
        tmp_path,
        OVERRIDES,
        num_rounds=24,
        sig=sig,
        kills=2,
        kill_during_save=kill_during_save,
        rng=random.Random(1),
    )
    expected_rc = "rc=0" if sig == signal.SIGTERM else "rc=-9"
    assert sum(expected_rc in line for line in log) >= 1, log
    assert resume_check._final_digest(tmp_path) == reference_digest
    rounds = [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").open()]
    assert rounds == list(range(1, 25))  # no round lost, none twice


def test_clients_with_nan_data_get_zero_weight_and_the_run_completes(tmp_path):
    record = train_and_evaluate(
        tiny_config(**{"data.poisoned_clients": 2, "algorithm.clients_per_round": 6}),
        str(tmp_path),
    )
    assert record["train/num_nonfinite_clients"] == 2
    assert record["train/num_clients"] == 6
    assert record["eval/loss"] == record["eval/loss"]  # finite model: not NaN


class PoisonedFromRound3(GrainCohortBuilder):
    """Test-only seam: `data.poisoned_clients` applies from round 3 on (round_index 2)."""

    def __call__(self, round_index: int):
        if round_index < 2:
            return GrainCohortBuilder.__call__(
                dataclasses.replace(self, poisoned_clients=0), round_index
            )
        return GrainCohortBuilder.__call__(self, round_index)


def test_a_round_of_only_nonfinite_clients_stops_with_checkpoint_intact(tmp_path, monkeypatch):
    config = tiny_config(
        **{"data.poisoned_clients": 6, "algorithm.clients_per_round": 6, "num_rounds": 3}
    )
    message = "round 1: all 6 clients returned non-finite updates; stopped with no checkpoint yet"
    with pytest.raises(TrainingError, match=f"^{message}$"):
        train_and_evaluate(config, str(tmp_path / "from_round_1"))
    # Poisoned from round 3 only: rounds 1 and 2 are those of a clean run, checkpoint 2 holds
    # exactly the clean run's round-2 params, and round 3 stops the run without a checkpoint 3.
    overrides = {"algorithm.clients_per_round": 6, "checkpoint.every_rounds": 1}
    clean = train_and_evaluate(tiny_config(num_rounds=2, **overrides), str(tmp_path / "clean"))
    monkeypatch.setattr(train_module, "GrainCohortBuilder", PoisonedFromRound3)
    config = tiny_config(num_rounds=4, **{"data.poisoned_clients": 6, **overrides})
    workdir = tmp_path / "from_round_3"
    kept = r"with the checkpoints of rounds 1, 2 kept \(the same command resumes from round 2; "
    with pytest.raises(TrainingError, match=rf"round 3: all 6 clients .*; stopped {kept}"):
        train_and_evaluate(config, str(workdir))
    assert checkpointing.latest_step(workdir) == 2
    target = build_experiment(config).initial_state
    manager = checkpointing.manager(workdir, keep=3)
    restored = checkpointing.restore(manager, 2, target)
    manager.close()
    assert int(restored.round) == 2
    assert params_sha256(restored.params) == clean["params_sha256"]
    rounds = [json.loads(line)["round"] for line in (workdir / "metrics.jsonl").open()]
    assert rounds == [1, 2]


def test_resume_with_another_model_is_refused_and_changes_nothing(tmp_path):
    train_and_evaluate(tiny_config(num_rounds=2), str(tmp_path))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(ConfigError, match=r"model\.name='cnn_hsu' differs from 'logistic'"):
        train_and_evaluate(tiny_config(**{"model.name": "cnn_hsu"}), str(tmp_path))
    with pytest.raises(ConfigError, match=r"algorithm\.client\.learning_rate=0\.5 differs"):
        train_and_evaluate(tiny_config(**{"algorithm.client.learning_rate": 0.5}), str(tmp_path))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def runlocal(**overrides):
    """configs/shapes_fedavg.py:runlocal with the logistic model (fast), checkpoints each round."""
    config = load_config(CONFIG)
    config.model.name = "logistic"
    config.checkpoint.every_rounds = 1
    return override(config, overrides)


def test_resume_after_changing_only_keys_that_may_change(tmp_path):
    """eval.*, checkpoint.*, data.root and the loop's lengths may change on resume; a key of
    the math (algorithm.client.learning_rate) may not. The resumed run ends exactly where an
    uninterrupted one does."""
    uninterrupted = train_and_evaluate(runlocal(num_rounds=2), str(tmp_path / "reference"))
    workdir = tmp_path / "run"
    train_and_evaluate(runlocal(num_rounds=1), str(workdir))
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    with pytest.raises(ConfigError, match=r"algorithm\.client\.learning_rate=0\.07 differs"):
        train_and_evaluate(
            runlocal(num_rounds=2, **{"algorithm.client.learning_rate": 0.07}), str(workdir)
        )
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before
    free = {
        "eval.batch_size": 64,
        "eval_every_rounds": 1,
        "log_every_rounds": 2,
        "checkpoint.every_rounds": 2,
        "checkpoint.keep": 1,
        "data.root": str(tmp_path / "elsewhere"),
    }
    # Each is a key of the config, not a new one that nothing reads.
    assert set(free) <= set(checkpointing.flat_config(runlocal()))
    resumed = train_and_evaluate(runlocal(num_rounds=2, **free), str(workdir))
    assert resumed["round"] == 2
    assert resumed["params_sha256"] == uninterrupted["params_sha256"]


def test_allowed_config_change_still_refuses_mismatched_shapes(tmp_path):
    train_and_evaluate(tiny_config(num_rounds=2), str(tmp_path))
    config = tiny_config(**{"data.image_size": 14, "checkpoint.allow_config_change": True})
    with pytest.raises(ConfigError, match=r"params\.Dense_0\.kernel is float32\(588, 4\) here"):
        train_and_evaluate(config, str(tmp_path))
    # A change that keeps every shape is allowed when asked for.
    config = tiny_config(
        **{"algorithm.client.learning_rate": 0.2, "checkpoint.allow_config_change": True}
    )
    assert train_and_evaluate(config, str(tmp_path))["round"] == 3


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("eval_every_rounds", 0, "eval_every_rounds=0"),
        ("checkpoint.every_rounds", 0, "checkpoint.every_rounds=0"),
        ("checkpoint.keep", 0, "checkpoint.keep=0"),
        ("algorithm.batch_size", 0, "algorithm.batch_size=0"),
        ("algorithm.local_epochs", 0, "algorithm.local_epochs=0"),
        ("algorithm.virtual_client_size", -3, "algorithm.virtual_client_size=-3"),
        ("algorithm.server.optimizer", "lamb", "algorithm.server.optimizer='lamb'"),
        ("algorithm.aggregation", "median", "algorithm.aggregation='median'"),
        ("model.norm", "instance", "model.norm='instance'"),
        ("data.num_clients", 0, "data.num_clients=0"),
        ("data.name", "imagenet", "data.name='imagenet'"),
        ("seed", -1, "seed=-1"),
        ("data.augmentation", "mixup", "data.augmentation='mixup' is unknown"),
        ("data.num_workers", -1, "data.num_workers=-1"),
        ("algorithm.client.momentum", 1.5, "algorithm.client.momentum=1.5"),
        ("algorithm.server.eps", 0.0, "algorithm.server.eps=0.0"),
        ("algorithm.client.class_prior", (0.5, 0.6, 0.0, 0.0), "algorithm.client.class_prior="),
    ],
)
def test_more_bad_values_fail_before_anything_is_written(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        train_and_evaluate(tiny_config(**{key: value}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_server_params_turning_nonfinite_stop_the_run_with_checkpoint_intact(tmp_path):
    # A server learning rate of 1e300 is inf in float32: the first server update overflows.
    config = tiny_config(**{"algorithm.server.learning_rate": 1e300, "checkpoint.every_rounds": 1})
    with pytest.raises(TrainingError, match="round 1: the server params became non-finite"):
        train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints" / "1").exists()


def test_clients_whose_loss_overflows_count_as_nonfinite(tmp_path):
    # Params near 1e36 saturate the softmax: finite gradients, infinite loss.
    config = tiny_config(**{"algorithm.server.learning_rate": 1e38})
    with pytest.raises(TrainingError, match="round 2: all 3 clients returned non-finite"):
        train_and_evaluate(config, str(tmp_path))


def test_a_checkpoint_from_before_client_local_state_still_restores(tmp_path):
    """ServerState gained `client_local` ({} unless FedBN); older checkpoints lack the field."""
    algorithm = algorithms.fedavgm(lp.loss_fn, 0.1)
    state, _ = algorithm.apply(
        algorithm.init(lp.initial_params()), lp.make_cohort(), jax.random.key(0)
    )
    old_layout = {
        "params": state.params,
        "opt_state": state.opt_state,
        "model_state": state.model_state,
        "round": state.round,
    }
    manager = checkpointing.manager(tmp_path, keep=1)
    manager.save(1, args=checkpointing.ocp.args.StandardSave(old_layout))
    manager.wait_until_finished()
    target = algorithm.init(lp.initial_params())
    assert checkpointing.state_difference(manager, 1, target) is None
    restored = jax.device_get(checkpointing.restore(manager, 1, target))
    manager.close()
    assert int(restored.round) == 1 and restored.client_local == {}
    for key in ("w", "b"):
        np.testing.assert_array_equal(restored.params[key], jax.device_get(state.params[key]))
    momentum = jax.tree.leaves(jax.device_get(state.opt_state))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(restored.opt_state), momentum, strict=True)
    )
