"""A fedjax_cv experiment as a Flower app: Flower carries the messages, fedjax_cv computes.

Real cross-organisation deployment rides on Flower (DESIGN.md, The engine): this module adds
no transport. `client_app()` is a Flower `ClientApp` that runs fedjax_cv's jit-compiled
one-client update on the node's own data; `server_app()` is a Flower `ServerApp` whose
`FedjaxStrategy` (a `flwr.serverapp.strategy.Strategy`) keeps fedjax_cv's `ServerState` and
applies fedjax_cv's aggregation pipeline and server optimizer. Both run the very functions
`FederatedAlgorithm.apply` runs (`fedjax_cv.algorithms.compose.round_parts`), so a Flower run
of the same clients in the same order gives the params of fedjax_cv's own simulation.

Configuration (Flower run config, `[tool.flwr.app.config]` of the app's pyproject.toml, or
`flwr run --run-config`, and each node's `--node-config`):
- `fedjax-config` (run config): the fedjax_cv config file, `path[:arg]` as launch/train.py's
  `--config` takes it;
- `fedjax.<key>` (run config, and node config on top): an override of config key `<key>`
  (`fedjax.data.num_clients = 2`); a node's own override describes its own data;
- `partition-id` (node config): which fedjax_cv client this node is, its partition of the
  config's federated dataset (`data.clients[partition-id]`);
- `fedjax-timeout` (run config): seconds a round waits for its replies (default: until all
  come); `fedjax-output` (run config): a directory for the final params and the run's
  history and failures (`write_result`).

An app directory holds a pyproject.toml with `[tool.flwr.app.components]` `serverapp =
"<module>:server"` and `clientapp = "<module>:client"`, its module holding `server =
server_app()` and `client = client_app()`, and the keys above in `[tool.flwr.app.config]`;
cross-silo, `flower-superlink --insecure` (or with TLS) and on each site
`flower-supernode --superlink HOST:PORT --node-config "partition-id=K"`, then `flwr run APP
CONNECTION` (tests/test_flower.py does this on 127.0.0.1). Flower's simulation runtime needs
Ray in flwr 1.42 (`flwr[simulation]`), which this project does not install; the tests carry
the same ClientApp and strategy in one process instead, through a `Grid` of their own.

A round, as Flower messages (fedjax_cv round r is Flower's server round r + 1):
1. Once, before round 1, a `query` message to every node; each replies its `partition-id`,
   `num-examples` and `num-classes`. A node whose data has another number of classes than
   the server's model raises an error naming itself (Flower replies it as the message's
   error); the server reports it and leaves the node out.
2. `configure_train`: the config's client sampler draws round r's clients (fedjax_cv's
   `cohorts.layout(r)`); each cohort row goes to the node holding that client, as a `train`
   message with an ArrayRecord `shared` (the leaves of `RoundShared`: server params, model
   state, learning-rate factor, the aggregation stages' server-held state), an ArrayRecord
   `round-key` (the round's key data) and a ConfigRecord `round` (`round`, `row`,
   `client-id`).
3. The node rebuilds that row of the cohort from its own data (`cohorts.rows(r, row, row +
   1)`: the same examples, augmentation and key as the simulation), runs
   `HostLoop(program)` for its one client (the pipeline's client stages included) and
   replies an ArrayRecord `contribution` (the leaves of its `ClientContribution` and of
   what it hands back: the robust aggregator's delta and weight) and a MetricRecord
   `metrics`.
4. `aggregate_train`: the contributions are summed in cohort order (the simulation's order),
   the per-client uploads stacked, and the algorithm's `server_apply` (pipeline reduction,
   server stages, server optimizer) gives the new `ServerState`. A node that fails or does
   not reply within the timeout is reported (`FedjaxStrategy.failures`) and the round goes on
   with the others, as FedAvg of the remaining clients.

Not yet carried: client-local state across rounds (FedBN, SCAFFOLD, error feedback would keep
it on the node, in the Flower `Context.state`); secure aggregation with a node that drops out
(its pairwise masks would not cancel); evaluation messages; checkpoints. The server still
builds the config's dataset (the sampler needs the client sizes; no pixel is read there).
Tested: FedAvg, FedAvgM and the median aggregator on the shapes data.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from fedjax_cv import api, cli
from fedjax_cv.algorithms.compose import RoundParts, round_parts
from fedjax_cv.api import apply_overrides, params_sha256
from fedjax_cv.engine.cohort import ClientInfo, client_key
from fedjax_cv.engine.strategies import HostLoop
from fedjax_cv.train import Experiment, build_experiment

CONFIG_KEY = "fedjax-config"
OVERRIDE_PREFIX = "fedjax."
PARTITION_KEY = "partition-id"
OUTPUT_KEY = "fedjax-output"
TIMEOUT_KEY = "fedjax-timeout"
QUERY = "query"
TRAIN = "train"

logger = logging.getLogger("flwr.fedjax_cv")  # shown with Flower's own log lines


class NodeDataError(ValueError):
    """A node's data or messages do not fit the server's experiment."""


def experiment_config(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """The fedjax_cv config of a Flower run: `fedjax-config`'s file with the run's, then the
    node's `fedjax.<key>` overrides."""
    if CONFIG_KEY not in run_config:
        raise ValueError(f"the Flower run config has no {CONFIG_KEY!r} (the fedjax_cv config)")
    config = cli.load_config_file(str(run_config[CONFIG_KEY]))
    overrides = {}
    for source in (run_config, node_config or {}):
        overrides.update(
            {
                k[len(OVERRIDE_PREFIX) :]: v
                for k, v in source.items()
                if k.startswith(OVERRIDE_PREFIX)
            }
        )
    return apply_overrides(config, overrides)


