"""Image classification: softmax cross-entropy, accuracy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_cv.algorithms.base import LossOutput

METRIC_NAMES = ("accuracy",)


def make_loss_fn(model: nn.Module):
    """Per-example training loss of `model` on batches {'image', 'label'} (train mode)."""

    def loss_fn(params, model_state, batch, rng):
        variables = {"params": params, **model_state}
        logits, new_state = model.apply(
            variables, batch["image"], train=True, rngs={"dropout": rng}, mutable=list(model_state)
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return losses, LossOutput(model_state=dict(new_state), metrics={"accuracy": correct})

    return loss_fn


def make_eval_fn(model: nn.Module):
    """Sums of loss and correct predictions over the real examples of a batch (eval mode)."""

    @jax.jit
    def eval_fn(params, model_state, batch, mask):
        logits = model.apply({"params": params, **model_state}, batch["image"], train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = jnp.argmax(logits, -1) == batch["label"]
        mask = mask.astype(jnp.float32)
        return {
            "loss": jnp.sum(losses * mask),
            "accuracy": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
        }

    return eval_fn


def make_centralized_step(model: nn.Module, optimizer: optax.GradientTransformation):
    """A jit-compiled centralized SGD step `(params, opt_state, batch, rng) -> (params,
    opt_state)` on the mean loss: the baseline federated throughput is measured against."""
    loss_fn = make_loss_fn(model)

    @jax.jit
    def step(params, opt_state, batch, rng):
        grads = jax.grad(lambda p: jnp.mean(loss_fn(p, {}, batch, rng)[0]))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step
