"""Detection data: letterbox, mosaic and HSV jitter against hand-computed cases; mosaics in the
grain pipeline; the embedded shapes_detection dataset; COCO (YOLO txt) and PASCAL VOC folders
written here; the bccd and coco128 configs on the real data; one-line errors for bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fedjax_cv.algorithms import sampling
from fedjax_cv.config_base import base_config
from fedjax_cv.data import augment, shapes
from fedjax_cv.data.federated import FederatedDataset
from fedjax_cv.data.inspect import inspect_partition
from fedjax_cv.data.pipeline import ClientExamples, GrainCohortBuilder
from fedjax_cv.data.registry import build_dataset
from tests import real_data
from tests.configs_loader import load_config, override

FILL = augment.LETTERBOX_FILL


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def _data_config(name: str, **overrides) -> ml_collections.ConfigDict:
    config = base_config().data
    config.name = name
    return override(config, overrides)


def _painted(shape, background, boxes, colours) -> np.ndarray:
    """An image of `background` with each pixel box (y0, x0, y1, x1) painted its colour."""
    image = np.empty(shape, np.uint8)
    image[...] = background
    for (y0, x0, y1, x1), colour in zip(boxes, colours, strict=True):
        image[y0:y1, x0:x1] = colour
    return image


def _example(shape, pixel_boxes, colours, background=(40, 40, 40)) -> dict:
    """An example whose boxes frame rectangles of the colours, box_labels their indices."""
    height, width = shape[:2]
    boxes = np.asarray(pixel_boxes, np.float32).reshape(-1, 4) / [height, width, height, width]
    return {
        "image": _painted(shape, background, pixel_boxes, colours),
        "boxes": boxes.astype(np.float32),
        "box_labels": np.arange(len(boxes), dtype=np.int32),
    }


# --------------------------------------------------------------------------- letterbox


def test_letterbox_maps_a_known_box_by_hand_and_back():
    # 40 x 80 into 64 x 64: scale min(64/40, 64/80) = 0.8, content 32 x 64, 16 rows of
    # padding above and below. Box rows 10-30, columns 40-80 -> rows 24-40, columns 32-64.
    example = _example((40, 80, 3), [(10, 40, 30, 80)], [(200, 30, 30)])
    out = augment.letterbox_example(example, (64, 64))
    np.testing.assert_allclose(out["letterbox"], [0.8, 16, 0, 40, 80])
    np.testing.assert_allclose(out["boxes"], [[24 / 64, 32 / 64, 40 / 64, 1.0]], atol=1e-6)
    np.testing.assert_array_equal(out["box_mask"], [True])
    image = out["image"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.all(image[:16] == FILL) and np.all(image[48:] == FILL)
    np.testing.assert_array_equal(image[25:39, 33:63], np.full((14, 30, 3), (200, 30, 30)))
    np.testing.assert_array_equal(image[17:23, :30], np.full((6, 30, 3), 40))
    back = augment.original_boxes(out["boxes"], out["letterbox"], (64, 64))
    np.testing.assert_allclose(back, [[10, 40, 30, 80]], atol=1e-4)


def test_letterbox_of_a_tall_image_pads_the_sides_and_maps_batches_back():
    # 96 x 48 into 64 x 96: scale min(64/96, 96/48) = 2/3, content 64 x 32, 32 columns each side.
    example = _example((96, 48, 3), [(0, 0, 48, 24), (48, 24, 96, 48)], [(9, 9, 9), (250, 0, 0)])
    out = augment.letterbox_example(example, (64, 96))
    np.testing.assert_allclose(out["letterbox"], [2 / 3, 0, 32, 96, 48], rtol=1e-6)
    expected = np.array([[0, 32, 32, 48], [32, 48, 64, 64]]) / [64, 96, 64, 96]
    np.testing.assert_allclose(out["boxes"], expected, atol=1e-6)
    assert np.all(out["image"][:, :32] == FILL) and np.all(out["image"][:, 64:] == FILL)
    batch_boxes = np.stack([out["boxes"], out["boxes"][::-1]])
    batch_letterbox = np.stack([out["letterbox"], out["letterbox"]])
    back = augment.original_boxes(batch_boxes, batch_letterbox, (64, 96))
    np.testing.assert_allclose(back[0], [[0, 0, 48, 24], [48, 24, 96, 48]], atol=1e-4)
    np.testing.assert_allclose(back[1], back[0][::-1], atol=1e-4)


def test_letterbox_scale_and_shift_move_boxes_with_their_pixels():
    example = _example((50, 70, 3), [(10, 20, 30, 45)], [(0, 220, 0)])
    out = augment.letterbox_example(example, (64, 64), scale=1.3, shift=(5.0, -7.0), cut_rule=True)
    (y0, x0, y1, x1) = out["boxes"][0] * 64
    assert out["box_mask"][0]
    inner = out["image"][int(np.ceil(y0)) + 1 : int(y1) - 1, int(np.ceil(x0)) + 1 : int(x1) - 1]
    assert inner.size and np.all(inner == (0, 220, 0))
    # Pixel p of the original lands at p * scale + offset, which the record holds.
    scale, offset_y, offset_x = out["letterbox"][:3]
    np.testing.assert_allclose([y0, x0], [10 * scale + offset_y, 20 * scale + offset_x], rtol=1e-5)


def test_letterbox_size_must_be_a_multiple_of_32():
    with pytest.raises(
        ValueError, match=r"^data\.augmentation\.image_size=\(100, 96\) is not"
    ) as e:
        augment.make_augmentation({"name": "detection", "image_size": (100, 96)})
    assert "multiples of 32" in _one_line(e)
    with pytest.raises(ValueError, match=r"data\.augmentation\.letterbox=True is not allowed"):
        augment.Augmentation(letterbox=True)
    with pytest.raises(ValueError, match=r"data\.augmentation\.mosaic=1\.0 .* letterbox"):
        augment.Augmentation(mosaic=1.0)
    with pytest.raises(ValueError, match=r"data\.augmentation\.hsv=\(0\.1, 2\.0, 0\.1\)"):
        augment.Augmentation(hsv=(0.1, 2.0, 0.1))
    assert augment.make_augmentation({"name": "detection", "image_size": [96, 128]}).image_size


def test_detection_preset_and_its_evaluation_form():
    preset = augment.make_augmentation("detection")
    assert preset.letterbox and preset.mosaic == 1.0 and preset.flip
    assert preset.scale_range == (0.5, 1.5) and preset.translate == 0.1
    assert preset.hsv == (0.015, 0.7, 0.4) and preset.fill == 114 and preset.max_boxes == 100
    evaluation = preset.deterministic()
    assert evaluation.letterbox and not evaluation.is_random
    example = _example((40, 80, 3), [(10, 40, 30, 80)], [(200, 30, 30)])
    out = dataclasses.replace(evaluation, image_size=(64, 64))(example, None)
    np.testing.assert_allclose(out["letterbox"], [0.8, 16, 0, 40, 80])
    assert out["boxes"].shape == (100, 4) and out["box_mask"].sum() == 1
    assert out["box_labels"].shape == (100,)


# --------------------------------------------------------------------------- mosaic

COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230)]


def _coloured_examples() -> list[dict]:
    """Four examples of different sizes, each with rectangles of distinct colours; box class
    k frames colour k."""
    specs = [
        ((64, 64, 3), [(8, 8, 40, 30), (44, 40, 60, 62)], [0, 1]),
        ((48, 96, 3), [(10, 10, 38, 50)], [2]),
        ((96, 40, 3), [(30, 4, 90, 36)], [3]),
        ((32, 32, 3), [(4, 4, 28, 20)], [4]),
    ]
    examples = []
    for shape, boxes, classes in specs:
        example = _example(shape, boxes, [COLOURS[c] for c in classes])
        example["box_labels"] = np.asarray(classes, np.int32)
        examples.append(example)
    return examples


def _assert_boxes_frame_their_colours(out: dict, size: int) -> int:
    """Every kept box's interior (a pixel in from each edge) shows its class's colour; returns
    how many boxes had an interior to check."""
    checked = 0
    for box, keep, label in zip(out["boxes"], out["box_mask"], out["box_labels"], strict=True):
        if not keep:
            continue
        y0, x0, y1, x1 = box * size
        rows = slice(int(np.ceil(y0)) + 1, int(np.floor(y1)) - 1)
        cols = slice(int(np.ceil(x0)) + 1, int(np.floor(x1)) - 1)
        inner = out["image"][rows, cols]
        if inner.size:
            assert np.all(np.abs(inner.astype(int) - COLOURS[label]) <= 1), (box, label)
            checked += 1
    return checked


def test_mosaic_of_fixed_placement_by_hand():
    # centre (64, 64) of the 128 x 128 canvas, scale 1, no shift: the output is the canvas's
    # middle, [32, 96) on both axes. The 64 x 64 first example fills canvas [0, 64)^2, so its
    # box (8, 8, 40, 30) shows as output rows 0-8, columns 0-0 (too thin: dropped) and its box
    # (44, 40, 60, 62) as output (12, 8, 28, 30).
    examples = _coloured_examples()
    out = augment.mosaic_example(examples, (64, 64), centre=(64.0, 64.0))
    assert out["image"].shape == (64, 64, 3)
    np.testing.assert_allclose(out["letterbox"], [1, 0, 0, 64, 64])
    first = out["box_labels"] == 1
    np.testing.assert_allclose(out["boxes"][first][0] * 64, [12, 8, 28, 30], atol=1e-4)
    assert not out["box_mask"][out["box_labels"] == 0][0]
    assert _assert_boxes_frame_their_colours(out, 64) >= 3
    # The second example (48 x 96, fitted to 32 x 64 by 2/3) sits above-right of the centre:
    # canvas rows [32, 64), columns [64, 128) -> output rows [0, 32), columns [32, 96). Its
    # pixel (3, 3) is background, its box (10, 10, 38, 50) shows at output (6.7, 38.7, 25.3, 64).
    np.testing.assert_array_equal(out["image"][2, 34], (40, 40, 40))
    np.testing.assert_array_equal(out["image"][16, 48], COLOURS[2])
    second = out["boxes"][out["box_labels"] == 2][0] * 64
    np.testing.assert_allclose(second, [20 / 3, 116 / 3, 76 / 3, 64], atol=1e-4)


def test_mosaic_drops_boxes_cut_too_thin_or_below_a_tenth_of_their_area():
    # Only the top-left 64 x 64 image has boxes; the output shows its bottom-right quarter,
    # canvas (and image) rows and columns [32, 64) -> output [0, 32).
    boxes = [
        (22, 40, 33.5, 50),  # 1.5 rows left: not more than 2 pixels -> dropped
        (28, 40, 38, 50),  # 6 of 10 rows left -> kept as (0, 8, 6, 18)
        (2, 40, 35, 50),  # 3 of 33 rows, 9% of its area -> dropped
        (12, 40, 35, 50),  # 3 of 23 rows, 13% of its area -> kept as (0, 8, 3, 18)
        (40, 10, 50, 31),  # columns [10, 31) all outside -> dropped
    ]
    first = {
        "image": np.zeros((64, 64, 3), np.uint8),
        "boxes": np.asarray(boxes, np.float32) / 64,
        "box_labels": np.arange(5, dtype=np.int32),
    }
    empty = {
        "image": np.zeros((64, 64, 3), np.uint8),
        "boxes": np.zeros((0, 4), np.float32),
        "box_labels": np.zeros(0, np.int32),
    }
    out = augment.mosaic_example([first, empty, empty, empty], (64, 64), centre=(64.0, 64.0))
    np.testing.assert_array_equal(out["box_mask"], [False, True, False, True, False])
    np.testing.assert_allclose(out["boxes"][1] * 64, [0, 8, 6, 18], atol=1e-4)
    np.testing.assert_allclose(out["boxes"][3] * 64, [0, 8, 3, 18], atol=1e-4)
    np.testing.assert_array_equal(out["box_labels"], np.arange(5))
    assert not out["boxes"][~out["box_mask"]].any()


def test_mosaic_clips_boxes_at_the_canvas_edge():
    # Centre (32, 32): the top-left 64 x 64 image spans canvas [-32, 32), cut at 0. Its box
    # rows [10, 50), columns [20, 40) keeps canvas [0, 18) x [0, 8); scaled by 0.5 and shifted
    # by 8 (canvas point c -> c / 2 + 8) that is output (8, 8, 17, 12), not a box reaching
    # into the grey beyond the canvas.
    first = {
        "image": np.zeros((64, 64, 3), np.uint8),
        "boxes": np.asarray([[10, 20, 50, 40]], np.float32) / 64,
        "box_labels": np.zeros(1, np.int32),
    }
    out = augment.mosaic_example([first] * 4, (64, 64), (32.0, 32.0), 0.5, (8.0, 8.0))
    np.testing.assert_allclose(out["boxes"][0] * 64, [8, 8, 17, 12], atol=1e-4)
    assert out["box_mask"][0]
    assert np.all(out["image"][:8] == FILL) and np.all(out["image"][8:16, 8:12] == 0)


@pytest.mark.parametrize("seed", range(6))
def test_random_mosaics_keep_boxes_on_their_pixels(seed):
    examples = _coloured_examples()
    augmentation = augment.Augmentation(
        image_size=(64, 64),
        letterbox=True,
        mosaic=1.0,
        scale_range=(0.5, 1.5),
        translate=0.1,
        max_boxes=8,
    )
    out = augmentation(examples[0], np.random.default_rng(seed), examples)
    assert out["image"].shape == (64, 64, 3) and out["boxes"].shape == (8, 4)
    assert out["box_mask"].any()
    _assert_boxes_frame_their_colours(out, 64)
    # Every kept box has its own colour somewhere inside: nothing kept is empty canvas.
    kept = out["box_mask"]
    for box, label in zip(out["boxes"][kept], out["box_labels"][kept], strict=True):
        y0, x0, y1, x1 = box * 64
        region = out["image"][int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))]
        assert np.any(np.all(np.abs(region.astype(int) - COLOURS[label]) <= 1, axis=-1))


def test_mosaic_is_deterministic_per_generator_and_uses_the_pool():
    examples = _coloured_examples()
    augmentation = augment.make_augmentation({"name": "detection", "image_size": (64, 64)})
    a = augmentation(examples[0], np.random.default_rng(3), examples)
    b = augmentation(examples[0], np.random.default_rng(3), examples)
    c = augmentation(examples[0], np.random.default_rng(4), examples)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])
    # A pool of one example with class-4 boxes only: the mosaic's other three come from it.
    alone = augmentation(examples[0], np.random.default_rng(3), [examples[3]])
    labels = set(alone["box_labels"][alone["box_mask"]].tolist())
    assert labels <= {0, 1, 4}


# --------------------------------------------------------------------------- HSV


def test_hsv_gains_by_hand():
    pixel = np.array([[[200, 100, 50]]], np.uint8)
    grey = augment.hsv_gains(pixel, (1.0, 0.0, 1.0))  # no saturation: grey at the value
    np.testing.assert_array_equal(grey, [[[200, 200, 200]]])
    darker = augment.hsv_gains(pixel, (1.0, 1.0, 0.5))
    np.testing.assert_allclose(darker.astype(int), [[[100, 50, 25]]], atol=2)
    same = augment.hsv_gains(pixel, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(same.astype(int), pixel, atol=3)
    # Hue wraps around the circle: 346 degrees (PIL's 245 of 256) times 1.1 is 20 degrees,
    # an orange, not a clipped red.
    rose = np.array([[[255, 0, 60]]], np.uint8)
    np.testing.assert_allclose(augment.hsv_gains(rose, (1.1, 1.0, 1.0)), [[[255, 78, 0]]], atol=3)
    red = np.array([[[255, 0, 0]]], np.uint8)  # hue 0 stays 0 under any hue gain
    np.testing.assert_array_equal(augment.hsv_gains(red, (1.3, 1.0, 1.0)), red)
    gray = np.array([[[100], [200]]], np.uint8)  # one channel: only the value gain
    np.testing.assert_array_equal(augment.hsv_gains(gray, (1.5, 0.0, 1.2)), [[[120], [240]]])


def test_hsv_jitter_leaves_boxes_alone_and_is_deterministic():
    example = _example((32, 48, 3), [(2, 3, 20, 30)], [(180, 60, 20)], background=(30, 90, 160))
    augmentation = augment.Augmentation(hsv=(0.015, 0.7, 0.4))
    assert augmentation.is_random
    outs = [augmentation(example, np.random.default_rng(seed)) for seed in (5, 5, 6)]
    for out in outs:
        np.testing.assert_array_equal(out["boxes"], example["boxes"])
        np.testing.assert_array_equal(out["box_labels"], example["box_labels"])
    np.testing.assert_array_equal(outs[0]["image"], outs[1]["image"])
    assert not np.array_equal(outs[0]["image"], example["image"])
    assert not np.array_equal(outs[0]["image"], outs[2]["image"])
    assert augmentation.deterministic().hsv is None


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def labelled_dataset() -> FederatedDataset:
    """24 images of one box each whose class is the image's index, over 4 clients."""
    examples = []
    for index in range(24):
        size = (40 + index, 64 - index, 3)  # mixed sizes
        example = _example(size, [(5, 5, 30, 30)], [COLOURS[index % 5]])
        example["box_labels"] = np.asarray([index], np.int32)
        examples.append(example)
    return FederatedDataset(
        name="labelled",
        train={key: [e[key] for e in examples] for key in examples[0]},
        test={},
        clients=tuple(np.arange(24).reshape(4, 6)),
        num_classes=24,
        label_key="box_labels",
        task="detection",
    )


