"""YOLOv5 box geometry, targets, loss, decoding and NMS (fedjax_cv.tasks.boxes, .yolo).

Golden values are worked out by hand in the comments or come from plain numpy written here
(a loop IoU, a greedy NMS), never from the code under test; the loss is checked through
equalities of two paths (padding vs none, weights of one vs none, box order) and a prediction
built by hand to be perfect.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_cv.tasks import boxes as box_ops
from fedjax_cv.tasks import yolo
from tests.xla import jit

IMAGE_HW = (64, 64)
STRIDES = (8, 16, 32)
NUM_CLASSES = 3
GRIDS = ((8, 8), (4, 4), (2, 2))  # 64 / stride

# --------------------------------------------------------------------------- geometry


def hand_ciou(a, b, eps=1e-7):
    """CIoU written out from the paper's definition for two xyxy boxes."""
    wa, ha = a[2] - a[0], a[3] - a[1]
    wb, hb = b[2] - b[0], b[3] - b[1]
    inter_w = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    inter_h = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    inter = inter_w * inter_h
    iou = inter / (wa * ha + wb * hb - inter + eps)
    enclosing_sq = (max(a[2], b[2]) - min(a[0], b[0])) ** 2
    enclosing_sq += (max(a[3], b[3]) - min(a[1], b[1])) ** 2
    centre_sq = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2
    centre_sq += ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2
    v = 4 / math.pi**2 * (math.atan(wb / hb) - math.atan(wa / ha)) ** 2
    alpha = v / (v - iou + 1 + eps)
    return iou - centre_sq / (enclosing_sq + eps) - alpha * v


CIOU_CASES = {
    # inter 2x2 = 4, union 16 + 24 - 4 = 36, IoU 1/9; enclosing 6x8 -> c^2 = 100; centres
    # (2, 2), (4, 5) -> rho^2 = 13; v = 4/pi^2 (atan(4/6) - atan(1))^2.
    "partial": ((0, 0, 4, 4), (2, 2, 6, 8), 1 / 9 - 13 / 100, math.atan(4 / 6) - math.pi / 4),
    # IoU 0; enclosing 7x3 -> c^2 = 58; centres (1, 1), (5.5, 2) -> rho^2 = 21.25.
    "disjoint": ((0, 0, 2, 2), (4, 1, 7, 3), -21.25 / 58, math.atan(3 / 2) - math.pi / 4),
    # b inside a: IoU 8 / 100; enclosing = a, c^2 = 200; centres (5, 5), (4, 4) -> rho^2 = 2.
    "nested": ((0, 0, 10, 10), (2, 3, 6, 5), 0.08 - 2 / 200, math.atan(4 / 2) - math.pi / 4),
    "identical": ((1, 2, 5, 9), (1, 2, 5, 9), 1.0, 0.0),
}


@pytest.mark.parametrize("case", sorted(CIOU_CASES))
def test_ciou_equals_hand_computed_values(case):
    a, b, distance_iou, atan_gap = CIOU_CASES[case]
    v = 4 / math.pi**2 * atan_gap**2
    iou = {"partial": 1 / 9, "disjoint": 0.0, "nested": 0.08, "identical": 1.0}[case]
    expected = distance_iou - (v * v / (v - iou + 1) if v else 0.0)
    assert hand_ciou(a, b) == pytest.approx(expected, abs=1e-6)
    got_numpy = box_ops.ciou(np.asarray(a, np.float64), np.asarray(b, np.float64))
    got_jax = box_ops.ciou(jnp.asarray([a], jnp.float32), jnp.asarray([b], jnp.float32))
    assert float(got_numpy) == pytest.approx(expected, abs=1e-6)
    assert float(got_jax[0]) == pytest.approx(expected, abs=1e-5)
    assert float(box_ops.ciou(np.asarray(b, float), np.asarray(a, float))) == pytest.approx(
        expected, abs=1e-6
    )


