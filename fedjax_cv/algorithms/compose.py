"""Composition of the building blocks into a `FederatedAlgorithm`, and the named presets.

Every axis of Hsu, Qi and Brown (2020, Table 1) is a separate argument, so FedAvgM + FedIR +
FedVC is one call:

    fedavgm(loss_fn, 0.05, server_momentum=0.9,
            objective=ClientObjective(class_prior=p), **virtual_clients(64))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from fedjax_cv.algorithms import compression, control, sampling
from fedjax_cv.algorithms.aggregation import Pipeline, server_key
from fedjax_cv.algorithms.base import FederatedAlgorithm, PerExampleLoss
from fedjax_cv.algorithms.client import ClientObjective, RoundShared, client_program
from fedjax_cv.algorithms.local_state import FEDBN, NO_LOCAL, ClientLocal, gather, scatter
from fedjax_cv.algorithms.param_groups import Rule, scale_by_multipliers
from fedjax_cv.algorithms.sampling import ClientSampler, ExampleSampler
from fedjax_cv.algorithms.schedules import RoundSchedule
from fedjax_cv.algorithms.secure_aggregation import secure_cohort
from fedjax_cv.algorithms.server import (
    aggregation_weight,
    server_init,
    server_optimizer,
    server_update,
)
from fedjax_cv.engine.store import seed_rows, spread
from fedjax_cv.engine.strategies import (
    ClientProgram,
    HostLoop,
    has_empty_steps,
    resolve_strategy,
    shard_cohort,
    sum_over_clients,
)


def client_sgd(
    learning_rate: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """Local SGD with optional momentum and L2 weight decay (decay added to the gradient)."""
    for field, value in (
        ("algorithm.client.learning_rate", learning_rate),
        ("algorithm.client.weight_decay", weight_decay),
    ):
        if not value >= 0:
            raise ValueError(f"{field}={value!r} is not allowed; must be >= 0")
    if not 0 <= momentum < 1:
        raise ValueError(
            f"algorithm.client.momentum={momentum!r} is not allowed; must be in [0, 1)"
        )
    sgd = optax.sgd(learning_rate, momentum=momentum or None)
    if weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay), sgd)
    return sgd


class RoundParts(NamedTuple):
    """The pieces `apply` makes a round of, each callable on its own, so a round can also run
    with its clients on other machines (`fedjax_cv.deploy.flower`) through the same code.

    - `program`: the one-client update (`ClientProgram`); run it for one client with
      `fedjax_cv.engine.strategies.HostLoop` on a one-client cohort;
    - `round_shared(state, clients, rng) -> RoundShared`: what every client of the round
      starts from (`clients`: the cohort's `ClientInfo`, leaves `[clients, ...]`);
    - `server_apply(state, total, clients, kept, rng) -> (state, metrics)`: the server update
      from the cohort's summed contributions `total` and the per-client `kept` values stacked
      in cohort order (not jit-compiled; `apply` compiles it).
    """

    program: ClientProgram
    round_shared: Callable
    server_apply: Callable


def round_parts(algorithm: FederatedAlgorithm) -> RoundParts:
    """The `RoundParts` of an algorithm built by `federated_algorithm` (every preset)."""
    parts = getattr(algorithm.apply, "round_parts", None)
    if parts is None:
        raise ValueError("the algorithm was not built by federated_algorithm; it has no parts")
    return parts


def federated_algorithm(
    loss_fn: PerExampleLoss,
    *,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    objective: ClientObjective | None = None,
    aggregation: str = "weighted",
    client_sampler: ClientSampler | None = None,
    example_sampler: ExampleSampler | None = None,
    metric_names: tuple[str, ...] = (),
    lr_multipliers: Sequence[Rule] = (),
    lr_schedule: RoundSchedule | None = None,
    local: ClientLocal = NO_LOCAL,
    pipeline: Pipeline | None = None,
    host_metrics=None,
    strategy: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    unroll: int | bool | None = None,
    donate: bool = True,
) -> FederatedAlgorithm:
    """Composes one federated algorithm from its axes.

    `lr_multipliers` scale the client updates by parameter name, 0 freezing (see
    `fedjax_cv.algorithms.param_groups`); `lr_schedule(round)` multiplies them by a factor
    that changes over rounds, reported as `lr_factor` (see `fedjax_cv.algorithms.schedules`).
    `local` names the values each client keeps across
    rounds (FedBN; see `fedjax_cv.algorithms.local_state`). `pipeline` holds the aggregation
    stages between the client deltas and the server optimizer (robust aggregators, DP,
    attacks; see `fedjax_cv.algorithms.aggregation`; default: the `aggregation` mean; without
    a compression stage, `compression.upload_accounting` is added last);
    `host_metrics(rounds)` adds host-side numbers to the log (DP's epsilon).
    `strategy` picks how clients
    execute ('auto', 'vmap', 'sequential', 'host'; see `fedjax_cv.engine.strategies`); with a
    `mesh` the client axis is sharded over its `clients` axis. `unroll` sets how many local
    steps the compiled round unrolls (None: see `fedjax_cv.engine.strategies.default_unroll`).
    With `donate`, `apply` donates the state passed to it: use the state it returns, not the
    one passed in.
    """
    objective = objective or ClientObjective()
    if objective.proximal_mu < 0:
        raise ValueError(
            f"algorithm.client.proximal_mu={objective.proximal_mu!r} is not allowed; must be >= 0"
        )
    resolve_strategy(strategy, {})  # rejects an unknown name now, not at the first round
    pipeline = compression.with_upload_accounting(pipeline or Pipeline())
    if pipeline.secure is not None and not pipeline.linear:
        raise ValueError(
            f"secure aggregation needs the linear aggregator (mean), not "
            f"{pipeline.aggregator.name!r}: it protects a sum, robust aggregators see each delta"
        )
    client_optimizer = scale_by_multipliers(client_optimizer, lr_multipliers)
    program = client_program(
        loss_fn,
        client_optimizer,
        objective,
        aggregation_weight(aggregation),
        metric_names,
        local,
        pipeline,
    )
    donate_argnums = (0,) if donate else ()

    def shared_values(state) -> RoundShared:
        factor = None if lr_schedule is None else lr_schedule(state.round)
        return RoundShared(state.params, state.model_state, factor, state.aggregation)

    def round_shared(state, clients, rng) -> RoundShared:
        """`shared_values` and, under secure aggregation, every client's identity (replicated
        on every device, so each client finds its pairs) with the round's mask key."""
        shared = shared_values(state)
        if pipeline.secure is None:
            return shared
        return shared._replace(secure_cohort=secure_cohort(rng, clients))

    def update(state, total, clients, kept, rng):
        factor = shared_values(state).lr_factor
        state, metrics = server_update(
            server_optimizer,
            state,
            total,
            pipeline=pipeline,
            upload=kept["upload"],
            key=server_key(rng),
        )
        store = scatter(
            state.client_local, clients.client_id, kept["local"], clients.occurrence, mesh
        )
        if factor is not None:
            metrics["lr_factor"] = factor
        return state.replace(client_local=store), metrics

    def compiled_round(strategy_name, gate_steps):
        def round_fn(state, cohort, rng):
            shared = round_shared(state, cohort.clients, rng)
            ids = cohort.clients.client_id
            total, kept = sum_over_clients(
                program,
                shared,
                cohort,
                rng,
                strategy=strategy_name,
                mesh=mesh,
                unroll=unroll,
                local=gather(state.client_local, ids, mesh),
                gate_steps=gate_steps,
            )
            return update(state, total, cohort.clients, kept, rng)

        return jax.jit(round_fn, donate_argnums=donate_argnums)

    def host_round():
        loop = HostLoop(program)
        jitted_gather = jax.jit(lambda store, ids: gather(store, ids, mesh))
        jitted_update = jax.jit(update, donate_argnums=donate_argnums)

        def round_fn(state, cohort, rng):
            ids = cohort.clients.client_id
            own = jitted_gather(state.client_local, ids)
            total, kept = loop(round_shared(state, cohort.clients, rng), cohort, rng, own)
            return jitted_update(state, total, cohort.clients, kept, rng)

        return round_fn

    rounds = {}

    def apply(state, cohort, rng):
        name = resolve_strategy(strategy, state.params)
        # One compiled round per strategy, and per whether some client has empty steps
        # (decided on the host's cohort, before placement; padding to the mesh adds some).
        gate_steps = name != "host" and has_empty_steps(cohort)
        if name != "host":
            placed = shard_cohort(cohort, mesh)
            gate_steps = gate_steps or placed.num_clients != cohort.num_clients
            cohort = placed
        key = (name, gate_steps)
        if key not in rounds:
            rounds[key] = host_round() if name == "host" else compiled_round(*key)
        return rounds[key](state, cohort, rng)

    apply.round_parts = RoundParts(program, round_shared, update)

    def init(params, model_state=None, num_clients: int = 0):
        rows = num_clients if mesh is None else seed_rows(num_clients)
        state = server_init(
            server_optimizer, params, model_state, rows, local=local, pipeline=pipeline
        )
        if mesh is not None:
            # Where a sharded round leaves its output: placed there from the start, the second
            # round reuses the first round's executable instead of compiling one for it. The
            # client-local store is split over the mesh, each device making its own rows.
            state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
            if jax.tree.leaves(state.client_local):
                state = state.replace(client_local=spread(state.client_local, num_clients, mesh))
        return state

    return FederatedAlgorithm(
        init=init,
        apply=apply,
        client_sampler=client_sampler or sampling.uniform_clients(),
        example_sampler=example_sampler or sampling.local_epochs(1),
        strategy=strategy,
        host_metrics=host_metrics,
    )


def fedbn(loss_fn: PerExampleLoss, client_learning_rate: float, **options) -> FederatedAlgorithm:
    """FedBN (Li et al. 2021): FedAvg whose clients keep their own normalisation layers
    (affine parameters and BatchNorm statistics) across rounds. `init` needs `num_clients`."""
    options.setdefault("local", FEDBN)
    return fedavg(loss_fn, client_learning_rate, **options)


def virtual_clients(size: int) -> dict:
    """FedVC's three axes (Hsu, Qi and Brown 2020): clients drawn in proportion to their size,
    exactly `size` examples each, plain mean. Pass as `**virtual_clients(size)`."""
    return dict(
        client_sampler=sampling.size_proportional_clients(),
        example_sampler=sampling.virtual_client(size),
        aggregation="mean",
    )


def _check_server(learning_rate: float, momentum: float = 0.0) -> None:
    if not learning_rate >= 0:
        raise ValueError(
            f"algorithm.server.learning_rate={learning_rate!r} is not allowed; must be >= 0"
        )
    if not 0 <= momentum < 1:
        raise ValueError(
            f"algorithm.server.momentum={momentum!r} is not allowed; must be in [0, 1)"
        )


def fedavg(
    loss_fn: PerExampleLoss,
    client_learning_rate: float,
    *,
    client_momentum: float = 0.0,
    client_weight_decay: float = 0.0,
    local_epochs: int = 1,
    server_optimizer_name: str = "sgd",
    server_learning_rate: float = 1.0,
    server_momentum: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
    server_variant: str = "optax",
    **options,
) -> FederatedAlgorithm:
    """FedAvg (McMahan et al. 2017): local SGD, n_k-weighted mean of the client models.

    Every preset is FedAvg with other defaults, and the config registry builds every
    algorithm through these presets, so a name means the same in a notebook and a config.
    The server optimizer (`server_optimizer_name`, its learning rate, momentum, b1, b2, eps,
    and `server_variant`: optax's adaptive optimizers or Reddi et al.'s Algorithm 2) is any
    of `fedjax_cv.algorithms.server.server_optimizer`'s; `options` go to
    `federated_algorithm` (objective, samplers, aggregation, pipeline, strategy...).
    """
    _check_server(server_learning_rate, server_momentum)
    options.setdefault("example_sampler", sampling.local_epochs(local_epochs))
    return federated_algorithm(
        loss_fn,
        client_optimizer=client_sgd(client_learning_rate, client_momentum, client_weight_decay),
        server_optimizer=server_optimizer(
            server_optimizer_name,
            server_learning_rate,
            server_momentum,
            b1=b1,
            b2=b2,
            eps=eps,
            variant=server_variant,
        ),
        **options,
    )


def fedavgm(
    loss_fn: PerExampleLoss,
    client_learning_rate: float,
    *,
    server_momentum: float = 0.9,
    **options,
) -> FederatedAlgorithm:
    """FedAvgM (Hsu, Qi and Brown 2019): server momentum on the averaged client delta."""
    if not 0 < server_momentum < 1:
        raise ValueError(
            f"algorithm.server.momentum={server_momentum!r} is not allowed with fedavgm; must "
            "be in (0, 1)"
        )
    return fedavg(loss_fn, client_learning_rate, server_momentum=server_momentum, **options)


FEDOPT_OPTIMIZERS = ("adam", "yogi", "adagrad")


def fedopt(
    loss_fn: PerExampleLoss,
    client_learning_rate: float,
    *,
    server_optimizer_name: str = "adam",
    server_learning_rate: float = 1e-2,
    **options,
) -> FederatedAlgorithm:
    """FedOpt (Reddi et al. 2021): FedAdam, FedYogi or FedAdagrad on the pseudo-gradient
    (b1 0.9, b2 0.99 and adaptivity eps 1e-3 unless given)."""
    if server_optimizer_name not in FEDOPT_OPTIMIZERS:
        raise ValueError(
            f"algorithm.server.optimizer={server_optimizer_name!r} is not allowed with fedopt; "
            f"allowed: {', '.join(FEDOPT_OPTIMIZERS)}"
        )
    return fedavg(
        loss_fn,
        client_learning_rate,
        server_optimizer_name=server_optimizer_name,
        server_learning_rate=server_learning_rate,
        **options,
    )


def fedprox(
    loss_fn: PerExampleLoss, client_learning_rate: float, *, proximal_mu: float = 0.01, **options
) -> FederatedAlgorithm:
    """FedProx (Li et al. 2020): FedAvg whose clients add mu/2 ||w - w_server||^2."""
    objective = options.pop("objective", ClientObjective())
    return fedavg(
        loss_fn,
        client_learning_rate,
        objective=objective._replace(proximal_mu=proximal_mu),
        **options,
    )


def fedir(
    loss_fn: PerExampleLoss, client_learning_rate: float, *, class_prior, **options
) -> FederatedAlgorithm:
    """FedIR (Hsu, Qi and Brown 2020): examples weighted by p(y) / q_k(y), self-normalised."""
    objective = options.pop("objective", ClientObjective())
    return fedavg(
        loss_fn,
        client_learning_rate,
        objective=objective._replace(class_prior=jax.numpy.asarray(class_prior)),
        **options,
    )


def fedvc(
    loss_fn: PerExampleLoss, client_learning_rate: float, *, virtual_client_size: int, **options
) -> FederatedAlgorithm:
    """FedVC (Hsu, Qi and Brown 2020): virtual clients of exactly `virtual_client_size`
    examples, drawn in proportion to client size, averaged with equal weight."""
    return fedavg(
        loss_fn, client_learning_rate, **{**virtual_clients(virtual_client_size), **options}
    )


def _first_stage(stage, options: dict) -> Pipeline:
    """`options`' pipeline (default: the mean) with `stage` first: its client part sees the
    delta local training produced, its server part runs last."""
    pipeline = options.pop("pipeline", None) or Pipeline()
    return pipeline._replace(stages=(stage,) + tuple(pipeline.stages))


def scaffold(
    loss_fn: PerExampleLoss, client_learning_rate: float, *, num_clients: int, **options
) -> FederatedAlgorithm:
    """SCAFFOLD (Karimireddy et al. 2020, option II): FedAvg whose local steps descend
    g - c_i + c, with c_i each client's control variate (kept in the client-local store) and c
    the server's (see `fedjax_cv.algorithms.control.scaffold`). `num_clients` is the
    population N; pass it to `init` too."""
    stage = control.scaffold(num_clients, client_learning_rate)
    pipeline = _first_stage(stage, options)
    if pipeline.secure is not None:
        raise ValueError(
            "algorithm.name='scaffold' is not allowed with algorithm.secure_aggregation.enabled: "
            "its control-variate updates, which reveal each client's delta, are summed in the "
            "clear"
        )
    return fedavg(loss_fn, client_learning_rate, pipeline=pipeline, **options)


def fednova(
    loss_fn: PerExampleLoss,
    client_learning_rate: float,
    *,
    client_momentum: float = 0.0,
    **options,
) -> FederatedAlgorithm:
    """FedNova (Wang et al. 2020): each client's delta normalised by its number of local steps
    (momentum- or proximal-adjusted), the mean rescaled by the clients' mean normaliser
    tau_eff (see `fedjax_cv.algorithms.control.fednova`)."""
    objective = options.get("objective") or ClientObjective()
    stage = control.fednova(client_momentum, objective.proximal_mu, client_learning_rate)
    return fedavg(
        loss_fn,
        client_learning_rate,
        client_momentum=client_momentum,
        pipeline=_first_stage(stage, options),
        **options,
    )
