"""`train_and_evaluate(config, workdir)`: the federated training loop.

It validates the config before writing anything, then runs rounds of the configured
algorithm, evaluates every `eval_every_rounds` rounds, appends one JSON line per logged round
to `metrics.jsonl`, and checkpoints the server state with orbax so that the same command on
the same workdir resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from fedjax_cv import api, checkpointing, curves
from fedjax_cv.algorithms.attacks import Attack, backdoor_test_batch, check_attack
from fedjax_cv.algorithms.param_groups import frozen_fraction, head_rules
from fedjax_cv.algorithms.registry import build_algorithm
from fedjax_cv.api import params_sha256
from fedjax_cv.checkpointing import CheckpointError
from fedjax_cv.data.cohort import test_batches
from fedjax_cv.data.federated import FederatedDataset
from fedjax_cv.data.pipeline import GrainCohortBuilder
from fedjax_cv.data.registry import build_dataset, partition_params
from fedjax_cv.engine import hosts
from fedjax_cv.engine.strategies import client_mesh
from fedjax_cv.models.weights import LoadReport, WeightsError, head_modules, load_pretrained
from fedjax_cv.tasks import Task, pictures
from fedjax_cv.validation import ConfigError, validate_config
from fedjax_cv.workdir import WorkdirError, WorkdirLock, check_workdir


@dataclasses.dataclass
class Experiment:
    """Everything a run is built from, resolved from the config."""

    config: ml_collections.ConfigDict
    dataset: FederatedDataset
    task: Task
    model: api.Model  # the module, its initial variables (after model.weights) and its task
    algorithm: Any
    cohorts: GrainCohortBuilder
    initial_state: Any
    root_key: jax.Array
    notes: tuple[str, ...] = ()  # what the run starts from, said once when it starts
    weights_report: LoadReport | None = None


def _class_prior(config, dataset: FederatedDataset) -> np.ndarray:
    """FedIR's p: `algorithm.client.class_prior` when given, else the union of all clients."""
    given = tuple(config.algorithm.client.class_prior)
    if not given:
        return dataset.class_prior()
    prior = np.asarray(given, np.float64)
    if len(prior) != dataset.num_classes or np.any(prior < 0) or not np.isclose(prior.sum(), 1):
        raise ConfigError(
            f"algorithm.client.class_prior={given!r} is not allowed; must be "
            f"{dataset.num_classes} non-negative numbers summing to 1"
        )
    return prior


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Validates `config` and builds the run; raises ConfigError / ValueError on bad input."""
    validate_config(config)
    dataset = build_dataset(config.data, config.seed)
    model = api.build_model(
        config.model, dataset, seed=config.seed, augmentation=config.data.augmentation
    )
    task, module, variables = model.task, model.module, model.variables
    notes, report = [], None
    if config.model.weights:
        try:
            variables, report = load_pretrained(variables, config.model.weights, model=module)
        except WeightsError as error:
            raise ConfigError(str(error)) from None
        notes.append(f"model.weights={config.model.weights!r}: {report.summary()}")
        model = dataclasses.replace(model, variables=variables)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    param_rules = head_rules(
        head_modules(module),
        freeze_backbone=config.model.freeze == "backbone",
        head_lr=config.model.head_lr,
    )
    if config.model.freeze == "backbone":
        share = frozen_fraction(params, param_rules)
        notes.append(f"model.freeze='backbone': {share:.1%} of the parameters are frozen")
    attack = Attack(**config.attack.to_dict())
    try:
        check_attack(attack, dataset.num_classes, task.name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    algorithm = build_algorithm(
        config.algorithm,
        model.loss_fn,
        num_rounds=config.num_rounds,
        class_prior=_class_prior(config, dataset),
        metric_names=task.metric_names,
        param_rules=param_rules,
        num_clients=len(dataset.clients),
        attack=attack,
        mesh=client_mesh(),
    )
    try:
        initial_state = algorithm.init(params, model_state, num_clients=len(dataset.clients))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    cohorts = api.cohorts(
        dataset,
        algorithm,
        clients_per_round=config.algorithm.clients_per_round,
        batch_size=config.algorithm.batch_size,
        seed=config.seed,
        augmentation=config.data.augmentation,
        num_workers=config.data.num_workers,
        poisoned_clients=config.data.poisoned_clients,
        attack=attack,
        builder=GrainCohortBuilder,  # this module's name: tests swap in a faulty builder
    )
    return Experiment(
        config=config,
        dataset=dataset,
        task=task,
        model=model,
        algorithm=algorithm,
        cohorts=cohorts,
        initial_state=initial_state,
        root_key=jax.random.key(config.seed),
        notes=tuple(notes),
        weights_report=report,
    )


def partition_record(experiment: Experiment):
    """The run's partition with its statistics (written as partition.json)."""
    partition = experiment.config.data.partition
    return experiment.dataset.partition(
        partition.name, experiment.config.seed, partition_params(partition)
    )


