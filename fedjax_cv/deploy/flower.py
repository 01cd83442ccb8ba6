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
  config's federated dataset (`data.clients[partition-id]`); Flower's simulation engine sets
  it on its virtual nodes (0 .. num-supernodes - 1);
- `fedjax-timeout` (run config): seconds a round waits for its replies (default: until all
  come); `fedjax-output` (run config): a directory for the final params and the run's
  history, evaluations and failures (`write_result`).

An app directory holds a pyproject.toml with `[tool.flwr.app.components]` `serverapp =
"<module>:server"` and `clientapp = "<module>:client"`, its module holding `server =
server_app()` and `client = client_app()`, and the keys above in `[tool.flwr.app.config]`;
cross-silo, `flower-superlink --insecure` (or with TLS) and on each site
`flower-supernode --superlink HOST:PORT --node-config "partition-id=K"`, then `flwr run APP
CONNECTION`; the same app runs on Flower's simulation engine (Ray, extra `simulation`) under
`flower-superlink --simulation` with `flwr run APP CONNECTION --federation-config
"num-supernodes=N"`. tests/test_flower.py runs both on 127.0.0.1, and the ClientApp and the
strategy in one process through a `Grid` of its own.

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
   `client-id`, and `local-round`/`local-row`: the last train reply of this client whose
   client-local values the server accepted, -1 for none).
3. The node rebuilds that row of the cohort from its own data (`cohorts.rows(r, row, row +
   1)`: the same examples, augmentation and key as the simulation), starts from its own
   client-local values (below), runs `HostLoop(program)` for its one client (the pipeline's
   client stages included) and replies an ArrayRecord `contribution` (the leaves of its
   `ClientContribution` and of what the robust aggregator needs: its delta and weight), a
   MetricRecord `metrics` and a ConfigRecord `round` (`row`, `local-written`).
4. `aggregate_train`: the contributions are summed in cohort order (the simulation's order),
   the per-client uploads stacked, and the algorithm's `server_apply` (pipeline reduction,
   server stages, server optimizer) gives the new `ServerState`. A node that fails or does
   not reply within the timeout is reported (`FedjaxStrategy.failures`) and the round goes on
   with the others, as FedAvg of the remaining clients.
5. Evaluation, after the rounds fedjax_cv's training loop evaluates (every
   `eval_every_rounds` and the last): `configure_evaluate` sends every node that did not fail
   this round an `evaluate` message with the global params and model state (ArrayRecord
   `model`); a node has no test split of its own (the config's test split is one split, the
   same on every node), so it evaluates them on its own client's examples, its partition of
   the train split through the test-time transform, and replies the task's statistics of
   each batch (its `eval_fn`, ArrayRecords `stats-<b>`); `aggregate_evaluate` merges them in
   node and batch order with the task's `merge` and reports the task's `finalize` as
   `eval/<metric>` (`FedjaxStrategy.evaluations`): the metrics of the union of the nodes'
   examples, as `fedjax_cv.api.evaluate` gives them.

Client-local state (FedBN's norm layers and batch statistics, SCAFFOLD's c_i, top-k's
error-feedback residual): the node keeps its client's values in Flower's `Context.state` (the
RecordDict a SuperNode keeps for the run across messages), never sends them, and the server
keeps no client store (`ServerState.client_local` is `{}` there); what the server needs of
them reaches it inside the contribution (SCAFFOLD's control-variate sums). A node's new values
wait in `Context.state` as pending until the server confirms, in the client's next `train`
message, that it aggregated that reply (`local-round`, `local-row`: the copy the simulation's
store would keep); a reply lost or late is dropped on both sides, so the node's values stay
those of the simulation that left that client out of the round. A node that lost its
`Context.state` (restarted) while the server holds an accepted reply of it refuses to train,
naming itself. Copies of one client twice in a round (FedVC) are carried, provided the node
runs that round's messages one after the other.

Not yet carried: secure aggregation with a node that drops out (its pairwise masks would not
cancel); checkpoints of the server. The server still builds the config's dataset (the sampler
needs the client sizes; no pixel is read there).
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
from fedjax_cv.data.cohort import test_batches
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
EVALUATE = "evaluate"
# Context.state records of a node: its client's values as of its last accepted reply, where
# they came from, and the values of replies the server has not confirmed yet.
LOCAL = "fedjax-local"
LOCAL_ORIGIN = "fedjax-local-origin"
PENDING = "fedjax-pending"
NO_REPLY = (-1, -1)  # (round, row) of a client whose local values were never accepted

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


