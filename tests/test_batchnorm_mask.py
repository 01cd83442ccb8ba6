"""Padded examples stay out of BatchNorm's batch statistics (issue 15).

The client step runs the loss inside `example_mask(mask)`; every BatchNorm of the zoo in training
then computes its batch mean and variance, and so its running averages, over the real examples
only. Checked against numpy for one layer, for a batch with no real example, for every model of
the registry, and as training of a registry model of each task on a batch with and without
padded examples appended. The round itself is in test_reported_numbers.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_cv import algorithms
from fedjax_cv.engine import pad_clients
from fedjax_cv.models import get_model, model_names
from fedjax_cv.models.norm import Norm, current_example_mask, example_mask
from fedjax_cv.models.yolo import BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM, UltralyticsBatchNorm
from fedjax_cv.tasks import get_task
from tests import norm_problem as bn
from tests import test_models_segmentation, test_models_zoo

# (layer, momentum, epsilon): the zoo's two BatchNorms.
LAYERS = {
    "norm": (Norm("batch"), 0.9, 1e-5),
    "ultralytics": (UltralyticsBatchNorm(), BATCH_NORM_MOMENTUM, BATCH_NORM_EPSILON),
}
MASK = np.array([True, False, True, True, False, True])
STRATEGIES = ("vmap", "sequential", "host")


def layer_inputs():
    """[6, 2, 3, 4] maps whose padded examples (MASK False) hold values far from the rest."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 2, 3, 4)) * np.array([1.0, 2.0, 0.5, 3.0]) + np.array([0, 1, -2, 4])
    x[~MASK] = rng.uniform(50.0, 100.0, size=x[~MASK].shape)
    return x.astype(np.float32)