def evaluation_stats(experiment: Experiment, state) -> dict:
    """The task's evaluation statistics of `state` on the whole test split, summed
    (`api.evaluation_stats` with the config's eval batch size and augmentation)."""
    return api.evaluation_stats(
        experiment.model,
        state,
        experiment.dataset,
        batch_size=experiment.config.eval.batch_size,
        augmentation=experiment.config.data.augmentation,
    )


def backdoor_success(experiment: Experiment, state) -> dict[str, float]:
    """With a backdoor attack, `eval/backdoor_success`: the share of the test images whose
    label is not the target that the model assigns to the target once the trigger is stamped
    (the task's accuracy on those images relabelled; see `fedjax_cv.algorithms.attacks`)."""
    attack = Attack(**experiment.config.attack.to_dict())
    if attack.name != "backdoor" or not attack.active:
        return {}
    stats = None
    batches = test_batches(
        experiment.dataset.test,
        experiment.config.eval.batch_size,
        api.eval_transform(experiment.config.data.augmentation),
    )
    for batch, mask in batches:
        poisoned, keep = backdoor_test_batch(attack, batch, mask)
        stats = experiment.task.merge(
            stats, experiment.model.eval_fn(state.params, state.model_state, poisoned, keep)
        )
    return {"eval/backdoor_success": experiment.task.finalize(stats)["accuracy"]}


def evaluate(experiment: Experiment, state) -> dict[str, float]:
    """`eval/<metric>` of `state` on the test split (the task's `finalize`)."""
    metrics = api.evaluate(
        experiment.model,
        state,
        experiment.dataset,
        batch_size=experiment.config.eval.batch_size,
        augmentation=experiment.config.data.augmentation,
    )
    return {f"eval/{key}": value for key, value in metrics.items()} | backdoor_success(
        experiment, state
    )


NUM_PICTURED = 8  # test images in each predictions picture


def evaluate_and_report(experiment: Experiment, state, workdir: pathlib.Path, completed: int):
    """`evaluate`, and beside metrics.jsonl: the task's per-class details of this round
    (`eval_details.json`, the latest evaluation) and a picture of predictions on the first
    test images (`predictions/round_<r>.png`)."""
    task = experiment.task
    stats = evaluation_stats(experiment, state)  # every process takes part
    if not hosts.is_writer():
        return {}
    state = hosts.process_local(state)  # what follows runs on process 0 alone
    details = {"round": completed, **task.details(stats, experiment.dataset.class_names)}
    (workdir / "eval_details.json").write_text(json.dumps(details, indent=1) + "\n")
    figure = api.plot_predictions(
        experiment.model,
        state,
        experiment.dataset,
        num_images=NUM_PICTURED,
        augmentation=experiment.config.data.augmentation,
        title=f"round {completed}: predicted / true",
    )
    pictures.save(figure, workdir / "predictions" / f"round_{completed:05d}.png")
    metrics = {f"eval/{key}": value for key, value in task.finalize(stats).items()}
    return metrics | backdoor_success(experiment, state)


