"""The Flower bridge (fedjax_cv.deploy.flower) against fedjax_cv's own simulation.

The ServerApp's strategy and the ClientApp run here in one process, their Flower Messages
carried by `InProcessGrid` (a `flwr.serverapp.Grid` that hands each message to the node's
ClientApp and its reply back, an exception becoming the reply's error as a SuperNode makes
it); the reference is `FederatedAlgorithm.apply` on the whole cohort, another path, and
fedjax_cv's `api.evaluate` for the federated evaluation. Marked slow: the shipped app on
Flower's Deployment Engine (SuperLink, SuperNodes, a ClientApp process a message) and on its
Simulation Engine (Ray).
"""

from __future__ import annotations

import dataclasses
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
import jax.numpy as jnp
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
from fedjax_cv.data.cohort import prepare
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
    # Three clients, all in every round: the median of two is their mean.
    "median": {
        "fedjax.algorithm.aggregator.name": "median",
        "fedjax.data.num_clients": 3,
        "fedjax.data.num_train_examples": 240,
        "fedjax.algorithm.clients_per_round": 3,
    },
}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower's runtime sets in a ServerApp's process before it builds messages."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class InProcessGrid(Grid):
    """Flower's Grid interface over ClientApps in this process. Test-only seams:
    `lost(message)` says which messages never reach their node (a node killed mid-round),
    `lost_reply(message)` which replies never come back after the node ran (a reply past
    the timeout), `on_deliver(message, context)` runs before a node gets a message."""

    def __init__(
        self,
        app,
        node_configs: dict[int, dict],
        run_config: dict,
        lost=None,
        lost_reply=None,
        on_deliver=None,
    ):
        self._app = app
        self.contexts = {
            node_id: Context(1, node_id, node_config, RecordDict(), run_config)
            for node_id, node_config in node_configs.items()
        }
        self._lost = lost or (lambda message: False)
        self._lost_reply = lost_reply or (lambda message: False)
        self._on_deliver = on_deliver or (lambda message, context: None)
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(message.metadata.message_id)
            if self._lost(message):
                continue
            context = self.contexts[message.metadata.dst_node_id]
            self._on_deliver(message, context)
            # A SuperNode keeps a ClientApp's changes to its context only when it succeeds.
            state = RecordDict(dict(context.state))
            try:
                reply = self._app(message, context)
            except Exception as error:  # what a SuperNode replies for a failing ClientApp
                reply = Message(Error(0, f"{type(error).__name__}: {error}"), reply_to=message)
                context.state = state
            if not self._lost_reply(message):
                self._replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def simulate(run_config: dict, rows: dict[int, tuple[int, int]] | None = None, forget_local=False):
    """fedjax_cv's own run of the config: `apply` on each round's cohort (only its client
    rows [start, stop) where `rows` says so) with the round keys of train.py's loop; returns
    the final server params. `forget_local`: every round starts from the initial client store
    (what a bridge that kept no client-local state would compute)."""
    config = flower.experiment_config(run_config)
    experiment = train.build_experiment(config)
    state = experiment.initial_state
    initial_store = jax.device_get(state.client_local)
    for round_index in range(config.num_rounds):
        start, stop = (rows or {}).get(round_index, (0, None))
        if forget_local:
            state = state.replace(client_local=jax.tree.map(jnp.asarray, initial_store))
        state, _ = experiment.algorithm.apply(
            state,
            experiment.cohorts.rows(round_index, start, stop),
            api.round_key(experiment.root_key, round_index),
        )
    return jax.device_get(state.params)


def evaluate_on(run_config: dict, params_and_state, client_ids) -> dict[str, float]:
    """fedjax_cv's own `api.evaluate` of the params on the union of these clients' train
    examples (one split, evaluated in one pass), as `eval/<metric>`."""
    experiment = train.build_experiment(flower.experiment_config(run_config))
    index = np.concatenate([experiment.dataset.clients[c] for c in client_ids])
    union = dataclasses.replace(
        experiment.dataset, test={k: v[index] for k, v in experiment.dataset.train.items()}
    )
    params, model_state = params_and_state
    state = experiment.initial_state.replace(params=params, model_state=model_state)
    metrics = api.evaluate(
        experiment.model,
        state,
        union,
        batch_size=experiment.config.eval.batch_size,
        augmentation=experiment.config.data.augmentation,
    )
    # An independent count of the accuracy: numpy over the model's predictions of the images
    # as evaluation reads them (normalised).
    images = prepare({"image": union.test["image"]})["image"]
    predicted = np.asarray(experiment.model.predict_fn(params, model_state, images))
    metrics["counted_accuracy"] = float(np.mean(predicted == union.test["label"]))
    return {f"eval/{k}": v for k, v in metrics.items()}


