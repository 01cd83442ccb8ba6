"""The Flower bridge (fedjax_cv.deploy.flower) against fedjax_cv's own simulation.

The ServerApp's strategy and the ClientApp run here in one process, their Flower Messages
carried by `InProcessGrid` (a `flwr.serverapp.Grid` that hands each message to the node's
ClientApp and its reply back, an exception becoming the reply's error as a SuperNode makes
it); the reference is `FederatedAlgorithm.apply` on the whole cohort, another path.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
import uuid

import jax
import numpy as np
import pytest

try:
    import flwr  # noqa: F401
except ImportError:
    if os.environ.get("FEDJAX_CV_REQUIRE_FLOWER"):
        raise
    pytest.skip("flwr is not installed (pip install 'fedjax_cv[deploy]')", allow_module_level=True)

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedjax_cv import api, train
from fedjax_cv.deploy import flower

CONFIG = str(pathlib.Path(__file__).parents[1] / "configs" / "shapes_fedavg.py")
RUN_CONFIG = {
    flower.CONFIG_KEY: CONFIG,
    "fedjax.num_rounds": 3,
    "fedjax.data.num_clients": 2,
    "fedjax.data.num_train_examples": 200,
    "fedjax.data.num_test_examples": 20,
    "fedjax.algorithm.clients_per_round": 2,
}
VARIANTS = {
    "fedavg": {},
    "fedavgm": {"fedjax.algorithm.name": "fedavgm", "fedjax.algorithm.server.momentum": 0.9},
    "median": {"fedjax.algorithm.aggregator.name": "median"},
}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower's runtime sets in a ServerApp's process before it builds messages."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class InProcessGrid(Grid):
    """Flower's Grid interface over ClientApps in this process. `lost(message)` says which
    messages never reach their node (a node killed mid-round: no reply comes back)."""

    def __init__(self, app, node_configs: dict[int, dict], run_config: dict, lost=None):
        self._app = app
        self._contexts = {
            node_id: Context(1, node_id, node_config, RecordDict(), run_config)
            for node_id, node_config in node_configs.items()
        }
        self._lost = lost or (lambda message: False)
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self._contexts)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(message.metadata.message_id)
            if self._lost(message):
                continue
            context = self._contexts[message.metadata.dst_node_id]
            try:
                reply = self._app(message, context)
            except Exception as error:  # what a SuperNode replies for a failing ClientApp
                reply = Message(Error(0, f"{type(error).__name__}: {error}"), reply_to=message)
            self._replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def simulate(run_config: dict, rows: dict[int, tuple[int, int]] | None = None):
    """fedjax_cv's own run of the config: `apply` on each round's cohort (only its client
    rows [start, stop) where `rows` says so) with the round keys of train.py's loop; returns
    the final server params."""
    config = flower.experiment_config(run_config)
    experiment = train.build_experiment(config)
    state = experiment.initial_state
    for round_index in range(config.num_rounds):
        start, stop = (rows or {}).get(round_index, (0, None))
        state, _ = experiment.algorithm.apply(
            state,
            experiment.cohorts.rows(round_index, start, stop),
            api.round_key(experiment.root_key, round_index),
        )
    return jax.device_get(state.params)


def max_difference(expected, got) -> float:
    pairs = zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True)
    return max(float(np.max(np.abs(a - b))) for a, b in pairs)


def run_flower(run_config: dict, node_configs: dict[int, dict], lost=None):
    grid = InProcessGrid(flower.client_app(), node_configs, run_config, lost)
    server_context = Context(1, 0, {}, RecordDict(), run_config)
    return flower.run_server(grid, server_context)


TWO_NODES = {11: {flower.PARTITION_KEY: 0}, 22: {flower.PARTITION_KEY: 1}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_flower_rounds_equal_simulation(variant):
    run_config = {**RUN_CONFIG, **VARIANTS[variant]}
    strategy = run_flower(run_config, TWO_NODES)
    assert strategy.failures == []
    assert strategy.nodes == {0: 11, 1: 22}
    assert [m["num_clients"] for m in strategy.history] == [2.0, 2.0, 2.0]
    got = jax.device_get(strategy.state.params)
    assert max_difference(simulate(run_config), got) <= 1e-5
    # The comparison can fail: three rounds moved the params well beyond the tolerance.
    initial = train.build_experiment(flower.experiment_config(run_config)).initial_state.params
    assert max_difference(jax.device_get(initial), got) > 1e-2


def test_lost_node_mid_run_is_reported_and_the_run_goes_on():
    # Node 22's message of Flower round 2 (fedjax_cv round 1) never comes back.
    lost = lambda m: m.metadata.dst_node_id == 22 and m.metadata.group_id == "2"
    strategy = run_flower(RUN_CONFIG, TWO_NODES, lost)
    assert [(f.round, f.node_id) for f in strategy.failures] == [(1, 22)]
    assert "no reply" in strategy.failures[0].reason
    assert [m["num_clients"] for m in strategy.history] == [2.0, 1.0, 2.0]
    # FedAvg of the remaining client: fedjax_cv's round 1 on cohort row 0 alone.
    expected = simulate(RUN_CONFIG, rows={1: (0, 1)})
    assert max_difference(expected, jax.device_get(strategy.state.params)) <= 1e-5
    assert max_difference(simulate(RUN_CONFIG), jax.device_get(strategy.state.params)) > 1e-3


def test_node_with_other_number_of_classes_fails_naming_itself():
    bad = {flower.PARTITION_KEY: 1, "fedjax.data.num_classes": 3}
    nodes = {11: {flower.PARTITION_KEY: 0}, 22: bad}
    grid = InProcessGrid(flower.client_app(), nodes, RUN_CONFIG)
    strategy = flower.make_strategy(
        train.build_experiment(flower.experiment_config(RUN_CONFIG)), timeout=None
    )
    strategy.connect(grid)
    assert strategy.nodes == {0: 11}
    [failure] = strategy.failures
    assert failure.node_id == 22
    assert "supernode 22 (partition-id 1)" in failure.reason
    assert "3 classes" in failure.reason and "the server's model 4" in failure.reason
    # On the node itself: the ClientApp raises that error.
    context = Context(1, 22, bad, RecordDict(), RUN_CONFIG)
    query = Message(RecordDict({"fedjax": flwr.app.ConfigRecord({"num-classes": 4})}), 22, "query")
    with pytest.raises(flower.NodeDataError, match=r"supernode 22 \(partition-id 1\).*3 classes"):
        flower.node_query(query, context)


# ------------------------------------------------------------------------------------------
# The Deployment Engine: a SuperLink and two SuperNodes on 127.0.0.1, `flwr run` of an app.

APP = pathlib.Path(__file__).parents[1] / "launch" / "flower_app"  # the app the README runs


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Federation:
    """A SuperLink and SuperNodes, each a process group of its own, ended by `close`."""

    def __init__(self, home: pathlib.Path, partitions: int):
        self.home = home
        # Every message starts a fresh ClientApp process: a compilation cache shared by them
        # saves most of their time after the first (same executables, same numbers).
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "JAX_COMPILATION_CACHE_DIR": str(home / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        }
        self.port = _free_port()
        self.processes = {}
        logs = home / "logs"
        logs.mkdir(parents=True)
        self._start(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--port",
                str(self.port),
                "--database",
                ":flwr-in-memory:",
            ],
            logs,
        )
        for partition in range(partitions):
            self._start(
                f"supernode{partition}",
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    f"{flower.PARTITION_KEY}={partition}",
                ],
                logs,
            )
        self._wait_for_nodes(logs / "superlink.log", partitions)
        config = home / "config.toml"
        config.write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def _start(self, name, command, logs):
        out = open(logs / f"{name}.log", "w")  # the process writes it until close
        self.processes[name] = subprocess.Popen(
            command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait_for_nodes(self, log: pathlib.Path, partitions: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while log.read_text().count("Activated node_id") < partitions:
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"{partitions} SuperNodes did not join in {timeout} s")
            time.sleep(0.2)

    def kill(self, name: str) -> None:
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait()

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _toml(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower()


def _flwr_run(federation, tmp_path, run_config, on_line=None, timeout=300):
    """`flwr run` of the shipped app with its run config replaced by `run_config`."""
    app = tmp_path / "app"
    shutil.copytree(APP, app)
    pyproject = (app / "pyproject.toml").read_text()
    head = pyproject[: pyproject.index("[tool.flwr.app.config]")]
    lines = "\n".join(f'"{k}" = {_toml(v)}' for k, v in run_config.items())
    (app / "pyproject.toml").write_text(f"{head}[tool.flwr.app.config]\n{lines}\n")
    run = subprocess.Popen(
        ["flwr", "run", str(app), "deploy", "--stream"],
        env=federation.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = []
    deadline = time.monotonic() + timeout
    for line in run.stdout:
        output.append(line)
        if on_line is not None:
            on_line(line)
        if time.monotonic() > deadline:
            os.killpg(run.pid, signal.SIGKILL)
            break
    run.wait()
    return "".join(output)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    federation = Federation(tmp_path_factory.mktemp("flwr_home"), partitions=2)
    yield federation
    federation.close()


@pytest.mark.slow
def test_deployment_engine_equals_simulation(federation, tmp_path):
    out = tmp_path / "out"
    output = _flwr_run(federation, tmp_path, {**RUN_CONFIG, flower.OUTPUT_KEY: str(out)})
    assert (out / "result.json").exists(), output[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["failures"] == []
    assert sorted(result["nodes"]) == ["0", "1"]
    assert [m["num_clients"] for m in result["history"]] == [2.0, 2.0, 2.0]
    with np.load(out / "params.npz") as saved:
        got = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    assert max_difference(simulate(RUN_CONFIG), got) <= 1e-5


@pytest.mark.slow
def test_deployment_engine_goes_on_without_a_killed_supernode(federation, tmp_path):
    out = tmp_path / "out"
    killed = []

    def kill_at_last_round(line):
        if "[ROUND 2/2]" in line and not killed:
            federation.kill("supernode1")
            killed.append(line)

    # A round waits 45 s for its replies: a fresh ClientApp process takes 5-25 s here.
    run_config = {
        **RUN_CONFIG,
        "fedjax.num_rounds": 2,
        flower.OUTPUT_KEY: str(out),
        flower.TIMEOUT_KEY: 45.0,
    }
    output = _flwr_run(federation, tmp_path, run_config, on_line=kill_at_last_round)
    assert killed, output[-3000:]
    assert (out / "result.json").exists(), output[-3000:]
    result = json.loads((out / "result.json").read_text())
    dead_node = result["nodes"]["1"]
    assert [(f["round"], f["node_id"]) for f in result["failures"]] == [(1, dead_node)], output
    assert [m["num_clients"] for m in result["history"]] == [2.0, 1.0]
    assert "1 failures" in output  # the server's report, in the run's log
    with np.load(out / "params.npz") as saved:
        got = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    # FedAvg of the remaining client: fedjax_cv's round 1 on cohort row 0 alone.
    assert max_difference(simulate(run_config, rows={1: (0, 1)}), got) <= 1e-5