class TrainingError(RuntimeError):
    """The run cannot go on (every client non-finite, server params non-finite)."""


class MetricsWriter:
    """Appends JSON lines to metrics.jsonl; on resume it drops lines past the checkpoint
    (they are recomputed identically), a line cut short by a kill, and any other line that is
    not a JSON object with a round (invalid UTF-8, garbage), naming it in one line."""

    def __init__(self, path: pathlib.Path, resume_round: int):
        self.path = path
        if path.exists():
            lines, unreadable = read_metrics_lines(path)
            _note_unreadable(path, unreadable, "dropped")
            kept = [line for line in lines if _round_of(line) <= resume_round]
            if unreadable or kept != lines or _ends_cut(path):
                _rewrite(path, kept)
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before the round's checkpoint, even on power loss

    def rewind(self, last_round: int) -> None:
        """Drops the lines past `last_round` (after a failed save: no line may claim what no
        checkpoint holds)."""
        self._file.close()
        lines, _ = read_metrics_lines(self.path)
        _rewrite(self.path, [line for line in lines if _round_of(line) <= last_round])
        self._file = open(self.path, "a")

    def close(self) -> None:
        self._file.close()


def _rewrite(path: pathlib.Path, lines: list[str]) -> None:
    """Replaces the file at once (a kill leaves the old one or the new one, never a part)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in lines))
    temporary.replace(path)


def _round_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics_lines(path: pathlib.Path) -> tuple[list[str], list[int]]:
    """metrics.jsonl's lines that are JSON objects with a round, and the numbers of the other
    lines (invalid UTF-8, garbage), less a last line cut short by a kill."""
    raw = path.read_bytes().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines, unreadable = [], []
    for number, data in enumerate(raw, start=1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError:
            line = ""
        if _round_of(line) is not None:
            lines.append(line)
        elif number < len(raw):
            unreadable.append(number)
    return lines, unreadable


def _resume_step_for_cut_metrics(workdir: pathlib.Path) -> int | None:
    """When metrics.jsonl ends in a line cut short and a checkpoint is newer than its last whole
    line (a crash kept the checkpoint but not the line), the newest checkpoint at or before that
    line, so that the resume writes the lost rounds again (0: from the start); else None."""
    path = workdir / "metrics.jsonl"
    if not path.is_file() or not _ends_cut(path):
        return None
    lines, _ = read_metrics_lines(path)
    last = max((_round_of(line) for line in lines), default=0)
    kept = checkpointing.steps(workdir)
    if not kept or max(kept) <= last:
        return None
    step = max((s for s in kept if s <= last), default=0)
    start = f"checkpoint {step}" if step else "the start"
    _note(f"{path}: its last line is cut short after round {last}; resuming from {start}")
    return step


def _ends_cut(path: pathlib.Path) -> bool:
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() == 0:
            return False
        file.seek(-1, os.SEEK_END)
        return file.read(1) != b"\n"


def _note_unreadable(path: pathlib.Path, unreadable: list[int], done: str) -> None:
    if unreadable:
        numbers = ", ".join(str(n) for n in unreadable)
        _note(f"{path}: {done} line {numbers}, not a JSON object with a round")


def _note(text: str) -> None:
    """One line for the user on stderr, above the progress bar when one is drawn (process 0's
    only: the others would repeat it)."""
    if hosts.is_writer():
        tqdm.write(text, file=sys.stderr)


class _StopRequest:
    """Turns SIGTERM / SIGINT into a request to finish the round, save and exit 0."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _jsonable(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items()}