def layer_variables(layer: nn.Module, x) -> dict:
    """The layer's variables with running statistics and affine params away from their inits,
    so that momentum, scale and bias all show in the result."""
    variables = jax.device_get(layer.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(1)
    leaves = {
        "params": {"scale": rng.uniform(0.5, 2.0, 4), "bias": rng.normal(size=4)},
        "batch_stats": {"mean": rng.normal(size=4), "var": rng.uniform(0.5, 2.0, 4)},
    }
    assert set(variables) == set(leaves)
    return {
        collection: {"BatchNorm_0": {k: v.astype(np.float32) for k, v in values.items()}}
        for collection, values in leaves.items()
    }


def train_layer(layer, variables, x, mask):
    @jax.jit
    def run(variables, x, mask):
        with example_mask(mask):
            return layer.apply(variables, x, train=True, mutable=["batch_stats"])

    y, updates = run(variables, x, mask)
    return np.asarray(y), jax.device_get(updates["batch_stats"]["BatchNorm_0"])


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_batch_statistics_are_those_of_the_real_examples(kind):
    """Running averages and outputs against numpy (float64) over the real examples only.

    Catches: BatchNorm not given the mask (the padded 50-100s move the mean by ~25)."""
    layer, momentum, epsilon = LAYERS[kind]
    x = layer_inputs()
    variables = layer_variables(layer, x)
    y, stats = train_layer(layer, variables, x, MASK)

    real = x[MASK].astype(np.float64)
    mean, var = real.mean(axis=(0, 1, 2)), real.var(axis=(0, 1, 2))  # biased, as BatchNorm
    old = variables["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(
        stats["mean"], momentum * old["mean"] + (1 - momentum) * mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        stats["var"], momentum * old["var"] + (1 - momentum) * var, rtol=1e-5, atol=1e-6
    )
    params = variables["params"]["BatchNorm_0"]
    expected = (x - mean) / np.sqrt(var + epsilon) * params["scale"] + params["bias"]
    np.testing.assert_allclose(y[MASK], expected[MASK], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_batch_with_no_real_example_keeps_running_statistics(kind):
    """An all-padded batch leaves the running averages bit for bit as they were, and its
    outputs and gradients finite.

    Catches: the padded examples updating the statistics (no mask), and flax's own all-False
    mask, whose 0/0 statistics are NaN in the outputs and the running averages."""
    layer, _, _ = LAYERS[kind]
    x = layer_inputs()
    variables = layer_variables(layer, x)
    y, stats = train_layer(layer, variables, x, np.zeros(6, bool))
    jax.tree.map(np.testing.assert_array_equal, stats, variables["batch_stats"]["BatchNorm_0"])
    assert np.all(np.isfinite(y))

    @jax.jit
    def grads(params):
        def total(params):
            with example_mask(jnp.zeros(6, bool)):
                y, _ = layer.apply(
                    {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
                )
            return jnp.sum(y)

        return jax.grad(total)(params)

    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads(variables["params"])))


def test_without_a_mask_batch_norm_is_flax_batch_norm():
    """No mask set (evaluation, centralized steps, a model applied by hand): flax's BatchNorm bit
    for bit; a mask of all real examples agrees with it to rounding. A guard for today's
    numbers: it passes on the code before issue 15 too."""
    layer, _, _ = LAYERS["norm"]
    x = layer_inputs()
    variables = layer_variables(layer, x)
    flax_layer = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    flax_variables = {name: tree["BatchNorm_0"] for name, tree in variables.items()}
    expected = flax_layer.apply(flax_variables, x, mutable=["batch_stats"])
    assert current_example_mask() is None
    unmasked = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(unmasked[0], expected[0])
    jax.tree.map(
        np.testing.assert_array_equal,
        unmasked[1]["batch_stats"]["BatchNorm_0"],
        expected[1]["batch_stats"],
    )
    y, stats = train_layer(layer, variables, x, np.ones(6, bool))
    np.testing.assert_allclose(y, expected[0], rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        stats,
        expected[1]["batch_stats"],
    )
    evaluated = layer.apply(variables, x, train=False)  # running averages, mask or not
    with example_mask(np.zeros(6, bool)):
        np.testing.assert_array_equal(layer.apply(variables, x, train=False), evaluated)


def test_a_mask_must_have_one_entry_an_example():
    layer, _, _ = LAYERS["norm"]
    x = layer_inputs()
    with pytest.raises(ValueError, match=r"example_mask has shape \(4,\).*\(6,\)"):
        with example_mask(np.ones(4, bool)):
            layer.apply(layer_variables(layer, x), x, train=True, mutable=["batch_stats"])


def batch_norm_models() -> list[str]:
    """Every registry model that takes norm='batch' (ViT has LayerNorm only)."""
    return [name for name in model_names() if not name.startswith("vit_")]


def small_kwargs(name: str) -> dict:
    if name in test_models_zoo.CONV_ZOO:
        return test_models_zoo.small_kwargs(name)
    if name in test_models_segmentation.SEGMENTATION:
        return test_models_segmentation.small_kwargs(name)
    return {}


@pytest.mark.parametrize("name", batch_norm_models())
def test_every_batch_norm_of_the_registry_gets_the_mask(name):
    """Traced only (jax.eval_shape): in training under `example_mask`, every nn.BatchNorm of the
    model is called with the mask, broadcast to its input.

    Catches: a model or layer that builds its own nn.BatchNorm beside `Norm` and
    `UltralyticsBatchNorm`, whose statistics would still take in padded examples."""
    model = get_model(name, 3, norm="batch", **small_kwargs(name))
    x = jax.ShapeDtypeStruct((3, 64, 64, 3), jnp.float32)
    mask = np.array([True, False, True])
    calls = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            given = kwargs.get("mask")
            calls.append(given is not None and given.shape == args[0].shape)
        return next_fun(*args, **kwargs)

    def train(variables, x):
        with example_mask(mask), nn.intercept_methods(spy):
            rngs = {"dropout": jax.random.key(0)}
            return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)

    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    jax.eval_shape(train, variables, x)
    if name == "logistic":  # no norm layer at all
        assert calls == []
    else:
        assert calls and all(calls), f"{calls.count(False)} of {len(calls)} without the mask"


def classification_batch(rng, n):
    return {
        "image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 3, n).astype(np.int32),
    }


def segmentation_batch(rng, n):
    labels = rng.integers(0, 3, (n, 32, 32))
    labels[:, :4] = 255  # ignored pixels
    return {
        "image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
        "mask": labels.astype(np.uint8),
    }


def detection_batch(rng, n):
    corner = rng.uniform(0.05, 0.5, (n, 3, 2))
    size = rng.uniform(0.2, 0.45, (n, 3, 2))
    return {
        "image": rng.uniform(size=(n, 64, 64, 3)).astype(np.float32),
        "boxes": np.concatenate([corner, corner + size], -1).astype(np.float32),
        "box_labels": rng.integers(0, 3, (n, 3)).astype(np.int32),
        "box_mask": np.array([[True, True, False]] * n),
    }


# (task, registry model and small kwargs, batch maker): one BatchNorm model a task, without
# dropout (its random bits depend on the batch size).
TRAINING_CASES = {
    "classification": ("resnet18", {"stage_sizes": (1, 1, 1, 1)}, classification_batch),
    "segmentation": ("unet", {"base_width": 8}, segmentation_batch),
    "detection": ("yolov5n", {"width_multiple": 0.125}, detection_batch),
}


