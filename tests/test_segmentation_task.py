"""The segmentation task: metrics against independent numpy, the loss by hand, and rounds
that agree across execution strategies with ignore pixels and padding changing nothing."""

from __future__ import annotations

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_cv.engine import ClientInfo, Cohort
from fedjax_cv.tasks import get_task, merge_stats
from fedjax_cv.tasks.segmentation import confusion_matrix, mean_iou
from tests import task_rounds
from tests.xla import run_on_devices

NUM_CLASSES = 5


def reference_confusion(labels, predictions, num_classes, ignore=255):
    """Pixel by pixel, the definition itself."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for t, p in zip(np.ravel(labels), np.ravel(predictions), strict=True):
        if t != ignore:
            matrix[t, p] += 1
    return matrix


def reference_iou(labels, predictions, num_classes, ignore=255):
    """IoU from pixel sets; classes in neither truth nor prediction are left out."""
    labels, predictions = np.ravel(labels), np.ravel(predictions)
    valid = labels != ignore
    ious = {}
    for c in range(num_classes):
        truth, predicted = (labels == c) & valid, (predictions == c) & valid
        union = np.sum(truth | predicted)
        if union:
            ious[c] = np.sum(truth & predicted) / union
    return ious


def random_masks(rng, shape, num_classes, absent=(3,)):
    classes = [c for c in range(num_classes) if c not in absent]
    labels = rng.choice(classes, size=shape).astype(np.int64)
    labels[rng.random(shape) < 0.2] = 255
    predictions = rng.choice(classes, size=shape)
    return labels, predictions


def test_confusion_matrix_and_mean_iou_equal_a_pixel_by_pixel_reference():
    rng = np.random.default_rng(0)
    labels, predictions = random_masks(rng, (6, 9, 11), NUM_CLASSES)
    predictions[0, 0, :3] = 4  # class 4 only predicted, never true: IoU 0, in the mean
    labels[labels == 4] = 0
    matrix = confusion_matrix(labels, predictions, NUM_CLASSES)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, reference_confusion(labels, predictions, NUM_CLASSES))
    miou, per_class = mean_iou(matrix)
    expected = reference_iou(labels, predictions, NUM_CLASSES)
    assert set(np.flatnonzero(~np.isnan(per_class))) == set(expected)  # class 3 left out
    for c, iou in expected.items():
        assert per_class[c] == pytest.approx(iou, abs=1e-12)
    assert expected[4] == 0.0
    assert miou == pytest.approx(np.mean(list(expected.values())), abs=1e-12)


def test_per_batch_matrices_sum_to_the_whole_set_and_mean_iou_is_not_a_mean_of_batches():
    rng = np.random.default_rng(1)
    labels, predictions = random_masks(rng, (8, 7, 7), NUM_CLASSES, absent=())
    whole = confusion_matrix(labels, predictions, NUM_CLASSES)
    parts = [
        confusion_matrix(labels[i : i + 3], predictions[i : i + 3], NUM_CLASSES) for i in (0, 3, 6)
    ]
    np.testing.assert_array_equal(sum(parts), whole)
    per_batch_mean = np.mean([mean_iou(p)[0] for p in parts])
    assert mean_iou(whole)[0] != pytest.approx(per_batch_mean, abs=1e-6)


def test_a_label_that_is_no_class_and_not_ignore_is_refused():
    with pytest.raises(ValueError, match="label 7 is not allowed"):
        confusion_matrix(np.array([[0, 7]]), np.array([[0, 1]]), NUM_CLASSES)


class PixelLinear(nn.Module):
    """Logits = image @ W + b at every pixel: a model whose pixels do not see each other."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        return nn.Conv(self.num_classes, (1, 1), name="classifier")(x)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def numpy_logits(params, images):
    kernel = np.asarray(params["classifier"]["kernel"], np.float64)[0, 0]
    return images.astype(np.float64) @ kernel + np.asarray(params["classifier"]["bias"])


def make_batch(rng, batch=3, height=5, width=6):
    images = rng.normal(size=(batch, height, width, 3)).astype(np.float32)
    masks = rng.integers(0, NUM_CLASSES, (batch, height, width)).astype(np.int32)
    masks[rng.random(masks.shape) < 0.3] = 255
    masks[1] = 255  # an image without a single labelled pixel
    masks[1, 0, 0] = 2
    return {"image": images, "mask": masks}


def test_loss_is_the_mean_over_valid_pixels_and_fedir_weighs_pixels():
    task = get_task("segmentation")
    model = PixelLinear()
    rng = np.random.default_rng(2)
    batch = make_batch(rng)
    params = model.init(jax.random.key(0), batch["image"], train=False)["params"]
    losses, out = task.make_loss_fn(model)(params, {}, batch, jax.random.key(1))
    logp = log_softmax(numpy_logits(params, batch["image"]))
    valid = batch["mask"] != 255
    safe = np.where(valid, batch["mask"], 0)
    ce = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    expected = [ce[i][valid[i]].mean() for i in range(3)]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    accuracy = [(logp[i].argmax(-1) == safe[i])[valid[i]].mean() for i in range(3)]
    np.testing.assert_allclose(out.metrics["pixel_accuracy"], accuracy, rtol=1e-6)
    assert out.example_weights is None

    table = np.array([0.5, 2.0, 1.0, 0.0, 3.0], np.float32)
    losses, out = task.make_loss_fn(model)(
        params, {}, batch, jax.random.key(1), class_weights=jnp.asarray(table)
    )
    w = np.where(valid, table[safe], 0.0)
    n = valid.sum(axis=(1, 2))
    np.testing.assert_allclose(
        losses, [np.sum(w[i] * ce[i]) / np.sum(w[i]) for i in range(3)], rtol=1e-5
    )
    np.testing.assert_allclose(out.example_weights, w.sum(axis=(1, 2)) / n, rtol=1e-6)
    # The objective the client minimises then weighs each pixel by w / n_image.
    objective = np.sum(out.example_weights * losses) / np.sum(out.example_weights)
    pixel_weights = w / n[:, None, None]
    assert objective == pytest.approx(np.sum(pixel_weights * ce) / np.sum(pixel_weights), rel=1e-5)