def _cohort(dataset, num_workers: int = 0):
    builder = GrainCohortBuilder(
        dataset=dataset,
        client_sampler=sampling.uniform_clients(),
        example_sampler=sampling.local_epochs(1),
        clients_per_round=3,
        batch_size=3,
        seed=11,
        augmentation={"name": "detection", "image_size": (64, 64), "max_boxes": 8},
        num_workers=num_workers,
    )
    return builder(2)


def test_pipeline_mosaics_draw_only_from_the_same_client(labelled_dataset):
    cohort = _cohort(labelled_dataset)
    examples = cohort.examples
    assert examples["image"].shape == (3, 2, 3, 64, 64, 3)
    assert examples["letterbox"].shape == (3, 2, 3, 5)
    assert examples["boxes"].shape == (3, 2, 3, 8, 4)
    mixed = 0
    for slot, client in enumerate(np.asarray(cohort.clients.client_id)):
        own = set(labelled_dataset.clients[client].tolist())
        for step in range(2):
            for index in range(3):
                kept = examples["box_mask"][slot, step, index]
                labels = set(examples["box_labels"][slot, step, index][kept].tolist())
                assert labels <= own, (client, labels)
                mixed += len(labels) > 1
    assert mixed >= 6  # mosaics mix several of a client's images


