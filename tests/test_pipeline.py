"""Augmentation against hand-computed cases; the grain cohort builder against the numpy one."""

import dataclasses

import jax
import numpy as np
import pytest

from fedjax_cv.algorithms import sampling
from fedjax_cv.config_base import base_config
from fedjax_cv.data import augment, shapes
from fedjax_cv.data.cohort import CohortBuilder, normalize_images
from fedjax_cv.data.federated import FederatedDataset
from fedjax_cv.data.pipeline import GrainCohortBuilder
from fedjax_cv.data.registry import shapes_dataset
from fedjax_cv.data.sources import IGNORE_LABEL

# --------------------------------------------------------------------------- augmentation

IMAGE_3X3 = np.arange(9, dtype=np.uint8).reshape(3, 3, 1)


def test_flip_of_a_known_image():
    flipped = augment.flip_images(IMAGE_3X3)[..., 0]
    np.testing.assert_array_equal(flipped, [[2, 1, 0], [5, 4, 3], [8, 7, 6]])


def test_random_flip_of_a_batch_flips_each_image_or_not():
    batch = np.stack([IMAGE_3X3 + 10 * i for i in range(16)]).astype(np.uint8)
    out = augment.random_flip(batch, np.random.default_rng(0))
    flipped = [np.array_equal(o, b[:, ::-1]) for o, b in zip(out, batch, strict=True)]
    kept = [np.array_equal(o, b) for o, b in zip(out, batch, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 16


def test_flipped_boxes_by_hand():
    # (ymin, xmin, ymax, xmax): x -> 1 - x, so xmin 0.2 .. xmax 0.6 becomes 0.4 .. 0.8.
    boxes = np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 0.25]], np.float32)
    expected = [[0.1, 0.4, 0.5, 0.8], [0.0, 0.75, 1.0, 1.0]]
    np.testing.assert_allclose(augment.flip_boxes(boxes), expected, atol=1e-7)
    example = augment.flip_example({"image": IMAGE_3X3, "boxes": boxes})
    np.testing.assert_allclose(example["boxes"], expected, atol=1e-7)


