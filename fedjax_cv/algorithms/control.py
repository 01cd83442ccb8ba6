"""SCAFFOLD's control variates and FedNova's normalised averaging, as aggregation stages.

Both are `fedjax_cv.algorithms.aggregation.Stage`s, so they compose with every other stage,
aggregator and server optimizer; the presets `compose.scaffold` and `compose.fednova` put them
first in the pipeline, so their client parts see the delta the client's training produced
(before attacks, clipping or compression) and their server parts run last.

- SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning", Algorithm 1 with option II): a server control variate c (server-held state) and
  one c_i per client (the client-local store); every local step descends g - c_i + c
  (`Stage.gradient`).
- FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
  Federated Optimization"): each client's delta divided by its normaliser ||a_i||_1 (its number
  of local steps for plain SGD), the mean of those rescaled by tau_eff = sum_i p_i ||a_i||_1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_cv.algorithms.aggregation import Stage

SCAFFOLD = "scaffold"
FEDNOVA = "fednova"


def _effective_learning_rate(learning_rate: float, view) -> jax.Array:
    """The client learning rate of this round: the configured one times the schedule's factor
    (`RoundShared.lr_factor`, which scales every local update of the round)."""
    lr = jnp.float32(learning_rate)
    return lr if view.lr_factor is None else lr * view.lr_factor


# ------------------------------------------------------------------------------------------
# SCAFFOLD.


def scaffold(num_clients: int, learning_rate: float) -> Stage:
    """SCAFFOLD's control variates (Karimireddy et al. 2020, Algorithm 1, option II).

    With x the server model, y_i the client's model after its K local steps of learning rate
    eta (`learning_rate` times the round's schedule factor), and S the round's voting clients:

        local step:   y_i <- y_i - eta (g_i(y_i) - c_i + c)
        option II:    c_i+ = c_i - c + (x - y_i) / (K eta)
        server:       x <- x + eta_g mean_S(y_i - x)       (the server optimizer, as FedAvg)
                      c <- c + (|S| / N) mean_S(c_i+ - c_i) = c + sum_S(c_i+ - c_i) / N

    N = `num_clients`, the population (pass the same number to `init`, which sizes the
    client-local store); c and every c_i start at 0, so c stays the mean of all c_i. The
    correction enters before the client optimizer, so client momentum, weight decay and
    `lr_multipliers` act on the corrected gradient; option II's estimate (x - y_i) / (K eta)
    is exact for plain SGD and a learning-rate multiplier of 0 or 1. A padded or non-finite
    client neither votes nor writes its c_i (the store's write mask). A client drawn twice in
    one round (FedVC) counts both copies in the sum but keeps one c_i.

    Reports `scaffold_control_norm`, ||c|| after the round.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients <= 0:
        raise ValueError(
            f"scaffold needs num_clients, the population size, as a positive integer; got "
            f"{num_clients!r}"
        )
    if not learning_rate > 0:
        raise ValueError(
            f"algorithm.client.learning_rate={learning_rate!r} is not allowed with scaffold; "
            "must be > 0 (option II divides by it)"
        )

    def zeros(params):
        return jax.tree.map(jnp.zeros_like, params)

    def gradient(control, own_control, grads):
        return jax.tree.map(lambda g, ci, c: g - ci + c, grads, own_control, control)

    def client(control, delta, own_control, view):
        steps_lr = view.num_steps.astype(jnp.float32) * _effective_learning_rate(
            learning_rate, view
        )
        informative = steps_lr > 0  # a client without a step learnt nothing about its drift
        scale = 1.0 / jnp.where(informative, steps_lr, 1.0)
        # c_i+ - c_i = -c + (x - y_i) / (K eta), with delta = y_i - x.
        control_delta = jax.tree.map(
            lambda c, d: jnp.where(informative, -c - d * scale.astype(d.dtype), 0.0),
            control,
            delta,
        )
        own_control = jax.tree.map(jnp.add, own_control, control_delta)
        return delta, own_control, {"scaffold_control": control_delta}

    def server(control, aggregate, sums, view):
        control = jax.tree.map(
            lambda c, s: c + (s / num_clients).astype(c.dtype), control, sums["scaffold_control"]
        )
        return aggregate, control, {"scaffold_control_norm": optax.tree.norm(control)}

    return Stage(
        SCAFFOLD,
        client=client,
        server=server,
        init=zeros,
        local_init=zeros,
        gradient=gradient,
    )


# ------------------------------------------------------------------------------------------
# FedNova.


def fednova_normaliser(
    num_steps: jax.Array,
    momentum: float = 0.0,
    proximal_step: jax.Array | float = 0.0,
) -> jax.Array:
    """||a_i||_1, the L1 norm of the weights a client's delta puts on its local gradients.

    Wang et al. 2020 write a client's delta as -eta G_i a_i (G_i its tau_i stochastic
    gradients, Section 3); for their local solvers (Section 4 and Appendix):

        plain SGD:             a_i = [1, ..., 1],                    ||a_i||_1 = tau_i
        momentum rho:          a_i = [1 - rho^tau_i, ..., 1 - rho] / (1 - rho),
                               ||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)
        proximal, eta mu:      a_i = [(1 - eta mu)^(tau_i - 1), ..., 1],
                               ||a_i||_1 = [1 - (1 - eta mu)^tau_i] / (eta mu)

    `proximal_step` is eta mu (FedProx's mu times the round's client learning rate).
    """
    tau = jnp.asarray(num_steps).astype(jnp.float32)
    if momentum:
        rho = jnp.float32(momentum)
        return (tau - rho * (1.0 - jnp.power(rho, tau)) / (1.0 - rho)) / (1.0 - rho)
    proximal_step = jnp.asarray(proximal_step, jnp.float32)
    shrink = 1.0 - proximal_step
    proximal = (1.0 - jnp.power(shrink, tau)) / jnp.where(proximal_step > 0, proximal_step, 1.0)
    return jnp.where(proximal_step > 0, proximal, tau)


def fednova(momentum: float = 0.0, proximal_mu: float = 0.0, learning_rate: float = 0.0) -> Stage:
    """FedNova's normalised averaging (Wang et al. 2020, Section 5):

        x <- x - tau_eff sum_i p_i eta d_i,   d_i = G_i a_i / ||a_i||_1,
        tau_eff = sum_i p_i ||a_i||_1,

    that is, with delta_i = -eta G_i a_i the client's delta: each client sends
    delta_i / ||a_i||_1 (`fednova_normaliser`: tau_i local steps for plain SGD; `momentum` rho
    of the client optimizer; FedProx's `proximal_mu` with the client `learning_rate`), the
    aggregator averages them with weights p_i, and the server part multiplies the aggregate by
    tau_eff (the weighted sum of the normalisers over the same denominator as the mean). With
    equal local steps it is FedAvg up to float rounding. Weight decay counts as part of the
    gradient, as in the authors' code. Reports `fednova_tau_eff`.
    """
    if not 0 <= momentum < 1:
        raise ValueError(
            f"algorithm.client.momentum={momentum!r} is not allowed; must be in [0, 1)"
        )
    if proximal_mu and momentum:
        raise ValueError(
            f"algorithm.client.proximal_mu={proximal_mu!r} is not allowed with fednova and "
            f"algorithm.client.momentum={momentum!r}: the paper's normaliser covers one of "
            "momentum or a proximal term, not both"
        )
    if proximal_mu and not learning_rate > 0:
        raise ValueError("fednova with proximal_mu needs the client learning_rate (> 0)")

    def client(state, delta, own, view):
        proximal_step = (
            proximal_mu * _effective_learning_rate(learning_rate, view) if proximal_mu else 0.0
        )
        normaliser = fednova_normaliser(view.num_steps, momentum, proximal_step)
        divisor = jnp.where(normaliser > 0, normaliser, 1.0)
        delta = jax.tree.map(lambda d: d / divisor.astype(d.dtype), delta)
        return delta, own, {"fednova_normaliser": view.weight * normaliser}

    def server(state, aggregate, sums, view):
        tau_eff = sums["fednova_normaliser"] / view.denominator
        aggregate = jax.tree.map(lambda a: a * tau_eff.astype(a.dtype), aggregate)
        return aggregate, state, {"fednova_tau_eff": tau_eff}

    return Stage(FEDNOVA, client=client, server=server)
