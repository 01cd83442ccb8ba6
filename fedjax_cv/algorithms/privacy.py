"""User-level differential privacy for federated rounds: DP-FedAvg and its accountant.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
each client's delta is clipped to L2 norm C over the whole pytree (`clip_update`), the server
sums the clipped deltas of the round's clients, each with weight 1, and adds Gaussian noise of
std z C to the sum (`gaussian_noise`, `noise_stddev`), z the noise multiplier; it then divides
by a denominator that must not depend on the data (the expected number of clients per round),
so one client moves the noised sum by at most C.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): C follows a target quantile gamma of the update norms, C <- C exp(-eta (b - gamma)),
b the fraction of clients whose norm is at most C, itself estimated with Gaussian noise
(`adaptive_clip_update`); the delta's noise multiplier is then raised so the pair of queries
costs what z alone would (`adaptive_delta_noise_multiplier`).

The accountant (`epsilon`, `rdp`, `calibrate_noise`) composes the round's subsampled Gaussian
mechanism over the rounds with dp-accounting (RDP or PLD), for Poisson sampling of clients
(each client in a round with probability q; add-or-remove-one neighbours) or fixed-size
sampling without replacement (replace-one neighbours, where replacing a client moves the sum
by up to 2C, so the mechanism's noise multiplier is z / 2). It runs on the host, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from dp_accounting import pld, rdp
from flax import struct

Metrics = dict[str, jax.Array]
ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")


# ------------------------------------------------------------------------------------------
# On device: clipping, noise, adaptive clip norm. Pure and jit-able.


def global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_update(update, clip_norm) -> tuple[Any, jax.Array]:
    """One client's update scaled to L2 norm `clip_norm` if it is longer (norm over the whole
    pytree), and whether it was. An update within the bound (any, for an infinite
    `clip_norm`) comes back bit for bit. `clip_norm` may be traced (adaptive clipping)."""
    norm = global_norm(update)
    was_clipped = norm > clip_norm
    scale = jnp.where(was_clipped, clip_norm / jnp.where(was_clipped, norm, 1.0), 1.0)
    clipped = jax.tree.map(
        lambda x: jnp.where(was_clipped, (x.astype(jnp.float32) * scale).astype(x.dtype), x),
        update,
    )
    return clipped, was_clipped


def noise_stddev(noise_multiplier, clip_norm) -> jax.Array:
    """DP-FedAvg's noise std on the sum of clipped client updates: z C."""
    return jnp.asarray(noise_multiplier, jnp.float32) * jnp.asarray(clip_norm, jnp.float32)


def gaussian_noise(key: jax.Array, tree, stddev) -> Any:
    """`tree` plus independent N(0, stddev^2) noise on every coordinate; one key per leaf,
    split from `key` in tree order. With `stddev` 0 the tree comes back bit for bit (also
    -0.0, which `x + 0.0` would turn into +0.0)."""
    leaves, structure = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    stddev = jnp.asarray(stddev, jnp.float32)

    def noised(x, k):
        noise = jax.random.normal(k, x.shape, jnp.float32)
        return jnp.where(stddev > 0, (x.astype(jnp.float32) + stddev * noise).astype(x.dtype), x)

    return jax.tree.unflatten(structure, [noised(x, keys[i]) for i, x in enumerate(leaves)])


def geometric_quantile_step(estimate, fraction_below, target_quantile, learning_rate):
    """One geometric step of a quantile estimate (Andrew et al. 2021, eq. 2 and Sec. 2.2):
    estimate exp(-eta (b - gamma)), b the fraction of values at most the estimate."""
    return estimate * jnp.exp(-learning_rate * (fraction_below - target_quantile))


@struct.dataclass
class AdaptiveClipState:
    """The adaptive clip norm between rounds (part of the server state)."""

    clip_norm: jax.Array  # float32 scalar


