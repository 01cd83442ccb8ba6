"""Semantic segmentation: per-pixel cross-entropy, mean IoU from a summed confusion matrix.

Batches hold `image` [B, H, W, C] and `mask` [B, H, W] of class ids, `IGNORE_INDEX` (255)
where no loss applies (VOC's object borders, COCO's unlabelled pixels, padding that an
augmentation invented). Evaluation sums one confusion matrix over the whole test split, across
batches, clients and hosts, and only then takes IoUs: the mean of per-batch IoUs would weigh
a batch with three pixels of a class like one with three thousand.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_cv.algorithms.base import LossOutput
from fedjax_cv.tasks import Task, argmax_predictions, pictures

IGNORE_INDEX = 255
METRIC_NAMES = ("pixel_accuracy",)


def confusion_matrix(
    labels, predictions, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """int64 [num_classes, num_classes] pixel counts, rows the true class, columns the
    predicted one; pixels labelled `ignore_index` are left out.

    Raises ValueError when a label is neither a class id nor `ignore_index`, or a prediction
    is not a class id.
    """
    labels = np.asarray(labels).ravel().astype(np.int64)
    predictions = np.asarray(predictions).ravel().astype(np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(
            f"labels have {labels.size} pixels and predictions {predictions.size}; must match"
        )
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(
            f"label {int(labels[bad][0])} is not allowed; must be in [0, {num_classes}) or "
            f"{ignore_index} (ignored)"
        )
    if np.any((predictions[valid] < 0) | (predictions[valid] >= num_classes)):
        raise ValueError(f"predictions must be class ids in [0, {num_classes})")
    flat = labels[valid] * num_classes + predictions[valid]
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def mean_iou(confusion) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU [num_classes]) of a confusion matrix.

    IoU_c = TP / (TP + FP + FN). A class absent from both truth and prediction has no IoU
    (NaN in the per-class array) and is left out of the mean, as in the PASCAL VOC devkit.
    """
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    present = union > 0
    per_class = np.full(len(confusion), np.nan)
    per_class[present] = true_positive[present] / union[present]
    miou = float(np.mean(per_class[present])) if present.any() else float("nan")
    return miou, per_class


def _confusion_counts(labels, predictions, valid, num_classes: int) -> jax.Array:
    """`confusion_matrix` inside jit: int32 [C, C] over the pixels where `valid`."""
    flat = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = (
        jnp.zeros(num_classes * num_classes, jnp.int32)
        .at[flat.ravel()]
        .add(valid.ravel().astype(jnp.int32))
    )
    return counts.reshape(num_classes, num_classes)


def _valid_pixels(labels, num_classes: int):
    labels = labels.astype(jnp.int32)
    valid = (labels != IGNORE_INDEX) & (labels >= 0) & (labels < num_classes)
    return jnp.where(valid, labels, 0), valid


