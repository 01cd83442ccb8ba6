"""YOLOv5 training targets, loss, decoding and NMS, in fixed shapes so that all of it jit-compiles.

The rules are those of Ultralytics YOLOv5 (Jocher et al., v7.0: `utils/loss.py` ComputeLoss,
`utils/general.py` non_max_suppression, `train.py`'s loss gains), rewritten for fixed shapes:
where YOLOv5 filters a list of (image, box, anchor, cell) candidates, here every candidate of
a fixed grid [batch, boxes, anchors, 3 cells] is computed and a mask says which are real.

Conventions:
- batch: `boxes` float32 [B, M, 4] as normalised (ymin, xmin, ymax, xmax), `box_labels` int32
  [B, M], `box_mask` bool [B, M] (False: a padding box whose values are arbitrary);
- model outputs: a tuple, one array a level, [B, H / stride, W / stride, A, 5 + C] of raw
  (tx, ty, tw, th, objectness, class logits...);
- anchors float [L, A, 2] as (width, height) in input pixels; strides (8, 16, 32).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_cv.tasks import boxes as box_ops

# YOLOv5's default anchors (models/yolov5*.yaml), (width, height) in pixels: P3/8, P4/16, P5/32.
DEFAULT_ANCHORS = np.array(
    [
        [[10, 13], [16, 30], [33, 23]],
        [[30, 61], [62, 45], [59, 119]],
        [[116, 90], [156, 198], [373, 326]],
    ],
    np.float32,
)
DEFAULT_STRIDES = (8, 16, 32)
# Objectness weight of each level, P3 to P5 (ComputeLoss.balance for three levels).
LEVEL_BALANCE = (4.0, 1.0, 0.4)
# A box is also assigned to the neighbouring cell on the side its centre leans to, when it lies
# within this fraction of a cell from that side (build_targets' g).
NEIGHBOUR_BIAS = 0.5
# The placeholder that padding boxes are replaced with, so that their arbitrary values (even
# NaN) never reach an arithmetic operation.
_PLACEHOLDER_BOX = (0.25, 0.25, 0.75, 0.75)


class LevelTargets(NamedTuple):
    """One level's candidates, [B, M, A, 3]: (image, box, anchor, cell), the cells being the
    box centre's cell, its neighbour along x and its neighbour along y."""

    valid: jax.Array  # bool [B, M, A, 3]: a real box matched to this anchor, a cell in the grid
    cell: jax.Array  # int32 [B, M, A, 3, 2]: the cell's (column, row) in the level's grid
    offset: jax.Array  # float32 [B, M, A, 3, 2]: box centre minus the cell's corner, in cells
    wh: jax.Array  # float32 [B, M, A, 3, 2]: the box's (width, height) in pixels
    anchor: jax.Array  # int32 [B, M, A, 3]: the anchor's index in the level
    label: jax.Array  # int32 [B, M, A, 3]: the box's class (0 for padding boxes)


