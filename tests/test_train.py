"""The training loop end to end on tiny shapes runs: metrics.jsonl, determinism, resume, errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_cv.config_base import base_config
from fedjax_cv.train import build_experiment, evaluate, train_and_evaluate
from fedjax_cv.validation import ConfigError
from tests.configs_loader import override, shrink

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
    config = base_config()
    config.num_rounds = 3
    config.eval_every_rounds = 2
    config.checkpoint.every_rounds = 2
    config.model.name = "logistic"
    config.algorithm.batch_size = 8
    config.data.image_size = 12
    return override(shrink(config, num_clients=6, num_train=120), overrides)


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """tiny_config() trained once, shared by the tests that only read its outputs."""
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    return workdir, train_and_evaluate(tiny_config(), str(workdir))


def test_metrics_jsonl_has_rounds_train_eval_and_final_digest(tiny_run):
    workdir, _ = tiny_run
    records = read_metrics(workdir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all("train/loss" in r for r in records)
    assert "eval/accuracy" in records[1] and "eval/accuracy" in records[2]
    assert "eval/accuracy" not in records[0]
    assert len(records[-1]["params_sha256"]) == 64
    assert 0.0 <= records[-1]["eval/accuracy"] <= 1.0
    assert json.loads((workdir / "config.json").read_text())["num_rounds"] == 3


def test_same_seed_same_digest_other_seed_other(tmp_path, tiny_run):
    digests = [tiny_run[1]["params_sha256"]]
    for name, seed in (("b", 0), ("c", 1)):
        record = train_and_evaluate(tiny_config(seed=seed), str(tmp_path / name))
        digests.append(record["params_sha256"])
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]


@pytest.mark.parametrize(
    "algorithm",
    [
        {"algorithm.name": "fedavgm", "algorithm.server.momentum": 0.9},
        {
            "algorithm.name": "fedopt",
            "algorithm.server.optimizer": "yogi",
            "algorithm.server.learning_rate": 0.01,
        },
        {"algorithm.name": "fedprox", "algorithm.client.proximal_mu": 0.1},
        {"algorithm.name": "fedir"},
        {"algorithm.name": "fedvc", "algorithm.virtual_client_size": 16},
        {
            "algorithm.name": "fedavgm",
            "algorithm.server.momentum": 0.9,
            "algorithm.client.importance_weighting": True,
            "algorithm.virtual_client_size": 16,
        },
    ],
)
def test_every_algorithm_trains_from_a_config(tmp_path, algorithm):
    record = train_and_evaluate(tiny_config(**algorithm), str(tmp_path))
    assert record["round"] == 3 and 0.0 <= record["eval/accuracy"] <= 1.0
    records = read_metrics(tmp_path)
    # Training lowers the clients' loss: a sign error, a zero step or a server update that
    # undoes the clients' work leaves it where the first round found it, or higher.
    assert records[-1]["train/loss"] < 0.95 * records[0]["train/loss"], records


def test_resume_after_finish_changes_nothing_and_interrupted_run_matches(tmp_path, tiny_run):
    workdir, full = tiny_run
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    again = train_and_evaluate(tiny_config(), str(workdir))
    after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    assert again["params_sha256"] == full["params_sha256"] and before == after
    # Stop after round 2 (a checkpoint), then finish: the same model as the uninterrupted run.
    train_and_evaluate(tiny_config(num_rounds=2), str(tmp_path / "split"))
    resumed = train_and_evaluate(tiny_config(), str(tmp_path / "split"))
    assert resumed["params_sha256"] == full["params_sha256"]
    assert [r["round"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("algorithm.name", "fedfoo", "algorithm.name='fedfoo' is unknown"),
        ("model.name", "resnet9", "model.name='resnet9'"),
        ("data.partition.alpha", 0.0, "data.partition.alpha=0.0"),
        ("data.partition.alpha", -1.0, "data.partition.alpha=-1.0"),
        ("algorithm.clients_per_round", 0, "algorithm.clients_per_round=0"),
        ("algorithm.clients_per_round", 7, "at most data.num_clients=6"),
        ("algorithm.client.learning_rate", -0.1, "algorithm.client.learning_rate=-0.1"),
        ("algorithm.server.learning_rate", -1.0, "algorithm.server.learning_rate=-1.0"),
        ("algorithm.client.proximal_mu", -0.5, "algorithm.client.proximal_mu=-0.5"),
        ("algorithm.server.momentum", 1.0, "algorithm.server.momentum=1.0"),
        ("algorithm.server.momentum", -0.1, "algorithm.server.momentum=-0.1"),
        ("algorithm.name", "fedvc", "algorithm.virtual_client_size=0"),
        ("num_rounds", -1, "num_rounds=-1"),
        ("algorithm.strategy", "pmap", "algorithm.strategy='pmap'"),
        ("data.partition.name", "zipf", "data.partition.name='zipf'"),
    ],
)
def test_bad_config_values_fail_before_anything_is_written(tmp_path, key, value, message):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        train_and_evaluate(tiny_config(**{key: value}), str(workdir))
    assert not workdir.exists()


def launch(workdir, *overrides, config="configs/shapes_fedavg.py:runlocal"):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            f"--config={config}",
            f"--workdir={workdir}",
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.algoritm.name=fedavg", "unknown config key 'algoritm'"),
        ("--config.algorithm.client.learning_rate=abc", "could not convert string to float"),
        ("--config.algorithm.name=fedfoo", "algorithm.name='fedfoo' is unknown; known: fedavg"),
    ],
)
def test_launcher_prints_one_error_line_without_traceback(tmp_path, override, message):
    result = launch(tmp_path / "run", override)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_launcher_runs_the_main_job_config_runlocal_to_a_level(tmp_path):
    # runlocal's 20 clients with twice the examples and 12 rounds of 10 clients: 12,000
    # client-examples, the budget after which the main job passes 0.5 (it is at 0.87 after
    # 20,000). Four balanced classes put chance at 0.25; 0.45 asks for clearly learnt shapes.
    result = launch(
        tmp_path / "run",
        "--config.num_rounds=12",
        "--config.eval_every_rounds=12",
        "--config.data.num_train_examples=2000",
        "--config.data.num_test_examples=400",
        "--config.algorithm.clients_per_round=10",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_metrics(tmp_path / "run")
    assert records[-1]["round"] == 12 and "params_sha256" in records[-1]
    assert records[-1]["eval/accuracy"] >= 0.45, records[-1]
    assert records[-1]["train/loss"] < 0.9 * records[0]["train/loss"]


def test_evaluate_equals_numpy_with_a_padded_last_batch():
    # 40 test examples in batches of 16: the last batch holds 8 real examples and 8 repeats.
    config = tiny_config(**{"eval.batch_size": 16})
    experiment = build_experiment(config)
    state = experiment.initial_state
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.05, state.params
    )
    metrics = evaluate(experiment, state.replace(params=params))
    test = experiment.dataset.test
    images = (test["image"].astype(np.float64) / 255.0 - 0.5) / 0.5
    logits = images.reshape(len(images), -1) @ params["Dense_0"]["kernel"].astype(np.float64)
    logits += params["Dense_0"]["bias"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    losses = -log_probs[np.arange(len(images)), test["label"]]
    assert len(images) == 40
    assert metrics["eval/loss"] == pytest.approx(losses.mean(), rel=1e-5)
    assert metrics["eval/accuracy"] == pytest.approx(
        np.mean(logits.argmax(axis=1) == test["label"]), abs=1e-12
    )
