"""Learning-rate schedules over rounds: the client learning rate of round r is the configured
one times `factor(r)`.

FedCV (He et al. 2021, §6.2) compares constant, polynomial ("poly") and linear decay over the
rounds of a segmentation run and keeps constant for FedAvg, so constant is the default. A
warm-up multiplies the first `warmup_rounds` rounds by (r + 1) / warmup_rounds (YOLO training
warms up; Ultralytics does it over epochs, here over rounds). The factor scales every client
update of the round: for optax's SGD, with or without momentum, that is exactly training at the
scaled learning rate, since a fresh client optimizer multiplies its (momentum) direction by
the learning rate last.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

SCHEDULES = ("constant", "poly", "linear")

# round (int32, 0-based: rounds already applied) -> float32 factor of the client learning rate
RoundSchedule = Callable[[jax.Array], jax.Array]


def round_schedule(
    name: str = "constant",
    num_rounds: int = 1,
    *,
    power: float = 0.9,
    warmup_rounds: int = 0,
) -> RoundSchedule | None:
    """The factor of round r (0-based) of a `num_rounds` run; None when it is always 1.

    - constant: 1;
    - poly: (1 - r / num_rounds) ** power (DeepLab's "poly", power 0.9);
    - linear: 1 - r / num_rounds;
    times min((r + 1) / warmup_rounds, 1) when `warmup_rounds` > 0.
    Raises ValueError naming the config field of a bad value.
    """
    field = "algorithm.client.lr_schedule"
    if name not in SCHEDULES:
        raise ValueError(f"{field}={name!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"num_rounds={num_rounds!r} is not allowed; must be a positive integer")
    if not power > 0:
        raise ValueError(f"algorithm.client.lr_power={power!r} is not allowed; must be > 0")
    if isinstance(warmup_rounds, bool) or not isinstance(warmup_rounds, int) or warmup_rounds < 0:
        raise ValueError(
            f"algorithm.client.lr_warmup_rounds={warmup_rounds!r} is not allowed; must be an "
            "integer >= 0"
        )
    if name == "constant" and warmup_rounds == 0:
        return None

    def factor(round_index):
        r = jnp.asarray(round_index, jnp.float32)
        remaining = jnp.clip(1.0 - r / num_rounds, 0.0, 1.0)
        value = {
            "constant": jnp.ones_like(r),
            "poly": remaining**power,
            "linear": remaining,
        }[name]
        if warmup_rounds:
            value = value * jnp.minimum((r + 1.0) / warmup_rounds, 1.0)
        return value.astype(jnp.float32)

    return factor