def test_pairwise_iou_equals_a_numpy_loop():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 20, size=(2, 9, 2))
    sizes = rng.uniform(1, 15, size=(2, 9, 2))
    a, b = (np.concatenate([c, c + s], -1) for c, s in zip(corners, sizes, strict=True))
    b[0] = a[3]  # one exact match
    expected = np.zeros((9, 9))
    for i in range(9):
        for j in range(9):
            inter_w = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            inter_h = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            area_a = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1])
            area_b = (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1])
            expected[i, j] = inter_w * inter_h / (area_a + area_b - inter_w * inter_h)
    assert expected[3, 0] == pytest.approx(1.0) and (expected == 0).any()
    np.testing.assert_allclose(box_ops.pairwise_iou(a, b), expected, atol=1e-7)
    got = jit(box_ops.pairwise_iou)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_box_format_conversions():
    yxyx = np.array([[0.25, 0.5, 0.75, 1.0]], np.float32)
    xyxy = box_ops.yxyx_to_xyxy_pixels(yxyx, (40, 80))
    np.testing.assert_allclose(xyxy, [[40, 10, 80, 30]])
    np.testing.assert_allclose(box_ops.xyxy_pixels_to_yxyx(jnp.asarray(xyxy), (40, 80)), yxyx)
    xywh = box_ops.xyxy_to_xywh(xyxy)
    np.testing.assert_allclose(xywh, [[60, 20, 40, 20]])
    np.testing.assert_allclose(box_ops.xywh_to_xyxy(jnp.asarray(xywh)), xyxy)


# --------------------------------------------------------------------------- targets

# Box A: centre (18, 46) px, 24x20 px -> yxyx (36, 6, 56, 30) / 64. Box B: centre (46, 20),
# 36x36 -> yxyx (2, 28, 38, 64) / 64. Box C: centre (3, 5), 6x8 -> yxyx (1, 0, 9, 6) / 64.
# All exactly representable in float32.
BOX_A = (36 / 64, 6 / 64, 56 / 64, 30 / 64)
BOX_B = (2 / 64, 28 / 64, 38 / 64, 64 / 64)
BOX_C = (1 / 64, 0.0, 9 / 64, 6 / 64)

