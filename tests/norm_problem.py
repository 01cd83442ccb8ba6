"""A BatchNorm model small enough that its running statistics are computed by hand in numpy.

BatchNorm acts on the raw inputs, so the statistics a client's local steps accumulate depend
on its data only, not on the params it trains: y = Dense(BatchNorm(x)).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_cv.algorithms import LossOutput
from fedjax_cv.engine import ClientInfo, Cohort
from fedjax_cv.models.norm import Norm

DIM = 3
MOMENTUM = 0.9  # fedjax_cv.models.norm.Norm's BatchNorm momentum
NUM_CLIENT_IDS = 16  # client c has the id 5 c


class BatchNormLinear(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        x = Norm("batch")(x, train=train)
        return nn.Dense(1)(x)[:, 0]


MODEL = BatchNormLinear()


def loss_fn(params, model_state, batch, rng):
    """0.5 (y_hat - y)^2 per example in training mode; returns the updated batch_stats."""
    del rng
    prediction, new_state = MODEL.apply(
        {"params": params, **model_state}, batch["x"], train=True, mutable=["batch_stats"]
    )
    losses = 0.5 * jnp.square(prediction - batch["label"].astype(jnp.float32))
    return losses, LossOutput(model_state=dict(new_state), metrics={})


def initial_variables() -> tuple[dict, dict]:
    """(params, model_state) of MODEL: BatchNorm starts at mean 0, var 1."""
    variables = MODEL.init(jax.random.key(0), jnp.zeros((2, DIM)), train=False)
    variables = jax.device_get(variables)
    return variables["params"], {"batch_stats": variables["batch_stats"]}


def batch_stats(model_state) -> tuple[np.ndarray, np.ndarray]:
    """(running mean, running var) of the model's one BatchNorm layer."""
    stats = model_state["batch_stats"]["Norm_0"]["BatchNorm_0"]
    return np.asarray(stats["mean"]), np.asarray(stats["var"])


def make_cohort(num_clients=3, num_steps=3, batch=4, seed=0, sizes=None) -> Cohort:
    """Clients whose inputs differ in location and scale, so their statistics differ."""
    rng = np.random.default_rng(seed)
    shift = np.arange(num_clients)[:, None, None, None] * np.array([1.0, -2.0, 0.5])
    scale = 1.0 + np.arange(num_clients)[:, None, None, None]
    x = rng.normal(size=(num_clients, num_steps, batch, DIM)) * scale + shift
    labels = rng.integers(0, 4, (num_clients, num_steps, batch)).astype(np.int32)
    sizes = np.full(num_clients, num_steps * batch) if sizes is None else np.asarray(sizes)
    info = ClientInfo(
        client_id=np.arange(num_clients, dtype=np.int32) * 5,
        occurrence=np.zeros(num_clients, np.int32),
        num_examples=sizes.astype(np.float32),
        label_counts=np.ones((num_clients, 4), np.float32),
    )
    mask = np.ones((num_clients, num_steps, batch), bool)
    return Cohort({"x": x.astype(np.float32), "label": labels}, mask, info)


def running_statistics(cohort: Cohort, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Client c's running (mean, var) after its local steps, by hand: each step with a real
    example moves them by (1 - momentum) towards the batch's mean and biased variance. Steps
    must be all real or all padded (BatchNorm does not see the mask)."""
    mean, var = np.zeros(DIM), np.ones(DIM)
    for s in range(cohort.num_steps):
        mask = cohort.mask[c, s]
        if not mask.any():
            continue
        assert mask.all(), "a partly padded batch: BatchNorm would see its padded examples"
        x = cohort.examples["x"][c, s].astype(np.float64)
        mean = MOMENTUM * mean + (1 - MOMENTUM) * x.mean(axis=0)
        var = MOMENTUM * var + (1 - MOMENTUM) * x.var(axis=0)
    return mean, var