def test_box_converters_swap_axes():
    xyxy = np.array([[0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_array_equal(augment.xyxy_to_yxyx(xyxy), [[0.2, 0.1, 0.4, 0.3]])
    np.testing.assert_array_equal(augment.yxyx_to_xyxy(augment.xyxy_to_yxyx(xyxy)), xyxy)


def test_crop_with_zero_padding_shifts_content():
    image = np.arange(1, 17, dtype=np.uint8).reshape(4, 4, 1)
    # Padded by 1, window at (top 0, left 2): out[y, x] = image[y - 1, x + 1], 0 outside.
    out = augment.crop_with_padding(image, 0, 2, padding=1, mode="zero")
    expected = [[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0]]
    assert out.shape == image.shape
    np.testing.assert_array_equal(out[..., 0], expected)


def test_crop_with_reflect_padding_mirrors_edges():
    # Padded by 1 with numpy's "reflect" (edge not repeated): index -1 reads index 1.
    out = augment.crop_with_padding(IMAGE_3X3, 0, 0, padding=1, mode="reflect")
    np.testing.assert_array_equal(out[..., 0], [[4, 3, 4], [1, 0, 1], [4, 3, 4]])
    np.testing.assert_array_equal(
        out, np.pad(IMAGE_3X3, ((1, 1), (1, 1), (0, 0)), "reflect")[:3, :3]
    )


@pytest.mark.parametrize("mode", augment.CROP_MODES)
def test_batched_crop_equals_crop_of_each_image(mode):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    tops, lefts = rng.integers(0, 9, 6), rng.integers(0, 9, 6)
    out = augment.crop_with_padding(batch, tops, lefts, padding=4, mode=mode)
    for i in range(6):
        single = augment.crop_with_padding(batch[i], tops[i], lefts[i], padding=4, mode=mode)
        np.testing.assert_array_equal(out[i], single)
    random = augment.random_crop(batch, np.random.default_rng(1), padding=4, mode=mode)
    assert random.shape == batch.shape


def test_bilinear_resize_by_hand():
    # Half-pixel centres: outputs sample x = -0.25, 0.25, 0.75, 1.25 -> 0, 63.75, 191.25, 255.
    row = np.array([[[0], [255]]], np.uint8)
    np.testing.assert_array_equal(augment.resize_images(row, (1, 4))[0, :, 0], [0, 64, 191, 255])
    np.testing.assert_allclose(
        augment.resize_images(row.astype(np.float32), (1, 4))[0, :, 0], [0, 63.75, 191.25, 255]
    )


def test_nearest_mask_resize_keeps_labels():
    mask = np.array([[0, 3], [255, 3]], np.uint8)
    np.testing.assert_array_equal(
        augment.resize_masks(mask, (4, 4)), np.kron(mask, np.ones((2, 2)))
    )
    big = np.random.default_rng(0).choice(np.array([0, 3, 255], np.uint8), (9, 11))
    for size in [(4, 5), (13, 7), (20, 30)]:
        values = set(np.unique(augment.resize_masks(big, size)))
        assert values <= {0, 3, 255}
        assert IGNORE_LABEL in values


def test_scale_example_moves_boxes_and_fills_mask_with_ignore():
    example = {
        "image": np.full((10, 10, 3), 200, np.uint8),
        "mask": np.ones((10, 10), np.uint8),
        "boxes": np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.2, 0.2]], np.float32),
    }
    # Half size, pasted at (top 5, left 0): the whole-image box becomes the bottom-left quarter.
    out = augment.scale_example(example, (5, 5), top=5, left=0)
    np.testing.assert_allclose(out["boxes"][0], [0.5, 0.0, 1.0, 0.5])
    np.testing.assert_allclose(out["boxes"][1], [0.5, 0.0, 0.6, 0.1])
    assert out["box_mask"].tolist() == [True, True]
    assert (out["mask"][5:, :5] == 1).all() and (out["mask"][:5] == IGNORE_LABEL).all()
    assert (out["image"][5:, :5] == 200).all() and (out["image"][:5] == 0).all()


def test_crop_example_drops_boxes_pushed_out():
    example = {
        "image": np.zeros((10, 10, 3), np.uint8),
        "boxes": np.array([[0.0, 0.0, 0.1, 0.1], [0.0, 0.5, 0.5, 1.0]], np.float32),
    }
    # Padding 2, window at (4, 4): content moves up-left by 2 px = 0.2.
    out = augment.crop_example(example, 4, 4, padding=2, mode="zero")
    assert out["box_mask"].tolist() == [False, True]
    np.testing.assert_allclose(out["boxes"], [[0, 0, 0, 0], [0.0, 0.3, 0.3, 0.8]], atol=1e-6)


def test_pad_boxes_keeps_real_boxes_first():
    boxes = np.arange(12, dtype=np.float32).reshape(3, 4) / 12
    example = {
        "boxes": boxes,
        "box_mask": np.array([True, False, True]),
        "box_labels": np.array([7, 8, 9], np.int32),
    }
    out = augment.pad_boxes(example, 4)
    np.testing.assert_array_equal(out["boxes"], [boxes[0], boxes[2], [0] * 4, [0] * 4])
    assert out["box_labels"].tolist() == [7, 9, 0, 0]
    assert out["box_mask"].tolist() == [True, True, False, False]
    short = augment.pad_boxes(example, 1)
    assert short["box_labels"].tolist() == [7] and short["box_mask"].tolist() == [True]


def test_normalize_is_mean_std_half():
    out = augment.normalize(np.array([0, 255], np.uint8))
    np.testing.assert_array_equal(out, [-1.0, 1.0])