# Worked by hand. A cell is (column, row); k = 0 the centre's cell, 1 its x neighbour, 2 its
# y neighbour; offsets = centre in cells minus the cell's corner. YOLOv5's neighbour rule:
# before when frac(g) < 0.5 and g > 1, after when frac(G - g) < 0.5 and G - g > 1.
#
# Box A, wh (24, 20):
#  level 0 (stride 8, grid 8): g = (2.25, 5.75). x: frac .25 -> left neighbour 1. y: frac
#   .75, 8 - 5.75 = 2.25 -> bottom neighbour 6. Anchors (10,13): max(2.4, 1.54) = 2.4 < 4;
#   (16,30): 1.5; (33,23): 1.375: all three match.
#  level 1 (stride 16, grid 4): g = (1.125, 2.875). left neighbour 0; 4 - 2.875 = 1.125 ->
#   bottom neighbour 3. Anchors (30,61): 61/20 = 3.05 < 4 match; (62,45): 62/24 = 2.58
#   match; (59,119): 119/20 = 5.95 no.
#  level 2 (stride 32): anchors (116,90): 116/24 = 4.8; the others larger: no match.
# Box B, wh (36, 36):
#  level 0: g = (5.75, 2.5). x: frac .75, 8 - 5.75 = 2.25 -> right neighbour 6. y: frac
#   exactly .5 -> neither neighbour. Anchors: 36/10 = 3.6, 36/16 = 2.25, 36/23 = 1.57: all.
#  level 1: g = (2.875, 1.25). right neighbour 3 (4 - 2.875 = 1.125); y frac .25, g > 1 ->
#   top neighbour 0. Anchors: 61/36 = 1.69, 62/36 = 1.72, 119/36 = 3.31: all.
#  level 2 (grid 2): g = (1.4375, 0.625). x frac .4375, g > 1 -> left neighbour 0. y frac
#   .625; 2 - .625 = 1.375, frac .375 -> bottom neighbour 1. Anchors: 116/36 = 3.22 match;
#   156/36 = 4.33 and 373/36 no.
# Box C, wh (6, 8):
#  level 0: g = (0.375, 0.625). x: frac .375 < .5 but g <= 1: the cell before would be -1,
#   outside the grid, so none; 8 - .375 = 7.625, frac .625: no cell after. y: frac .625;
#   8 - .625 = 7.375, frac .375 -> bottom neighbour 1. Anchors (10,13): 1.67, 1.63 match;
#   (16,30): 30/8 = 3.75 match; (33,23): 33/6 = 5.5 no.
#  levels 1 and 2: 30/6 = 5 and larger: no match.
# (level, box, anchors, k, cell, offset)
EXPECTED_CANDIDATES = [
    (0, 0, (0, 1, 2), 0, (2, 5), (0.25, 0.75)),
    (0, 0, (0, 1, 2), 1, (1, 5), (1.25, 0.75)),
    (0, 0, (0, 1, 2), 2, (2, 6), (0.25, -0.25)),
    (1, 0, (0, 1), 0, (1, 2), (0.125, 0.875)),
    (1, 0, (0, 1), 1, (0, 2), (1.125, 0.875)),
    (1, 0, (0, 1), 2, (1, 3), (0.125, -0.125)),
    (0, 1, (0, 1, 2), 0, (5, 2), (0.75, 0.5)),
    (0, 1, (0, 1, 2), 1, (6, 2), (-0.25, 0.5)),
    (1, 1, (0, 1, 2), 0, (2, 1), (0.875, 0.25)),
    (1, 1, (0, 1, 2), 1, (3, 1), (-0.125, 0.25)),
    (1, 1, (0, 1, 2), 2, (2, 0), (0.875, 1.25)),
    (2, 1, (0,), 0, (1, 0), (0.4375, 0.625)),
    (2, 1, (0,), 1, (0, 0), (1.4375, 0.625)),
    (2, 1, (0,), 2, (1, 1), (0.4375, -0.375)),
    (0, 2, (0, 1), 0, (0, 0), (0.375, 0.625)),
    (0, 2, (0, 1), 2, (0, 1), (0.375, -0.375)),
]
BOX_WH = ((24.0, 20.0), (36.0, 36.0), (6.0, 8.0))


def test_build_targets_equals_the_hand_worked_example():
    # Image 0: A, B, C and a padding box of garbage; image 1: nothing but padding.
    garbage = (np.nan, -3.0, 1e9, 0.5)
    boxes = np.array([[BOX_A, BOX_B, BOX_C, garbage], [garbage, BOX_A, BOX_B, BOX_C]])
    labels = np.array([[2, 1, 0, 77], [-4, 0, 1, 2]], np.int32)
    mask = np.array([[True, True, True, False], [False] * 4])
    targets = jit(
        lambda b, c, m: yolo.build_targets(b, c, m, yolo.DEFAULT_ANCHORS, STRIDES, IMAGE_HW)
    )(boxes.astype(np.float32), labels, mask)
    expected_valid = [np.zeros((2, 4, 3, 3), bool) for _ in STRIDES]
    for level, box, anchors, k, cell, offset in EXPECTED_CANDIDATES:
        target = targets[level]
        for anchor in anchors:
            expected_valid[level][0, box, anchor, k] = True
            where = (level, box, anchor, k)
            assert tuple(np.asarray(target.cell[0, box, anchor, k])) == cell, where
            np.testing.assert_allclose(target.offset[0, box, anchor, k], offset, err_msg=where)
            np.testing.assert_allclose(target.wh[0, box, anchor, k], BOX_WH[box], rtol=1e-6)
            assert int(target.anchor[0, box, anchor, k]) == anchor
            assert int(target.label[0, box, anchor, k]) == labels[0, box]
    for level, target in enumerate(targets):
        np.testing.assert_array_equal(target.valid, expected_valid[level], err_msg=str(level))
        # Every cell, valid or not, lies in the grid (a safe index for gathers).
        grid_h, grid_w = GRIDS[level]
        assert np.all((target.cell >= 0) & (target.cell < np.array([grid_w, grid_h])))


