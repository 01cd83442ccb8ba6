"""The detection task: a perfect detector scores mAP 1 through decode, NMS, merge and COCO
rules; evaluation drops padded images; a detection round agrees on every strategy and on 8
sharded devices; padded boxes and padded examples change nothing."""

from __future__ import annotations

import textwrap
from typing import ClassVar

import flax.linen as nn
import jax
import numpy as np
import pytest

from fedjax_cv import algorithms
from fedjax_cv.engine import ClientInfo, Cohort
from fedjax_cv.models.yolo import ANCHORS
from fedjax_cv.tasks import get_task
from fedjax_cv.tasks.coco_eval import coco_map
from fedjax_cv.train import train_and_evaluate
from fedjax_cv.validation import ConfigError
from tests import task_rounds
from tests.configs_loader import load_config, override
from tests.xla import run_on_devices

NUM_CLASSES = 3
SIZE = 64  # image side: grids of 8, 4 and 2 cells
MAX_BOXES = 4


class TinyDetector(nn.Module):
    """Per level: average-pool the image to the level's grid, a dense layer, plus a learned
    map of raw outputs (so a test can set the output directly). The same output layout and
    geometry as the zoo's YOLO models, at a fraction of the compile time."""

    num_classes: int = NUM_CLASSES
    anchors: ClassVar = ANCHORS
    strides: ClassVar = (8, 16, 32)

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        outputs = []
        channels = 5 + self.num_classes
        for level, stride in enumerate(self.strides):
            pooled = nn.avg_pool(x, (stride, stride), (stride, stride))
            dense = nn.Dense(3 * channels, name=f"dense{level}")(pooled)
            grid = pooled.shape[1:3]
            raw = self.param(f"raw{level}", nn.initializers.zeros, (*grid, 3, channels))
            outputs.append(dense.reshape(*dense.shape[:3], 3, channels) + raw)
        return tuple(outputs)


def logit(p):
    return np.log(p) - np.log1p(-p)


def perfect_params(boxes_yxyx, labels):
    """Params of `TinyDetector` whose output decodes to exactly these boxes (normalised yxyx)
    with objectness and class ~1, by the documented YOLOv5 decoding inverted by hand:
    centre = (sigmoid(t) * 2 - 0.5 + cell) * stride, size = (sigmoid(t) * 2)^2 * anchor."""
    model = TinyDetector()
    params = jax.device_get(
        model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32), train=False)
    )["params"]
    params = jax.tree.map(np.zeros_like, params)
    for level in range(3):
        params[f"raw{level}"][..., 4] = -30.0  # no object anywhere...
    for (ymin, xmin, ymax, xmax), label in zip(boxes_yxyx, labels, strict=True):
        level, anchor = 0, 2  # stride 8, anchor (33, 23): the boxes below are 16-32 px
        stride, (anchor_w, anchor_h) = 8, ANCHORS[level][anchor]
        cx, cy = (xmin + xmax) / 2 * SIZE / stride, (ymin + ymax) / 2 * SIZE / stride
        w, h = (xmax - xmin) * SIZE, (ymax - ymin) * SIZE
        col, row = int(cx), int(cy)
        out = params[f"raw{level}"][row, col, anchor]
        out[0] = logit((cx - col + 0.5) / 2)
        out[1] = logit((cy - row + 0.5) / 2)
        out[2] = logit(np.sqrt(w / anchor_w) / 2)
        out[3] = logit(np.sqrt(h / anchor_h) / 2)
        out[4] = 30.0  # ...but here
        out[5:] = -30.0
        out[5 + label] = 30.0
    return params


# Two images; normalised (ymin, xmin, ymax, xmax): sizes 16-32 px, centres in distinct cells.
TRUE_BOXES = [
    [(0.1, 0.2, 0.4, 0.5), (0.55, 0.5, 0.8, 0.9)],
    [(0.3, 0.3, 0.6, 0.7)],
]
TRUE_LABELS = [[0, 2], [1]]


def eval_batch(images=2, padded=1):
    """The two images above, plus `padded` padding images holding garbage boxes."""
    boxes = np.zeros((images + padded, MAX_BOXES, 4), np.float32)
    labels = np.zeros((images + padded, MAX_BOXES), np.int32)
    box_mask = np.zeros((images + padded, MAX_BOXES), bool)
    for i, (image_boxes, image_labels) in enumerate(zip(TRUE_BOXES, TRUE_LABELS, strict=True)):
        boxes[i, : len(image_boxes)] = image_boxes
        labels[i, : len(image_labels)] = image_labels
        box_mask[i, : len(image_boxes)] = True
    boxes[images:] = (0.1, 0.1, 0.9, 0.9)
    box_mask[images:] = True
    batch = {
        "image": np.zeros((images + padded, SIZE, SIZE, 3), np.float32),
        "boxes": boxes,
        "box_labels": labels,
        "box_mask": box_mask,
    }
    return batch, np.arange(images + padded) < images


