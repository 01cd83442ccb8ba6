"""Object detection: YOLOv5's loss per image, detections under jit, COCO mAP on the host.

Batches hold `image` [B, H, W, C] (letterboxed to a multiple of 32), `boxes` [B, M, 4] as
normalised (ymin, xmin, ymax, xmax), `box_labels` [B, M] and `box_mask` [B, M] (False: a padding
box). The model is a detector of the zoo (`yolov5*`, `yolov3`: raw maps at strides 8/16/32 and
its anchors, see `fedjax_cv.models.yolo`).

Evaluation keeps every test image's detections (fixed-size NMS output on the device, at most
`MAX_DETECTIONS` an image) and its true boxes on the host, and `finalize` computes mAP over the
whole test split by COCO's rules (`coco_map`): unlike a confusion matrix, precision-recall
curves do not add up over batches, so `merge` concatenates where the other tasks add. Boxes are
compared in the pixels of the letterboxed input: a letterbox scales both axes alike and
shifts, which leaves every IoU as it is in the original image.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_cv.algorithms.base import LossOutput
from fedjax_cv.models.yolo import DETECTORS, detection_geometry
from fedjax_cv.tasks import Task, pictures, yolo
from fedjax_cv.tasks import boxes as box_ops
from fedjax_cv.tasks.coco_eval import coco_map

METRIC_NAMES = ("box_loss", "obj_loss", "cls_loss")
MAX_DETECTIONS = 100  # an image, after NMS (COCO's maxDets)
# Evaluation NMS as YOLOv5's val.py: every box above a low score enters, IoU 0.6.
EVAL_NMS = {"score_threshold": 0.001, "iou_threshold": 0.6, "max_detections": MAX_DETECTIONS}
# Pictures show what a user would keep: scores of at least 0.25 (YOLOv5's detect.py).
PICTURE_SCORE = 0.25


def _loss_terms(model: nn.Module, image_hw: Sequence[int]):
    anchors, strides = detection_geometry(model)
    return yolo.yolo_loss_fn(anchors, strides, model.num_classes, tuple(image_hw))


def make_loss_fn(model: nn.Module):
    """YOLOv5's loss as a per-image loss (train mode; see `yolo.yolo_loss_fn`): box 1 - CIoU,
    objectness BCE against the IoU, class BCE. FedIR's `class_weights` weigh each box by its
    class's ratio, and the image by the mean ratio of its boxes."""
    detection_geometry(model)  # a classifier here fails now, in one line

    def loss_fn(params, model_state, batch, rng, class_weights=None):
        variables = {"params": params, **model_state}
        outputs, new_state = model.apply(
            variables, batch["image"], train=True, rngs={"dropout": rng}, mutable=list(model_state)
        )
        terms = _loss_terms(model, batch["image"].shape[1:3])
        losses, metrics, example_weights = terms(outputs, batch, class_weights)
        return losses, LossOutput(
            model_state=dict(new_state), metrics=metrics, example_weights=example_weights
        )

    return loss_fn


def _detector(model: nn.Module, nms: dict):
    anchors, strides = detection_geometry(model)

    def run(params, model_state, images):
        outputs = model.apply({"params": params, **model_state}, images, train=False)
        return outputs, yolo.detect(outputs, anchors, strides, **nms)

    return run


def make_eval_fn(model: nn.Module):
    """A batch's summed loss and image count, and each image's detections and true boxes in
    input pixels (padded images carry `image_mask` False and are dropped by `merge`)."""
    run = _detector(model, EVAL_NMS)

    @jax.jit
    def eval_fn(params, model_state, batch, mask):
        outputs, detections = run(params, model_state, batch["image"])
        image_hw = batch["image"].shape[1:3]
        losses, _, _ = _loss_terms(model, image_hw)(outputs, batch)
        return {
            "loss": jnp.sum(jnp.where(mask, losses, 0.0)),
            "images": jnp.sum(mask.astype(jnp.int32)),
            "detections": detections._asdict(),
            "true_boxes": box_ops.yxyx_to_xyxy_pixels(batch["boxes"], image_hw),
            "true_classes": batch["box_labels"],
            "true_mask": batch["box_mask"],
            "image_mask": mask,
        }

    return eval_fn


def merge(total: dict | None, stats: dict) -> dict:
    """Adds the loss and image count; appends each real image's detections and truth."""
    stats = jax.device_get(stats)
    total = total or {"loss": 0.0, "images": 0, "predictions": [], "ground_truths": []}
    detections = stats["detections"]
    for i in np.flatnonzero(stats["image_mask"]):
        valid = detections["valid"][i]
        total["predictions"].append(
            {
                "boxes": np.asarray(detections["boxes"][i][valid], np.float64),
                "scores": np.asarray(detections["scores"][i][valid], np.float64),
                "classes": np.asarray(detections["classes"][i][valid], np.int64),
            }
        )
        real = stats["true_mask"][i]
        total["ground_truths"].append(
            {
                "boxes": np.asarray(stats["true_boxes"][i][real], np.float64),
                "classes": np.asarray(stats["true_classes"][i][real], np.int64),
            }
        )
    return {
        **total,
        "loss": total["loss"] + float(stats["loss"]),
        "images": total["images"] + int(stats["images"]),
    }


