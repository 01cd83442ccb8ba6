"""Box geometry for detection: format conversions, IoU and CIoU (the letterbox lives with the
input pipeline: `fedjax_cv.data.augment.letterbox_example` and `original_boxes`).

Formats:
- yxyx normalised: (ymin, xmin, ymax, xmax) in [0, 1] by the image height and width, the
  data pipeline's format (`fedjax_cv.data.augment`);
- xyxy pixels: (x1, y1, x2, y2) in pixels, the format of detections and of COCO evaluation;
- xywh: (x centre, y centre, width, height), in whatever unit the caller works in.

Every function takes numpy or JAX arrays and returns the same kind (JAX when any input is a JAX
array or a tracer), so the host-side input pipeline and jit-compiled code share one geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-7  # YOLOv5's eps in bbox_iou / box_iou


def _array_module(*values):
    """jax.numpy when any value is a JAX array (or tracer), numpy otherwise."""
    return jnp if any(isinstance(v, jax.Array) for v in values) else np


def yxyx_to_xyxy_pixels(boxes, image_hw: Sequence[int]):
    """Normalised (ymin, xmin, ymax, xmax) -> (x1, y1, x2, y2) in pixels of an image of size
    `image_hw` (height, width)."""
    xp = _array_module(boxes)
    height, width = image_hw
    ymin, xmin, ymax, xmax = (boxes[..., i] for i in range(4))
    return xp.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=-1)


def xyxy_pixels_to_yxyx(boxes, image_hw: Sequence[int]):
    """(x1, y1, x2, y2) in pixels -> normalised (ymin, xmin, ymax, xmax); the inverse of
    `yxyx_to_xyxy_pixels`."""
    xp = _array_module(boxes)
    height, width = image_hw
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    return xp.stack([y1 / height, x1 / width, y2 / height, x2 / width], axis=-1)


def xywh_to_xyxy(boxes):
    """(x centre, y centre, width, height) -> (x1, y1, x2, y2)."""
    xp = _array_module(boxes)
    centre, size = boxes[..., :2], boxes[..., 2:4]
    return xp.concatenate([centre - size / 2, centre + size / 2], axis=-1)


def xyxy_to_xywh(boxes):
    """(x1, y1, x2, y2) -> (x centre, y centre, width, height)."""
    xp = _array_module(boxes)
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:4]
    return xp.concatenate([(top_left + bottom_right) / 2, bottom_right - top_left], axis=-1)


def pairwise_iou(boxes_a, boxes_b, eps: float = EPS):
    """IoU [N, M] of every xyxy box of `boxes_a` [N, 4] with every one of `boxes_b` [M, 4].

    `eps` in the denominator (YOLOv5's box_iou) makes two empty boxes overlap by 0, not NaN.
    """
    xp = _array_module(boxes_a, boxes_b)
    a, b = boxes_a[:, None, :], boxes_b[None, :, :]
    overlap = xp.maximum(xp.minimum(a[..., 2:], b[..., 2:]) - xp.maximum(a[..., :2], b[..., :2]), 0)
    intersection = overlap[..., 0] * overlap[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return intersection / (area_a + area_b - intersection + eps)


def ciou(boxes_a, boxes_b, eps: float = EPS):
    """Complete IoU of Zheng et al., "Distance-IoU Loss" (AAAI 2020), elementwise over xyxy
    boxes [..., 4] -> [...], with YOLOv5's constants (bbox_iou with CIoU=True):

        CIoU = IoU - rho^2 / c^2 - alpha * v,
        v = 4 / pi^2 * (atan(w_b / h_b) - atan(w_a / h_a))^2,  alpha = v / (v - IoU + 1 + eps),

    rho the distance between the centres, c the diagonal of the smallest enclosing box, heights
    clamped at `eps`, `eps` added to the union and to c^2. As in the paper, alpha is a
    trade-off weight and gets no gradient (only under JAX; numpy has no gradients). Symmetric
    in its arguments; 1 for identical boxes, in (-1, 1] otherwise.
    """
    xp = _array_module(boxes_a, boxes_b)
    ax1, ay1, ax2, ay2 = (boxes_a[..., i] for i in range(4))
    bx1, by1, bx2, by2 = (boxes_b[..., i] for i in range(4))
    width_a, height_a = ax2 - ax1, xp.maximum(ay2 - ay1, eps)
    width_b, height_b = bx2 - bx1, xp.maximum(by2 - by1, eps)
    intersection = xp.maximum(xp.minimum(ax2, bx2) - xp.maximum(ax1, bx1), 0) * xp.maximum(
        xp.minimum(ay2, by2) - xp.maximum(ay1, by1), 0
    )
    union = width_a * height_a + width_b * height_b - intersection + eps
    iou = intersection / union
    enclosing_width = xp.maximum(ax2, bx2) - xp.minimum(ax1, bx1)
    enclosing_height = xp.maximum(ay2, by2) - xp.minimum(ay1, by1)
    diagonal_sq = enclosing_width**2 + enclosing_height**2 + eps
    centre_distance_sq = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4
    v = (4 / math.pi**2) * (xp.arctan(width_b / height_b) - xp.arctan(width_a / height_a)) ** 2
    alpha = v / (v - iou + (1 + eps))
    if xp is jnp:
        alpha = jax.lax.stop_gradient(alpha)
    return iou - (centre_distance_sq / diagonal_sq + v * alpha)


__all__ = [
    "EPS",
    "ciou",
    "pairwise_iou",
    "xywh_to_xyxy",
    "xyxy_pixels_to_yxyx",
    "xyxy_to_xywh",
    "yxyx_to_xyxy_pixels",
]