def max_difference(expected, got) -> float:
    pairs = zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True)
    return max(float(np.max(np.abs(a - b))) for a, b in pairs)


def run_flower(run_config: dict, node_configs: dict[int, dict], **seams):
    grid = InProcessGrid(flower.client_app(), node_configs, run_config, **seams)
    server_context = Context(1, 0, {}, RecordDict(), run_config)
    return flower.run_server(grid, server_context)


TWO_NODES = {11: {flower.PARTITION_KEY: 0}, 22: {flower.PARTITION_KEY: 1}}
THREE_NODES = {**TWO_NODES, 33: {flower.PARTITION_KEY: 2}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_flower_rounds_equal_simulation(variant):
    run_config = {**RUN_CONFIG, **VARIANTS[variant]}
    clients = run_config["fedjax.data.num_clients"]
    nodes = dict(list(THREE_NODES.items())[:clients])
    strategy = run_flower(run_config, nodes)
    assert strategy.failures == []
    assert strategy.nodes == {cfg[flower.PARTITION_KEY]: n for n, cfg in nodes.items()}
    assert [m["num_clients"] for m in strategy.history] == [float(clients)] * 3
    got = jax.device_get(strategy.state.params)
    assert max_difference(simulate(run_config), got) <= 1e-5
    if variant == "median":  # the median of three is not their mean
        mean = {**run_config, "fedjax.algorithm.aggregator.name": "mean"}
        assert max_difference(simulate(mean), got) > 1e-4
    # The comparison can fail: three rounds moved the params well beyond the tolerance.
    initial = train.build_experiment(flower.experiment_config(run_config)).initial_state.params
    assert max_difference(jax.device_get(initial), got) > 1e-2


def in_round(node_id: int, server_round: int, message_type: str = "train"):
    """A predicate of the messages of this type to this node in this Flower round."""
    return lambda m: (
        (m.metadata.dst_node_id, m.metadata.group_id, m.metadata.message_type)
        == (
            node_id,
            str(server_round),
            message_type,
        )
    )


def test_lost_node_mid_run_is_reported_and_the_run_goes_on():
    # Node 22's message of Flower round 2 (fedjax_cv round 1) never comes back.
    run_config = {**RUN_CONFIG, "fedjax.eval_every_rounds": 1}
    strategy = run_flower(run_config, TWO_NODES, lost=in_round(22, 2))
    assert [(f.round, f.node_id) for f in strategy.failures] == [(1, 22)]
    assert "no reply" in strategy.failures[0].reason
    assert [m["num_clients"] for m in strategy.history] == [2.0, 1.0, 2.0]
    # FedAvg of the remaining client: fedjax_cv's round 1 on cohort row 0 alone.
    expected = simulate(RUN_CONFIG, rows={1: (0, 1)})
    assert max_difference(expected, jax.device_get(strategy.state.params)) <= 1e-5
    assert max_difference(simulate(RUN_CONFIG), jax.device_get(strategy.state.params)) > 1e-3
    # The node that failed round 2 is not asked to evaluate it; both evaluate rounds 1 and 3.
    assert [e["eval/num_nodes"] for e in strategy.evaluations] == [2.0, 1.0, 2.0]
    assert [e["eval/num_examples"] for e in strategy.evaluations] == [200.0, 100.0, 200.0]


def test_federated_evaluation_equals_evaluate_on_the_union_of_the_nodes_data():
    run_config = {**RUN_CONFIG, "fedjax.eval_every_rounds": 1}
    strategy = run_flower(run_config, TWO_NODES)
    assert strategy.failures == []
    assert [e["round"] for e in strategy.evaluations] == [1, 2, 3]
    final = strategy.evaluations[-1]
    assert (final["eval/num_nodes"], final["eval/num_examples"]) == (2.0, 200.0)
    state = jax.device_get((strategy.state.params, strategy.state.model_state))
    expected = evaluate_on(run_config, state, [0, 1])
    reported = set(final) - {"round", "eval/num_nodes", "eval/num_examples"}
    assert reported == set(expected) - {"eval/counted_accuracy"} == {"eval/accuracy", "eval/loss"}
    for key in ("eval/accuracy", "eval/loss"):
        assert abs(final[key] - expected[key]) <= 1e-6, (key, final[key], expected[key])
    assert abs(final["eval/accuracy"] - expected["eval/counted_accuracy"]) <= 1e-9
    # Three rounds moved the model: the first round's metrics are another model's.
    assert abs(strategy.evaluations[0]["eval/loss"] - final["eval/loss"]) > 1e-3


LOCAL_STATE = {  # algorithms whose clients keep values across rounds
    "fedbn": {"fedjax.algorithm.name": "fedbn", "fedjax.model.norm": "batch"},
    # SCAFFOLD with plain local SGD: the config's momentum 0.9 on top of the correction
    # diverges within three rounds here.
    "scaffold": {"fedjax.algorithm.name": "scaffold", "fedjax.algorithm.client.momentum": 0.0},
    "top_k": {
        "fedjax.algorithm.compression.name": "top_k",
        "fedjax.algorithm.compression.fraction": 0.1,
    },
}
# Three clients, two a round: with seed 1 the cohorts are [1, 2], [0, 2], [1, 2], so client 1
# is left out of a round and comes back, client 0 trains once and client 2 every round.
THREE_CLIENTS = {
    **RUN_CONFIG,
    "fedjax.seed": 1,
    "fedjax.data.num_clients": 3,
    "fedjax.data.num_train_examples": 240,
}


@pytest.mark.parametrize("variant", sorted(LOCAL_STATE))
def test_client_local_state_stays_on_the_nodes_and_rounds_equal_simulation(variant):
    run_config = {**THREE_CLIENTS, **LOCAL_STATE[variant]}
    grid = InProcessGrid(flower.client_app(), THREE_NODES, run_config)
    strategy = flower.run_server(grid, Context(1, 0, {}, RecordDict(), run_config))
    assert strategy.failures == []
    assert [m["num_clients"] for m in strategy.history] == [2.0, 2.0, 2.0]
    assert strategy.state.client_local == {}  # the server holds no client's values
    # Each node holds its client's values of its last round (client 0: round 1, row 0),
    assert strategy.local_origin == {1: (2, 0), 0: (1, 0), 2: (2, 1)}
    # committed when the server confirmed them in the client's next message, else pending.
    states = {node: grid.contexts[node].state for node in THREE_NODES}
    assert sorted(states[11]) == ["fedjax-pending:1:0"]
    assert sorted(states[22]) == [flower.LOCAL, flower.LOCAL_ORIGIN, "fedjax-pending:2:0"]
    assert dict(states[22][flower.LOCAL_ORIGIN]) == {"round": 0, "row": 0}
    assert dict(states[33][flower.LOCAL_ORIGIN]) == {"round": 1, "row": 1}
    got = jax.device_get(strategy.state.params)
    assert max_difference(simulate(run_config), got) <= 1e-5
    # The comparison can fail: clients that forgot their values would end elsewhere.
    assert max_difference(simulate(run_config, forget_local=True), got) > 1e-4


def test_client_drawn_twice_in_a_round_keeps_the_copy_the_simulation_keeps():
    # FedVC draws clients with replacement: with these settings every round holds one client
    # twice, and the store keeps the values of its copy of higher occurrence.
    run_config = {
        **THREE_CLIENTS,
        **LOCAL_STATE["scaffold"],
        "fedjax.algorithm.virtual_client_size": 40,
        "fedjax.algorithm.clients_per_round": 3,
    }
    experiment = train.build_experiment(flower.experiment_config(run_config))
    cohorts = [experiment.cohorts.layout(r).client_ids.tolist() for r in range(3)]
    assert cohorts == [[0, 2, 2], [1, 1, 2], [0, 2, 2]]
    strategy = run_flower(run_config, THREE_NODES)
    assert strategy.failures == []
    assert strategy.local_origin == {0: (2, 0), 1: (1, 1), 2: (2, 2)}
    got = jax.device_get(strategy.state.params)
    assert max_difference(simulate(run_config), got) <= 1e-5
    assert max_difference(simulate(run_config, forget_local=True), got) > 1e-4


def test_late_reply_drops_the_nodes_new_local_values_as_the_server_drops_its_update():
    # Node 22 trains fedjax_cv round 1 but its reply never arrives: the server leaves row 1
    # out, and the node must start round 2 from its values of round 0, not of round 1.
    run_config = {**RUN_CONFIG, **LOCAL_STATE["scaffold"]}
    strategy = run_flower(run_config, TWO_NODES, lost_reply=in_round(22, 2))
    assert [(f.round, f.node_id) for f in strategy.failures] == [(1, 22)]
    got = jax.device_get(strategy.state.params)
    assert max_difference(simulate(run_config, rows={1: (0, 1)}), got) <= 1e-5
    assert max_difference(simulate(run_config), got) > 1e-4


def test_node_that_lost_its_local_state_refuses_to_train_naming_itself():
    run_config = {**RUN_CONFIG, **LOCAL_STATE["scaffold"]}

    def restart(message, context):  # node 22 comes back with an empty Context.state
        if in_round(22, 2)(message):
            context.state = RecordDict()

    strategy = run_flower(run_config, TWO_NODES, on_deliver=restart)
    assert [(f.round, f.node_id) for f in strategy.failures] == [(1, 22), (2, 22)]
    assert "supernode 22 (partition-id 1)" in strategy.failures[0].reason
    assert "round 0 row 1" in strategy.failures[0].reason
    assert "Context.state was lost" in strategy.failures[0].reason
    assert [m["num_clients"] for m in strategy.history] == [2.0, 1.0, 1.0]


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
# Flower's runtimes on 127.0.0.1, `flwr run` of the shipped app: the Deployment Engine (a
# SuperLink and two SuperNodes, a ClientApp process a message) and the Simulation Engine (a
# SuperLink in simulation mode running the ClientApps on Ray).

APP = pathlib.Path(__file__).parents[1] / "launch" / "flower_app"  # the app the README runs


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Federation:
    """A SuperLink and SuperNodes (none in simulation mode: Flower's simulation engine runs
    the nodes), each a process group of its own, ended by `close`."""

    def __init__(self, home: pathlib.Path, partitions: int, simulation: bool = False):
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
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)
        superlink = ["flower-superlink", "--insecure", "--port", str(self.port)]
        superlink += ["--database", ":flwr-in-memory:"] + (["--simulation"] if simulation else [])
        self._start("superlink", superlink)
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
            )
        ready = "Activated node_id" if partitions else "Application startup complete"
        self._wait_for(self.logs / "superlink.log", ready, max(partitions, 1))
        config = home / "config.toml"
        config.write_text(
            f'[superlink]\ndefault = "fedjax"\n\n[superlink.fedjax]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def _start(self, name, command):
        out = open(self.logs / f"{name}.log", "w")  # the process writes it until close
        self.processes[name] = subprocess.Popen(
            command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait_for(self, log: pathlib.Path, line: str, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while log.read_text().count(line) < count:
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"{log.name} did not say {line!r} {count}x in {timeout} s")
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


def _flwr_run(federation, tmp_path, run_config, on_line=None, timeout=300, options=()):
    """`flwr run` of the shipped app with its run config replaced by `run_config`."""
    app = tmp_path / "app"
    shutil.copytree(APP, app)
    pyproject = (app / "pyproject.toml").read_text()
    head = pyproject[: pyproject.index("[tool.flwr.app.config]")]
    lines = "\n".join(f'"{k}" = {_toml(v)}' for k, v in run_config.items())
    (app / "pyproject.toml").write_text(f"{head}[tool.flwr.app.config]\n{lines}\n")
    run = subprocess.Popen(
        ["flwr", "run", str(app), "fedjax", "--stream", *options],
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


def _result(out: pathlib.Path, run_config: dict, output: str):
    """The run's result.json and its final params and model state (trees of the config's)."""
    assert (out / "result.json").exists(), output[-3000:]
    result = json.loads((out / "result.json").read_text())
    initial = train.build_experiment(flower.experiment_config(run_config)).initial_state
    trees = []
    for name, template in (("params", initial.params), ("model_state", initial.model_state)):
        with np.load(out / f"{name}.npz") as saved:
            leaves = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        trees.append(jax.tree.unflatten(jax.tree.structure(template), leaves))
    return result, trees[0], trees[1]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    federation = Federation(tmp_path_factory.mktemp("flwr_home"), partitions=2)
    yield federation
    federation.close()


@pytest.mark.slow
def test_deployment_engine_equals_simulation_and_goes_on_without_a_killed_supernode(
    federation, tmp_path
):
    """One run: SCAFFOLD (c_i kept in each SuperNode's Context.state, carried from one
    ClientApp process to the next) for rounds 1 and 2 with both nodes, SuperNode 1 killed when
    round 3 starts, the run going on with node 0; then the evaluation of the final params."""
    out = tmp_path / "out"
    killed = []

    def kill_at_last_round(line):
        if "[ROUND 3/3]" in line and not killed:
            federation.kill("supernode1")
            killed.append(line)

    # A round waits 45 s for its replies: a fresh ClientApp process takes 5-25 s here.
    run_config = {
        **RUN_CONFIG,
        **LOCAL_STATE["scaffold"],
        flower.OUTPUT_KEY: str(out),
        flower.TIMEOUT_KEY: 45.0,
    }
    output = _flwr_run(federation, tmp_path, run_config, on_line=kill_at_last_round)
    assert killed, output[-3000:]
    result, params, model_state = _result(out, run_config, output)
    assert sorted(result["nodes"]) == ["0", "1"]
    dead_node = result["nodes"]["1"]
    assert [(f["round"], f["node_id"]) for f in result["failures"]] == [(2, dead_node)], output
    assert [m["num_clients"] for m in result["history"]] == [2.0, 2.0, 1.0]
    assert "1 failures" in output  # the server's report, in the run's log
    # Rounds 1-2 of both clients, then round 3 of the remaining one: fedjax_cv's round 2 on
    # cohort row 0 alone.
    expected = simulate(run_config, rows={2: (0, 1)})
    assert max_difference(expected, params) <= 1e-5
    # c_i went from one ClientApp process to the next: without it the params differ.
    assert max_difference(simulate(run_config, rows={2: (0, 1)}, forget_local=True), params) > 1e-4
    # The last round is evaluated by the node still alive, on its own examples.
    [evaluation] = result["evaluations"]
    assert (evaluation["round"], evaluation["eval/num_nodes"]) == (3, 1.0)
    reference = evaluate_on(run_config, (params, model_state), [0])
    for key in ("eval/accuracy", "eval/loss"):
        assert abs(evaluation[key] - reference[key]) <= 1e-6, (key, evaluation, reference)


@pytest.mark.slow
def test_simulation_engine_on_ray_equals_simulation(tmp_path):
    """The same app on Flower's simulation engine (Ray; extra `simulation`): FedBN, whose
    clients keep their norm layers and batch statistics in the virtual nodes' Context.state."""
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("FEDJAX_CV_REQUIRE_FLOWER"):
            raise
        pytest.skip("ray is not installed (pip install 'fedjax_cv[simulation]')")
    federation = Federation(tmp_path / "flwr_home", partitions=0, simulation=True)
    out = tmp_path / "out"
    run_config = {
        **RUN_CONFIG,
        **LOCAL_STATE["fedbn"],
        "fedjax.num_rounds": 2,
        flower.OUTPUT_KEY: str(out),
    }
    try:
        output = _flwr_run(
            federation, tmp_path, run_config, options=["--federation-config", "num-supernodes=2"]
        )
    finally:
        federation.close()
    assert "Starting Flower Simulation" in output, output[-3000:]
    result, params, model_state = _result(out, run_config, output)
    assert result["failures"] == [], output[-3000:]
    assert sorted(result["nodes"]) == ["0", "1"]
    assert [m["num_clients"] for m in result["history"]] == [2.0, 2.0]
    assert max_difference(simulate(run_config), params) <= 1e-5
    assert max_difference(simulate(run_config, forget_local=True), params) > 1e-4
    [evaluation] = result["evaluations"]
    assert (evaluation["round"], evaluation["eval/num_nodes"]) == (2, 2.0)
    reference = evaluate_on(run_config, (params, model_state), [0, 1])
    for key in ("eval/accuracy", "eval/loss"):
        assert abs(evaluation[key] - reference[key]) <= 1e-6, (key, evaluation, reference)
