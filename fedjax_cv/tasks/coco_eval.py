"""COCO box mAP computed by the library itself, by the rules of pycocotools' `COCOeval` (bbox).

The rules, each as pycocotools applies them with its default parameters, area range "all" and
no crowd boxes:

- Per image and class, detections are sorted by descending score with a stable sort (ties keep
  their input order) and only the first `max_detections` are kept (pycocotools' maxDets,
  applied per image *and class*).
- Box IoU as pycocotools' `maskUtils.iou`: boxes turned into x, y, w, h, areas w * h (no +1),
  no overlap unless both the intersection's width and height are positive.
- Greedy matching at each IoU threshold 0.50, 0.55, ..., 0.95: every detection, best score
  first, takes the unmatched ground truth of highest IoU among those with IoU >= threshold;
  of several with that same IoU it takes the last in input order (pycocotools' `>=` scan).
- Per class, the kept detections of all images are ranked by score (stable again, images in
  input order), and precision at each of 101 recall thresholds 0, 0.01, ..., 1 is the largest
  precision at that recall or beyond (0 where the recall is never reached). A class's AP is the
  mean over the 101 thresholds; a class without ground truth has none (NaN) and is left out of
  the mean over classes; a class with ground truth and no detections has AP 0.
- mAP@0.5 is the mean over classes at IoU 0.5; mAP@0.5:0.95 the mean over classes and the ten
  thresholds.

Ground truths carry no crowd or "difficult" flag: every one counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The same expressions as pycocotools' Params.setDetParams, so that the floats are identical
# (the 9th threshold is 0.8999999999999999, which decides whether an IoU of exactly 0.9
# matches).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


def _as_boxes(value, where: str, n: int | None) -> np.ndarray:
    boxes = np.asarray(value, dtype=np.float64)
    if boxes.size == 0 and n in (None, 0):
        return np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"{where}['boxes'] has shape {boxes.shape}; must be [N, 4] (x1, y1, x2, y2)"
        )
    if n is not None and len(boxes) != n:
        raise ValueError(f"{where}['boxes'] has {len(boxes)} rows and 'scores' {n}; must match")
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{where}['boxes'] has a NaN or infinite coordinate")
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise ValueError(
            f"{where}['boxes'] has a box with x2 < x1 or y2 < y1; must be x1, y1, x2, y2"
        )
    return boxes


def _as_classes(value, where: str, n: int, num_classes: int | None) -> np.ndarray:
    classes = np.asarray(value)
    if classes.size == 0 and n == 0:
        return np.zeros(0, np.int64)
    if classes.shape != (n,):
        raise ValueError(f"{where}['classes'] has shape {classes.shape}; must be [{n}], one a box")
    if classes.dtype.kind not in "iu":
        whole = classes.dtype.kind == "f" and np.all(np.isfinite(classes))
        as_int = classes.astype(np.int64) if whole else None
        if as_int is None or not np.array_equal(as_int, classes):
            raise ValueError(f"{where}['classes'] has dtype {classes.dtype}; must be integer ids")
        classes = as_int
    classes = classes.astype(np.int64)
    if np.any(classes < 0):
        raise ValueError(f"{where}['classes'] has class {int(classes.min())}; must be >= 0")
    if num_classes is not None and np.any(classes >= num_classes):
        raise ValueError(
            f"{where}['classes'] has class {int(classes.max())}; must be < num_classes "
            f"({num_classes})"
        )
    return classes


def _field(item, index: int, name: str, key: str):
    if not hasattr(item, "keys"):
        raise ValueError(f"{name}[{index}] is a {type(item).__name__}; must be a dict")
    if key not in item:
        raise ValueError(f"{name}[{index}] has no '{key}'")
    return item[key]


def _read(predictions, ground_truths, num_classes):
    """Validated float64 boxes, float64 scores and int64 classes of every image."""
    for name, items in (("predictions", predictions), ("ground_truths", ground_truths)):
        if isinstance(items, str | bytes | dict) or not isinstance(items, Sequence):
            raise ValueError(
                f"{name} is a {type(items).__name__}; must be a list, one dict an image"
            )
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions has {len(predictions)} images and ground_truths {len(ground_truths)}; "
            "must match"
        )
    preds, gts = [], []
    for i, item in enumerate(predictions):
        where = f"predictions[{i}]"
        scores = np.asarray(_field(item, i, "predictions", "scores"), dtype=np.float64)
        if scores.size == 0:
            scores = np.zeros(0)
        elif scores.ndim != 1:
            raise ValueError(f"{where}['scores'] has shape {scores.shape}; must be [N]")
        if np.any(np.isnan(scores)):
            raise ValueError(f"{where}['scores'] has a NaN score")
        n = len(scores)
        boxes = _as_boxes(_field(item, i, "predictions", "boxes"), where, n)
        classes = _as_classes(_field(item, i, "predictions", "classes"), where, n, num_classes)
        preds.append((boxes, scores, classes))
    for i, item in enumerate(ground_truths):
        where = f"ground_truths[{i}]"
        boxes = _as_boxes(_field(item, i, "ground_truths", "boxes"), where, None)
        classes = _as_classes(
            _field(item, i, "ground_truths", "classes"), where, len(boxes), num_classes
        )
        gts.append((boxes, classes))
    return preds, gts


def box_iou(detections: np.ndarray, ground_truths: np.ndarray) -> np.ndarray:
    """IoU [D, G] of xyxy boxes, computed as pycocotools' `maskUtils.iou` does from xywh."""
    dx, dy = detections[:, 0:1], detections[:, 1:2]
    dw, dh = detections[:, 2:3] - dx, detections[:, 3:4] - dy
    gx, gy = ground_truths[None, :, 0], ground_truths[None, :, 1]
    gw, gh = ground_truths[None, :, 2] - gx, ground_truths[None, :, 3] - gy
    width = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    height = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    overlap = (width > 0) & (height > 0)
    intersection = np.where(overlap, width * height, 0.0)
    union = dw * dh + gw * gh - intersection
    return np.where(overlap, intersection / np.where(overlap, union, 1.0), 0.0)


