"""Normalisation layers chosen by name, so every conv model takes a `norm` field.

GroupNorm is the default (Hsu et al. 2020; FedCV): BatchNorm statistics are a poor fit for
federated training, where each client sees a skewed slice of the data.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

NORMS = ("group", "batch", "layer", "none")


def group_count(channels: int, max_groups: int = 32) -> int:
    """Groups used by `norm='group'` for `channels` channels.

    The rule: the largest divisor of `channels` that is at most `max_groups` and leaves at least
    two channels in every group (so 64 -> 32, 256 -> 32, 24 -> 12, 16 -> 8, 3 -> 1).
    """
    limit = max(1, min(max_groups, channels // 2))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"model.norm={norm!r} is unknown; allowed: {', '.join(NORMS)}")


class Norm(nn.Module):
    """Normalises over channels with the layer `kind` names.

    `batch` keeps running statistics in the `batch_stats` collection, updated only when
    `train=True`; the engine aggregates that collection by its own policy, never through the
    server optimizer.
    """

    kind: str = "group"
    max_groups: int = 32
    scale_init: Callable = nn.initializers.ones
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_norm(self.kind)
        if self.kind == "group":
            groups = group_count(x.shape[-1], self.max_groups)
            return nn.GroupNorm(
                num_groups=groups, epsilon=self.epsilon, scale_init=self.scale_init
            )(x)
        if self.kind == "batch":
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=self.epsilon,
                scale_init=self.scale_init,
            )(x)
        if self.kind == "layer":
            return nn.LayerNorm(epsilon=self.epsilon, scale_init=self.scale_init)(x)
        return x