def _check_resumable(
    experiment: Experiment, workdir: pathlib.Path, resume_step: int | None = None
) -> tuple[int | None, Any]:
    """The round to resume from and its verified state ((None, initial state): a fresh start).

    Refuses a workdir whose config.json or checkpoint was made with another config, or whose
    state has other shapes. A damaged checkpoint is set aside (`checkpoints_set_aside/`) with
    one line saying why, and the one before it is tried. With `resume_step` the checkpoints
    after that round are set aside too (0: all of them, a fresh start).
    """
    config = experiment.config
    allow = config.checkpoint.allow_config_change
    refusal = "use the same config, another workdir, or "
    refusal += "--config.checkpoint.allow_config_change=True"
    try:
        saved = checkpointing.read_saved_config(workdir)
    except ValueError as error:
        raise ConfigError(
            f"cannot resume in {workdir}: {error}; repair or delete it (each checkpoint also "
            "records the config it was made with)"
        ) from None
    difference = None if saved is None else checkpointing.config_difference(saved, config)
    if difference and not allow:
        raise ConfigError(f"cannot resume in {workdir}: {difference}; {refusal}")
    kept = checkpointing.steps(workdir)
    if resume_step not in (None, 0) and resume_step not in kept:
        raise ConfigError(
            f"resume_step={resume_step}: {workdir / 'checkpoints'} holds no checkpoint of round "
            f"{resume_step}; kept: {_rounds(kept)} (0 starts over)"
        )
    candidates = [step for step in kept if resume_step is None or step <= resume_step]
    found, state = None, experiment.initial_state
    if candidates:
        manager = checkpointing.manager(workdir, config.checkpoint.keep)
        try:
            for step in reversed(candidates):
                try:
                    record = checkpointing.read_record(manager, step)
                    difference = checkpointing.record_difference(record, step, config)
                    if difference and not allow:
                        raise ConfigError(f"cannot resume in {workdir}: {difference}; {refusal}")
                    restored, difference = checkpointing.restore_verified(
                        manager, step, state, record
                    )
                except checkpointing.Damaged as why:
                    moved = hosts.writer_only(
                        functools.partial(checkpointing.set_aside, workdir, step)
                    )
                    _note(f"skipped checkpoint {step} of {workdir}: {why}; moved it to {moved}")
                    continue
                if difference:
                    raise ConfigError(f"cannot resume in {workdir}: {difference}")
                found, state = step, restored
                break
        finally:
            manager.close()
    for step in kept:
        if resume_step is not None and step > resume_step:
            moved = hosts.writer_only(functools.partial(checkpointing.set_aside, workdir, step))
            _note(f"set aside checkpoint {step} (after resume_step={resume_step}) in {moved}")
    return found, state


def _rounds(steps: list[int]) -> str:
    return ", ".join(str(step) for step in steps) if steps else "none"


def _kept_checkpoints(workdir: pathlib.Path) -> str:
    """Where a stopped run can go on from, as the end of its error line."""
    kept = checkpointing.steps(workdir)
    if not kept:
        return "with no checkpoint yet"
    return (
        f"with the checkpoints of rounds {_rounds(kept)} kept (the same command resumes from "
        f"round {kept[-1]}; add --resume_step=<round> to resume from an earlier one)"
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, resume_step: int | None = None
) -> dict[str, Any]:
    """Runs (or resumes) the experiment of `config` in `workdir`; returns the last record.

    `resume_step`: resume from that kept checkpoint instead of the newest, setting the newer
    ones aside (0: start over). Raises ConfigError (bad config, mismatched workdir),
    WorkdirError (a workdir that cannot be used, or one in use by another run), TrainingError
    (the run cannot go on) and CheckpointError (a checkpoint could not be saved).
    """
    validate_config(config)  # bad values and a bad workdir fail before anything is built
    if resume_step is not None and (not isinstance(resume_step, int) or resume_step < 0):
        raise ConfigError(f"resume_step={resume_step!r} is not allowed; must be a round >= 0")
    workdir_path = pathlib.Path(workdir)
    check_workdir(workdir_path)
    lock = WorkdirLock(workdir_path)
    # One writer (process 0 of a multi-process run): a second run is refused before it builds
    # anything. Each step ends with every process saying whether it got through, before the
    # next step's collectives (placing the initial state), so all stop together.
    _in_step(lambda: hosts.writer_only(lock.acquire), lock)
    experiment = _in_step(lambda: build_experiment(config), lock, discard=True)
    try:
        return _train_in(experiment, workdir_path, resume_step)
    finally:
        lock.release()


