"""The server side: aggregation of client deltas and the server optimizer (FedOpt).

The aggregated client delta Delta (client minus server) gives the pseudo-gradient
g = -Delta = `server - mean(client)`, fed to an optax transformation (Reddi et al. 2021,
"Adaptive Federated Optimization"): sgd(1.0) is FedAvg, sgd(lr, momentum) FedAvgM (Hsu et
al. 2019), adam / yogi / adagrad FedOpt, in one of two variants (`server_optimizer`'s
`variant`, config `algorithm.server.variant`), with eps standing for the paper's tau:

- 'optax' (the default) runs optax's own optimizers, which are not the paper's: optax.adam
  and optax.yogi bias-correct both moments (m / (1 - b1^t), v / (1 - b2^t)) and add eps
  outside the square root, optax.yogi starts both moments at 1e-6 and optax.adam at 0;
  optax.adagrad has no momentum, starts its sum of squares at 0 here and puts eps inside
  the root, g / sqrt(sum g^2 + eps).
- 'paper' runs the paper's Algorithm 2 (`scale_by_fedopt`): no bias correction, tau outside
  the root, m / (sqrt(v) + tau), m_{-1} = 0, v_{-1} = tau^2, and momentum b1 for all three,
  FedAdagrad included.

sgd is the same in both variants.
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


SERVER_VARIANTS = ("optax", "paper")
FEDOPT_PAPER_OPTIMIZERS = ("adagrad", "adam", "yogi")


def scale_by_fedopt(
    name: str, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> optax.GradientTransformation:
    """FedAdagrad, FedAdam or FedYogi scaling exactly as Reddi et al. 2021, Algorithm 2.

    In the paper's terms, Delta_t the round's aggregated client delta (client minus server):

        m_t = b1 m_{t-1} + (1 - b1) Delta_t                               (all three)
        v_t = v_{t-1} + Delta_t^2                                         (FedAdagrad)
        v_t = b2 v_{t-1} + (1 - b2) Delta_t^2                             (FedAdam)
        v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)      (FedYogi)
        x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

    elementwise, with m_{-1} = 0 and v_{-1} = tau^2 (the paper asks v_{-1} >= tau^2; this is
    that smallest value), no bias correction, tau outside the square root, and v_t built
    from the raw Delta_t^2, not from m_t^2. Algorithm 2 writes the momentum line for all
    three, so b1 applies to FedAdagrad too; b1 = 0 gives momentum-free Adagrad (the
    paper's convergence analysis takes beta1 = 0; Flower's FedAdagrad fixes beta_1 = 0).
    b2 is unused by FedAdagrad.

    It is fed the pseudo-gradient g = -Delta_t and returns m / (sqrt(v) + tau) in g's terms
    (its first moment is -m_t; v is the same since g^2 = Delta_t^2): chain it with a scale
    of -eta, as `server_optimizer(name, eta, variant='paper')` does. Its state is an
    `optax.ScaleByAdamState`: count (the rounds applied; the update never reads it), mu
    (-m_t) and nu (v_t).
    """
    if name not in FEDOPT_PAPER_OPTIMIZERS:
        raise ValueError(
            f"algorithm.server.optimizer={name!r} is unknown with algorithm.server.variant="
            f"'paper'; allowed: {', '.join(FEDOPT_PAPER_OPTIMIZERS)}"
        )
    if not tau > 0:
        raise ValueError(f"algorithm.server.eps={tau!r} must be > 0 (it is the paper's tau)")

    def second_moment(v, g):
        g2 = g * g
        if name == "adagrad":
            return v + g2
        if name == "adam":
            return b2 * v + (1 - b2) * g2
        return v - (1 - b2) * g2 * jnp.sign(v - g2)

    def init_fn(params):
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(lambda p: jnp.full_like(p, tau * tau), params),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(second_moment, state.nu, updates)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), mu, nu)
        return updates, optax.ScaleByAdamState(count=state.count + 1, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def server_optimizer(
    name: str,
    learning_rate: float = 1.0,
    momentum: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
    *,
    variant: str = "optax",
) -> optax.GradientTransformation:
    """The server optimizers of FedAvg, FedAvgM and FedOpt.

    `eps` is FedOpt's adaptivity tau (Reddi et al. 2021 tune it in [1e-5, 1e-1]; 1e-3 there
    is a common best value). `variant` picks what adam / yogi / adagrad mean:

    - 'optax' (default): optax.adam(learning_rate, b1, b2, eps) and optax.yogi (both
      bias-corrected, eps outside the root; yogi's moments start at 1e-6) and
      optax.adagrad(learning_rate, initial_accumulator_value=0, eps) (no momentum, b1 and
      b2 unused, eps inside the root).
    - 'paper': Algorithm 2 of Reddi et al. 2021, `scale_by_fedopt(name, b1, b2, tau=eps)`
      then a scale of -learning_rate: no bias correction, eps outside the root, v starting
      at eps^2, and momentum b1 for FedAdagrad too.

    sgd (FedAvg, FedAvgM) is the same in both.
    """
    if variant not in SERVER_VARIANTS:
        raise ValueError(
            f"algorithm.server.variant={variant!r} is unknown; "
            f"allowed: {', '.join(SERVER_VARIANTS)}"
        )
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=momentum or None)
    if variant == "paper" and name in FEDOPT_PAPER_OPTIMIZERS:
        return optax.chain(
            scale_by_fedopt(name, b1=b1, b2=b2, tau=eps),
            optax.scale_by_learning_rate(learning_rate),
        )
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