def test_eval_statistics_leave_out_padded_images_and_ignore_pixels():
    task = get_task("segmentation")
    model = PixelLinear()
    rng = np.random.default_rng(3)
    batch = make_batch(rng, batch=4)
    padded = np.array([True, True, True, False])
    params = model.init(jax.random.key(0), batch["image"], train=False)["params"]
    stats = merge_stats(None, task.make_eval_fn(model)(params, {}, batch, padded))
    logp = log_softmax(numpy_logits(params, batch["image"][:3]))
    labels = batch["mask"][:3]
    np.testing.assert_array_equal(
        stats["confusion"], reference_confusion(labels, logp.argmax(-1), NUM_CLASSES)
    )
    valid = labels != 255
    ce = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    metrics = task.finalize(stats)
    assert stats["pixels"] == valid.sum()
    assert metrics["loss"] == pytest.approx(ce[valid].mean(), rel=1e-5)
    ious = reference_iou(labels, logp.argmax(-1), NUM_CLASSES)
    assert metrics["miou"] == pytest.approx(np.mean(list(ious.values())), abs=1e-12)
    assert metrics["pixel_accuracy"] == pytest.approx(
        (logp.argmax(-1) == labels)[valid].mean(), abs=1e-12
    )


def make_cohort(seed=0, num_clients=3, steps=2, batch=2, size=(5, 6)):
    rng = np.random.default_rng(seed)
    shape = (num_clients, steps, batch) + size
    images = rng.normal(size=shape + (3,)).astype(np.float32)
    masks = rng.integers(0, NUM_CLASSES, shape).astype(np.int32)
    masks[rng.random(shape) < 0.25] = 255
    example_mask = np.ones((num_clients, steps, batch), bool)
    counts = np.stack(
        [np.bincount(m[m != 255], minlength=NUM_CLASSES) for m in masks.reshape(num_clients, -1)]
    ).astype(np.float32)
    info = ClientInfo(
        client_id=np.arange(num_clients, dtype=np.int32),
        occurrence=np.zeros(num_clients, np.int32),
        num_examples=np.array([4, 3, 4], np.float32)[:num_clients],
        label_counts=counts,
    )
    return Cohort({"image": images, "mask": masks}, example_mask, info)


def run_rounds(cohort, strategy, importance=False, mesh=None):
    return task_rounds.run_rounds(
        "segmentation",
        PixelLinear(),
        cohort,
        strategy,
        NUM_CLASSES,
        importance=importance,
        mesh=mesh,
    )


@pytest.mark.parametrize("importance", [False, True])
def test_segmentation_round_agrees_across_strategies(importance):
    cohort = make_cohort()
    reference, ref_metrics = run_rounds(cohort, "vmap", importance)
    for strategy in ("sequential", "host"):
        params, metrics = run_rounds(cohort, strategy, importance)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, reference)
        assert metrics["pixel_accuracy"] == pytest.approx(ref_metrics["pixel_accuracy"], abs=1e-6)


def test_ignore_pixels_and_padded_examples_change_nothing():
    cohort = make_cohort(seed=4)
    reference, _ = run_rounds(cohort, "sequential")
    # Other pixel values where the mask says ignore: the 1x1 model's other pixels see nothing.
    rng = np.random.default_rng(9)
    images = cohort.examples["image"].copy()
    ignored = cohort.examples["mask"] == 255
    images[ignored] = rng.normal(size=(ignored.sum(), 3)) * 50
    changed = cohort.replace(examples={**cohort.examples, "image": images})
    params, _ = run_rounds(changed, "sequential")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, reference)

    # A padded example in a new last step and batch column holds garbage and has mask False.
    grow = task_rounds.grow
    padded = Cohort(
        {"image": grow(cohort.examples["image"], 7.0), "mask": grow(cohort.examples["mask"], 1)},
        grow(cohort.mask, False),
        cohort.clients,
    )
    params, _ = run_rounds(padded, "sequential")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, reference)


def test_eight_device_sharded_segmentation_round_matches_single_device():
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from fedjax_cv.engine import client_mesh
        from tests.test_segmentation_task import make_cohort, run_rounds
        assert jax.device_count() == 8, jax.devices()
        cohort = make_cohort()
        reference, _ = run_rounds(cohort, "vmap")
        for strategy in ("vmap", "sequential"):
            params, _ = run_rounds(cohort, strategy, mesh=client_mesh())
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, reference
            )
        print("sharded ok")
        """
    )
    result = run_on_devices(script)
    assert "sharded ok" in result.stdout
