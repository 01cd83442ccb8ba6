"""The server side: aggregation of client deltas and the server optimizer (FedOpt).

The averaged client delta is a pseudo-gradient `server - mean(client)` fed to any optax
transformation (Reddi et al. 2021, "Adaptive Federated Optimization"): sgd(1.0) is FedAvg,
sgd(lr, momentum) FedAvgM (Hsu et al. 2019), adam / yogi / adagrad FedOpt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_cv.algorithms.aggregation import MEAN, Pipeline, ServerView
from fedjax_cv.algorithms.base import Metrics, ServerState
from fedjax_cv.algorithms.client import ClientContribution, all_finite
from fedjax_cv.algorithms.local_state import NO_LOCAL, ClientLocal, init_store

AGGREGATIONS = ("weighted", "mean")
SERVER_OPTIMIZERS = ("sgd", "adam", "yogi", "adagrad")


def aggregation_weight(name: str):
    """'weighted': n_k (McMahan et al. 2017); 'mean': 1 per client (FedVC, Hsu et al. 2020)."""
    if name == "weighted":
        return lambda info: info.num_examples.astype(jnp.float32)
    if name == "mean":
        return lambda info: jnp.ones((), jnp.float32)
    raise ValueError(
        f"algorithm.aggregation={name!r} is unknown; allowed: {', '.join(AGGREGATIONS)}"
    )


def server_optimizer(
    name: str,
    learning_rate: float = 1.0,
    momentum: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
) -> optax.GradientTransformation:
    """The server optimizers of FedAvg, FedAvgM and FedOpt.

    `eps` is FedOpt's adaptivity tau (Reddi et al. 2021 tune it in [1e-5, 1e-1]; 1e-3 there
    is a common best value).
    """
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=momentum or None)
    if name == "adam":
        return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    if name == "yogi":
        return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)
    if name == "adagrad":
        return optax.adagrad(learning_rate, initial_accumulator_value=0.0, eps=eps)
    raise ValueError(
        f"algorithm.server.optimizer={name!r} is unknown; allowed: {', '.join(SERVER_OPTIMIZERS)}"
    )


def server_init(
    optimizer: optax.GradientTransformation,
    params,
    model_state=None,
    num_clients: int = 0,
    *,
    local: ClientLocal = NO_LOCAL,
    pipeline: Pipeline = MEAN,
) -> ServerState:
    """A fresh server state. It holds copies: `apply` may donate them, never the caller's."""
    params = jax.tree.map(jnp.array, params)
    model_state = jax.tree.map(jnp.array, {} if model_state is None else model_state)
    stages = pipeline.local_init(params)
    return ServerState(
        params=params,
        opt_state=optimizer.init(params),
        model_state=model_state,
        round=jnp.zeros((), jnp.int32),
        client_local=init_store(local, params, model_state, num_clients, stages),
        aggregation=pipeline.init(params),
    )


def server_update(
    optimizer: optax.GradientTransformation,
    state: ServerState,
    total: ClientContribution,
    *,
    pipeline: Pipeline = MEAN,
    upload=None,
    key: jax.Array | None = None,
) -> tuple[ServerState, Metrics]:
    """Applies the round's summed client contributions to the server state.

    The pipeline reduces them to the aggregate (the weighted sum over its denominator, or a
    robust aggregator of the stacked `upload` deltas), its server stages transform the
    aggregate with `key` (the round's server key), and the server optimizer takes the
    aggregate's negative as a pseudo-gradient. A round whose clients all carry weight 0 (all
    non-finite, or none) leaves the model, optimizer and stage states as they were and only
    advances the round counter.
    """
    has_weight = total.weight > 0
    aggregate, denominator, aggregator_metrics = pipeline.reduce(
        total.weighted_delta, total.weight, upload
    )
    aggregation, stage_metrics = state.aggregation, {}
    if pipeline.stages:
        view = ServerView(
            key=key,
            num_votes=total.num_clients - total.num_nonfinite,
            denominator=denominator,
        )
        aggregate, aggregation, stage_metrics = pipeline.server(
            state.aggregation, aggregate, total.stage_sums, view
        )
    pseudo_gradient = jax.tree.map(jnp.negative, aggregate)
    updates, opt_state = optimizer.update(pseudo_gradient, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model_denominator = jnp.where(has_weight, total.weight, 1.0)
    model_state = jax.tree.map(lambda s: s / model_denominator, total.weighted_model_state)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(has_weight, n, o), new, old)
    new_state = state.replace(
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        model_state=keep(model_state, state.model_state),
        round=state.round + 1,
        aggregation=keep(aggregation, state.aggregation),
    )
    num_trained = jnp.maximum(total.num_trained, 1.0)
    metrics = {
        "loss": total.loss_sum / num_trained,
        **{name: value / num_trained for name, value in total.metric_sums.items()},
        "num_clients": total.num_clients,
        "num_examples": total.num_trained,
        "num_nonfinite_clients": total.num_nonfinite,
        "delta_norm": optax.tree.norm(aggregate),
        "nonfinite_params": 1.0 - all_finite(new_state.params).astype(jnp.float32),
        **aggregator_metrics,
        **stage_metrics,
    }
    return new_state, metrics
