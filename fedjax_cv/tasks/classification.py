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