def test_pipeline_mosaics_do_not_depend_on_workers(labelled_dataset):
    a, b = _cohort(labelled_dataset, 0), _cohort(labelled_dataset, 2)
    for key in a.examples:
        np.testing.assert_array_equal(a.examples[key], b.examples[key])


def test_client_examples_reads_the_clients_examples(labelled_dataset):
    pool = ClientExamples(labelled_dataset.train, labelled_dataset.clients[2])
    assert len(pool) == 6
    np.testing.assert_array_equal(pool[1]["box_labels"], [13])


# --------------------------------------------------------------------------- shapes_detection


def test_render_without_overlap_frames_every_shape():
    labels = np.arange(80) % 4
    out = shapes.render(
        labels, labels % 3, seed=1, image_size=64, num_classes=4, max_shapes=4, overlap=False
    )
    counts = out.box_mask.sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= 4 and len(set(counts.tolist())) >= 3
    boxes = np.round(augment.xyxy_to_yxyx(out.boxes) * 64).astype(int)
    for image in range(len(labels)):
        claimed = np.zeros((64, 64), int)
        for slot in np.flatnonzero(out.box_mask[image]):
            y0, x0, y1, x1 = boxes[image, slot]
            region = out.masks[image, y0:y1, x0:x1] == out.box_classes[image, slot] + 1
            # Tight: the shape's pixels touch all four sides of its box.
            assert region[0].any() and region[-1].any() and region[:, 0].any()
            assert region[:, -1].any()
            claimed[y0:y1, x0:x1] += 1
        assert claimed.max() <= 1  # boxes never overlap
        assert np.all(claimed[out.masks[image] > 0] == 1)  # every shape pixel in a box