def check_supported(experiment: Experiment) -> None:
    """Refuses what the bridge does not carry yet: values a client keeps across rounds."""
    if jax.tree.leaves(experiment.initial_state.client_local):
        raise NotImplementedError(
            f"algorithm.name={experiment.config.algorithm.name!r} keeps client-local state "
            "across rounds (FedBN, SCAFFOLD, error feedback); not carried over Flower yet"
        )


def _config_key(run_config, node_config=None) -> tuple:
    items = lambda c: tuple(sorted((k, v) for k, v in (c or {}).items() if k != PARTITION_KEY))
    return items(run_config), items(node_config)


@functools.lru_cache(maxsize=4)
def _experiment(key: tuple) -> tuple[Experiment, RoundParts, HostLoop]:
    """One experiment a configuration, kept across the messages a ClientApp process serves
    (its jit-compiled client update compiled once). Flower 1.42's SuperNode starts a fresh
    ClientApp process a message, which then builds it again: a JAX compilation cache
    (`JAX_COMPILATION_CACHE_DIR`) shared by those processes saves most of that."""
    run_config, node_config = (dict(items) for items in key)
    experiment = build_experiment(experiment_config(run_config, node_config))
    check_supported(experiment)
    parts = round_parts(experiment.algorithm)
    return experiment, parts, HostLoop(parts.program)


def round_key(experiment: Experiment, round_index: int) -> jax.Array:
    """The key fedjax_cv's training loop gives round `round_index` (train.py)."""
    return api.round_key(experiment.root_key, round_index)


def cohort_clients(experiment: Experiment, round_index: int) -> ClientInfo:
    """Round r's sampled clients, leaves `[clients, ...]`, from indices only (no pixels)."""
    layout = experiment.cohorts.layout(round_index)
    ids = layout.client_ids
    return ClientInfo(
        client_id=ids.astype(np.int32),
        occurrence=layout.occurrence,
        num_examples=experiment.dataset.client_sizes[ids].astype(np.float32),
        label_counts=experiment.dataset.label_histograms[ids].astype(np.float32),
    )


def _arrays(tree):
    from flwr.app import ArrayRecord

    return ArrayRecord([np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))])


