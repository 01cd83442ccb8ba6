"""The client update: local training of one client from the server's model.

The objective is the masked mean of per-example losses, optionally reweighted per example
(FedIR) and regularised towards the server model (FedProx). The optimizer is any optax
transformation; its state starts fresh every round (FedCV appendix), so client momentum
never leaks across rounds.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_cv.algorithms.aggregation import MEAN, ClientView, Pipeline
from fedjax_cv.algorithms.base import PerExampleLoss
from fedjax_cv.algorithms.local_state import (
    NO_LOCAL,
    ClientLocal,
    apply_local,
    kept_values,
    stage_values,
)
from fedjax_cv.engine.cohort import ClientInfo
from fedjax_cv.engine.strategies import ClientProgram
from fedjax_cv.models.norm import example_mask


class ClientObjective(NamedTuple):
    """How a client weighs its examples and what it adds to its loss.

    - `class_prior`: None for plain training; for FedIR (Hsu, Qi and Brown 2020, eq. 1-4) the
      population label distribution p, so an example of label y gets weight p(y) / q_k(y),
      q_k the client's own label distribution, self-normalised over the batch.
      The task's loss applies the weights (`class_weights` keyword of `PerExampleLoss`), so
      FedIR weighs images, pixels or boxes alike.
    - `proximal_mu`: FedProx (Li et al. 2020) adds mu/2 ||w - w_server||^2.
    """

    class_prior: jax.Array | None = None
    proximal_mu: float = 0.0


def importance_table(class_prior: jax.Array, label_counts: jax.Array) -> jax.Array:
    """p(y) / q_k(y) for every class y; 0 where the client holds no example of y."""
    q = label_counts / jnp.maximum(jnp.sum(label_counts), 1.0)
    return jnp.where(q > 0, class_prior / jnp.where(q > 0, q, 1.0), 0.0)


def objective_value(
    objective: ClientObjective,
    losses: jax.Array,
    mask: jax.Array,
    example_weights: jax.Array,
    params,
    server_params,
) -> jax.Array:
    """Self-normalised weighted mean of per-example losses over real examples, + proximal."""
    weights = example_weights * mask
    value = jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1e-12)
    if objective.proximal_mu:
        squared = jax.tree.map(lambda w, s: jnp.sum(jnp.square(w - s)), params, server_params)
        value = value + 0.5 * objective.proximal_mu * sum(jax.tree.leaves(squared))
    return value


class RoundShared(NamedTuple):
    """What every client of a round starts from: the server's values, the factor of the
    client learning rate this round (None: 1; see `fedjax_cv.algorithms.schedules`), the
    aggregation stages' server-held state (clip norms; see `fedjax_cv.algorithms.aggregation`),
    and under secure aggregation the cohort's identities for the pairwise masks (None: off;
    see `fedjax_cv.algorithms.secure_aggregation`)."""

    params: Any
    model_state: Any
    lr_factor: jax.Array | None = None
    aggregation: Any = None
    secure_cohort: Any = None  # SecureCohort


@struct.dataclass
class ClientState:
    params: Any
    opt_state: Any
    model_state: Any
    rng: jax.Array
    steps: jax.Array  # int32: local steps taken (padded steps excluded)
    class_weights: jax.Array | None  # FedIR's p(y)/q_k(y) table, None otherwise
    loss_sum: jax.Array  # sum of per-example losses over real examples
    metric_sums: dict[str, jax.Array]
    num_trained: jax.Array  # real examples trained on
    stage_own: Any = struct.field(default_factory=dict)  # the aggregation stages' own state


class ClientContribution(NamedTuple):
    """What one client adds to the round's sums (see `server_update` in server.py)."""

    # weight * (the client's delta after the pipeline's client stages); None where the
    # aggregator is robust and gets the deltas stacked instead; under secure aggregation its
    # masked fixed-point encoding (a `SecureSum`).
    weighted_delta: Any
    weighted_model_state: Any
    weight: jax.Array
    loss_sum: jax.Array
    metric_sums: dict[str, jax.Array]
    num_trained: jax.Array
    num_clients: jax.Array
    num_nonfinite: jax.Array
    stage_sums: dict[str, jax.Array] = {}  # the pipeline's client stages' sums


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def client_program(
    loss_fn: PerExampleLoss,
    optimizer: optax.GradientTransformation,
    objective: ClientObjective,
    client_weight,
    metric_names: tuple[str, ...] = (),
    local: ClientLocal = NO_LOCAL,
    pipeline: Pipeline = MEAN,
) -> ClientProgram:
    """Builds the one-client update.

    `client_weight(info)` is the client's aggregation weight; `metric_names` are the
    per-example metrics `loss_fn` reports, averaged over the examples trained on; `local` says
    which values the client starts from its own copy of and hands back (FedBN); `pipeline`'s
    client stages transform the delta before it is weighted (linear aggregator) or handed
    back stacked (robust aggregator).

    `final` returns the contribution summed over the cohort and, stacked over the cohort,
    `{'local': what the client keeps, 'upload': {'delta', 'weight'} for a robust aggregator}`.
    """

    def init(shared: RoundShared, info: ClientInfo, key, own):
        params, model_state = apply_local(shared.params, shared.model_state, own)
        zero = jnp.zeros((), jnp.float32)
        class_weights = None
        if objective.class_prior is not None:
            class_weights = importance_table(objective.class_prior, info.label_counts)
        return ClientState(
            params=params,
            opt_state=optimizer.init(params),
            model_state=model_state,
            rng=key,
            steps=jnp.zeros((), jnp.int32),
            class_weights=class_weights,
            loss_sum=zero,
            metric_sums={name: zero for name in metric_names},
            num_trained=zero,
            stage_own=stage_values(own),
        )

    def step(shared: RoundShared, state: ClientState, batch, mask):
        server_params = shared.params
        mask = mask.astype(jnp.float32)
        key = jax.random.fold_in(state.rng, state.steps)

        def value(params):
            # BatchNorm's batch statistics leave out the padded examples (see example_mask).
            with example_mask(mask):
                if state.class_weights is None:
                    losses, out = loss_fn(params, state.model_state, batch, key)
                    example_weights = jnp.ones_like(mask)
                else:
                    losses, out = loss_fn(
                        params, state.model_state, batch, key, class_weights=state.class_weights
                    )
                    example_weights = out.example_weights
            total = objective_value(objective, losses, mask, example_weights, params, server_params)
            return total, (losses, out)

        grads, (losses, out) = jax.grad(value, has_aux=True)(state.params)
        grads = pipeline.correct_gradient(shared.aggregation or {}, state.stage_own, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        if shared.lr_factor is not None:
            updates = jax.tree.map(lambda u: u * shared.lr_factor, updates)
        return state.replace(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            model_state=out.model_state,
            steps=state.steps + 1,
            loss_sum=state.loss_sum + jnp.sum(losses * mask),
            metric_sums={
                name: state.metric_sums[name] + jnp.sum(out.metrics[name] * mask)
                for name in state.metric_sums
            },
            num_trained=state.num_trained + jnp.sum(mask),
        )

    def final(shared: RoundShared, state: ClientState, info: ClientInfo):
        server_params = shared.params
        delta = jax.tree.map(jnp.subtract, state.params, server_params)
        # A client whose loss overflowed has no trustworthy update, even when saturated
        # gradients left its delta finite.
        finite = all_finite(delta) & all_finite(state.model_state) & jnp.isfinite(state.loss_sum)
        real = info.num_examples > 0
        weight = jnp.where(finite & real, client_weight(info), 0.0).astype(jnp.float32)
        delta, stage_own, stage_sums = pipeline.client(
            shared.aggregation or {},
            delta,
            state.stage_own,
            ClientView(info, state.rng, weight, state.steps, shared.lr_factor),
        )
        # NaN * 0 is NaN: zero the update itself, not just its weight.
        unless_nonfinite = lambda tree: jax.tree.map(lambda x: jnp.where(finite, x, 0.0), tree)
        safe = lambda tree: jax.tree.map(lambda x: x * weight, unless_nonfinite(tree))
        upload = {}
        if not pipeline.linear:
            upload = {"delta": unless_nonfinite(delta), "weight": weight}
        weighted_delta = safe(delta) if pipeline.linear else None
        if pipeline.secure is not None:
            weighted_delta = pipeline.secure.encode(weighted_delta, shared.secure_cohort, info)
        contribution = ClientContribution(
            weighted_delta=weighted_delta,
            weighted_model_state=safe(state.model_state),
            weight=weight,
            loss_sum=jnp.where(finite, state.loss_sum, 0.0),
            metric_sums={k: jnp.where(finite, v, 0.0) for k, v in state.metric_sums.items()},
            num_trained=jnp.where(finite, state.num_trained, 0.0),
            num_clients=real.astype(jnp.float32),
            num_nonfinite=(real & ~finite).astype(jnp.float32),
            stage_sums=stage_sums,
        )
        kept = kept_values(local, state.params, state.model_state, finite & real, stage_own)
        return contribution, {"local": kept, "upload": upload}

    return ClientProgram(init=init, step=step, final=final)