def _in_step(step, lock: WorkdirLock, *, discard: bool = False):
    """`step()`, which every process runs; when it fails on some process, every process
    raises (the others a ConfigError naming the process and its reason), releasing `lock`
    (`discard`: a workdir made for this run goes again)."""
    try:
        result = step()
    except BaseException as error:
        if discard:
            lock.release(discard=True)
        if isinstance(error, Exception):
            hosts.agree(str(error))
        raise
    refusal = hosts.agree(None)
    if refusal is not None:
        lock.release(discard=True)
        raise ConfigError(refusal)
    return result


def _train_in(experiment: Experiment, workdir_path: pathlib.Path, resume_step: int | None):
    """train_and_evaluate in a workdir this process holds."""
    config = experiment.config
    if resume_step is None:
        resume_step = _resume_step_for_cut_metrics(workdir_path)
    found, state = _check_resumable(experiment, workdir_path, resume_step)
    hosts.sync("fedjax_cv_resume_decided")  # process 0 has set aside what it had to
    metrics_path = workdir_path / "metrics.jsonl"
    num_rounds = config.num_rounds
    if found is not None and found >= num_rounds and metrics_path.exists():
        lines, unreadable = read_metrics_lines(metrics_path)
        _note_unreadable(metrics_path, unreadable, "left alone")
        return json.loads(lines[-1]) if lines else {"round": found}

    if hosts.is_writer():
        _write_run_files(experiment, workdir_path, found)
        checkpointing.remove_unfinished(workdir_path)
    hosts.sync("fedjax_cv_workdir_ready")
    manager = checkpointing.manager(workdir_path, config.checkpoint.keep)
    start_round = found or 0
    writer = MetricsWriter(metrics_path, start_round) if hosts.is_writer() else _NoMetrics()
    failed = True
    try:
        record = _run_rounds(experiment, state, start_round, manager, writer, workdir_path)
        failed = False
    except CheckpointError:
        writer.rewind(checkpointing.latest_step(workdir_path) or 0)
        raise
    except TrainingError as error:
        raise TrainingError(f"{error} {_kept_checkpoints(workdir_path)}") from None
    finally:
        writer.close()
        try:
            manager.close()
        except Exception:  # a failed save fails close() again; it was said once already
            if not failed:
                raise
    if hosts.is_writer():
        curves.plot_learning_curves(
            metrics_path,
            workdir_path / "learning_curves.png",
            score_keys=_score_keys(experiment.task),
        )
    return record


def _write_run_files(experiment: Experiment, workdir_path: pathlib.Path, found: int | None):
    """config.json, partition.json and the weights report, when not there yet (process 0)."""
    config = experiment.config
    config_json = workdir_path / "config.json"
    if not config_json.exists():
        config_json.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    if not (workdir_path / "partition.json").exists():
        partition_record(experiment).save(workdir_path / "partition.json")
    if experiment.weights_report is not None and found is None:
        (workdir_path / "weights_report.txt").write_text(experiment.weights_report.summary() + "\n")
    if found is None:
        for note in experiment.notes:
            tqdm.write(note)


class _NoMetrics:
    """The metrics writer of a process other than 0: it writes nothing."""

    def write(self, record: dict) -> None:
        del record

    def rewind(self, last_round: int) -> None:
        del last_round

    def close(self) -> None:
        pass


def _cohort_source(experiment: Experiment):
    """round -> the cohort `apply` takes: the host's whole cohort with one process; with
    several, the global cohort of which this process assembled only its own client rows."""
    if not hosts.is_multiprocess():
        return experiment.cohorts
    mesh = client_mesh()
    num_clients = experiment.cohorts.clients_per_round

    def global_cohort(round_index: int):
        start, stop = hosts.process_rows(num_clients, mesh)
        local = experiment.cohorts.rows(round_index, start, stop)
        return hosts.global_cohort(local, num_clients, mesh)

    return global_cohort


