"""Normalisation layers chosen by name, so every conv model takes a `norm` field.

GroupNorm is the default (Hsu et al. 2020; FedCV): BatchNorm statistics are a poor fit for
federated training, where each client sees a skewed slice of the data.

BatchNorm is the one layer in which examples of a batch see each other, so it is the one layer
that must know which examples are padding. The client step, the one place where a loss meets
the engine's example mask, runs the loss inside `with example_mask(mask):`; every BatchNorm
in training (`Norm("batch")`, YOLO's `UltralyticsBatchNorm`, anything built on `batch_norm`)
then takes its batch statistics, and so its running averages, over the real examples only.
A context rather than a `mask` argument threaded through every model's `__call__` and every
loss function: the mask is a fact of the engine's padding, the coupling a fact of one layer,
and neither the zoo's models nor a user's loss function need to carry it in between. It is
read while the model is traced, so it works under jit, grad, vmap and lax.cond alike. Without
a mask set, a BatchNorm behaves exactly as flax's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("group", "batch", "layer", "none")


def group_count(channels: int, max_groups: int = 32) -> int:
    """Groups used by `norm='group'` for `channels` channels.

    The rule: the largest divisor of `channels` that is at most `max_groups` and leaves at least
    two channels in every group (so 64 -> 32, 256 -> 32, 24 -> 12, 16 -> 8, 3 -> 1).
    """
    limit = max(1, min(max_groups, channels // 2))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


_EXAMPLE_MASK: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "fedjax_cv_example_mask", default=None
)


@contextlib.contextmanager
def example_mask(mask) -> Iterator[None]:
    """Within the block, BatchNorm in training counts only the examples where `mask` [batch]
    is true (nonzero) in its batch statistics; None: every example, as without the block.

    Set it around the call of a training loss on a padded batch; the models need no argument.
    """
    token = _EXAMPLE_MASK.set(None if mask is None else jnp.asarray(mask).astype(bool))
    try:
        yield
    finally:
        _EXAMPLE_MASK.reset(token)


def current_example_mask() -> jax.Array | None:
    """The mask `example_mask` set around this call, None outside one."""
    return _EXAMPLE_MASK.get()


def batch_norm(
    x: jnp.ndarray,
    *,
    train: bool,
    momentum: float,
    epsilon: float,
    scale_init: Callable = nn.initializers.ones,
) -> jnp.ndarray:
    """`nn.BatchNorm` over all axes but the last, created in the calling compact module (so
    named `BatchNorm_0` there), whose batch statistics leave out what `example_mask` marks as
    padding.

    A batch with no real example keeps the running averages exactly as they were (flax's
    all-false mask gives 0/0 = NaN statistics, which would poison them) and is normalised by
    the statistics of all its examples, so its outputs stay finite; its loss carries no weight.
    """
    layer = nn.BatchNorm(
        use_running_average=not train, momentum=momentum, epsilon=epsilon, scale_init=scale_init
    )
    mask = current_example_mask()
    if mask is None or not train or layer.is_initializing():
        return layer(x)
    if mask.shape != x.shape[:1]:
        raise ValueError(
            f"example_mask has shape {mask.shape}; BatchNorm's input {x.shape} needs one entry "
            f"an example: ({x.shape[0]},)"
        )
    any_real = jnp.any(mask)
    where = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x.shape)
    names = [n for n in ("mean", "var") if layer.has_variable("batch_stats", n)]
    before = {n: layer.get_variable("batch_stats", n) for n in names}
    y = layer(x, mask=where | ~any_real)
    for name, value in before.items():
        after = layer.get_variable("batch_stats", name)
        layer.put_variable("batch_stats", name, jnp.where(any_real, after, value))
    return y


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"model.norm={norm!r} is unknown; allowed: {', '.join(NORMS)}")


class Norm(nn.Module):
    """Normalises over channels with the layer `kind` names.

    `batch` keeps running statistics in the `batch_stats` collection, updated only when
    `train=True`; the engine aggregates that collection by its own policy, never through the
    server optimizer. Its batch statistics leave out padded examples (`example_mask`).
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
            return batch_norm(
                x, train=train, momentum=0.9, epsilon=self.epsilon, scale_init=self.scale_init
            )
        if self.kind == "layer":
            return nn.LayerNorm(epsilon=self.epsilon, scale_init=self.scale_init)(x)
        return x