def test_shapes_detection_dataset_boxes_enclose_their_shapes():
    config = _data_config(
        "shapes_detection",
        num_classes=4,
        image_size=64,
        max_shapes=4,
        num_train_examples=120,
        num_test_examples=30,
        num_clients=4,
        **{"partition.name": "lda_multilabel", "partition.alpha": 1.0},
    )
    dataset = build_dataset(config, seed=3)
    assert dataset.task == "detection" and dataset.label_key == "box_labels"
    assert dataset.class_names == shapes.SHAPE_NAMES[:4] and dataset.num_classes == 4
    assert len(dataset.train["image"]) == 120 and len(dataset.test["boxes"]) == 30
    every = np.sort(np.concatenate(dataset.clients))
    np.testing.assert_array_equal(every, np.arange(120))
    counts = [len(b) for b in dataset.train["boxes"]]
    assert min(counts) >= 1 and max(counts) <= 4
    inside_share, outside_share = [], []
    for split in (dataset.train, dataset.test):
        for image, boxes, labels in zip(
            split["image"], split["boxes"], split["box_labels"], strict=True
        ):
            assert len(boxes) == len(labels) and np.all((boxes >= 0) & (boxes <= 1))
            assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
            inside = np.zeros((64, 64), bool)
            for y0, x0, y1, x1 in np.round(boxes * 64).astype(int):
                inside[y0:y1, x0:x1] = True
            background = np.median(image[~inside], axis=0)
            differs = np.abs(image.astype(float) - background).mean(axis=-1) > 50
            outside_share.append(differs[~inside].mean())
            for y0, x0, y1, x1 in np.round(boxes * 64).astype(int):
                inside_share.append(differs[y0:y1, x0:x1].mean())
    # Shape pixels contrast with the background: they fill their boxes and are absent outside.
    assert np.min(inside_share) > 0.3, np.min(inside_share)
    assert np.max(outside_share) < 0.03, np.max(outside_share)
    # Clients keep their own style: each client's images share a background colour.
    corners = np.asarray(dataset.train["image"])[:, :2, :2].reshape(120, -1, 3).mean(axis=1)
    for members in dataset.clients:
        assert np.abs(corners[members] - np.median(corners[members], axis=0)).max() < 60