def test_make_augmentation_names_and_errors():
    assert augment.make_augmentation("none").is_identity
    cifar = augment.make_augmentation("cifar")
    assert cifar.crop_padding == 4 and cifar.flip
    assert augment.make_augmentation(cifar) is cifar
    custom = augment.make_augmentation({"name": "cifar", "crop_mode": "reflect"})
    assert custom.crop_mode == "reflect" and custom.flip
    with pytest.raises(ValueError, match=r"data\.augmentation='autoaugment'.*cifar.*none"):
        augment.make_augmentation("autoaugment")
    with pytest.raises(ValueError, match=r"data\.augmentation\.colour"):
        augment.make_augmentation({"name": "none", "colour": 1})
    with pytest.raises(ValueError, match=r"data\.augmentation\.crop_mode='edge'"):
        augment.make_augmentation({"crop_mode": "edge"})


# --------------------------------------------------------------------------- cohort builder


@pytest.fixture(scope="module")
def dataset() -> FederatedDataset:
    config = base_config().data
    config.num_clients, config.num_train_examples, config.num_test_examples = 12, 360, 8
    config.image_size = 12
    config.partition.name, config.partition.alpha = "lda", 0.5  # unequal client sizes
    return shapes_dataset(config, seed=0)


SAMPLERS = {
    "fedavg": (sampling.uniform_clients(), sampling.local_epochs(1)),
    "fedvc": (sampling.size_proportional_clients(), sampling.virtual_client(20)),
}


def _builder(dataset, sampler="fedavg", cls=GrainCohortBuilder, **kwargs):
    clients, examples = SAMPLERS[sampler]
    return cls(
        dataset=dataset,
        client_sampler=clients,
        example_sampler=examples,
        clients_per_round=kwargs.pop("clients_per_round", 5),
        batch_size=kwargs.pop("batch_size", 8),
        seed=7,
        **kwargs,
    )


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("num_workers", [0, 2])
def test_equals_numpy_builder_without_augmentation(dataset, sampler, num_workers):
    for round_index in (0, 3):
        expected = _builder(dataset, sampler, CohortBuilder)(round_index)
        got = _builder(dataset, sampler, num_workers=num_workers)(round_index)
        _assert_same(got, expected)


def test_equals_numpy_builder_with_poisoned_clients(dataset):
    kwargs = dict(poisoned_clients=6, clients_per_round=8)
    expected = _builder(dataset, cls=CohortBuilder, **kwargs)(1)
    got = _builder(dataset, **kwargs)(1)
    assert np.isnan(got.examples["image"]).any()
    _assert_same(got, expected)


@pytest.mark.parametrize("augmentation", ["cifar", "scale_flip"])
def test_worker_count_changes_nothing(dataset, augmentation):
    cohorts = [
        _builder(dataset, "fedvc", augmentation=augmentation, num_workers=w)(2) for w in (0, 2)
    ]
    _assert_same(cohorts[0], cohorts[1])


def test_same_round_same_cohort_other_round_other_cohort(dataset):
    builder = _builder(dataset, augmentation="cifar", num_workers=2)
    _assert_same(builder(4), builder(4))
    assert not np.array_equal(builder(4).examples["image"], builder(5).examples["image"])


def test_augmentation_changes_pixels_only(dataset):
    plain = _builder(dataset)(0)
    augmented = _builder(dataset, augmentation="cifar")(0)
    _assert_same(augmented.mask, plain.mask)
    _assert_same(augmented.examples["label"], plain.examples["label"])
    _assert_same(augmented.clients, plain.clients)
    real = plain.mask
    assert not np.array_equal(augmented.examples["image"][real], plain.examples["image"][real])


def test_padding_masks(dataset):
    builder = _builder(dataset, augmentation="cifar", clients_per_round=12, batch_size=8)
    cohort = builder(0)
    slots = builder.num_steps * builder.batch_size
    sizes = dataset.client_sizes[np.asarray(cohort.clients.client_id)]
    assert (sizes < slots).any()  # some client pads
    mask = cohort.mask.reshape(len(sizes), slots)
    np.testing.assert_array_equal(mask.sum(axis=1), np.minimum(sizes, slots))
    # Real examples first, then padding: the mask is a prefix of each client's slots.
    np.testing.assert_array_equal(mask, np.arange(slots)[None] < sizes[:, None])
    np.testing.assert_array_equal(cohort.clients.num_examples, sizes)
    # Every real example of a client is one of its own, each exactly once.
    labels = cohort.examples["label"].reshape(len(sizes), slots)
    for slot, client in enumerate(np.asarray(cohort.clients.client_id)):
        expected = np.sort(dataset.train["label"][dataset.clients[client]])
        np.testing.assert_array_equal(np.sort(labels[slot][mask[slot]]), expected)