# --------------------------------------------------------------------------- decode and NMS


def test_decode_of_a_hand_built_output():
    # Level 1 (stride 16), cell column 2 row 1, anchor 1 = (62, 45) px:
    # tx = 0 -> sigmoid .5 -> x = (2 * .5 - .5 + 2) * 16 = 40;
    # ty = ln 3 -> sigmoid .75 -> y = (1.5 - .5 + 1) * 16 = 32;
    # tw = 0 -> (2 * .5)^2 * 62 = 62; th = -ln 3 -> sigmoid .25 -> (2 * .25)^2 * 45 = 11.25;
    # xyxy = (40 - 31, 32 - 5.625, 40 + 31, 32 + 5.625). Objectness logit ln 4 -> 0.8.
    outputs = [np.zeros((1, h, w, 3, 5 + NUM_CLASSES), np.float32) for h, w in GRIDS]
    outputs[1][0, 1, 2, 1, :5] = [0.0, math.log(3), 0.0, -math.log(3), math.log(4)]
    outputs[1][0, 1, 2, 1, 5:] = [-math.log(3), 0.0, math.log(9)]  # .25, .5, .9
    boxes, objectness, probs = jit(lambda o: yolo.decode(o, yolo.DEFAULT_ANCHORS, STRIDES))(outputs)
    assert boxes.shape == (1, 8 * 8 * 3 + 4 * 4 * 3 + 2 * 2 * 3, 4)
    index = 8 * 8 * 3 + (1 * 4 + 2) * 3 + 1  # level 0 first, then row-major (row, col, anchor)
    np.testing.assert_allclose(boxes[0, index], [9, 26.375, 71, 37.625], rtol=1e-6)
    assert float(objectness[0, index]) == pytest.approx(0.8)
    np.testing.assert_allclose(probs[0, index], [0.25, 0.5, 0.9], rtol=1e-6)
    # All-zero logits elsewhere: level 0, column 0, row 0, anchor 2 = (33, 23) at (4, 4).
    np.testing.assert_allclose(boxes[0, 2], [4 - 16.5, 4 - 11.5, 4 + 16.5, 4 + 11.5])
    assert float(objectness[0, 2]) == 0.5


def numpy_greedy_nms(
    boxes, scores, classes, iou_threshold, *, score_threshold, max_detections, max_candidates
):
    """Sort, keep the top `max_candidates`, drop those at or under the score threshold, then
    keep a box unless a kept box of its class overlaps it by more than the IoU threshold."""
    order = np.argsort(-scores, kind="stable")[:max_candidates]
    order = order[scores[order] > score_threshold]
    kept = []
    for i in order:
        suppressed = False
        for j in kept:
            inter_w = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            inter_h = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = inter_w * inter_h
            area_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            area_j = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
            iou = inter / (area_i + area_j - inter)
            suppressed |= classes[i] == classes[j] and iou > iou_threshold
        if not suppressed:
            kept.append(i)
    return kept[:max_detections]


