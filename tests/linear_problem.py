"""A least-squares problem whose federated rounds are easy to compute by hand in numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fedjax_cv.algorithms import LossOutput
from fedjax_cv.engine import ClientInfo, Cohort

DIM, NUM_CLASSES = 3, 4
NUM_CLIENT_IDS = 64  # make_cohort gives client c the id 7 c


def loss_fn(params, model_state, batch, rng, class_weights=None):
    """0.5 (w.x + b - y)^2 per example, y the integer label as a number; under FedIR each
    example weighs `class_weights[y]`."""
    del rng
    prediction = batch["x"] @ params["w"] + params["b"]
    losses = 0.5 * jnp.square(prediction - batch["label"].astype(jnp.float32))
    weights = None if class_weights is None else class_weights[batch["label"]]
    return losses, LossOutput(model_state=model_state, metrics={}, example_weights=weights)


def initial_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=DIM).astype(np.float32), "b": np.float32(0.3)}


def make_cohort(num_clients=3, num_steps=2, batch=4, seed=0, sizes=None) -> Cohort:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_clients, num_steps, batch, DIM)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (num_clients, num_steps, batch)).astype(np.int32)
    mask = np.ones((num_clients, num_steps, batch), bool)
    histograms = np.stack(
        [np.bincount(labels[c].ravel(), minlength=NUM_CLASSES) for c in range(num_clients)]
    ).astype(np.float32)
    sizes = np.full(num_clients, num_steps * batch) if sizes is None else np.asarray(sizes)
    info = ClientInfo(
        client_id=np.arange(num_clients, dtype=np.int32) * 7,
        occurrence=np.zeros(num_clients, np.int32),
        num_examples=sizes.astype(np.float32),
        label_counts=histograms,
    )
    return Cohort({"x": x, "label": labels}, mask, info)


def local_sgd(
    params, cohort, c, lr, *, mu=0.0, momentum=0.0, weight_decay=0.0, weights=None, lr_b=None
):
    """Client c's final params by hand: SGD on the masked, weighted mean loss (`lr_b`: another
    learning rate for b)."""
    lr_b = lr if lr_b is None else lr_b
    w, b = params["w"].astype(np.float64), float(params["b"])
    w0, b0 = w.copy(), b
    velocity_w, velocity_b = np.zeros_like(w), 0.0
    for s in range(cohort.num_steps):
        m = cohort.mask[c, s].astype(np.float64)
        if not m.any():
            continue
        x = cohort.examples["x"][c, s].astype(np.float64)
        y = cohort.examples["label"][c, s].astype(np.float64)
        a = m if weights is None else m * weights(cohort.examples["label"][c, s])
        residual = x @ w + b - y
        grad_w = (a * residual) @ x / a.sum() + mu * (w - w0) + weight_decay * w
        grad_b = float(np.sum(a * residual) / a.sum()) + mu * (b - b0) + weight_decay * b
        velocity_w = momentum * velocity_w + grad_w
        velocity_b = momentum * velocity_b + grad_b
        w, b = w - lr * velocity_w, b - lr_b * velocity_b
    return {"w": w, "b": np.float64(b)}


def mean_delta(params, cohort, finals, weights):
    weights = np.asarray(weights, np.float64)
    return {
        k: sum(
            wt * (f[k] - np.asarray(params[k], np.float64))
            for wt, f in zip(weights, finals, strict=True)
        )
        / weights.sum()
        for k in params
    }