def train_two_steps(loss_fn, params, model_state, batches, masks, lr=0.1):
    """Two SGD steps on the masked mean loss, the objective and mask context of the client
    step (fedjax_cv.algorithms.client)."""

    @jax.jit
    def step(params, model_state, batch, mask):
        def objective(params):
            with example_mask(mask):
                losses, out = loss_fn(params, model_state, batch, jax.random.key(0))
            weights = mask.astype(jnp.float32)
            return jnp.sum(losses * weights) / jnp.sum(weights), out.model_state

        grads, model_state = jax.grad(objective, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), model_state

    for batch, mask in zip(batches, masks, strict=True):
        params, model_state = step(params, model_state, batch, mask)
    return jax.device_get((params, model_state))


@pytest.mark.slow
@pytest.mark.parametrize("task_name", sorted(TRAINING_CASES))
def test_registry_model_trains_the_same_with_padded_examples(task_name):
    """Two steps on batches of 4 real examples, and on the same batches with 2 padded examples
    (other images and labels) appended: params and running statistics agree within 1e-6.

    Catches: the padded examples in BatchNorm's statistics, which move the real examples'
    normalised features, their losses, gradients and the running averages."""
    name, kwargs, make_batch = TRAINING_CASES[task_name]
    model = get_model(name, 3, norm="batch", **kwargs)
    loss_fn = get_task(task_name).make_loss_fn(model)
    rng = np.random.default_rng(0)
    real = [make_batch(rng, 4) for _ in range(2)]
    padding = [make_batch(rng, 2) for _ in range(2)]
    for pad in padding:
        pad["image"] = pad["image"] * 10.0 + 5.0  # far from the real examples
    padded = [
        jax.tree.map(lambda a, b: np.concatenate([a, b]), r, p)
        for r, p in zip(real, padding, strict=True)
    ]
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(real[0]["image"])
    params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
    mask = np.array([True] * 4 + [False] * 2)
    expected = train_two_steps(loss_fn, params, model_state, real, [np.ones(4, bool)] * 2)
    result = train_two_steps(loss_fn, params, model_state, padded, [mask] * 2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), result, expected)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), model_state, expected[1])
    assert all(jax.tree.leaves(changed))  # the steps did move every running statistic


def batch_norm_cohorts():
    """(unpadded, padded) cohorts of the same real examples for `norm_problem`'s BatchNorm model:
    2 clients, 3 steps of 4 examples (client 1's last step has none); the padded one appends 2
    padded examples of far-off inputs to every batch and 2 padded clients."""
    cohort = bn.make_cohort(num_clients=2, num_steps=3, batch=6, seed=1, sizes=[12, 8])
    mask = np.zeros((2, 3, 6), bool)
    mask[:, :, :4] = True
    mask[1, 2] = False
    x = cohort.examples["x"].copy()
    x[~mask] = 40.0 + 10.0 * np.arange(int((~mask).sum()))[:, None]
    padded = cohort.replace(examples={**cohort.examples, "x": x}, mask=mask)
    unpadded = jax.tree.map(lambda a: a[:, :, :4], padded.examples)
    unpadded = padded.replace(examples=unpadded, mask=mask[:, :, :4])
    return unpadded, pad_clients(padded, 4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_round_trains_the_same_with_padded_examples_steps_and_clients(strategy):
    """FedAvg on a BatchNorm model with a hand-written loss function (not a task's): the round
    on padded batches, an all-padded step and padded clients equals the round without padding,
    and the averaged running statistics stay finite.

    Catches: the client step not setting `example_mask` (the padded inputs of 40 and more move
    the statistics), and NaN statistics of all-padded batches reaching the server (the padded
    clients' steps run under vmap, where lax.cond becomes a select)."""
    states = []
    for cohort in batch_norm_cohorts():
        params, model_state = bn.initial_variables()
        algorithm = algorithms.fedavg(bn.loss_fn, 0.1, strategy=strategy)
        state = algorithm.init(params, model_state)
        states.append(jax.device_get(algorithm.apply(state, cohort, jax.random.key(0))[0]))
    unpadded, padded = states
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(padded.model_state))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        (padded.params, padded.model_state),
        (unpadded.params, unpadded.model_state),
    )
    mean, var = bn.batch_stats(padded.model_state)
    assert np.all(mean != 0) and np.all(var != 1)  # the round moved the statistics