def check_adaptive_clip(
    initial_clip_norm: float, target_quantile: float, learning_rate: float
) -> None:
    for field, value, ok, allowed in (
        ("clip_norm", initial_clip_norm, initial_clip_norm > 0, "> 0"),
        ("target_quantile", target_quantile, 0 <= target_quantile <= 1, "in [0, 1]"),
        ("clip_learning_rate", learning_rate, learning_rate >= 0, ">= 0"),
    ):
        if not ok:
            raise ValueError(f"algorithm.dp.{field}={value!r} is not allowed; must be {allowed}")


def adaptive_clip_init(initial_clip_norm: float) -> AdaptiveClipState:
    check_adaptive_clip(initial_clip_norm, 0.5, 0.0)
    return AdaptiveClipState(clip_norm=jnp.asarray(initial_clip_norm, jnp.float32))


def adaptive_clip_update(
    state: AdaptiveClipState,
    key: jax.Array,
    num_unclipped,
    num_clients,
    expected_clients: float,
    *,
    target_quantile: float = 0.5,
    learning_rate: float = 0.2,
    count_stddev: float = 0.0,
) -> tuple[AdaptiveClipState, Metrics]:
    """The next round's clip norm (Andrew et al. 2021, Algorithm 1, geometric update).

    `num_unclipped`: the sum over the round's real clients of 1[|delta| <= C] (that is, not
    `was_clipped`), `num_clients` the number of real clients: both plain sums, so they stream
    with the linear aggregate. The clipped-count query adds N(0, count_stddev^2) to the sum
    of (b_i - 1/2) (sensitivity 1/2) and divides by the data-independent `expected_clients`:
    b = clip((sum (b_i - 1/2) + noise) / expected_clients + 1/2, 0, 1).
    """
    centred = jnp.asarray(num_unclipped, jnp.float32) - 0.5 * jnp.asarray(num_clients, jnp.float32)
    noise = jnp.asarray(count_stddev, jnp.float32) * jax.random.normal(key, (), jnp.float32)
    noised = jnp.where(count_stddev > 0, centred + noise, centred)
    fraction = jnp.clip(noised / expected_clients + 0.5, 0.0, 1.0)
    clip_norm = geometric_quantile_step(state.clip_norm, fraction, target_quantile, learning_rate)
    metrics = {"dp_clip_norm": state.clip_norm, "dp_unclipped_estimate": fraction}
    return state.replace(clip_norm=clip_norm), metrics