def _score_keys(task: Task) -> tuple[str, ...]:
    """The metrics.jsonl keys of the task's scores: training metrics, then eval metrics."""
    eval_keys = (task.headline,) + tuple(k for k in task.metric_names if k != task.headline)
    return tuple(f"train/{k}" for k in task.metric_names) + tuple(f"eval/{k}" for k in eval_keys)


def _run_rounds(experiment, state, start_round, manager, writer, workdir) -> dict[str, Any]:
    config = experiment.config
    shown = ("train/loss",) + _score_keys(experiment.task)
    num_rounds = config.num_rounds
    kill_round = int(os.environ.get("FEDJAX_CV_FAULT_KILL_DURING_SAVE", "0"))
    record: dict[str, Any] = {"round": start_round}
    progress = tqdm(
        total=num_rounds,
        initial=start_round,
        desc="rounds",
        unit="round",
        dynamic_ncols=True,
        disable=not hosts.is_writer(),
    )
    cohorts = _cohort_source(experiment)
    # The bar is closed before an error leaves: the last line a user sees is the error.
    with progress, concurrent.futures.ThreadPoolExecutor(1) as prefetch, _StopRequest() as stop:
        next_cohort = prefetch.submit(cohorts, start_round)
        for round_index in range(start_round, num_rounds):
            cohort = next_cohort.result()
            if round_index + 1 < num_rounds:
                next_cohort = prefetch.submit(cohorts, round_index + 1)
            started = time.perf_counter()
            state, round_metrics = experiment.algorithm.apply(
                state, cohort, api.round_key(experiment.root_key, round_index)
            )
            train = _jsonable(jax.device_get(round_metrics))
            train["examples_per_s"] = train["num_examples"] / (time.perf_counter() - started)
            completed = round_index + 1
            if experiment.algorithm.host_metrics is not None:
                train.update(experiment.algorithm.host_metrics(completed))
            _check_finite(train, completed)
            record = {"round": completed}
            if completed % config.log_every_rounds == 0 or completed == num_rounds:
                record.update({f"train/{k}": v for k, v in train.items()})
            if completed % config.eval_every_rounds == 0 or completed == num_rounds:
                record.update(evaluate_and_report(experiment, state, workdir, completed))
            if completed == num_rounds:
                record["params_sha256"] = params_sha256(state.params)
            if len(record) > 1:
                writer.write(record)
            periodic = completed % config.checkpoint.every_rounds == 0
            if hosts.is_multiprocess():  # a signal to one process stops them all, together
                stop.signal = hosts.first_signal(stop.signal)
            if periodic or completed == num_rounds or stop.signal is not None:
                in_flight = None
                if completed == kill_round:  # test-only fault: die while the save is in flight
                    in_flight = functools.partial(os.kill, os.getpid(), signal.SIGKILL)
                checkpointing.save(manager, completed, state, config, in_flight=in_flight)
            progress.update(1)
            progress.set_postfix(
                {k.replace("train/", ""): f"{record[k]:.3f}" for k in shown if k in record}
                | {"ex/s": f"{train['examples_per_s']:.0f}"}
            )
            if stop.signal is not None:
                progress.write(f"signal {stop.signal}: saved round {completed}, exiting")
                record = {**record, "stopped_by_signal": stop.signal}
                break
    if num_rounds == 0:
        record = {"round": 0, **evaluate_and_report(experiment, state, workdir, 0)}
        record["params_sha256"] = params_sha256(state.params)
        writer.write(record)
    return record


def _check_finite(train: dict[str, float], completed: int) -> None:
    if train["num_clients"] > 0 and train["num_nonfinite_clients"] == train["num_clients"]:
        raise TrainingError(
            f"round {completed}: all {train['num_clients']:.0f} clients returned non-finite "
            "updates; stopped"
        )
    if train.pop("nonfinite_params", 0.0):
        raise TrainingError(f"round {completed}: the server params became non-finite; stopped")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "TrainingError",
    "WorkdirError",
    "build_experiment",
    "params_sha256",
    "train_and_evaluate",
]