@pytest.mark.parametrize(
    "iou_threshold,score_threshold,max_detections,max_candidates,binding",
    [
        (0.45, 0.2, 12, 60, "max_detections"),
        (0.3, 0.6, 100, 60, "score_threshold"),  # also more slots than candidates
        (0.6, 0.0, 5, 80, "max_detections"),
        (0.25, 0.0, 100, 20, "max_candidates"),
    ],
)
def test_nms_equals_numpy_greedy(
    iou_threshold, score_threshold, max_detections, max_candidates, binding
):
    rng = np.random.default_rng(1)
    num_images, num_boxes = 2, 80
    # Crowded boxes in a 64-pixel image so that many overlap; ties-free scores.
    corners = rng.uniform(0, 40, size=(num_images, num_boxes, 2))
    sizes = rng.uniform(6, 24, size=(num_images, num_boxes, 2))
    boxes = np.concatenate([corners, corners + sizes], -1).astype(np.float32)
    scores = rng.permutation(num_images * num_boxes).reshape(num_images, num_boxes)
    scores = ((scores + 1) / (num_images * num_boxes + 1)).astype(np.float32)
    classes = rng.integers(0, 3, size=(num_images, num_boxes)).astype(np.int32)

    limits = {
        "score_threshold": score_threshold,
        "max_detections": max_detections,
        "max_candidates": max_candidates,
    }
    run = jit(jax.vmap(functools.partial(yolo.nms, iou_threshold=iou_threshold, **limits)))
    got = run(boxes, scores, classes)
    assert got.boxes.shape == (num_images, max_detections, 4)
    unlimited = {"score_threshold": -1.0, "max_detections": 999, "max_candidates": 999}
    suppressed = []
    for image in range(num_images):
        reference = functools.partial(
            numpy_greedy_nms,
            boxes[image].astype(np.float64),
            scores[image],
            classes[image],
            iou_threshold,
        )
        kept = reference(**limits)
        count = len(kept)
        assert 0 < count, "the case must keep something"
        np.testing.assert_array_equal(got.valid[image], np.arange(max_detections) < count)
        np.testing.assert_array_equal(got.boxes[image, :count], boxes[image, kept])
        np.testing.assert_array_equal(got.scores[image, :count], scores[image, kept])
        np.testing.assert_array_equal(got.classes[image, :count], classes[image, kept])
        assert np.all(got.classes[image, count:] == -1) and np.all(got.scores[image, count:] == 0)
        # The case exercises what it claims: without its binding limit the result differs.
        assert reference(**{**limits, binding: unlimited[binding]}) != kept
        num_candidates = min(max_candidates, np.sum(scores[image] > score_threshold))
        suppressed.append(len(reference(**{**limits, "max_detections": 999})) < num_candidates)
    assert any(suppressed), "suppression must remove boxes"


def test_detect_keeps_the_best_class_per_box():
    outputs = [np.full((2, h, w, 3, 5 + NUM_CLASSES), -10.0, np.float32) for h, w in GRIDS]
    outputs[1][1, 1, 2, 1, :5] = [0.0, math.log(3), 0.0, -math.log(3), 10.0]
    outputs[1][1, 1, 2, 1, 5:] = [0.0, 3.0, 1.0]
    got = jit(lambda o: yolo.detect(o, yolo.DEFAULT_ANCHORS, STRIDES, max_detections=4))(outputs)
    assert got.boxes.shape == (2, 4, 4)
    assert not np.any(got.valid[0]) and list(np.asarray(got.valid[1])) == [1, 0, 0, 0]
    np.testing.assert_allclose(got.boxes[1, 0], [9, 26.375, 71, 37.625], rtol=1e-5)
    assert int(got.classes[1, 0]) == 1
    expected_score = 1 / (1 + math.exp(-10)) / (1 + math.exp(-3))
    assert float(got.scores[1, 0]) == pytest.approx(expected_score, rel=1e-5)


# --------------------------------------------------------------------------- loss

LOSS_FN = yolo.yolo_loss_fn(yolo.DEFAULT_ANCHORS, STRIDES, NUM_CLASSES, IMAGE_HW)
LOSS = jit(LOSS_FN)
OBJ_GAIN = 1.0 * (64 / 640) ** 2  # train.py's scaling, 3 levels


def random_outputs(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        rng.normal(size=(batch_size, h, w, 3, 5 + NUM_CLASSES)).astype(np.float32) for h, w in GRIDS
    )