def adaptive_delta_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier z_delta for the clipped sum such that it and the clipped-count
    query (noise multiplier 2 sigma_b, sensitivity 1/2) together cost one Gaussian query of
    multiplier z: z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Theorem 1).
    The accountant is then run with z."""
    check_noise_multiplier(noise_multiplier)
    if noise_multiplier == 0:
        return 0.0
    if not 2 * count_stddev > noise_multiplier:
        raise ValueError(
            f"algorithm.dp.clipped_count_stddev={count_stddev!r} is not allowed with "
            f"algorithm.dp.noise_multiplier={noise_multiplier!r}; must be > noise_multiplier / 2 "
            "(Andrew et al. suggest clients_per_round / 20)"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


# ------------------------------------------------------------------------------------------
# On the host: the accountant, on dp-accounting.


def check_noise_multiplier(noise_multiplier: float) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(
            f"algorithm.dp.noise_multiplier={noise_multiplier!r} is not allowed; must be >= 0"
        )


def check_target_delta(target_delta: float) -> None:
    if not 0 < target_delta < 1:
        raise ValueError(
            f"algorithm.dp.target_delta={target_delta!r} is not allowed; must be in (0, 1)"
        )


def check_dp(noise_multiplier: float, clip_norm: float, target_delta: float) -> None:
    """Refuses a bad `algorithm.dp` config in one line naming the field."""
    check_noise_multiplier(noise_multiplier)
    if not clip_norm > 0:
        raise ValueError(f"algorithm.dp.clip_norm={clip_norm!r} is not allowed; must be > 0")
    check_target_delta(target_delta)


def _check_choices(accountant: str, sampling: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"algorithm.dp.accountant={accountant!r} is unknown; known: {', '.join(ACCOUNTANTS)}"
        )
    if sampling not in SAMPLINGS:
        raise ValueError(
            f"algorithm.dp.sampling={sampling!r} is unknown; known: {', '.join(SAMPLINGS)}"
        )
    if accountant == "pld" and sampling == "fixed":
        raise ValueError(
            "algorithm.dp.accountant='pld' is not allowed with algorithm.dp.sampling='fixed' "
            "(dp-accounting has no PLD of sampling without replacement); use 'rdp'"
        )


def _sampling(
    sampling: str,
    sampling_probability: float | None,
    clients_per_round: int | None,
    num_clients: int | None,
) -> tuple[float, int | None, int | None]:
    """(q, clients_per_round, num_clients) checked; q from the counts when not given."""
    if clients_per_round is not None or num_clients is not None:
        if not (
            clients_per_round is not None
            and num_clients is not None
            and 0 < clients_per_round <= num_clients
        ):
            raise ValueError(
                f"algorithm.clients_per_round={clients_per_round!r} is not allowed with "
                f"data.num_clients={num_clients!r}; must be in [1, data.num_clients]"
            )
        if sampling_probability is None:
            sampling_probability = clients_per_round / num_clients
    elif sampling == "fixed":
        raise ValueError(
            "algorithm.dp.sampling='fixed' needs algorithm.clients_per_round and "
            "data.num_clients, not only a sampling probability"
        )
    if sampling_probability is None or not 0 < sampling_probability <= 1:
        raise ValueError(
            f"algorithm.dp.sampling_probability={sampling_probability!r} is not allowed; "
            "must be in (0, 1]"
        )
    return sampling_probability, clients_per_round, num_clients


def dp_event(
    noise_multiplier: float,
    *,
    rounds: int,
    sampling_probability: float | None = None,
    clients_per_round: int | None = None,
    num_clients: int | None = None,
    sampling: str = "poisson",
) -> dp_accounting.DpEvent:
    """The whole training run as a dp-accounting event: `rounds` compositions of the sampled
    Gaussian mechanism. Poisson: q = `sampling_probability`, else clients_per_round /
    num_clients. Fixed: `clients_per_round` of `num_clients` without replacement, noise
    multiplier z / 2 (replace-one sensitivity 2C)."""
    check_noise_multiplier(noise_multiplier)
    _check_choices("rdp", sampling)
    if not (isinstance(rounds, int | np.integer) and rounds >= 0):
        raise ValueError(f"num_rounds={rounds!r} is not allowed; must be an integer >= 0")
    q, cohort, population = _sampling(
        sampling, sampling_probability, clients_per_round, num_clients
    )
    if sampling == "poisson":
        one = dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
    else:
        one = dp_accounting.SampledWithoutReplacementDpEvent(
            population, cohort, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
        )
    return dp_accounting.SelfComposedDpEvent(one, int(rounds))


def _neighbours(sampling: str) -> dp_accounting.NeighboringRelation:
    relation = dp_accounting.NeighboringRelation
    return relation.ADD_OR_REMOVE_ONE if sampling == "poisson" else relation.REPLACE_ONE


def _fresh_accountant(accountant: str, sampling: str, pld_discretization: float):
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=_neighbours(sampling))
    return pld.PLDAccountant(
        neighboring_relation=_neighbours(sampling),
        value_discretization_interval=pld_discretization,
    )


def rdp_curve(
    noise_multiplier: float,
    orders: Sequence[float],
    *,
    rounds: int,
    sampling_probability: float | None = None,
    clients_per_round: int | None = None,
    num_clients: int | None = None,
    sampling: str = "poisson",
) -> np.ndarray:
    """The run's Renyi DP at each of `orders` (what the RDP accountant converts to epsilon)."""
    event = dp_event(
        noise_multiplier,
        rounds=rounds,
        sampling_probability=sampling_probability,
        clients_per_round=clients_per_round,
        num_clients=num_clients,
        sampling=sampling,
    )
    accountant = rdp.RdpAccountant(orders=list(orders), neighboring_relation=_neighbours(sampling))
    return accountant.compose(event).rdp