def test_shapes_detection_errors_are_one_line():
    config = _data_config("shapes_detection", max_shapes=0)
    with pytest.raises(ValueError, match=r"data\.max_shapes=0 is not allowed") as error:
        build_dataset(config, seed=0)
    _one_line(error)
    config = _data_config("shapes_detection", **{"partition.name": "nope"})
    with pytest.raises(ValueError, match=r"data\.partition\.name='nope' is unknown"):
        build_dataset(config, seed=0)


# --------------------------------------------------------------------------- COCO and VOC folders


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _coco_root(tmp_path: Path, labels: dict[str, str] | None = None) -> Path:
    """A YOLO-layout COCO folder with splits 'fit' and 'held' and a names file."""
    root = tmp_path / "coco"
    for split, stems in (("fit", ("a", "b", "c", "d")), ("held", ("e",))):
        for index, stem in enumerate(stems):
            _save(root / f"pics/{split}/{stem}.png", np.full((20, 40, 3), 10 * index, np.uint8))
    _save(root / "pics/fit/d.png", np.full((20, 40), 77, np.uint8))  # a grayscale file
    texts = {
        "fit/a": "0 0.5 0.5 0.5 0.5\n",
        "fit/b": "1 0.25 0.5 0.5 1.0\n2 0.75 0.75 0.5 0.5\n",
        "fit/c": "2 0.5 0.5 1.0 1.0\n",
        "held/e": "1 0.5 0.5 0.2 0.2\n",
        **(labels or {}),
    }
    for name, text in texts.items():
        path = root / f"txt/{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "names.yaml").write_text("names:\n  0: cat\n  1: dog\n  2: emu\n")
    return root