def _match(ious: np.ndarray) -> np.ndarray:
    """bool [T, D]: whether each detection (rows of `ious`, best score first) is a true
    positive at each IoU threshold, by pycocotools' greedy rule."""
    num_dets, num_gts = ious.shape
    matched = np.zeros((len(IOU_THRESHOLDS), num_dets), bool)
    if num_dets == 0 or num_gts == 0:
        return matched
    # pycocotools starts each scan at min(t, 1 - 1e-10) so that t = 1 could still match a
    # perfect box; for the thresholds here that equals t.
    limits = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[:, None]
    taken = np.zeros((len(IOU_THRESHOLDS), num_gts), bool)
    lowest = limits.min()
    for d in range(num_dets):
        row = ious[d]
        if row.max() < lowest:
            continue
        allowed = (row[None, :] >= limits) & ~taken
        found = np.nonzero(allowed.any(axis=1))[0]
        if len(found) == 0:
            continue
        candidates = np.where(allowed[found], row[None, :], -1.0)
        # Highest IoU, the last ground truth of equal IoU (pycocotools replaces its best on >=).
        best = num_gts - 1 - np.argmax(candidates[:, ::-1], axis=1)
        taken[found, best] = True
        matched[found, d] = True
    return matched


def _average_precision(scores: np.ndarray, matched: np.ndarray, num_gts: int) -> np.ndarray:
    """AP [T] of one class from its kept detections over all images (in image order)."""
    num_thresholds = len(IOU_THRESHOLDS)
    if len(scores) == 0:
        return np.zeros(num_thresholds)
    order = np.argsort(-scores, kind="mergesort")
    hits = matched[:, order]
    true_pos = np.cumsum(hits, axis=1, dtype=np.float64)
    ranks = np.arange(1, len(scores) + 1, dtype=np.float64)
    recall = true_pos / num_gts
    precision = true_pos / ranks
    # The best precision at this recall or beyond: a running max from the right.
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    ap = np.empty(num_thresholds)
    for t in range(num_thresholds):
        index = np.searchsorted(recall[t], RECALL_THRESHOLDS, side="left")
        reached = index < len(scores)
        interpolated = np.where(reached, precision[t][np.minimum(index, len(scores) - 1)], 0.0)
        ap[t] = interpolated.mean()
    return ap