def epsilon(
    noise_multiplier: float,
    *,
    rounds: int,
    target_delta: float,
    sampling_probability: float | None = None,
    clients_per_round: int | None = None,
    num_clients: int | None = None,
    accountant: str = "rdp",
    sampling: str = "poisson",
    pld_discretization: float = 1e-4,
) -> float:
    """The run's epsilon at `target_delta` after `rounds` rounds (`train/dp_epsilon`); inf
    for noise 0, 0 before the first round. PLD is tighter than RDP and slower (about a second
    for a thousand rounds); RDP takes milliseconds."""
    check_target_delta(target_delta)
    _check_choices(accountant, sampling)
    event = dp_event(
        noise_multiplier,
        rounds=rounds,
        sampling_probability=sampling_probability,
        clients_per_round=clients_per_round,
        num_clients=num_clients,
        sampling=sampling,
    )
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    fresh = _fresh_accountant(accountant, sampling, pld_discretization)
    return float(fresh.compose(event).get_epsilon(target_delta))


def calibrate_noise(
    target_epsilon: float,
    *,
    rounds: int,
    target_delta: float,
    sampling_probability: float | None = None,
    clients_per_round: int | None = None,
    num_clients: int | None = None,
    accountant: str = "rdp",
    sampling: str = "poisson",
    pld_discretization: float = 1e-4,
    tolerance: float = 1e-4,
) -> float:
    """The smallest noise multiplier (within `tolerance`) whose `epsilon` is at most
    `target_epsilon`, by dp-accounting's calibration (Brent's method, then a step to the safe
    side)."""
    if not target_epsilon > 0:
        raise ValueError(
            f"algorithm.dp.target_epsilon={target_epsilon!r} is not allowed; must be > 0"
        )
    check_target_delta(target_delta)
    _check_choices(accountant, sampling)
    options = dict(
        rounds=rounds,
        sampling_probability=sampling_probability,
        clients_per_round=clients_per_round,
        num_clients=num_clients,
        sampling=sampling,
    )
    common = dict(target_delta=target_delta, tolerance=tolerance)
    dp_event(1.0, **options)  # refuses bad settings in one line before the search

    def epsilon_of(z: float, name: str) -> float:
        fresh = _fresh_accountant(name, sampling, pld_discretization)
        return fresh.compose(dp_event(z, **options)).get_epsilon(target_delta)

    if rounds == 0:
        return 0.0  # nothing released
    # A bracket [low, high] with epsilon(low) > target >= epsilon(high), found with few
    # evaluations near the answer: PLD's cost grows without bound as the noise goes to 0 (a
    # noise of 0.01 asks for tens of GiB), so PLD starts from the RDP answer, which is close.
    guess, factor = 1.0, 2.0
    if accountant == "pld":
        guess, factor = calibrate_noise(target_epsilon, accountant="rdp", **options, **common), 1.25
    if epsilon_of(guess, accountant) > target_epsilon:
        low, high = guess, guess * factor
        while epsilon_of(high, accountant) > target_epsilon:
            low, high = high, high * factor
    else:
        low, high = guess / factor, guess
        while epsilon_of(low, accountant) <= target_epsilon:
            if low < tolerance:
                return low  # (almost) no noise reaches the target
            low, high = low / factor, low
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _fresh_accountant(accountant, sampling, pld_discretization),
            lambda z: dp_event(z, **options),
            target_epsilon,
            target_delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(low, high),
            tol=tolerance,
        )
    )
