"""Image classification: softmax cross-entropy, accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_cv.algorithms.base import LossOutput
from fedjax_cv.tasks import Task, argmax_predictions, pictures

METRIC_NAMES = ("accuracy",)


def make_loss_fn(model: nn.Module):
    """Per-example training loss of `model` on batches {'image', 'label'} (train mode)."""

    def loss_fn(params, model_state, batch, rng, class_weights=None):
        variables = {"params": params, **model_state}
        logits, new_state = model.apply(
            variables, batch["image"], train=True, rngs={"dropout": rng}, mutable=list(model_state)
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        weights = None if class_weights is None else class_weights[batch["label"]]
        return losses, LossOutput(
            model_state=dict(new_state), metrics={"accuracy": correct}, example_weights=weights
        )

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


def finalize(stats: dict) -> dict[str, float]:
    count = max(float(stats["count"]), 1.0)
    return {"accuracy": float(stats["accuracy"]) / count, "loss": float(stats["loss"]) / count}


def check_output(output_shape, input_shape: Sequence[int], field: str) -> None:
    if len(output_shape) != 2 or not all(isinstance(n, int) for n in output_shape):
        raise ValueError(
            f"{field} outputs {tuple(output_shape)} for images {tuple(input_shape)}; "
            "classification needs one logit vector an image [batch, classes]: pick a "
            "classification model"
        )


def details(stats: dict, class_names: Sequence[str]) -> dict:
    del class_names
    return {"num_examples": int(stats["count"])}


def plot_predictions(batch, predicted, class_names, title=""):
    """A grid of test images titled 'predicted / true', red where they differ."""
    images, truth = batch["image"], batch["label"]
    names = lambda ids: [class_names[i] if i < len(class_names) else str(i) for i in ids]
    captions = [
        (f"{p} / {t}", "black" if p == t else "red")
        for p, t in zip(names(np.asarray(predicted)), names(np.asarray(truth)), strict=True)
    ]
    panels = [pictures.displayable(image) for image in images]
    return pictures.image_grid(panels, captions, columns=min(8, len(panels)), title=title)


TASK = Task(
    name="classification",
    make_loss_fn=make_loss_fn,
    metric_names=METRIC_NAMES,
    make_eval_fn=make_eval_fn,
    finalize=finalize,
    headline="accuracy",
    check_output=check_output,
    details=details,
    predict=argmax_predictions,
    plot_predictions=plot_predictions,
)