def _tree(record, template, what: str):
    """`record`'s arrays as a pytree shaped like `template`; a NodeDataError naming `what`
    when their number, shapes or dtypes differ."""
    arrays = record.to_numpy_ndarrays()
    leaves, treedef = jax.tree.flatten(template)
    if len(arrays) != len(leaves):
        raise NodeDataError(f"{what}: {len(arrays)} arrays, expected {len(leaves)}")
    for index, (got, want) in enumerate(zip(arrays, leaves, strict=True)):
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise NodeDataError(
                f"{what}: array {index} is {got.dtype}{list(got.shape)}, expected "
                f"{want.dtype}{list(want.shape)}"
            )
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(a) for a in arrays])


def _node_name(context) -> str:
    return f"supernode {context.node_id} (partition-id {context.node_config.get(PARTITION_KEY)})"


# ------------------------------------------------------------------------------------------
# The node.


def _node_experiment(context):
    if PARTITION_KEY not in context.node_config:
        raise NodeDataError(f"{_node_name(context)}: its node config has no {PARTITION_KEY!r}")
    return _experiment(_config_key(context.run_config, context.node_config))


def node_query(message, context):
    """Replies who this node is; raises a NodeDataError naming the node when its data does
    not fit the server's model (another number of classes)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    experiment, _, _ = _node_experiment(context)
    partition = int(context.node_config[PARTITION_KEY])
    server_classes = int(message.content["fedjax"]["num-classes"])
    own_classes = experiment.dataset.num_classes
    if own_classes != server_classes:
        raise NodeDataError(
            f"{_node_name(context)}: its data has {own_classes} classes, the server's model "
            f"{server_classes}; data.num_classes must agree"
        )
    if not 0 <= partition < len(experiment.dataset.clients):
        raise NodeDataError(
            f"{_node_name(context)}: {PARTITION_KEY}={partition} is not a client of the "
            f"dataset (0 .. {len(experiment.dataset.clients) - 1})"
        )
    reply = ConfigRecord(
        {
            PARTITION_KEY: partition,
            "num-examples": int(experiment.dataset.client_sizes[partition]),
            "num-classes": own_classes,
        }
    )
    return Message(RecordDict({"fedjax": reply}), reply_to=message)


def node_train(message, context):
    """Runs fedjax_cv's one-client update for the cohort row the message names."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    experiment, parts, host_loop = _node_experiment(context)
    name = _node_name(context)
    partition = int(context.node_config[PARTITION_KEY])
    spec = message.content["round"]
    round_index, row, client_id = int(spec["round"]), int(spec["row"]), int(spec["client-id"])
    if client_id != partition:
        raise NodeDataError(f"{name}: asked to train client {client_id}, holds {partition}")
    cohort = experiment.cohorts.rows(round_index, row, row + 1)
    if int(cohort.clients.client_id[0]) != partition:
        raise NodeDataError(
            f"{name}: row {row} of round {round_index} is client "
            f"{int(cohort.clients.client_id[0])} here, not {partition}: the server's config "
            "samples other clients than this node's"
        )
    key = jax.random.wrap_key_data(message.content["round-key"].to_numpy_ndarrays()[0])
    clients = cohort_clients(experiment, round_index)
    template = jax.eval_shape(parts.round_shared, experiment.initial_state, clients, key)
    shared = _tree(message.content["shared"], template, f"{name}: the server's values")
    total, kept = host_loop(shared, cohort, key)
    metrics = MetricRecord(
        {
            "num-examples": float(total.num_trained),
            "loss-sum": float(total.loss_sum),
            "weight": float(total.weight),
        }
    )
    echo = ConfigRecord({"round": round_index, "row": row})
    content = RecordDict(
        {"contribution": _arrays((total, kept)), "metrics": metrics, "round": echo}
    )
    return Message(content, reply_to=message)


def client_app():
    """The Flower ClientApp: `query` and `train` messages run on the node's own data."""
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.query()(node_query)
    app.train()(node_train)
    return app


# ------------------------------------------------------------------------------------------
# The server.


class Failure(NamedTuple):
    """A node that failed a message or did not reply in time."""

    round: int  # fedjax_cv round (0: the query before round 1)
    node_id: int
    reason: str


def _strategy_base():
    from flwr.serverapp.strategy import Strategy

    return Strategy


