"""`coco_map` against pycocotools' COCOeval (bbox) and against small cases worked by hand."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fedjax_cv.tasks.coco_eval import coco_map

TOLERANCE = 1e-6


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def pycocotools_map(predictions, ground_truths, num_classes, max_detections=100):
    """(map50, map50_95, per-class AP50 [K], per-class AP50:95 [K]) from pycocotools, our
    class c as its category c + 1, image i as its image i + 1, NaN where it reports -1."""
    annotations = []
    for i, truth in enumerate(ground_truths):
        for (x1, y1, x2, y2), c in zip(
            np.asarray(truth["boxes"], float), truth["classes"], strict=True
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,  # 0 would read as "unmatched" in COCOeval
                    "image_id": i + 1,
                    "category_id": int(c) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    results = []
    for i, pred in enumerate(predictions):
        for (x1, y1, x2, y2), s, c in zip(
            np.asarray(pred["boxes"], float), pred["scores"], pred["classes"], strict=True
        ):
            results.append(
                {
                    "image_id": i + 1,
                    "category_id": int(c) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(s),
                }
            )
    assert results, "loadRes cannot take an empty result list; test that case without it"
    with _quiet():
        truth = COCO()
        truth.dataset = {
            "images": [{"id": i + 1} for i in range(len(ground_truths))],
            "annotations": annotations,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
        }
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        default_max_dets = evaluation.params.maxDets == [1, 10, max_detections]
        if not default_max_dets:
            evaluation.params.maxDets = [max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
        if default_max_dets:
            evaluation.summarize()
    # [T, R, K] at area range "all" and the last maxDets.
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    present = np.all(precision > -1, axis=(0, 1))
    assert np.array_equal(present, np.any(precision > -1, axis=(0, 1)))
    per_class = np.where(present[None, :], precision.mean(axis=1), np.nan)  # [T, K]
    valid = precision[precision > -1]
    map50_95 = float(valid.mean()) if valid.size else float("nan")
    at_50 = precision[0][precision[0] > -1]
    map50 = float(at_50.mean()) if at_50.size else float("nan")
    if default_max_dets and valid.size:
        assert abs(evaluation.stats[0] - map50_95) < 1e-12
        assert abs(evaluation.stats[1] - map50) < 1e-12
    return map50, map50_95, per_class[0], per_class.mean(axis=0)


def random_case(seed, num_images=24, integer_boxes=False, tied_scores=False, crowded=False):
    """Images of 5 classes: class 3 has ground truth and is never predicted, class 4 is
    predicted and has no ground truth, some images have no ground truth at all. Predictions
    are jittered ground truths (IoUs across the thresholds), random boxes and exact
    duplicates; `tied_scores` rounds scores to 0.1 (rank ties), `integer_boxes` rounds
    coordinates (IoU ties, IoUs exactly on thresholds), `crowded` puts 130 detections of one
    class in one image."""
    rng = np.random.default_rng(seed)
    predictions, ground_truths = [], []

    def boxes_at(xy, wh):
        boxes = np.concatenate([xy, xy + wh], axis=1)
        return np.round(boxes) if integer_boxes else boxes

    for i in range(num_images):
        num_gt = 0 if i % 5 == 0 else int(rng.integers(1, 7))
        gt_boxes = boxes_at(rng.uniform(0, 80, (num_gt, 2)), rng.uniform(3, 40, (num_gt, 2)))
        gt_classes = rng.integers(0, 4, num_gt)
        guessed = gt_classes != 3
        jittered = gt_boxes[guessed] + rng.normal(0, 3, (int(guessed.sum()), 4))
        jittered[:, 2:] = np.maximum(jittered[:, 2:], jittered[:, :2] + 0.5)
        num_random = int(rng.integers(0, 6))
        boxes = [
            np.round(jittered) if integer_boxes else jittered,
            boxes_at(rng.uniform(0, 80, (num_random, 2)), rng.uniform(3, 40, (num_random, 2))),
        ]
        classes = [gt_classes[guessed], rng.choice([0, 1, 2, 4], num_random)]
        if crowded and i == 1:
            many = np.repeat(gt_boxes[:1], 130, axis=0) + rng.normal(0, 4, (130, 4))
            many[:, 2:] = np.maximum(many[:, 2:], many[:, :2] + 0.5)
            boxes.append(np.round(many) if integer_boxes else many)
            classes.append(np.full(130, gt_classes[0] if gt_classes[0] != 3 else 0))
        boxes, classes = np.concatenate(boxes), np.concatenate(classes)
        if len(boxes):  # duplicates: the same box and class again
            copies = rng.integers(0, len(boxes), int(rng.integers(0, 3)))
            boxes, classes = (
                np.concatenate([boxes, boxes[copies]]),
                np.append(classes, classes[copies]),
            )
        scores = rng.uniform(0, 1, len(boxes))
        if tied_scores:
            scores = np.round(scores, 1)
        predictions.append({"boxes": boxes, "scores": scores, "classes": classes})
        ground_truths.append({"boxes": gt_boxes, "classes": gt_classes})
    return predictions, ground_truths


CASES = {
    "float": dict(seed=0),
    "integer_boxes": dict(seed=1, integer_boxes=True),
    "tied_scores": dict(seed=2, tied_scores=True),
    "integer_boxes_tied_scores": dict(seed=3, integer_boxes=True, tied_scores=True),
    "crowded": dict(seed=4, crowded=True),
    "crowded_tied": dict(seed=5, crowded=True, tied_scores=True, integer_boxes=True),
}


def assert_matches_pycocotools(predictions, ground_truths, num_classes=5, max_detections=100):
    ours = coco_map(
        predictions, ground_truths, num_classes=num_classes, max_detections=max_detections
    )
    map50, map50_95, ap50, ap50_95 = pycocotools_map(
        predictions, ground_truths, num_classes, max_detections
    )
    np.testing.assert_allclose(ours["per_class_ap50"], ap50, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(ours["per_class_ap50_95"], ap50_95, rtol=0, atol=TOLERANCE)
    assert abs(ours["map50"] - map50) < TOLERANCE
    assert abs(ours["map50_95"] - map50_95) < TOLERANCE
    return ours


@pytest.mark.parametrize("name", list(CASES))
def test_equals_pycocotools_on_random_sets(name):
    predictions, ground_truths = random_case(**CASES[name])
    ours = assert_matches_pycocotools(predictions, ground_truths)
    # The set covers what it claims to.
    assert np.isnan(ours["per_class_ap50"][4]) and ours["per_class_ap50"][3] == 0
    assert any(len(t["classes"]) == 0 for t in ground_truths)
    assert 0 < ours["map50_95"] < ours["map50"] < 1
    assert ours["num_images"] == len(predictions)
    assert ours["num_detections"] == sum(len(p["scores"]) for p in predictions)
    assert ours["num_ground_truths"] == sum(len(t["classes"]) for t in ground_truths)
    if CASES[name].get("crowded"):
        assert len(predictions[1]["scores"]) > 130


@pytest.mark.parametrize("max_detections", [1, 3])
def test_equals_pycocotools_with_fewer_max_detections(max_detections):
    predictions, ground_truths = random_case(seed=6, crowded=True, tied_scores=True)
    ours = assert_matches_pycocotools(predictions, ground_truths, max_detections=max_detections)
    full = coco_map(predictions, ground_truths)
    assert abs(ours["map50_95"] - full["map50_95"]) > 1e-4  # the cut matters here


def test_max_detections_are_per_image_and_class():
    """One image, 100 detections of class 0 ahead of one correct detection of class 1: the
    cut is per class, so class 1 still finds its box (a per-image cut would drop it)."""
    truth = [{"boxes": [[0, 0, 10, 10], [50, 50, 60, 60]], "classes": [0, 1]}]
    boxes = [[20 + i % 10, 20, 30 + i % 10, 30] for i in range(100)] + [[50, 50, 60, 60]]
    scores = [0.9] * 100 + [0.1]
    pred = [{"boxes": boxes, "scores": scores, "classes": [0] * 100 + [1]}]
    ours = assert_matches_pycocotools(pred, truth, num_classes=2)
    assert ours["per_class_ap50"][1] == 1.0 and ours["per_class_ap50"][0] == 0.0


def test_one_perfect_detection_scores_one():
    truth = [{"boxes": [[10.0, 20.0, 50.0, 60.0]], "classes": [2]}]
    pred = [{"boxes": [[10.0, 20.0, 50.0, 60.0]], "scores": [0.3], "classes": [2]}]
    ours = assert_matches_pycocotools(pred, truth, num_classes=3)
    assert ours["map50"] == 1.0 and ours["map50_95"] == 1.0
    # Classes 0 and 1 have no ground truth: no AP, and out of the mean.
    assert np.isnan(ours["per_class_ap50"][:2]).all() and ours["per_class_ap50"][2] == 1.0


def test_detection_of_the_wrong_class_scores_zero():
    truth = [{"boxes": [[10.0, 20.0, 50.0, 60.0]], "classes": [0]}]
    pred = [{"boxes": [[10.0, 20.0, 50.0, 60.0]], "scores": [0.9], "classes": [1]}]
    ours = assert_matches_pycocotools(pred, truth, num_classes=2)
    assert ours["map50"] == 0.0 and ours["map50_95"] == 0.0
    assert np.isnan(ours["per_class_ap50"][1])


def test_two_ground_truths_one_detection_by_hand():
    """One detection on one of two boxes: recall 0.5 at precision 1. The 101 recall
    thresholds 0, 0.01, ..., 0.50 (51 of them) are reached with precision 1, the 50 above
    0.5 never: AP = 51 / 101 = 0.50495..., at every IoU threshold (the box is exact)."""
    truth = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "classes": [0, 0]}]
    pred = [{"boxes": [[0, 0, 10, 10]], "scores": [0.8], "classes": [0]}]
    ours = assert_matches_pycocotools(pred, truth, num_classes=1)
    assert ours["map50"] == pytest.approx(51 / 101, abs=1e-12)
    assert ours["map50_95"] == pytest.approx(51 / 101, abs=1e-12)


def test_false_positive_ranked_first_by_hand():
    """A wrong box at score 0.9, the right one at 0.5: precision [0/1, 1/2] at recall [0, 1],
    made monotone from the right [1/2, 1/2]; every recall threshold reads 1/2, AP = 0.5."""
    truth = [{"boxes": [[0, 0, 10, 10]], "classes": [0]}]
    pred = [{"boxes": [[40, 40, 50, 50], [0, 0, 10, 10]], "scores": [0.9, 0.5], "classes": [0, 0]}]
    ours = assert_matches_pycocotools(pred, truth, num_classes=1)
    assert ours["map50"] == pytest.approx(0.5, abs=1e-12)
    assert ours["map50_95"] == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("percent", range(50, 100, 5))
def test_iou_exactly_on_a_threshold_matches(percent):
    """A box of width `percent` inside one of width 100: IoU = 10 * percent / 1000, the double
    nearest percent / 100, which matches at every threshold up to it (>=): AP 1 at those
    (percent - 50) / 5 + 1 thresholds and 0 above. pycocotools' thresholds come from
    np.linspace (0.8999999999999999 for 0.9); thresholds built another way (np.arange gives
    0.6000000000000001, 0.8500000000000001, ...) would miss some of these boxes."""
    truth = [{"boxes": [[0, 0, 100, 10]], "classes": [0]}]
    pred = [{"boxes": [[0, 0, percent, 10]], "scores": [0.9], "classes": [0]}]
    ours = assert_matches_pycocotools(pred, truth, num_classes=1)
    assert ours["map50"] == 1.0
    assert ours["map50_95"] == pytest.approx(((percent - 50) // 5 + 1) / 10, abs=1e-12)


def test_equal_iou_goes_to_the_last_ground_truth():
    """Truths A = [0, 10] and B = [2, 12] (x; y 0-10). Detection 1 at [1, 11] (score 0.9)
    overlaps both by 90 / 110 = 0.818 and, as in pycocotools, takes the last of equals, B;
    detection 2 = B (0.8) then has only A left, IoU 80 / 120 = 0.667.
    - IoU 0.50-0.65 (4 thresholds): both match, AP 1.
    - 0.70-0.80 (3): detection 1 matches, 2 misses: precision [1, 1/2] at recall [1/2, 1/2];
      the 51 recall thresholds <= 0.5 read 1, the rest 0: AP 51/101.
    - 0.85-0.95 (3): detection 1 misses, 2 matches B: precision [0, 1/2] at recall [0, 1/2],
      monotone [1/2, 1/2]: AP 0.5 * 51/101.
    AP50:95 = (4 + 3 * 51/101 + 3 * 0.5 * 51/101) / 10 = 0.62723. Had detection 1 taken A,
    detection 2 would match B exactly: AP 1 at 0.50-0.80, and (7 + 1.5 * 51/101) / 10."""
    truth = [{"boxes": [[0, 0, 10, 10], [2, 0, 12, 10]], "classes": [0, 0]}]
    pred = [{"boxes": [[1, 0, 11, 10], [2, 0, 12, 10]], "scores": [0.9, 0.8], "classes": [0, 0]}]
    ours = assert_matches_pycocotools(pred, truth, num_classes=1)
    assert ours["map50"] == 1.0
    assert ours["map50_95"] == pytest.approx((4 + 4.5 * 51 / 101) / 10, abs=1e-12)


def test_no_predictions_and_no_ground_truths():
    truth = [
        {"boxes": [[0, 0, 10, 10]], "classes": [1]},
        {"boxes": np.zeros((0, 4)), "classes": []},
    ]
    empty = [{"boxes": np.zeros((0, 4)), "scores": [], "classes": []}] * 2
    ours = coco_map(empty, truth)
    assert ours["map50"] == 0.0 and ours["map50_95"] == 0.0
    assert np.isnan(ours["per_class_ap50"][0]) and ours["per_class_ap50"][1] == 0.0
    assert ours["num_detections"] == 0 and ours["num_ground_truths"] == 1
    nothing = coco_map(empty, [{"boxes": [], "classes": []}] * 2, num_classes=3)
    assert np.isnan(nothing["map50"]) and np.isnan(nothing["per_class_ap50_95"]).all()
    assert nothing["per_class_ap50"].shape == (3,)


def test_accepts_float32_and_integer_class_floats():
    predictions, ground_truths = random_case(seed=7, num_images=6)
    as32 = [
        {
            "boxes": p["boxes"].astype(np.float32),
            "scores": p["scores"].astype(np.float32),
            "classes": p["classes"].astype(np.float32),
        }
        for p in predictions
    ]
    assert_matches_pycocotools(as32, ground_truths)


GOOD_PRED = {"boxes": [[0.0, 0.0, 1.0, 1.0]], "scores": [0.5], "classes": [0]}
GOOD_TRUTH = {"boxes": [[0.0, 0.0, 1.0, 1.0]], "classes": [0]}


@pytest.mark.parametrize(
    "predictions, ground_truths, kwargs, message",
    [
        ([GOOD_PRED], [GOOD_TRUTH] * 2, {}, r"predictions has 1 images and ground_truths 2"),
        (
            [GOOD_PRED, {**GOOD_PRED, "boxes": [[0, 0, 1]]}],
            [GOOD_TRUTH] * 2,
            {},
            r"predictions\[1\]\['boxes'\] has shape \(1, 3\)",
        ),
        (
            [GOOD_PRED],
            [{**GOOD_TRUTH, "boxes": [[2.0, 0.0, 1.0, 1.0]]}],
            {},
            r"ground_truths\[0\]\['boxes'\] has a box with x2 < x1",
        ),
        (
            [{**GOOD_PRED, "boxes": [[0.0, 3.0, 1.0, 1.0]]}],
            [GOOD_TRUTH],
            {},
            r"predictions\[0\]\['boxes'\] has a box with x2 < x1 or y2 < y1",
        ),
        (
            [{**GOOD_PRED, "scores": [np.nan]}],
            [GOOD_TRUTH],
            {},
            r"predictions\[0\]\['scores'\] has a NaN",
        ),
        (
            [{**GOOD_PRED, "scores": [0.5, 0.4]}],
            [GOOD_TRUTH],
            {},
            r"predictions\[0\]\['boxes'\] has 1 rows and 'scores' 2",
        ),
        (
            [{**GOOD_PRED, "classes": [-1]}],
            [GOOD_TRUTH],
            {},
            r"predictions\[0\]\['classes'\] has class -1",
        ),
        (
            [GOOD_PRED],
            [{**GOOD_TRUTH, "classes": [0, 1]}],
            {},
            r"ground_truths\[0\]\['classes'\] has shape \(2,\)",
        ),
        (
            [GOOD_PRED],
            [{**GOOD_TRUTH, "classes": [4]}],
            {"num_classes": 3},
            r"ground_truths\[0\]\['classes'\] has class 4; must be < num_classes",
        ),
        (
            [{**GOOD_PRED, "classes": [0.5]}],
            [GOOD_TRUTH],
            {},
            r"predictions\[0\]\['classes'\] has dtype float64",
        ),
        (
            [{"boxes": [[0.0, 0.0, 1.0, 1.0]], "classes": [0]}],
            [GOOD_TRUTH],
            {},
            r"predictions\[0\] has no 'scores'",
        ),
        (
            [{**GOOD_PRED, "boxes": [[0.0, 0.0, np.inf, 1.0]]}],
            [GOOD_TRUTH],
            {},
            r"predictions\[0\]\['boxes'\] has a NaN or infinite",
        ),
        ([GOOD_PRED], [GOOD_TRUTH], {"max_detections": 0}, r"max_detections is 0"),
    ],
)
def test_invalid_inputs_raise_one_line_errors(predictions, ground_truths, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        coco_map(predictions, ground_truths, **kwargs)
    assert "\n" not in str(error.value)