def _coco(stats: dict) -> dict:
    if "coco" not in stats:  # finalize and details share one computation
        stats["coco"] = coco_map(stats["predictions"], stats["ground_truths"])
    return stats["coco"]


def finalize(stats: dict) -> dict[str, float]:
    result = _coco(stats)
    return {
        "map50": float(np.nan_to_num(result["map50"])),
        "map50_95": float(np.nan_to_num(result["map50_95"])),
        "loss": stats["loss"] / max(stats["images"], 1),
    }


def details(stats: dict, class_names: Sequence[str]) -> dict:
    """Per-class AP@0.5 and AP@0.5:0.95 (None for a class without test boxes), counts."""
    result = _coco(stats)
    ap50, ap50_95 = result["per_class_ap50"], result["per_class_ap50_95"]
    names = list(class_names) or [str(c) for c in range(len(ap50))]

    def per_class(values):
        return {
            name: (None if c >= len(values) or np.isnan(values[c]) else float(values[c]))
            for c, name in enumerate(names)
        }

    return {
        "per_class_ap50": per_class(ap50),
        "per_class_ap50_95": per_class(ap50_95),
        "num_images": int(result["num_images"]),
        "num_detections": int(result["num_detections"]),
        "num_ground_truths": int(result["num_ground_truths"]),
    }


def check_output(output_shapes, input_shape: Sequence[int], field: str) -> None:
    shapes = output_shapes if isinstance(output_shapes, list | tuple) else None
    fits = (
        shapes is not None
        and len(shapes) > 0
        and all(isinstance(s, tuple) and len(s) == 5 for s in shapes)
    )
    if not fits:
        raise ValueError(
            f"{field} outputs {output_shapes} for images {tuple(input_shape)}; detection needs "
            "per-level maps [batch, height, width, anchors, 5 + classes]: pick a detection "
            f"model ({', '.join(DETECTORS)})"
        )


def predict(model: nn.Module):
    """`(params, model_state, images) -> Detections` for pictures (NMS IoU 0.45, as detect.py)."""
    run = _detector(model, {"max_detections": MAX_DETECTIONS})
    return jax.jit(lambda params, model_state, images: run(params, model_state, images)[1])


def plot_predictions(batch, predicted, class_names, title=""):
    """Two panels an image: the detections scoring at least `PICTURE_SCORE` with their class
    and score, and the true boxes."""
    images = batch["image"]
    image_hw = np.asarray(images).shape[1:3]
    true_boxes = box_ops.yxyx_to_xyxy_pixels(np.asarray(batch["boxes"]), image_hw)
    colours = pictures.palette(max(len(class_names), 1) + 1)[1:]
    name = lambda c: class_names[c] if 0 <= c < len(class_names) else str(c)
    panels, captions, annotations = [], [], []
    for i, image in enumerate(images):
        real = np.asarray(batch["box_mask"][i], bool)
        labels = np.asarray(batch["box_labels"][i])[real]
        truth = [
            (box, colours[c % len(colours)], name(c))
            for box, c in zip(true_boxes[i][real], labels, strict=True)
        ]
        shown = np.asarray(predicted.valid[i]) & (np.asarray(predicted.scores[i]) >= PICTURE_SCORE)
        found = [
            (box, colours[c % len(colours)], f"{name(c)} {score:.2f}")
            for box, c, score in zip(
                np.asarray(predicted.boxes[i])[shown],
                np.asarray(predicted.classes[i])[shown],
                np.asarray(predicted.scores[i])[shown],
                strict=True,
            )
        ]
        panels += [pictures.displayable(image)] * 2
        captions += [(f"predicted ({len(found)})", "black"), (f"true ({len(truth)})", "black")]
        annotations += [found, truth]
    return pictures.image_grid(
        panels, captions, columns=min(8, len(panels)), title=title, boxes=annotations
    )


TASK = Task(
    name="detection",
    make_loss_fn=make_loss_fn,
    metric_names=METRIC_NAMES,
    make_eval_fn=make_eval_fn,
    finalize=finalize,
    headline="map50",
    check_output=check_output,
    details=details,
    predict=predict,
    plot_predictions=plot_predictions,
    merge=merge,
)

__all__ = ["TASK", "coco_map", "make_eval_fn", "make_loss_fn", "merge"]