def _grid_sizes(image_hw: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    height, width = (int(v) for v in image_hw)
    for stride in strides:
        if height % stride or width % stride:
            raise ValueError(
                f"image_hw {tuple(image_hw)} is not a multiple of stride {stride}; YOLO needs "
                f"sides divisible by every stride {tuple(strides)}"
            )
    return [(height // stride, width // stride) for stride in strides]


def _real_boxes(boxes, box_mask):
    """(boxes with padding replaced by a placeholder, real: bool [B, M])."""
    boxes = jnp.asarray(boxes, jnp.float32)
    size = boxes[..., 2:] - boxes[..., :2]
    real = jnp.asarray(box_mask, bool) & jnp.all(jnp.isfinite(boxes), -1) & jnp.all(size > 0, -1)
    safe = jnp.where(real[..., None], boxes, jnp.asarray(_PLACEHOLDER_BOX, jnp.float32))
    return safe, real


def _neighbour(grid_coord, grid_size: int, cell):
    """YOLOv5's neighbour rule along one axis: the cell before when the centre lies in the
    first half of its cell (and more than one cell from the edge), the cell after when in the
    second half; (neighbour cell, whether it exists). A centre exactly on a cell border would
    take both neighbours in YOLOv5; here it takes the one before, so that one slot suffices."""
    before = (grid_coord % 1 < NEIGHBOUR_BIAS) & (grid_coord > 1)
    from_end = grid_size - grid_coord
    after = (from_end % 1 < NEIGHBOUR_BIAS) & (from_end > 1) & ~before
    return cell - before.astype(jnp.int32) + after.astype(jnp.int32), before | after


def build_targets(
    boxes,
    box_labels,
    box_mask,
    anchors,
    strides: Sequence[int],
    image_hw: Sequence[int],
    anchor_t: float = 4.0,
) -> tuple[LevelTargets, ...]:
    """YOLOv5's target assignment (ComputeLoss.build_targets) with fixed shapes, one
    `LevelTargets` a level.

    A box matches an anchor of a level when max(r, 1/r) < `anchor_t` for both width and height
    ratios r of box to anchor. A matched box is assigned to the cell of its centre and to up to
    two neighbours (see `_neighbour`), so its centre lies in [-0.5, 1.5] cells from the
    assigned cell's corner: the range the decoding sigmoid(t) * 2 - 0.5 can reach. Neighbour
    cells outside the grid, padding boxes and boxes without area are invalid.
    """
    image_h, image_w = (int(v) for v in image_hw)
    anchors = jnp.asarray(anchors, jnp.float32)
    safe, real = _real_boxes(boxes, box_mask)
    labels = jnp.where(real, jnp.asarray(box_labels, jnp.int32), 0)
    ymin, xmin, ymax, xmax = (safe[..., i] for i in range(4))
    centre_x, centre_y = (xmin + xmax) / 2 * image_w, (ymin + ymax) / 2 * image_h
    box_wh = jnp.stack([(xmax - xmin) * image_w, (ymax - ymin) * image_h], -1)  # [B, M, 2]
    num_anchors = anchors.shape[1]
    candidates_shape = real.shape + (num_anchors, 3)

    targets = []
    for level, (stride, (grid_h, grid_w)) in enumerate(
        zip(strides, _grid_sizes(image_hw, strides), strict=True)
    ):
        ratio = box_wh[:, :, None, :] / anchors[level]  # [B, M, A, 2]
        matched = jnp.max(jnp.maximum(ratio, 1 / ratio), -1) < anchor_t
        matched &= real[..., None]
        grid_x, grid_y = centre_x / stride, centre_y / stride
        cell_x = jnp.clip(jnp.floor(grid_x).astype(jnp.int32), 0, grid_w - 1)
        cell_y = jnp.clip(jnp.floor(grid_y).astype(jnp.int32), 0, grid_h - 1)
        neighbour_x, has_x = _neighbour(grid_x, grid_w, cell_x)
        neighbour_y, has_y = _neighbour(grid_y, grid_h, cell_y)
        cells_x = jnp.stack([cell_x, neighbour_x, cell_x], -1)  # [B, M, 3]
        cells_y = jnp.stack([cell_y, cell_y, neighbour_y], -1)
        has_cell = jnp.stack([jnp.ones_like(has_x), has_x, has_y], -1)
        cell = jnp.stack([cells_x, cells_y], -1)  # [B, M, 3, 2]
        offset = jnp.stack([grid_x[..., None] - cells_x, grid_y[..., None] - cells_y], -1)
        targets.append(
            LevelTargets(
                valid=matched[..., None] & has_cell[:, :, None, :],
                cell=jnp.broadcast_to(cell[:, :, None], candidates_shape + (2,)),
                offset=jnp.broadcast_to(offset[:, :, None], candidates_shape + (2,)),
                wh=jnp.broadcast_to(box_wh[:, :, None, None], candidates_shape + (2,)),
                anchor=jnp.broadcast_to(
                    jnp.arange(num_anchors, dtype=jnp.int32)[:, None], candidates_shape
                ),
                label=jnp.broadcast_to(labels[..., None, None], candidates_shape),
            )
        )
    return tuple(targets)


def _weighted_image_mean(values, weights):
    """Per-image weighted mean over every axis but the first; 0 for an image without weight."""
    axes = tuple(range(1, values.ndim))
    total = jnp.sum(weights, axes)
    return jnp.sum(values * weights, axes) / jnp.where(total > 0, total, 1.0)


def yolo_loss_fn(
    anchors,
    strides: Sequence[int],
    num_classes: int,
    image_hw: Sequence[int],
    *,
    anchor_t: float = 4.0,
    box_gain: float = 0.05,
    obj_gain: float = 1.0,
    cls_gain: float = 0.5,
    level_balance: Sequence[float] | None = None,
):
    """YOLOv5's loss as a per-image loss: `loss(outputs, batch, class_weights=None) ->
    (per_image_loss [B], {"box_loss", "obj_loss", "cls_loss"}: [B] each, example_weights)`.

    Terms (ComputeLoss), for each level l:
    - box: 1 - CIoU(predicted box, target box) over the level's matched candidates;
    - objectness: BCE with logits at every cell and anchor against the CIoU of the candidate
      assigned there (no gradient, clamped at 0; YOLOv5's gr = 1), 0 where none is. When
      several candidates land on one cell and anchor the target is the largest of their
      IoUs: YOLOv5 keeps whichever its scatter writes last, which is not deterministic;
    - class: BCE with logits against the one-hot class (no label smoothing), averaged over the
      classes; none with a single class, as in YOLOv5.
    Gains as Ultralytics train.py scales the hyperparameters: box * 3 / L, class * C / 80 * 3 /
    L, objectness * (imgsz / 640)^2 * 3 / L with imgsz the longer side of `image_hw`.

    Per-image definition. YOLOv5 averages the box and class terms over all matched candidates
    of the batch and the objectness over all cells of the batch, then multiplies by the batch
    size: images are coupled. Here each image is a training example of its own:
        box_b = sum_l mean over image b's matched candidates at level l of (1 - CIoU),
        cls_b = sum_l mean over the same candidates of the class BCE,
        obj_b = sum_l balance_l * mean over image b's cells and anchors at level l of the BCE,
    a mean over an empty set being 0, and
        loss_b = box_gain' * box_b + obj_gain' * obj_b + cls_gain' * cls_b.
    The engine's padding masks and FedIR's weights thus act per image, and for a batch of
    identical images the mean of loss_b equals YOLOv5's batch loss divided by the batch size.
    The metrics are the three gained terms, which add up to the loss.

    FedIR (Hsu et al., 2020): with `class_weights` [C] (p(y) / q_k(y)) each candidate's box and
    class terms are weighted by its box's class ratio (the means above become weighted means);
    objectness is not. `example_weights` [B] is then the mean ratio of the image's real boxes
    (1 for an image without boxes); None without `class_weights`.
    """
    anchors = np.asarray(anchors, np.float32)
    strides = tuple(int(s) for s in strides)
    num_levels = len(strides)
    if anchors.ndim != 3 or anchors.shape[0] != num_levels or anchors.shape[2] != 2:
        raise ValueError(
            f"anchors have shape {anchors.shape}; must be [levels={num_levels}, anchors, 2]"
        )
    grid_sizes = _grid_sizes(image_hw, strides)
    if level_balance is None:
        if num_levels != len(LEVEL_BALANCE):
            raise ValueError(f"level_balance must be given for {num_levels} levels")
        level_balance = LEVEL_BALANCE
    level_balance = tuple(float(b) for b in level_balance)
    image_size = max(int(v) for v in image_hw)
    box_gain = box_gain * 3 / num_levels
    cls_gain = cls_gain * num_classes / 80 * 3 / num_levels
    obj_gain = obj_gain * (image_size / 640) ** 2 * 3 / num_levels
    num_anchors = anchors.shape[1]
    expected = [(gh, gw, num_anchors, 5 + num_classes) for gh, gw in grid_sizes]
    assign = functools.partial(
        build_targets, anchors=anchors, strides=strides, image_hw=image_hw, anchor_t=anchor_t
    )

    def loss_fn(outputs, batch, class_weights=None):
        shapes = [tuple(o.shape[1:]) for o in outputs]
        if shapes != expected:
            raise ValueError(
                f"model outputs per level {shapes} do not fit images {tuple(image_hw)} with "
                f"strides {strides}, {num_anchors} anchors and {num_classes} classes: expected "
                f"{expected}"
            )
        targets = assign(batch["boxes"], batch["box_labels"], batch["box_mask"])
        batch_size = outputs[0].shape[0]
        batch_index = jnp.arange(batch_size)[:, None, None, None]
        box_loss = obj_loss = cls_loss = jnp.zeros(batch_size, jnp.float32)
        for level, (output, target, stride) in enumerate(
            zip(outputs, targets, strides, strict=True)
        ):
            output = output.astype(jnp.float32)
            column, row = target.cell[..., 0], target.cell[..., 1]
            picked = output[batch_index, row, column, target.anchor]  # [B, M, A, 3, 5 + C]
            # Boxes in cells, relative to the assigned cell's corner, as YOLOv5 compares them.
            anchor_cells = jnp.asarray(anchors[level] / stride)[target.anchor]
            predicted_xy = jax.nn.sigmoid(picked[..., :2]) * 2 - 0.5
            predicted_wh = (jax.nn.sigmoid(picked[..., 2:4]) * 2) ** 2 * anchor_cells
            predicted = box_ops.xywh_to_xyxy(jnp.concatenate([predicted_xy, predicted_wh], -1))
            truth = box_ops.xywh_to_xyxy(jnp.concatenate([target.offset, target.wh / stride], -1))
            quality = box_ops.ciou(predicted, truth)  # [B, M, A, 3]

            labels = jnp.clip(target.label, 0, num_classes - 1)
            weights = target.valid.astype(jnp.float32)
            if class_weights is not None:
                weights = weights * jnp.asarray(class_weights, jnp.float32)[labels]
            box_loss += _weighted_image_mean(1.0 - quality, weights)

            objectness_target = jnp.where(
                target.valid, jax.lax.stop_gradient(jnp.maximum(quality, 0.0)), 0.0
            )
            objectness_target = (
                jnp.zeros(output.shape[:4], jnp.float32)
                .at[batch_index, row, column, target.anchor]
                .max(objectness_target)
            )
            objectness_bce = optax.sigmoid_binary_cross_entropy(output[..., 4], objectness_target)
            obj_loss += level_balance[level] * jnp.mean(objectness_bce, axis=(1, 2, 3))

            if num_classes > 1:
                one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
                class_bce = jnp.mean(
                    optax.sigmoid_binary_cross_entropy(picked[..., 5:], one_hot), -1
                )
                cls_loss += _weighted_image_mean(class_bce, weights)

        metrics = {
            "box_loss": box_gain * box_loss,
            "obj_loss": obj_gain * obj_loss,
            "cls_loss": cls_gain * cls_loss,
        }
        per_image_loss = metrics["box_loss"] + metrics["obj_loss"] + metrics["cls_loss"]
        example_weights = None
        if class_weights is not None:
            box_mask = jnp.asarray(batch["box_mask"], bool)
            labels = jnp.clip(jnp.asarray(batch["box_labels"], jnp.int32), 0, num_classes - 1)
            box_weights = jnp.where(box_mask, jnp.asarray(class_weights, jnp.float32)[labels], 0)
            num_boxes = jnp.sum(box_mask, -1)
            example_weights = jnp.where(
                num_boxes > 0, jnp.sum(box_weights, -1) / jnp.maximum(num_boxes, 1), 1.0
            )
        return per_image_loss, metrics, example_weights

    return loss_fn


def decode(outputs, anchors, strides: Sequence[int]):
    """Raw outputs -> (boxes xyxy in input pixels [B, N, 4], objectness [B, N], class
    probabilities [B, N, C]), N = sum over levels of H_l * W_l * A, levels in order and each
    flattened row-major over (row, column, anchor).

    YOLOv5's Detect: centre = (sigmoid(t_xy) * 2 - 0.5 + cell (column, row)) * stride,
    size = (sigmoid(t_wh) * 2)^2 * anchor.
    """
    anchors = jnp.asarray(anchors, jnp.float32)
    all_boxes, all_objectness, all_probs = [], [], []
    for level, (output, stride) in enumerate(zip(outputs, strides, strict=True)):
        output = output.astype(jnp.float32)
        batch_size, grid_h, grid_w, num_anchors, _ = output.shape
        columns, rows = jnp.meshgrid(jnp.arange(grid_w), jnp.arange(grid_h), indexing="xy")
        cells = jnp.stack([columns, rows], -1)[:, :, None, :].astype(jnp.float32)
        centre = (jax.nn.sigmoid(output[..., :2]) * 2 - 0.5 + cells) * stride
        size = (jax.nn.sigmoid(output[..., 2:4]) * 2) ** 2 * anchors[level]
        level_boxes = box_ops.xywh_to_xyxy(jnp.concatenate([centre, size], -1))
        count = grid_h * grid_w * num_anchors
        all_boxes.append(level_boxes.reshape(batch_size, count, 4))
        all_objectness.append(jax.nn.sigmoid(output[..., 4]).reshape(batch_size, count))
        all_probs.append(jax.nn.sigmoid(output[..., 5:]).reshape(batch_size, count, -1))
    return (
        jnp.concatenate(all_boxes, 1),
        jnp.concatenate(all_objectness, 1),
        jnp.concatenate(all_probs, 1),
    )


class Detections(NamedTuple):
    """Fixed-size detections sorted by descending score; slots past the last detection have
    `valid` False, zero boxes and scores and class -1."""

    boxes: jax.Array  # float32 [..., K, 4] xyxy
    scores: jax.Array  # float32 [..., K]
    classes: jax.Array  # int32 [..., K]
    valid: jax.Array  # bool [..., K]


def nms(
    boxes,
    scores,
    classes,
    *,
    iou_threshold: float = 0.45,
    score_threshold: float = 0.001,
    max_detections: int = 300,
    max_candidates: int = 1024,
) -> Detections:
    """Class-aware greedy non-maximum suppression of ONE image's boxes, fixed-size under jit
    (vmap it over a batch).

    boxes [N, 4] xyxy, scores [N], classes int [N]. The `max_candidates` highest scores above
    `score_threshold` are the candidates (YOLOv5 takes up to 30000; the quadratic IoU matrix
    here asks for fewer); in descending score order a candidate is kept unless its IoU with a
    kept candidate of the same class exceeds `iou_threshold`; the first `max_detections` kept
    ones are returned.

    The greedy pass is solved as a fixed point: keep_i = candidate_i and no kept j < i
    suppresses i. Iterating from keep = candidate fixes one more entry each pass at least, and
    the iteration stops when nothing changes, usually after a few passes (the longest chain
    of suppressions), rather than looping over every candidate.
    """
    num_boxes = scores.shape[0]
    num_candidates = min(int(max_candidates), num_boxes)
    top_scores, order = jax.lax.top_k(scores, num_candidates)
    candidate_boxes = boxes[order]
    candidate_classes = jnp.asarray(classes, jnp.int32)[order]
    candidate = top_scores > score_threshold
    earlier = jnp.arange(num_candidates)[:, None] < jnp.arange(num_candidates)[None, :]
    # suppresses[j, i]: candidate j, if kept, suppresses the lower-scored candidate i.
    suppresses = (
        (box_ops.pairwise_iou(candidate_boxes, candidate_boxes) > iou_threshold)
        & (candidate_classes[:, None] == candidate_classes[None, :])
        & earlier
    )

    def greedy_pass(state):
        keep, _, passes = state
        new_keep = candidate & ~jnp.any(keep[:, None] & suppresses, axis=0)
        return new_keep, jnp.any(new_keep != keep), passes + 1

    def changing(state):
        # num_candidates + 1 passes always suffice; the bound only guards against a bug.
        return state[1] & (state[2] <= num_candidates)

    keep, _, _ = jax.lax.while_loop(
        changing, greedy_pass, (candidate, jnp.asarray(True), jnp.asarray(0, jnp.int32))
    )

    size = max(int(max_detections), num_candidates)
    pad = size - num_candidates
    keep = jnp.pad(keep, (0, pad))
    top_scores = jnp.pad(top_scores, (0, pad))
    candidate_boxes = jnp.pad(candidate_boxes, ((0, pad), (0, 0)))
    candidate_classes = jnp.pad(candidate_classes, (0, pad))
    # Kept candidates first, each group still in descending score order.
    ranked = jnp.argsort(~keep, stable=True)[: int(max_detections)]
    valid = keep[ranked]
    return Detections(
        boxes=jnp.where(valid[:, None], candidate_boxes[ranked], 0.0),
        scores=jnp.where(valid, top_scores[ranked], 0.0),
        classes=jnp.where(valid, candidate_classes[ranked], -1),
        valid=valid,
    )


def detect(outputs, anchors, strides: Sequence[int], **nms_kwargs) -> Detections:
    """Raw outputs of a batch -> its `Detections` [B, K, ...], all on the device.

    Each box's score is objectness * the probability of its best class, and its class that
    best class: YOLOv5's `multi_label=False` (its detect.py; its val.py lets one box enter NMS
    once per class above the threshold, which finds slightly more). `nms_kwargs` go to `nms`.
    """
    boxes, objectness, class_probs = decode(outputs, anchors, strides)
    class_scores = objectness[..., None] * class_probs
    scores = jnp.max(class_scores, -1)
    classes = jnp.argmax(class_scores, -1).astype(jnp.int32)
    return jax.vmap(functools.partial(nms, **nms_kwargs))(boxes, scores, classes)


__all__ = [
    "DEFAULT_ANCHORS",
    "DEFAULT_STRIDES",
    "Detections",
    "LEVEL_BALANCE",
    "LevelTargets",
    "build_targets",
    "decode",
    "detect",
    "nms",
    "yolo_loss_fn",
]