def client_local_values(experiment: Experiment, client_id: int):
    """One client's initial client-local values (FedBN's norm layers, SCAFFOLD's c_i, the
    error-feedback residual), as the simulation's store starts them; `{}` without any."""
    return jax.tree.map(lambda store: store[client_id], experiment.initial_state.client_local)


def _examples(split: dict, index: np.ndarray) -> dict:
    """The examples `index` of a split (arrays, or per-image sequences of box arrays)."""
    return {
        key: values[index] if isinstance(values, np.ndarray) else [values[int(i)] for i in index]
        for key, values in split.items()
    }


def client_examples(experiment: Experiment, client_id: int) -> dict:
    """The client's own examples, its partition of the train split."""
    return _examples(experiment.dataset.train, experiment.dataset.clients[client_id])


def evaluation_batches(experiment: Experiment, examples: dict):
    """(batch, mask) over `examples` as fedjax_cv's evaluation reads a split: the config's
    eval batch size, the test-time transform, the last batch padded (`api.evaluation_stats`)."""
    transform = api.eval_transform(experiment.config.data.augmentation)
    return test_batches(examples, experiment.config.eval.batch_size, transform)


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


def _pending_key(round_index: int, row: int) -> str:
    return f"{PENDING}:{round_index}:{row}"


def _own_values(context, experiment: Experiment, round_index: int, accepted: tuple[int, int]):
    """The node's client-local values at the start of round `round_index`: its last values
    the server accepted (`accepted`: that reply's (round, row)), committed from the pending
    ones; the pending values of earlier rounds are dropped (the server has decided on them)."""
    partition = int(context.node_config[PARTITION_KEY])
    template = client_local_values(experiment, partition)
    if not jax.tree.leaves(template):
        return template
    state = context.state
    if _pending_key(*accepted) in state:
        state[LOCAL] = state.pop(_pending_key(*accepted))
        state[LOCAL_ORIGIN] = _origin_record(accepted)
    for key in [k for k in state if k.startswith(PENDING + ":")]:
        if int(key.split(":")[1]) < round_index:
            del state[key]
    held = NO_REPLY
    if LOCAL_ORIGIN in state:
        held = (int(state[LOCAL_ORIGIN]["round"]), int(state[LOCAL_ORIGIN]["row"]))
    if held != accepted:
        raise NodeDataError(
            f"{_node_name(context)}: the server holds its client-local values of round "
            f"{accepted[0]} row {accepted[1]}, this node those of round {held[0]} row "
            f"{held[1]} (its Context.state was lost: the SuperNode restarted?); it cannot train"
        )
    if LOCAL not in state:
        return template
    return _tree(state[LOCAL], template, f"{_node_name(context)}: its stored client-local values")


def _origin_record(origin: tuple[int, int]):
    from flwr.app import ConfigRecord

    return ConfigRecord({"round": origin[0], "row": origin[1]})


def node_train(message, context):
    """Runs fedjax_cv's one-client update for the cohort row the message names, from the
    node's own client-local values; keeps its new ones pending in `context.state`."""
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
    accepted = (int(spec["local-round"]), int(spec["local-row"]))
    own = _own_values(context, experiment, round_index, accepted)
    key = jax.random.wrap_key_data(message.content["round-key"].to_numpy_ndarrays()[0])
    clients = cohort_clients(experiment, round_index)
    template = jax.eval_shape(parts.round_shared, experiment.initial_state, clients, key)
    shared = _tree(message.content["shared"], template, f"{name}: the server's values")
    local = jax.tree.map(lambda x: x[None], own)
    total, kept = host_loop(shared, cohort, key, local)
    written = bool(kept["local"]) and bool(kept["local"]["write"][0])
    if written:
        values = jax.tree.map(lambda x: x[0], kept["local"]["values"])
        context.state[_pending_key(round_index, row)] = _arrays(values)
    metrics = MetricRecord(
        {
            "num-examples": float(total.num_trained),
            "loss-sum": float(total.loss_sum),
            "weight": float(total.weight),
        }
    )
    echo = ConfigRecord({"round": round_index, "row": row, "local-written": written})
    upload = jax.tree.map(lambda x: x[0], kept["upload"])
    content = RecordDict(
        {"contribution": _arrays((total, upload)), "metrics": metrics, "round": echo}
    )
    return Message(content, reply_to=message)