def _coco_config(root: Path, tmp_path: Path, **overrides) -> ml_collections.ConfigDict:
    fields = {
        "root": str(root),
        "cache_dir": str(tmp_path / "cache"),
        "num_clients": 2,
        "train_split": "fit",
        "test_split": "held",
        "images_dir": "pics",
        "labels_dir": "txt",
        "names_file": "names.yaml",
        "partition.name": "iid",
    }
    return _data_config("coco_detection", **{**fields, **overrides})


def test_coco_detection_with_its_own_split_folders(tmp_path):
    dataset = build_dataset(_coco_config(_coco_root(tmp_path), tmp_path), seed=0)
    assert dataset.task == "detection" and dataset.class_names == ("cat", "dog", "emu")
    assert len(dataset.train["image"]) == 4 and len(dataset.test["image"]) == 1
    np.testing.assert_allclose(dataset.train["boxes"][1], [[0, 0, 1, 0.5], [0.5, 0.5, 1, 1]])
    np.testing.assert_array_equal(dataset.train["box_labels"][1], [1, 2])
    assert dataset.train["boxes"][3].shape == (0, 4)  # d has no label file: no boxes
    assert dataset.train["image"][2].shape == (20, 40, 3)
    np.testing.assert_array_equal(dataset.train["image"][3], np.full((20, 40, 3), 77))  # RGB
    partition = dataset.partition("iid", 0)
    assert partition.stats.num_boxes == 4 and sum(partition.stats.client_sizes) == 4