def test_a_perfect_detector_scores_map_one_and_padded_images_are_left_out():
    task = get_task("detection")
    model = TinyDetector()
    batch, mask = eval_batch()
    # Image i's own boxes in its own output: both images' boxes at once in one param set
    # would put the first image's boxes into the second. Evaluate image by image instead.
    stats = None
    for i in range(2):
        params = perfect_params(TRUE_BOXES[i], TRUE_LABELS[i])
        one = {k: v[[i, 2]] for k, v in batch.items()}  # the image and a padded one
        stats = task.merge(stats, task.make_eval_fn(model)(params, {}, one, mask[[i, 2]]))
    assert stats["images"] == 2 and len(stats["predictions"]) == 2
    # The true boxes in input pixels, by hand: x = xmin * 64 ...
    np.testing.assert_allclose(
        stats["ground_truths"][0]["boxes"], [[12.8, 6.4, 32.0, 25.6], [32.0, 35.2, 57.6, 51.2]]
    )
    np.testing.assert_array_equal(stats["ground_truths"][1]["classes"], [1])
    for predictions, truth in zip(stats["predictions"], stats["ground_truths"], strict=True):
        order = np.argsort(predictions["classes"])
        np.testing.assert_array_equal(predictions["classes"][order], np.sort(truth["classes"]))
        expected = truth["boxes"][np.argsort(truth["classes"])]
        np.testing.assert_allclose(predictions["boxes"][order], expected, atol=1e-3)
    metrics = task.finalize(stats)
    assert metrics["map50"] == pytest.approx(1.0)
    assert metrics["map50_95"] == pytest.approx(1.0)
    details = task.details(stats, ["a", "b", "c"])
    assert details["per_class_ap50"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert details["num_ground_truths"] == 3


def test_a_wrong_class_and_a_shifted_box_lower_the_map_as_coco_rules_say():
    task = get_task("detection")
    model = TinyDetector()
    batch, mask = eval_batch(padded=0)
    # Image 0 predicted perfectly; image 1's box given class 2 instead of 1.
    stats = task.merge(
        None,
        task.make_eval_fn(model)(
            perfect_params(TRUE_BOXES[0], TRUE_LABELS[0]),
            {},
            {k: v[:1] for k, v in batch.items()},
            mask[:1],
        ),
    )
    stats = task.merge(
        stats,
        task.make_eval_fn(model)(
            perfect_params(TRUE_BOXES[1], [2]), {}, {k: v[1:] for k, v in batch.items()}, mask[1:]
        ),
    )
    # Classes 0 and 2 have one true box each; class 2 also gets a false positive. Scores are
    # all ~1 (ties), so by COCO's stable order the false positive of image 1 ranks after the
    # true positive of image 0: precision 1 up to recall 1 -> AP 1. Class 1: missed -> 0.
    reference = coco_map(stats["predictions"], stats["ground_truths"])
    assert reference["map50"] == pytest.approx(2 / 3)
    assert task.finalize(stats)["map50"] == pytest.approx(2 / 3)


def make_cohort(seed=0, num_clients=3, steps=2, batch=2):
    rng = np.random.default_rng(seed)
    shape = (num_clients, steps, batch)
    images = rng.normal(size=shape + (SIZE, SIZE, 3)).astype(np.float32)
    corner = rng.uniform(0.0, 0.6, shape + (MAX_BOXES, 2))
    size = rng.uniform(0.15, 0.4, shape + (MAX_BOXES, 2))
    boxes = np.concatenate([corner, np.minimum(corner + size, 1.0)], -1).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, shape + (MAX_BOXES,)).astype(np.int32)
    box_mask = rng.random(shape + (MAX_BOXES,)) < 0.6
    counts = np.stack(
        [np.bincount(labels[c][box_mask[c]], minlength=NUM_CLASSES) for c in range(num_clients)]
    ).astype(np.float32)
    info = ClientInfo(
        client_id=np.arange(num_clients, dtype=np.int32),
        occurrence=np.zeros(num_clients, np.int32),
        num_examples=np.array([4, 3, 4], np.float32)[:num_clients],
        label_counts=counts,
    )
    examples = {"image": images, "boxes": boxes, "box_labels": labels, "box_mask": box_mask}
    return Cohort(examples, np.ones(shape, bool), info)


def run_rounds(cohort, strategy, importance=False, mesh=None):
    return task_rounds.run_rounds(
        "detection", TinyDetector(), cohort, strategy, NUM_CLASSES, importance=importance, mesh=mesh
    )


@pytest.fixture(scope="module")
def fedir_vmap_rounds():
    """Two FedIR rounds of `make_cohort()` on `vmap` and one device: the reference of the
    strategies test and of the 8-device test, computed once."""
    return run_rounds(make_cohort(), "vmap", importance=True)