def pixel_losses(logits, masks):
    """(per-pixel cross-entropy [B, H, W], safe labels, valid pixels)."""
    labels, valid = _valid_pixels(masks, logits.shape[-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses, labels, valid


def make_loss_fn(model: nn.Module):
    """Per-image loss: the mean cross-entropy over the image's valid pixels (train mode).

    With FedIR's `class_weights` (p(y)/q_k(y) from pixel counts) each pixel weighs its class's
    ratio: the image's loss is the weighted mean over its pixels and its example weight the
    mean pixel weight, so the batch objective sum_i e_i l_i / sum_i e_i weighs every pixel by
    its ratio while images still count alike, and equals the plain loss when all ratios are 1.
    """

    def loss_fn(params, model_state, batch, rng, class_weights=None):
        variables = {"params": params, **model_state}
        logits, new_state = model.apply(
            variables, batch["image"], train=True, rngs={"dropout": rng}, mutable=list(model_state)
        )
        losses, labels, valid = pixel_losses(logits, batch["mask"])
        valid = valid.astype(jnp.float32)
        num_valid = jnp.sum(valid, axis=(1, 2))
        weights = valid if class_weights is None else valid * class_weights[labels]
        weight_sums = jnp.sum(weights, axis=(1, 2))
        image_losses = jnp.sum(weights * losses, axis=(1, 2)) / jnp.maximum(weight_sums, 1e-12)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * valid
        accuracy = jnp.sum(correct, axis=(1, 2)) / jnp.maximum(num_valid, 1.0)
        example_weights = None
        if class_weights is not None:
            example_weights = weight_sums / jnp.maximum(num_valid, 1.0)
        return image_losses, LossOutput(
            model_state=dict(new_state),
            metrics={"pixel_accuracy": accuracy},
            example_weights=example_weights,
        )

    return loss_fn


def make_eval_fn(model: nn.Module):
    """A batch's confusion matrix, summed pixel loss and pixel count over real images."""

    @jax.jit
    def eval_fn(params, model_state, batch, mask):
        logits = model.apply({"params": params, **model_state}, batch["image"], train=False)
        losses, labels, valid = pixel_losses(logits, batch["mask"])
        valid = valid & mask[:, None, None]
        predictions = jnp.argmax(logits, -1)
        return {
            "confusion": _confusion_counts(labels, predictions, valid, logits.shape[-1]),
            "loss": jnp.sum(jnp.where(valid, losses, 0.0)),
            "pixels": jnp.sum(valid.astype(jnp.int32)),
        }

    return eval_fn


def finalize(stats: dict) -> dict[str, float]:
    confusion = np.asarray(stats["confusion"])
    miou, _ = mean_iou(confusion)
    pixels = max(int(stats["pixels"]), 1)
    return {
        "miou": miou,
        "pixel_accuracy": float(np.trace(confusion)) / pixels,
        "loss": float(stats["loss"]) / pixels,
    }


def details(stats: dict, class_names: Sequence[str]) -> dict:
    """Per-class IoU (None for a class absent from truth and prediction) and the matrix."""
    confusion = np.asarray(stats["confusion"])
    _, per_class = mean_iou(confusion)
    names = list(class_names) or [str(c) for c in range(len(confusion))]
    return {
        "per_class_iou": {
            name: (None if np.isnan(iou) else float(iou))
            for name, iou in zip(names, per_class, strict=True)
        },
        "confusion": confusion.tolist(),
    }


def check_output(output_shape, input_shape: Sequence[int], field: str) -> None:
    output_shape, input_shape = tuple(output_shape), tuple(input_shape)
    if (
        len(output_shape) != 4
        or not all(isinstance(n, int) for n in output_shape)
        or output_shape[1:3] != input_shape[1:3]
    ):
        raise ValueError(
            f"{field} outputs {output_shape} for images {input_shape}; segmentation needs "
            "per-pixel logits [batch, height, width, classes] at the input size: pick a "
            "segmentation model (deeplabv3plus_*, unet*)"
        )


def plot_predictions(batch, predicted, class_names, title=""):
    """One row an image: the image, the true mask, the predicted mask (its pixel accuracy)."""
    images, truth = batch["image"], batch["mask"]
    num_classes = max(len(class_names), int(np.max(predicted)) + 1)
    panels, captions = [], []
    for image, true_mask, predicted_mask in zip(images, truth, predicted, strict=True):
        true_mask, predicted_mask = np.asarray(true_mask), np.asarray(predicted_mask)
        valid = true_mask != IGNORE_INDEX
        accuracy = float(np.mean(predicted_mask[valid] == true_mask[valid])) if valid.any() else 0
        panels += [
            pictures.displayable(image),
            pictures.colour_mask(true_mask, num_classes),
            pictures.colour_mask(predicted_mask, num_classes),
        ]
        captions += [("image", "black"), ("true", "black")]
        captions.append((f"predicted ({accuracy:.0%} pixels)", "black"))
    return pictures.image_grid(panels, captions, columns=3, title=title)


TASK = Task(
    name="segmentation",
    make_loss_fn=make_loss_fn,
    metric_names=METRIC_NAMES,
    make_eval_fn=make_eval_fn,
    finalize=finalize,
    headline="miou",
    check_output=check_output,
    details=details,
    predict=argmax_predictions,
    plot_predictions=plot_predictions,
)