def node_evaluate(message, context):
    """The task's evaluation statistics of the server's params on the node's own client's
    examples, one ArrayRecord `stats-<b>` a batch (merged by the server)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    experiment, _, _ = _node_experiment(context)
    name = _node_name(context)
    partition = int(context.node_config[PARTITION_KEY])
    initial = experiment.initial_state
    params, model_state = _tree(
        message.content["model"],
        (initial.params, initial.model_state),
        f"{name}: the server's model",
    )
    eval_fn = experiment.model.eval_fn
    records = {}
    examples = client_examples(experiment, partition)
    for index, (batch, mask) in enumerate(evaluation_batches(experiment, examples)):
        records[f"stats-{index}"] = _arrays(eval_fn(params, model_state, batch, mask))
    summary = ConfigRecord(
        {
            "round": int(message.content["evaluate"]["round"]),
            "num-batches": len(records),
            "num-examples": int(experiment.dataset.client_sizes[partition]),
        }
    )
    return Message(RecordDict({"evaluation": summary, **records}), reply_to=message)


def client_app():
    """The Flower ClientApp: `query`, `train` and `evaluate` messages run on the node's own
    data."""
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.query()(node_query)
    app.train()(node_train)
    app.evaluate()(node_evaluate)
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
    """Keeps fedjax_cv's `ServerState` (without a client store: the nodes keep their
    client-local values); samples clients, sums contributions, applies the algorithm's server
    update (pipeline aggregator, server stages, server optimizer) and merges the nodes'
    evaluation statistics."""

    def __init__(self, experiment: Experiment, *, timeout: float | None = None):
        self.experiment = experiment
        self.parts = round_parts(experiment.algorithm)
        initial = experiment.initial_state
        self._own_template = jax.tree.map(
            lambda store: jax.ShapeDtypeStruct(store.shape[1:], store.dtype),
            initial.client_local,
        )
        self.state = initial.replace(client_local={})
        self.timeout = timeout
        self.nodes: dict[int, int] = {}  # partition-id (fedjax_cv client) -> Flower node id
        # client id -> (round, row) of its last train reply whose client-local values the
        # server aggregated: the copy the simulation's store holds, which the node commits.
        self.local_origin: dict[int, tuple[int, int]] = {}
        self.failures: list[Failure] = []
        self.history: list[dict[str, float]] = []
        self.evaluations: list[dict[str, float]] = []
        self._server_apply = jax.jit(self.parts.server_apply)
        self._pending: dict[str, Any] = {}
        self._evaluating: dict[str, Any] = {}
        self._stats_shapes = None

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
            local_round, local_row = self.local_origin.get(client_id, NO_REPLY)
            spec = ConfigRecord(
                {
                    "round": round_index,
                    "row": row,
                    "client-id": client_id,
                    "local-round": local_round,
                    "local-row": local_row,
                }
            )
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
        received, written = {}, {}
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
                continue
            written[row] = bool(reply.content["round"].get("local-written", False))
        for node_id, row in pending["rows"]:
            if row not in received and not any(
                f.round == round_index and f.node_id == node_id for f in self.failures
            ):
                self._report(round_index, node_id, f"no reply for row {row} (timeout or lost)")
        rows = sorted(received)  # cohort order: the simulation's order of the sum
        if not rows:
            logger.warning("round %d: no client replied; the state is unchanged", round_index)
            return None, None
        self._accept_local_values(round_index, clients, [row for row in rows if written[row]])
        totals = [received[row][0] for row in rows]
        total = functools.reduce(lambda a, b: jax.tree.map(jax.numpy.add, a, b), totals)
        uploads = [received[row][1] for row in rows]
        kept = {"local": {}, "upload": jax.tree.map(lambda *xs: jax.numpy.stack(xs), *uploads)}
        chosen = jax.tree.map(lambda x: np.asarray(x)[rows], clients)
        self.state, metrics = self._server_apply(self.state, total, chosen, kept, pending["key"])
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.history.append(metrics)
        return ArrayRecord([np.asarray(x) for x in jax.tree.leaves(self.state.params)]), (
            MetricRecord(metrics)
        )

    def _accept_local_values(self, round_index: int, clients: ClientInfo, rows: list[int]):
        """Records which reply's client-local values each client keeps: of its copies in the
        round that wrote them, the one of highest occurrence (ties: the later row), the rule
        of the simulation's store (`local_state.scatter`)."""
        for row in rows:
            client_id = int(clients.client_id[row])
            rank = (int(clients.occurrence[row]), row)
            last = self.local_origin.get(client_id, NO_REPLY)
            if last[0] != round_index or rank > (int(clients.occurrence[last[1]]), last[1]):
                self.local_origin[client_id] = (round_index, row)

    def configure_evaluate(self, server_round: int, arrays, config, grid) -> Iterable:
        """`evaluate` messages after the rounds fedjax_cv's loop evaluates, to every node
        that did not fail this round."""
        from flwr.app import ConfigRecord, Message, RecordDict

        config = self.experiment.config
        completed, round_index = server_round, server_round - 1
        if completed % config.eval_every_rounds and completed != config.num_rounds:
            self._evaluating = {}
            return []
        failed = {f.node_id for f in self.failures if f.round == round_index}
        model = _arrays((self.state.params, self.state.model_state))
        spec = ConfigRecord({"round": completed})
        messages, nodes = [], {}
        for partition, node_id in sorted(self.nodes.items()):
            if node_id in failed:
                continue
            content = RecordDict({"model": model, "evaluate": spec})
            messages.append(Message(content, node_id, EVALUATE, group_id=str(server_round)))
            nodes[node_id] = partition
        self._evaluating = {"round": completed, "nodes": nodes}
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable):
        """The task's metrics of the merged statistics, `eval/<metric>`, with the examples
        (`eval/num_examples`) and nodes (`eval/num_nodes`) they cover."""
        from flwr.app import MetricRecord

        if not self._evaluating:
            return None
        completed, nodes = self._evaluating["round"], self._evaluating["nodes"]
        template = self._stats_template()
        received = {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            what = f"node {node_id}'s evaluation"
            if reply.has_error():
                self._report(
                    completed - 1, node_id, reply.error.reason or f"error {reply.error.code}"
                )
                continue
            if node_id not in nodes or node_id in received:
                self._report(completed - 1, node_id, "an evaluation reply it was not asked for")
                continue
            try:
                summary = reply.content["evaluation"]
                batches = [
                    _tree(reply.content[f"stats-{b}"], template, f"{what}, batch {b}")
                    for b in range(int(summary["num-batches"]))
                ]
                received[node_id] = (int(summary["num-examples"]), batches)
            except NodeDataError as error:
                self._report(completed - 1, node_id, str(error))
            except KeyError as error:
                self._report(completed - 1, node_id, f"{what} has no record {error}")
        for node_id in nodes:
            if node_id not in received and not any(
                f.round == completed - 1 and f.node_id == node_id for f in self.failures
            ):
                self._report(completed - 1, node_id, "no evaluation reply (timeout or lost)")
        task, stats = self.experiment.task, None
        for node_id in sorted(received, key=nodes.get):  # node (partition) order, then batch
            for batch_stats in received[node_id][1]:
                stats = task.merge(stats, batch_stats)
        if stats is None:
            logger.warning("round %d: no evaluation statistics came back", completed)
            return None
        metrics = {f"eval/{k}": float(v) for k, v in task.finalize(stats).items()}
        metrics["eval/num_examples"] = float(sum(n for n, _ in received.values()))
        metrics["eval/num_nodes"] = float(len(received))
        self.evaluations.append({"round": completed, **metrics})
        return MetricRecord(metrics)

    def _contribution_template(self, clients: ClientInfo, key):
        """The shapes of one client's contribution and upload (what a node replies)."""
        program = self.parts.program
        info = jax.tree.map(lambda x: x[0], clients)
        shared = self.parts.round_shared(self.state, clients, key)

        def one_client(shared, info, key, own):
            state = program.init(shared, info, client_key(key, info), own)
            contribution, kept = program.final(shared, state, info)
            return contribution, kept["upload"]

        return jax.eval_shape(one_client, shared, info, key, self._own_template)

    def _stats_template(self):
        """The shapes of one batch's evaluation statistics (what a node replies a batch)."""
        if self._stats_shapes is None:
            experiment, state = self.experiment, self.state
            first = _examples(experiment.dataset.train, np.zeros(1, np.int64))
            batch, mask = next(evaluation_batches(experiment, first))
            self._stats_shapes = jax.eval_shape(
                experiment.model.eval_fn, state.params, state.model_state, batch, mask
            )
        return self._stats_shapes


def make_strategy(experiment: Experiment, *, timeout: float | None = None):
    """A `FedjaxStrategy` that is also a `flwr.serverapp.strategy.Strategy`."""
    strategy_class = type("FedjaxStrategy", (FedjaxStrategy, _strategy_base()), {})
    return strategy_class(experiment, timeout=timeout)


def write_result(strategy: FedjaxStrategy, directory: str | pathlib.Path) -> None:
    """`params.npz` and `model_state.npz` (the final server params and model state, leaves
    in tree order) and `result.json` (`params_sha256`, per-round `history`, `evaluations`,
    `failures`, `nodes`) into `directory`."""
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("params", "model_state"):
        tree = jax.device_get(getattr(strategy.state, name))
        np.savez(path / f"{name}.npz", *[np.asarray(x) for x in jax.tree.leaves(tree)])
    result = {
        "params_sha256": params_sha256(strategy.state.params),
        "history": strategy.history,
        "evaluations": strategy.evaluations,
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