def make_batch(image_boxes, num_slots, garbage=False):
    """Each image's [(box, label)] padded to `num_slots` boxes, with garbage or zeros."""
    rng = np.random.default_rng(7)
    boxes = np.zeros((len(image_boxes), num_slots, 4), np.float32)
    labels = np.zeros((len(image_boxes), num_slots), np.int32)
    mask = np.zeros((len(image_boxes), num_slots), bool)
    if garbage:
        boxes[:] = rng.normal(scale=5, size=boxes.shape)
        boxes[:, ::2, 1] = np.nan
        boxes[:, 1::3, 2] = np.inf
        labels[:] = rng.integers(-9, 99, size=labels.shape)
    for image, entries in enumerate(image_boxes):
        for slot, (box, label) in enumerate(entries):
            boxes[image, slot], labels[image, slot], mask[image, slot] = box, label, True
    return {"boxes": boxes, "box_labels": labels, "box_mask": mask}


IMAGES = [[(BOX_A, 2), (BOX_B, 1)], [(BOX_B, 0)], []]


def test_padding_boxes_change_nothing():
    outputs = random_outputs(3)
    loss, metrics, weights = LOSS(outputs, make_batch(IMAGES, 2))
    padded_loss, padded_metrics, _ = LOSS(outputs, make_batch(IMAGES, 5, garbage=True))
    assert weights is None
    np.testing.assert_allclose(padded_loss, loss, rtol=1e-6)
    for name in ("box_loss", "obj_loss", "cls_loss"):
        np.testing.assert_allclose(padded_metrics[name], metrics[name], rtol=1e-6)
    assert np.all(np.asarray(metrics["box_loss"][:2]) > 0)
    np.testing.assert_allclose(loss, sum(metrics.values()), rtol=1e-6)


def no_object_loss(outputs, image):
    """What objectness costs when no box is anywhere: BCE(x, 0) = log(1 + e^x), averaged over
    each level's cells and anchors, weighted by the level's balance."""
    return OBJ_GAIN * sum(
        balance * np.mean(np.logaddexp(0.0, output[image, ..., 4].astype(np.float64)))
        for balance, output in zip((4.0, 1.0, 0.4), outputs, strict=True)
    )


def test_an_image_without_boxes_has_only_the_no_object_loss():
    outputs = random_outputs(3, seed=1)
    loss, metrics, _ = LOSS(outputs, make_batch(IMAGES, 4, garbage=True))
    assert float(loss[2]) == pytest.approx(no_object_loss(outputs, 2), rel=1e-5)
    assert float(metrics["box_loss"][2]) == 0 and float(metrics["cls_loss"][2]) == 0
    # Where boxes are, their cells' objectness targets are not 0.
    assert float(metrics["obj_loss"][0]) != pytest.approx(no_object_loss(outputs, 0), rel=1e-3)


def test_loss_and_its_gradient_are_finite_under_jit_and_equal_eager():
    outputs = random_outputs(3, seed=2)
    batch = make_batch(IMAGES, 4, garbage=True)
    loss, _, _ = LOSS(outputs, batch)
    eager_loss, _, _ = LOSS_FN(tuple(map(jnp.asarray, outputs)), batch)
    np.testing.assert_allclose(loss, eager_loss, rtol=1e-5)
    grads = jit(jax.grad(lambda o: jnp.sum(LOSS_FN(o, batch)[0])))(outputs)
    for grad in grads:
        assert np.all(np.isfinite(grad))
    assert all(np.any(grad != 0) for grad in grads)
    # Only image 0's box B reaches level 2: image 1 is B too, image 2 has none.
    assert np.any(grads[2][0, ..., :4] != 0) and np.all(grads[2][2, ..., :4] == 0)