class FedjaxStrategy:  # a flwr Strategy: see `make_strategy`, which subclasses it lazily
    """Keeps fedjax_cv's `ServerState`; samples clients, sums contributions and applies the
    algorithm's server update (pipeline aggregator, server stages, server optimizer)."""

    def __init__(self, experiment: Experiment, *, timeout: float | None = None):
        self.experiment = experiment
        check_supported(experiment)
        self.parts = round_parts(experiment.algorithm)
        self.state = experiment.initial_state
        self.timeout = timeout
        self.nodes: dict[int, int] = {}  # partition-id (fedjax_cv client) -> Flower node id
        self.failures: list[Failure] = []
        self.history: list[dict[str, float]] = []
        self._server_apply = jax.jit(self.parts.server_apply)
        self._pending: dict[str, Any] = {}

    # Flower's Strategy interface.
    def summary(self) -> None:
        config = self.experiment.config
        logger.info(
            "fedjax_cv %s, aggregator %s, %d clients a round",
            config.algorithm.name,
            config.algorithm.aggregator.name,
            config.algorithm.clients_per_round,
        )

    def _report(self, round_index: int, node_id: int, reason: str) -> None:
        failure = Failure(round_index, node_id, reason)
        self.failures.append(failure)
        logger.warning("round %d: node %d failed: %s", round_index, node_id, reason)

    def connect(self, grid) -> None:
        """Asks every node who it is (`query`); a node that errs is reported and left out."""
        from flwr.app import ConfigRecord, Message, RecordDict

        question = ConfigRecord({"num-classes": int(self.experiment.dataset.num_classes)})
        messages = [
            Message(RecordDict({"fedjax": question}), node_id, QUERY)
            for node_id in grid.get_node_ids()
        ]
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self._report(0, node_id, reply.error.reason or f"error {reply.error.code}")
                continue
            partition = int(reply.content["fedjax"][PARTITION_KEY])
            if partition in self.nodes:
                self._report(
                    0,
                    node_id,
                    f"{PARTITION_KEY}={partition} is node {self.nodes[partition]}'s too; left out",
                )
                continue
            self.nodes[partition] = node_id

    def configure_train(self, server_round: int, arrays, config, grid) -> Iterable:
        from flwr.app import ConfigRecord, Message, RecordDict

        if not self.nodes:
            self.connect(grid)
        round_index = server_round - 1
        clients = cohort_clients(self.experiment, round_index)
        key = round_key(self.experiment, round_index)
        shared = _arrays(self.parts.round_shared(self.state, clients, key))
        key_data = _arrays(jax.random.key_data(key))
        messages, rows = [], {}
        for row, client_id in enumerate(clients.client_id.tolist()):
            node_id = self.nodes.get(client_id)
            if node_id is None:
                self._report(
                    round_index, -1, f"no node holds client {client_id}; row {row} left out"
                )
                continue
            spec = ConfigRecord({"round": round_index, "row": row, "client-id": client_id})
            content = RecordDict({"shared": shared, "round-key": key_data, "round": spec})
            message = Message(content, node_id, TRAIN, group_id=str(server_round))
            messages.append(message)
            rows[(node_id, row)] = client_id
        self._pending = {"round": round_index, "clients": clients, "key": key, "rows": rows}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable):
        from flwr.app import ArrayRecord, MetricRecord

        pending = self._pending
        round_index, clients = pending["round"], pending["clients"]
        template = self._contribution_template(clients, pending["key"])
        received = {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self._report(
                    round_index, node_id, reply.error.reason or f"error {reply.error.code}"
                )
                continue
            row = int(reply.content["round"]["row"])
            if (node_id, row) not in pending["rows"] or row in received:
                self._report(round_index, node_id, f"a reply for row {row} it was not sent")
                continue
            try:
                received[row] = _tree(
                    reply.content["contribution"], template, f"node {node_id}'s contribution"
                )
            except NodeDataError as error:
                self._report(round_index, node_id, str(error))
        for node_id, row in pending["rows"]:
            if row not in received and not any(
                f.round == round_index and f.node_id == node_id for f in self.failures
            ):
                self._report(round_index, node_id, f"no reply for row {row} (timeout or lost)")
        rows = sorted(received)  # cohort order: the simulation's order of the sum
        if not rows:
            logger.warning("round %d: no client replied; the state is unchanged", round_index)
            return None, None
        totals = [received[row][0] for row in rows]
        total = functools.reduce(lambda a, b: jax.tree.map(jax.numpy.add, a, b), totals)
        kept = jax.tree.map(
            lambda *xs: jax.numpy.concatenate(xs), *[received[row][1] for row in rows]
        )
        chosen = jax.tree.map(lambda x: np.asarray(x)[rows], clients)
        self.state, metrics = self._server_apply(self.state, total, chosen, kept, pending["key"])
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.history.append(metrics)
        return ArrayRecord([np.asarray(x) for x in jax.tree.leaves(self.state.params)]), (
            MetricRecord(metrics)
        )

    def configure_evaluate(self, server_round: int, arrays, config, grid) -> Iterable:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable):
        return None

    def _contribution_template(self, clients: ClientInfo, key):
        program = self.parts.program
        info = jax.tree.map(lambda x: x[0], clients)
        shared = self.parts.round_shared(self.state, clients, key)

        def one_client(shared, info, key):
            state = program.init(shared, info, client_key(key, info), {})
            contribution, kept = program.final(shared, state, info)
            return contribution, jax.tree.map(lambda x: x[None], kept)

        return jax.eval_shape(one_client, shared, info, key)


