"""`train_and_evaluate(config, workdir)`: the federated training loop.

It validates the config before writing anything, then runs rounds of the configured
algorithm, evaluates every `eval_every_rounds` rounds, appends one JSON line per logged round
to `metrics.jsonl`, and checkpoints the server state with orbax so that the same command on
the same workdir resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from fedjax_cv.algorithms.registry import build_algorithm
from fedjax_cv.data.cohort import CohortBuilder, prepare, test_batches
from fedjax_cv.data.federated import FederatedDataset
from fedjax_cv.data.registry import build_dataset
from fedjax_cv.engine.strategies import client_mesh
from fedjax_cv.models import get_model
from fedjax_cv.tasks import classification
from fedjax_cv.validation import ConfigError, validate_config

_INIT_STREAM, _TRAIN_STREAM = 0, 1


def params_sha256(params) -> str:
    """SHA-256 of the params' raw bytes, leaves in tree order: equal digests, equal models."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class Experiment:
    """Everything a run is built from, resolved from the config."""

    config: ml_collections.ConfigDict
    dataset: FederatedDataset
    model: Any
    algorithm: Any
    cohorts: CohortBuilder
    eval_fn: Any
    initial_state: Any
    root_key: jax.Array


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Validates `config` and builds the run; raises ConfigError / ValueError on bad input."""
    validate_config(config)
    dataset = build_dataset(config.data, config.seed)
    model_kwargs = {} if config.model.norm == "auto" else {"norm": config.model.norm}
    model = get_model(config.model.name, dataset.num_classes, **model_kwargs)
    root_key = jax.random.key(config.seed)
    sample = jnp.asarray(prepare({"image": dataset.train["image"][:1]})["image"])
    variables = model.init(jax.random.fold_in(root_key, _INIT_STREAM), sample, train=False)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    algorithm = build_algorithm(
        config.algorithm,
        classification.make_loss_fn(model),
        class_prior=dataset.class_prior(),
        metric_names=classification.METRIC_NAMES,
        mesh=client_mesh(),
    )
    cohorts = CohortBuilder(
        dataset=dataset,
        client_sampler=algorithm.client_sampler,
        example_sampler=algorithm.example_sampler,
        clients_per_round=config.algorithm.clients_per_round,
        batch_size=config.algorithm.batch_size,
        seed=config.seed,
    )
    return Experiment(
        config=config,
        dataset=dataset,
        model=model,
        algorithm=algorithm,
        cohorts=cohorts,
        eval_fn=classification.make_eval_fn(model),
        initial_state=algorithm.init(params, model_state),
        root_key=root_key,
    )


def evaluate(experiment: Experiment, state) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch, mask in test_batches(experiment.dataset.test, experiment.config.eval.batch_size):
        sums = experiment.eval_fn(state.params, state.model_state, batch, mask)
        for key, value in jax.device_get(sums).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = max(totals.pop("count", 0.0), 1.0)
    return {f"eval/{key}": value / count for key, value in totals.items()}


class MetricsWriter:
    """Appends JSON lines to metrics.jsonl; on resume it drops lines past the checkpoint."""

    def __init__(self, path: pathlib.Path, resume_round: int):
        self._path = path
        if path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["round"] <= resume_round
            ]
            if len(kept) != len(path.read_text().splitlines()):
                path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def _jsonable(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the experiment of `config` in `workdir`; returns the last record."""
    experiment = build_experiment(config)  # all input errors surface here, before any write
    workdir_path = pathlib.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    config_json = workdir_path / "config.json"
    if not config_json.exists():
        config_json.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

    manager = _checkpoint_manager(workdir_path, config)
    state = experiment.initial_state
    start_round = 0
    latest = manager.latest_step()
    if latest is not None:
        state = manager.restore(latest, args=ocp.args.StandardRestore(state))
        start_round = int(latest)
    num_rounds = config.num_rounds
    metrics_path = workdir_path / "metrics.jsonl"
    if start_round >= num_rounds and metrics_path.exists() and latest is not None:
        manager.close()
        last = metrics_path.read_text().splitlines()[-1]
        return json.loads(last)

    writer = MetricsWriter(metrics_path, start_round)
    train_key = jax.random.fold_in(experiment.root_key, _TRAIN_STREAM)
    record: dict[str, Any] = {"round": start_round}
    progress = tqdm(
        total=num_rounds, initial=start_round, desc="rounds", unit="round", dynamic_ncols=True
    )
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as prefetch:
        next_cohort = prefetch.submit(experiment.cohorts, start_round)
        for round_index in range(start_round, num_rounds):
            cohort = next_cohort.result()
            if round_index + 1 < num_rounds:
                next_cohort = prefetch.submit(experiment.cohorts, round_index + 1)
            started = time.perf_counter()
            state, round_metrics = experiment.algorithm.apply(
                state, cohort, jax.random.fold_in(train_key, round_index)
            )
            completed = round_index + 1
            record = {"round": completed}
            if completed % config.log_every_rounds == 0 or completed == num_rounds:
                train = _jsonable(jax.device_get(round_metrics))
                train["examples_per_s"] = train["num_examples"] / (time.perf_counter() - started)
                record.update({f"train/{k}": v for k, v in train.items()})
            if completed % config.eval_every_rounds == 0 or completed == num_rounds:
                record.update(evaluate(experiment, state))
            if completed == num_rounds:
                record["params_sha256"] = params_sha256(state.params)
            if len(record) > 1:
                writer.write(record)
            if completed % config.checkpoint.every_rounds == 0 or completed == num_rounds:
                manager.save(completed, args=ocp.args.StandardSave(state))
            progress.update(1)
            progress.set_postfix(
                {
                    k.split("/")[-1]: f"{record[k]:.3f}"
                    for k in (
                        "train/loss",
                        "train/accuracy",
                        "eval/accuracy",
                        "train/examples_per_s",
                    )
                    if k in record
                }
            )
    progress.close()
    if num_rounds == 0:
        record = {
            "round": 0,
            **evaluate(experiment, state),
            "params_sha256": params_sha256(state.params),
        }
        writer.write(record)
    writer.close()
    manager.wait_until_finished()
    manager.close()
    return record


__all__ = ["ConfigError", "build_experiment", "params_sha256", "train_and_evaluate"]