def test_fedir_weights_of_one_equal_the_plain_loss():
    outputs = random_outputs(3, seed=3)
    batch = make_batch(IMAGES, 4, garbage=True)
    loss, metrics, _ = LOSS(outputs, batch)
    ones_loss, ones_metrics, ones_weights = LOSS(outputs, batch, jnp.ones(NUM_CLASSES))
    np.testing.assert_allclose(ones_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(ones_metrics["cls_loss"], metrics["cls_loss"], rtol=1e-6)
    np.testing.assert_allclose(ones_weights, [1, 1, 1])
    _, _, weights = LOSS(outputs, batch, jnp.asarray([0.5, 2.0, 3.0]))
    # Image 0: classes 2 and 1 -> (3 + 2) / 2; image 1: class 0; image 2: no boxes -> 1.
    np.testing.assert_allclose(weights, [2.5, 0.5, 1.0])


def test_fedir_weights_pick_the_boxes_of_the_weighted_class():
    # With class 2 (box A) weighted almost 0, image 0's box and class terms are those of an
    # image with box B alone; objectness, which FedIR leaves alone, still sees box A.
    outputs = random_outputs(1, seed=4)
    both = make_batch([IMAGES[0]], 2)
    only_b = make_batch([[(BOX_B, 1)]], 2)
    _, weighted, _ = LOSS(outputs, both, jnp.asarray([1.0, 1.0, 1e-6]))
    _, alone, _ = LOSS(outputs, only_b)
    _, plain, _ = LOSS(outputs, both)
    for name in ("box_loss", "cls_loss"):
        np.testing.assert_allclose(weighted[name], alone[name], rtol=1e-4)
        assert abs(float(plain[name][0]) - float(alone[name][0])) > 1e-3
    np.testing.assert_allclose(weighted["obj_loss"], plain["obj_loss"], rtol=1e-6)


def test_objectness_target_does_not_depend_on_box_order():
    # Two boxes with the same centre (and so the same cells and anchors at level 0) but
    # different sizes: their CIoU with the shared predictions differ; the objectness target
    # takes the larger one whichever comes first.
    other = (38 / 64, 8 / 64, 54 / 64, 28 / 64)  # centre (18, 46) like A, 20x16 px
    outputs = random_outputs(1, seed=5)
    first, _, _ = LOSS(outputs, make_batch([[(BOX_A, 0), (other, 0)]], 2))
    second, _, _ = LOSS(outputs, make_batch([[(other, 0), (BOX_A, 0)]], 2))
    np.testing.assert_array_equal(first, second)


def test_a_perfect_prediction_has_no_box_loss():
    # Box A alone, class 2. At each of its hand-worked candidates, invert the decoding:
    # sigmoid(t_xy) = (offset + 0.5) / 2 and sigmoid(t_wh) = sqrt(wh / anchor) / 2, with the
    # objectness and the right class logit large, every other logit very negative.
    def logit(p):
        return math.log(p / (1 - p))

    outputs = [np.full((1, h, w, 3, 5 + NUM_CLASSES), -30.0, np.float32) for h, w in GRIDS]
    for level, box, anchors, _, (column, row), offset in EXPECTED_CANDIDATES:
        if box != 0:
            continue
        for anchor in anchors:
            anchor_wh = yolo.DEFAULT_ANCHORS[level, anchor]
            raw = [logit((o + 0.5) / 2) for o in offset]
            raw += [logit(math.sqrt(s / a) / 2) for s, a in zip(BOX_WH[0], anchor_wh, strict=True)]
            outputs[level][0, row, column, anchor, :5] = raw + [30.0]
            outputs[level][0, row, column, anchor, 5 + 2] = 30.0
    _, metrics, _ = LOSS(tuple(outputs), make_batch([[(BOX_A, 2)]], 2))
    assert float(metrics["box_loss"][0]) < 1e-5
    assert float(metrics["cls_loss"][0]) < 1e-6
    assert float(metrics["obj_loss"][0]) < 1e-3
    # The same outputs with the box shifted by a few pixels are no longer perfect.
    shifted = tuple(np.asarray(BOX_A) + np.array([0, 4, 0, 4]) / 64)
    _, moved, _ = LOSS(tuple(outputs), make_batch([[(shifted, 2)]], 2))
    assert float(moved["box_loss"][0]) > 1e-3