def coco_map(
    predictions: Sequence[dict],
    ground_truths: Sequence[dict],
    *,
    num_classes: int | None = None,
    max_detections: int = 100,
) -> dict:
    """COCO box mAP of `predictions` against `ground_truths` (see the module docstring).

    predictions: a list, one dict an image, with `boxes` float [N, 4] (x1, y1, x2, y2 in
      pixels), `scores` [N] and `classes` int [N].
    ground_truths: a list of the same length, one dict an image with `boxes` and `classes`.
    num_classes: the number of classes; by default one more than the largest class id seen.
    max_detections: detections kept per image and class, best score first (COCO's maxDets).

    Returns a dict with `map50` and `map50_95` (floats, NaN when no class has ground truth),
    `per_class_ap50` and `per_class_ap50_95` (float64 [num_classes], NaN for classes without
    ground truth), and the counts `num_images`, `num_detections` (all given, before the
    max_detections cut) and `num_ground_truths`.

    Raises ValueError naming the image and field of a malformed input: lists of different
    lengths, boxes not [N, 4] or with x2 < x1 or y2 < y1 or non-finite, scores or classes not
    [N], NaN scores, negative class ids or ids >= num_classes.
    """
    if isinstance(max_detections, bool) or not isinstance(max_detections, int | np.integer):
        raise ValueError(f"max_detections is {max_detections!r}; must be a positive int")
    if max_detections < 1:
        raise ValueError(f"max_detections is {max_detections}; must be >= 1")
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int | np.integer)
        or num_classes < 1
    ):
        raise ValueError(f"num_classes is {num_classes!r}; must be a positive int or None")
    preds, gts = _read(predictions, ground_truths, num_classes)
    if num_classes is None:
        largest = [c.max() for _, _, c in preds if len(c)] + [c.max() for _, c in gts if len(c)]
        num_classes = int(max(largest)) + 1 if largest else 0

    num_gts = np.zeros(num_classes, np.int64)
    kept_scores: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    kept_matches: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for (dt_boxes, dt_scores, dt_classes), (gt_boxes, gt_classes) in zip(preds, gts, strict=True):
        num_gts += np.bincount(gt_classes, minlength=num_classes)
        for c in np.unique(dt_classes):
            dets = np.nonzero(dt_classes == c)[0]
            dets = dets[np.argsort(-dt_scores[dets], kind="mergesort")][:max_detections]
            truth = gt_boxes[gt_classes == c]
            ious = box_iou(dt_boxes[dets], truth)
            kept_scores[c].append(dt_scores[dets])
            kept_matches[c].append(_match(ious))

    ap = np.full((num_classes, len(IOU_THRESHOLDS)), np.nan)
    for c in range(num_classes):
        if num_gts[c] == 0:
            continue
        if kept_scores[c]:
            scores = np.concatenate(kept_scores[c])
            matched = np.concatenate(kept_matches[c], axis=1)
        else:
            scores, matched = np.zeros(0), np.zeros((len(IOU_THRESHOLDS), 0), bool)
        ap[c] = _average_precision(scores, matched, int(num_gts[c]))

    present = num_gts > 0
    per_class_ap50 = ap[:, 0].copy()
    per_class_ap50_95 = ap.mean(axis=1)
    return {
        "map50": float(per_class_ap50[present].mean()) if present.any() else float("nan"),
        "map50_95": float(per_class_ap50_95[present].mean()) if present.any() else float("nan"),
        "per_class_ap50": per_class_ap50,
        "per_class_ap50_95": per_class_ap50_95,
        "num_images": len(preds),
        "num_detections": int(sum(len(s) for _, s, _ in preds)),
        "num_ground_truths": int(num_gts.sum()),
    }