# --------------------------------------------------------------------------- boxes and masks


@pytest.fixture(scope="module")
def detection_dataset() -> FederatedDataset:
    """shapes images with masks and boxes, of two sizes, as per-example sequences."""
    parts = []
    for size, n in ((16, 20), (24, 20)):
        labels = np.arange(n) % 4
        parts.append(shapes.render(labels, labels % 3, seed=size, image_size=size, max_shapes=3))
    images = [image for part in parts for image in part.images]
    return FederatedDataset(
        name="shapes_detection",
        train={
            "image": images,
            "label": np.concatenate([p.labels for p in parts]),
            "mask": [mask for part in parts for mask in part.masks],
            "boxes": [augment.xyxy_to_yxyx(b) for part in parts for b in part.boxes],
            "box_classes": [c for part in parts for c in part.box_classes],
            "box_mask": [m for part in parts for m in part.box_mask],
        },
        test={},
        clients=tuple(np.arange(40).reshape(4, 10)),
        num_classes=4,
    )


def test_flip_moves_image_mask_and_boxes_together(detection_dataset):
    train = detection_dataset.train
    augmentation = augment.Augmentation("flip", image_size=(16, 16), flip=True, max_boxes=4)
    builder = _builder(
        detection_dataset, augmentation=augmentation, clients_per_round=4, batch_size=5
    )
    cohort = builder(0)
    layout = builder.layout(0)
    examples = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[3:]), cohort.examples)
    flips = []
    for i, index in enumerate(layout.examples.ravel()[layout.mask.ravel()]):
        plain = augment.pad_boxes(
            augment.resize_example({k: v[index] for k, v in train.items()}, (16, 16)), 4
        )
        flipped = augment.flip_example(plain)
        got = {k: v[i] for k, v in examples.items()}
        matches = [
            np.array_equal(got["image"], normalize_images(ref["image"]))
            and np.array_equal(got["mask"], ref["mask"])
            and np.allclose(got["boxes"], ref["boxes"] * ref["box_mask"][:, None])
            and np.array_equal(got["box_mask"], ref["box_mask"])
            for ref in (plain, flipped)
        ]
        assert any(matches), f"example {index}: image, mask and boxes disagree"
        flips.append(matches[1] and not matches[0])
    assert 0 < sum(flips) < len(flips)


def test_mixed_sizes_need_image_size(detection_dataset):
    with pytest.raises(ValueError, match=r"data\.augmentation\.image_size"):
        _builder(detection_dataset, clients_per_round=4, batch_size=5)(0)


def test_detection_cohort_shapes_and_worker_determinism(detection_dataset):
    augmentation = dataclasses.replace(
        augment.make_augmentation("scale_flip"), image_size=(20, 20), max_boxes=5
    )
    cohorts = [
        _builder(
            detection_dataset,
            augmentation=augmentation,
            clients_per_round=4,
            batch_size=5,
            num_workers=w,
        )(1)
        for w in (0, 2)
    ]
    _assert_same(cohorts[0], cohorts[1])
    examples = cohorts[0].examples
    assert examples["image"].shape == (4, 2, 5, 20, 20, 3)
    assert examples["mask"].shape == (4, 2, 5, 20, 20)
    assert examples["boxes"].shape == (4, 2, 5, 5, 4)
    assert examples["box_mask"].shape == (4, 2, 5, 5)
    assert set(np.unique(examples["mask"])) <= {0, 1, 2, 3, 4, IGNORE_LABEL}
    boxes = examples["boxes"][examples["box_mask"]]
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