def test_coco_detection_defaults_to_the_80_coco_classes(tmp_path):
    config = _coco_config(_coco_root(tmp_path), tmp_path, names_file="")
    dataset = build_dataset(config, seed=0)
    assert len(dataset.class_names) == 80 and dataset.class_names[:3] == (
        "person",
        "bicycle",
        "car",
    )


@pytest.mark.parametrize(
    "text, match",
    [
        ("3 0.5 0.5 0.1 0.1\n", r"b\.txt:1: class id '3' is out of range; must be .* \[0, 2\]"),
        ("0 0.5 0.5 0.1 0.1\n1 0.5 x 0.1 0.1\n", r"b\.txt:2: box .* is not four numbers"),
        ("0 0.5 0.5 0.1 0.1\n\n0 0.5 0.5 0.1\n", r"b\.txt:3: has 4 fields; must be 'class"),
        ("0 0.95 0.5 0.2 0.1\n", r"b\.txt:1: box .* reaches outside \[0, 1\]"),
        ("0 0.5 -0.2 0.1 0.1\n", r"b\.txt:1: box .* reaches outside \[0, 1\]"),
    ],
    ids=["class-id", "not-a-number", "malformed", "outside-right", "negative"],
)
def test_yolo_bad_labels_name_file_and_line(tmp_path, text, match):
    config = _coco_config(_coco_root(tmp_path, {"fit/b": text}), tmp_path)
    with pytest.raises(ValueError, match=match) as error:
        build_dataset(config, seed=0)
    _one_line(error)


def _voc_object(name: str, box) -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"  <object>\n    <name>{name}</name>\n    <bndbox>\n      <xmin>{xmin}</xmin>\n"
        f"      <ymin>{ymin}</ymin>\n      <xmax>{xmax}</xmax>\n      <ymax>{ymax}</ymax>\n"
        "    </bndbox>\n  </object>\n"
    )


def _vocdevkit(tmp_path: Path, year: str = "2007", first: str | None = None) -> Path:
    """tmp/VOCdevkit/VOC<year> with trainval images p, q, r and test image s (30 x 50)."""
    root = tmp_path / "devkit"
    voc = root / "VOCdevkit" / f"VOC{year}"
    objects = {
        "p": _voc_object("dog", (1, 1, 25, 15)) + _voc_object("cat", (26, 16, 50, 30)),
        "q": _voc_object("cat", (11, 6, 20, 10)),
        "r": _voc_object("bird", (1, 1, 50, 30)),
        "s": _voc_object("dog", (5, 5, 10, 10)),
    }
    for image_id, text in objects.items():
        _save(voc / f"JPEGImages/{image_id}.jpg", np.full((30, 50, 3), 128, np.uint8))
        xml = f"<annotation>\n{text}</annotation>\n"
        if image_id == "q" and first is not None:
            xml = first
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / f"Annotations/{image_id}.xml").write_text(xml)
    (voc / "ImageSets/Main").mkdir(parents=True)
    (voc / "ImageSets/Main/trainval.txt").write_text("p\nq\nr\n")
    (voc / "ImageSets/Main/test.txt").write_text("s\n")
    return root


def test_voc_detection_from_a_vocdevkit_folder(tmp_path):
    root = _vocdevkit(tmp_path)
    config = _data_config(
        "voc_detection",
        root=str(root),
        cache_dir=str(tmp_path / "cache"),
        num_clients=2,
        **{"partition.name": "iid"},
    )
    dataset = build_dataset(config, seed=0)
    assert dataset.class_names == ("bird", "cat", "dog") and dataset.task == "detection"
    assert len(dataset.train["boxes"]) == 3 and len(dataset.test["boxes"]) == 1
    # VOC's 1-based pixels: (v - 1) / size.
    np.testing.assert_allclose(
        dataset.train["boxes"][0], [[0, 0, 14 / 30, 24 / 50], [15 / 30, 25 / 50, 29 / 30, 49 / 50]]
    )
    np.testing.assert_array_equal(dataset.train["box_labels"][0], [2, 1])
    np.testing.assert_array_equal(dataset.test["box_labels"][0], [2])
    # The year picks the folder; a root without VOC data is one line.
    config.year = "2012"
    with pytest.raises(FileNotFoundError, match=r"holds no PASCAL VOC detection data") as error:
        build_dataset(config, seed=0)
    _one_line(error)