def test_detection_round_agrees_across_strategies(fedir_vmap_rounds):
    """With FedIR's box weights (plain rounds: the padding test below, on `sequential`)."""
    importance = True
    cohort = make_cohort()
    reference, ref_metrics = fedir_vmap_rounds
    assert ref_metrics["box_loss"] > 0 and ref_metrics["obj_loss"] > 0
    for strategy in ("sequential", "host"):
        params, metrics = run_rounds(cohort, strategy, importance)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, reference)
        for name in ("loss", "box_loss", "obj_loss", "cls_loss"):
            assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-5)


def test_padded_boxes_and_padded_examples_change_nothing():
    cohort = make_cohort(seed=4)
    reference, _ = run_rounds(cohort, "sequential")
    # Garbage in every padding box slot.
    rng = np.random.default_rng(9)
    boxes = cohort.examples["boxes"].copy()
    labels = cohort.examples["box_labels"].copy()
    padding = ~cohort.examples["box_mask"]
    boxes[padding] = rng.uniform(-1, 2, (padding.sum(), 4))
    labels[padding] = rng.integers(0, NUM_CLASSES, padding.sum())
    changed = cohort.replace(examples={**cohort.examples, "boxes": boxes, "box_labels": labels})
    params, _ = run_rounds(changed, "sequential")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, reference)

    # A padded example in a new last step and batch column, full of boxes, with mask False.
    grow = task_rounds.grow
    examples = {
        "image": grow(cohort.examples["image"], 7.0),
        "boxes": grow(cohort.examples["boxes"], 0.3),
        "box_labels": grow(cohort.examples["box_labels"], 1),
        "box_mask": grow(cohort.examples["box_mask"], True),
    }
    padded = Cohort(examples, grow(cohort.mask, False), cohort.clients)
    params, _ = run_rounds(padded, "sequential")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, reference)


def test_eight_device_sharded_detection_round_matches_single_device(tmp_path, fedir_vmap_rounds):
    # The single-device reference comes from this process (one CPU device), leaf by leaf.
    reference = tmp_path / "reference.npz"
    np.savez(reference, *jax.tree.leaves(fedir_vmap_rounds[0]))
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from fedjax_cv.engine import client_mesh
        from tests.test_detection_task import make_cohort, run_rounds
        assert jax.device_count() == 8, jax.devices()
        cohort = make_cohort()
        with np.load(REFERENCE) as saved:
            reference = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        for strategy in ("vmap", "sequential"):
            params, _ = run_rounds(cohort, strategy, importance=True, mesh=client_mesh())
            leaves = jax.tree.leaves(params)
            assert len(leaves) == len(reference)
            for a, b in zip(leaves, reference):
                assert a.shape == b.shape
                np.testing.assert_allclose(a, b, atol=1e-5)
        print("sharded ok")
        """
    ).replace("REFERENCE", repr(str(reference)))
    result = run_on_devices(script)
    assert "sharded ok" in result.stdout


def test_the_loss_falls_when_the_tiny_detector_trains_on_one_cohort():
    cohort = make_cohort(seed=1)
    task = get_task("detection")
    model = TinyDetector()
    params = model.init(jax.random.key(0), cohort.examples["image"][0, 0], train=False)["params"]
    algorithm = algorithms.fedavg(
        task.make_loss_fn(model), 20.0, metric_names=task.metric_names, strategy="vmap"
    )
    state = algorithm.init(params)
    losses = []
    for r in range(6):
        state, metrics = algorithm.apply(state, cohort, jax.random.key(r))
        losses.append(float(metrics["loss"]))
    # The tiny detector sees pooled noise: only its bias maps can learn the boxes' layout, so
    # the bar is that every round goes downhill and six of them cut the loss by a tenth.
    assert (np.diff(losses) < 0).all(), losses
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize(
    "config, message",
    [
        (
            lambda: override(
                load_config("configs/shapes_detection.py:runlocal"), {"model.name": "cnn_emnist"}
            ),
            r"detection needs per-level maps .* pick a detection model \(yolov5n",
        ),
        (
            lambda: override(
                load_config("configs/shapes_fedavg.py:runlocal"),
                {"model.name": "yolov5n", "data.image_size": 32},
            ),
            "classification needs one logit vector an image",
        ),
        (
            lambda: override(
                load_config("configs/shapes_detection.py:runlocal"), {"data.image_size": 48}
            ),
            "multiple of 32",
        ),
    ],
)
def test_a_model_of_another_task_or_a_bad_size_fails_before_anything_is_written(
    tmp_path, config, message
):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message) as error:
        train_and_evaluate(config(), str(workdir))
    assert "\n" not in str(error.value)
    assert not workdir.exists()