def make_strategy(experiment: Experiment, *, timeout: float | None = None):
    """A `FedjaxStrategy` that is also a `flwr.serverapp.strategy.Strategy`."""
    strategy_class = type("FedjaxStrategy", (FedjaxStrategy, _strategy_base()), {})
    return strategy_class(experiment, timeout=timeout)


def write_result(strategy: FedjaxStrategy, directory: str | pathlib.Path) -> None:
    """`params.npz` (the final server params, leaves in tree order) and `result.json`
    (`params_sha256`, per-round `history`, `failures`, `nodes`) into `directory`."""
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(strategy.state.params))]
    np.savez(path / "params.npz", *leaves)
    result = {
        "params_sha256": params_sha256(strategy.state.params),
        "history": strategy.history,
        "failures": [failure._asdict() for failure in strategy.failures],
        "nodes": {str(partition): node for partition, node in strategy.nodes.items()},
    }
    (path / "result.json").write_text(json.dumps(result, indent=1))


def run_server(grid, context, *, timeout: float | None = None):
    """The ServerApp's main: builds the experiment from the run config and runs
    `num_rounds` rounds through Flower's `Strategy.start`; returns the strategy.

    Run config: `fedjax-timeout` (seconds a round waits for its replies; default `timeout`,
    None: until all come) and `fedjax-output` (a directory for `write_result`)."""
    timeout = context.run_config.get(TIMEOUT_KEY, timeout)
    experiment = build_experiment(experiment_config(context.run_config))
    strategy = make_strategy(experiment, timeout=timeout)
    strategy.connect(grid)
    if not strategy.nodes:
        raise RuntimeError(f"no node joined the run: {[f.reason for f in strategy.failures]}")
    from flwr.app import ArrayRecord

    initial = ArrayRecord([np.asarray(x) for x in jax.tree.leaves(strategy.state.params)])
    strategy.start(
        grid,
        initial,
        num_rounds=experiment.config.num_rounds,
        timeout=timeout if timeout is not None else 3600,
    )
    logger.info("params_sha256 %s", params_sha256(strategy.state.params))
    if failures := strategy.failures:
        logger.warning("%d failures: %s", len(failures), [tuple(f) for f in failures])
    if OUTPUT_KEY in context.run_config:
        write_result(strategy, context.run_config[OUTPUT_KEY])
    return strategy


def server_app(timeout: float | None = None):
    """The Flower ServerApp: fedjax_cv's server through `FedjaxStrategy`."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        run_server(grid, context, timeout=timeout)

    return app