@pytest.mark.parametrize(
    "xml, match",
    [
        ("<annotation>\n  <object>\n</annotation>\n", r"q\.xml: not valid XML \(.*line 3"),
        (
            "<annotation>\n" + _voc_object("cat", (20, 6, 11, 10)) + "</annotation>\n",
            r"q\.xml: object 0 box .* has xmax < xmin.*must satisfy min <= max \(line 2\)",
        ),
        (
            "<annotation>\n"
            + _voc_object("cat", (1, 1, 5, 5))
            + _voc_object("cat", (11, 6, 20, 40))
            + "</annotation>\n",
            r"q\.xml: object 1 box .* outside the 50x30 image.*\(line 11\)",
        ),
        (
            "<annotation>\n  <object>\n    <name>cat</name>\n  </object>\n</annotation>\n",
            r"q\.xml: object 0 lacks a name or a numeric bndbox.*\(line 2\)",
        ),
    ],
    ids=["unparsable", "xmax-below-xmin", "outside", "no-box"],
)
def test_voc_bad_annotations_name_file_and_line(tmp_path, xml, match):
    root = _vocdevkit(tmp_path, first=xml)
    config = _data_config(
        "voc_detection", root=str(root), cache_dir=str(tmp_path / "cache"), num_clients=2
    )
    config.partition.name = "iid"
    with pytest.raises(ValueError, match=match) as error:
        build_dataset(config, seed=0)
    _one_line(error)


# --------------------------------------------------------------------------- the shipped configs


def _real_boxes(config) -> int:
    if config.data.name == "bccd":
        voc = real_data.require("bccd/BCCD")
        ids = (voc / "ImageSets/Main/train.txt").read_text().split()
        return sum((voc / f"Annotations/{i}.xml").read_text().count("<object>") for i in ids)
    coco = real_data.require("coco128")
    labels = coco / "object_detection/labels/train2017"
    images = {p.stem for p in (coco / "images/train2017").glob("*.jpg")}
    return sum(len(p.read_text().split()) // 5 for p in labels.glob("*.txt") if p.stem in images)


@pytest.mark.parametrize(
    "spec, clients, images",
    [
        ("configs/bccd_detection.py", 4, 205),
        ("configs/bccd_detection.py:fedcv,clients=2", 2, 205),
        ("configs/coco128_detection.py", 8, 128),
        ("configs/coco128_detection.py:lda,alpha=1.0", 8, 128),
    ],
)
def test_detection_configs_partition_and_inspect(tmp_path, spec, clients, images):
    real_data.require("bccd/BCCD" if "bccd" in spec else "coco128")
    config = load_config(spec)
    partition = inspect_partition(config, tmp_path)
    assert partition.stats.num_clients == clients
    every = np.sort(np.concatenate(partition.clients))
    np.testing.assert_array_equal(every, np.arange(images))
    saved = (tmp_path / "partition.json").read_text()
    assert f'"num_boxes": {_real_boxes(config)}' in saved
    assert (tmp_path / "class_heatmap.png").is_file()


def test_bccd_config_cohort_through_the_detection_preset():
    real_data.require("bccd/BCCD")
    config = load_config("configs/bccd_detection.py:size=96")
    dataset = build_dataset(config.data, config.seed)
    builder = GrainCohortBuilder(
        dataset=dataset,
        client_sampler=sampling.uniform_clients(),
        example_sampler=sampling.virtual_client(6),
        clients_per_round=2,
        batch_size=3,
        seed=0,
        augmentation=config.data.augmentation,
    )
    examples = builder(0).examples
    assert examples["image"].shape == (2, 2, 3, 96, 96, 3)
    assert examples["boxes"].shape == (2, 2, 3, 100, 4)
    assert examples["box_mask"].sum(axis=-1).min() >= 1  # every mosaic keeps some cells
    assert examples["letterbox"].shape == (2, 2, 3, 5)


def test_detection_config_arguments_are_checked():
    with pytest.raises(ValueError, match=r"config argument 'lad' is unknown"):
        load_config("configs/coco128_detection.py:lad")
    with pytest.raises(ValueError, match=r"lda and fedcv exclude each other"):
        load_config("configs/bccd_detection.py:lda,fedcv")
    config = load_config("configs/bccd_detection.py:size=100")
    with pytest.raises(ValueError, match=r"image_size=\(100, 100\) .* multiples of 32"):
        augment.make_augmentation(config.data.augmentation)
