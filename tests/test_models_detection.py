"""YOLO detectors: parameter counts, the output convention, priors, anchors, input checks, norms
and zoo backbones.

Full-size models are traced (`jax.eval_shape`: shapes, no compute); the only real forward passes
are YOLOv5n's at 640x640 (once, shared by the tests that need values), a zero-kernel pass at
64x96, one BatchNorm training step at 64x64 and single `Conv` blocks, so the file stays fast on
a 2-core CPU.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_cv.algorithms.local_state import NORM_LAYERS, select
from fedjax_cv.algorithms.param_groups import freeze_except, frozen_fraction, multipliers
from fedjax_cv.models import NORMS, count_params, detection_geometry, get_model, model_names
from fedjax_cv.models.weights import head_modules
from fedjax_cv.models.yolo import Conv, Detect, upsample2
from tests.xla import jit

NUM_CLASSES = 80

# Ultralytics' model summaries at 80 classes (params only: conv weights and biases, BatchNorm
# scale and bias; running statistics are buffers there).
REFERENCE_PARAMS = {
    "yolov5n": 1_872_157,
    "yolov5s": 7_235_389,
    "yolov5m": 21_190_557,
    "yolov5l": 46_563_709,
    "yolov5x": 86_749_405,
    "yolov3": 61_949_149,
}
DETECTORS = tuple(REFERENCE_PARAMS)
STRIDES = (8, 16, 32)
# YOLOv5's default anchors, written out here rather than imported, (w, h) per level.
DEFAULT_ANCHORS = [
    [[10, 13], [16, 30], [33, 23]],
    [[30, 61], [62, 45], [59, 119]],
    [[116, 90], [156, 198], [373, 326]],
]


def trace(model: nn.Module, shape: tuple[int, ...], **kwargs):
    """(outputs, variables) of `model.init_with_output` as shapes: nothing is computed."""
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False, **kwargs), images
    )


def expected_shapes(batch, height, width, num_classes=NUM_CLASSES):
    return [(batch, height // s, width // s, 3, 5 + num_classes) for s in STRIDES]


def shapes_of(outputs):
    assert isinstance(outputs, tuple) and len(outputs) == 3
    return [tuple(o.shape) for o in outputs]


def shape_tree(tree):
    return jax.tree.map(lambda leaf: leaf.shape, tree)


def prior(stride: int, num_classes: int) -> np.ndarray:
    """YOLOv5's initial Detect bias, [3 anchors, 5 + classes], from the formula."""
    row = np.zeros(5 + num_classes)
    row[4] = math.log(8 / (640 / stride) ** 2)
    row[5:] = math.log(0.6 / (num_classes - 0.99))
    return np.tile(row, (3, 1))


@pytest.fixture(scope="module")
def yolov5n_640():
    """(outputs, variables) of YOLOv5n's init at 640x640: one real forward pass."""
    model = get_model("yolov5n", NUM_CLASSES)
    x = jax.random.uniform(jax.random.key(1), (1, 640, 640, 3))
    return jit(lambda key, x: model.init_with_output(key, x, train=False))(jax.random.key(0), x)


def test_registry_has_the_detectors():
    assert set(DETECTORS) <= set(model_names())


@pytest.mark.parametrize("name", DETECTORS)
def test_parameter_count_matches_ultralytics(name):
    counts = {
        norm: count_params(trace(get_model(name, NUM_CLASSES, norm=norm), (1, 64, 64, 3))[1])
        for norm in ("batch", "group")
    }
    reference = REFERENCE_PARAMS[name]
    assert abs(counts["batch"] - reference) / reference < 0.01, counts["batch"]
    # The counts are in fact exact, which also catches a missing block (one of YOLOv3's 256
    # channel bottlenecks is 0.5% of it).
    assert counts["batch"] == reference
    # GroupNorm's scale and bias are BatchNorm's two parameters per channel.
    assert counts["group"] == counts["batch"]


@pytest.mark.parametrize("name", DETECTORS)
def test_output_shapes(name):
    model = get_model(name, NUM_CLASSES)
    sizes = [(2, 320, 320), (1, 64, 96)] + ([] if name == "yolov5n" else [(1, 640, 640)])
    for batch, height, width in sizes:
        outputs, _ = trace(model, (batch, height, width, 3))
        assert shapes_of(outputs) == expected_shapes(batch, height, width)
        assert all(o.dtype == jnp.float32 for o in outputs)


def test_yolov5n_forward_at_640(yolov5n_640):
    outputs, _ = yolov5n_640
    assert shapes_of(outputs) == expected_shapes(1, 640, 640)
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in outputs)


def test_detect_biases_start_at_yolov5_priors(yolov5n_640):
    _, variables = yolov5n_640
    detect = variables["params"]["detect"]
    for level, stride in enumerate(STRIDES):
        bias = np.asarray(detect[f"level{level}"]["bias"]).reshape(3, 5 + NUM_CLASSES)
        np.testing.assert_allclose(bias, prior(stride, NUM_CLASSES), rtol=1e-6, atol=1e-7)
    # The numbers themselves: objectness log(8 / 80^2) at stride 8, classes log(0.6 / 79.01).
    assert detect["level0"]["bias"][4] == pytest.approx(-6.684612, abs=1e-5)
    assert detect["level2"]["bias"][4] == pytest.approx(-3.912023, abs=1e-5)
    assert detect["level1"]["bias"][5] == pytest.approx(-4.880400, abs=1e-5)

    # Another class count, on Detect alone.
    maps = [jnp.zeros((1, 1, 1, 4))] * 3
    params = Detect(3).init(jax.random.key(0), maps)["params"]
    for level, stride in enumerate(STRIDES):
        bias = np.asarray(params[f"level{level}"]["bias"]).reshape(3, 8)
        np.testing.assert_allclose(bias, prior(stride, 3), rtol=1e-6, atol=1e-7)


def test_outputs_are_laid_out_anchor_then_prediction(yolov5n_640):
    # With Detect's kernels zeroed, every cell predicts exactly its level's bias: this pins the
    # last two axes to (anchor, tx ty tw th obj classes...) on a non-square input.
    _, variables = yolov5n_640
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.zeros_like(leaf) if "kernel" in str(path[-1]) else leaf,
        variables["params"]["detect"],
    )
    variables = {**variables, "params": {**variables["params"], "detect": params}}
    model = get_model("yolov5n", NUM_CLASSES)
    x = jax.random.uniform(jax.random.key(2), (2, 64, 96, 3))
    outputs = jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert shapes_of(outputs) == expected_shapes(2, 64, 96)
    for output, stride in zip(outputs, STRIDES, strict=True):
        expected = np.broadcast_to(prior(stride, NUM_CLASSES), output.shape)
        np.testing.assert_allclose(np.asarray(output), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["yolov5s", "yolov3"])
def test_anchors_and_strides(name):
    model = get_model(name, NUM_CLASSES)
    assert np.array_equal(np.asarray(model.anchors), DEFAULT_ANCHORS)
    assert tuple(model.strides) == STRIDES
    anchors, strides = detection_geometry(model)
    assert anchors.dtype == np.float32 and anchors.shape == (3, 3, 2)
    assert np.array_equal(anchors, DEFAULT_ANCHORS)
    assert strides.shape == (3,) and list(strides) == list(STRIDES)

    custom = tuple(tuple((w / 2, h / 2) for w, h in level) for level in DEFAULT_ANCHORS)
    anchors, _ = detection_geometry(get_model(name, NUM_CLASSES, anchors=custom))
    assert np.array_equal(anchors, np.asarray(DEFAULT_ANCHORS) / 2)


def test_detection_geometry_refuses_other_models():
    with pytest.raises(ValueError, match="not a detector") as error:
        detection_geometry(get_model("resnet18", 10))
    assert "\n" not in str(error.value)


def test_bad_anchors_are_refused():
    model = get_model("yolov5n", NUM_CLASSES, anchors=((10, 13), (16, 30), (33, 23)))
    with pytest.raises(ValueError, match=r"^model\.anchors=.* is not allowed"):
        trace(model, (1, 64, 64, 3))
    with pytest.raises(ValueError, match=r"^model\.anchors=.* is not allowed"):
        detection_geometry(model)


@pytest.mark.parametrize("shape", [(1, 100, 96, 3), (1, 64, 80, 3), (2, 320, 330, 3)])
def test_input_not_a_multiple_of_32_is_refused(shape):
    with pytest.raises(ValueError) as error:
        trace(get_model("yolov5n", NUM_CLASSES), shape)
    message = str(error.value)
    assert str(shape) in message
    assert "letterboxed to a multiple of 32" in message
    assert "\n" not in message


def test_unknown_backbone_is_refused():
    model = get_model("yolov5n", NUM_CLASSES, backbone="vgg16")
    with pytest.raises(ValueError) as error:
        trace(model, (1, 64, 64, 3))
    message = str(error.value)
    assert message.startswith("model.backbone='vgg16' is unknown; allowed: csp_darknet, ")
    assert "mobilenet_v2" in message and "resnet50" in message and "\n" not in message


def test_upsampling_is_nearest_neighbour():
    x = np.arange(2 * 2 * 3 * 2, dtype=np.float32).reshape(2, 2, 3, 2)
    expected = np.kron(x, np.ones((1, 2, 2, 1), np.float32))  # each pixel becomes a 2x2 block
    np.testing.assert_array_equal(np.asarray(upsample2(jnp.asarray(x))), expected)


def test_every_norm_builds():
    counts = {}
    for norm in NORMS:
        outputs, variables = trace(get_model("yolov5n", NUM_CLASSES, norm=norm), (1, 64, 64, 3))
        assert shapes_of(outputs) == expected_shapes(1, 64, 64)
        assert ("batch_stats" in variables) == (norm == "batch")
        counts[norm] = count_params(variables)
    assert counts["group"] == counts["batch"] == counts["layer"] > counts["none"]


def test_conv_batch_norm_is_ultralytics():
    conv = Conv(2, 1, norm="batch")
    norm = {"scale": jnp.ones(2), "bias": jnp.zeros(2)}
    variables = {  # the names `Norm(kind="batch")` gives: FedBN and weight files rely on them
        "params": {
            "conv": {"kernel": jnp.eye(2).reshape(1, 1, 2, 2)},
            "norm": {"BatchNorm_0": norm},
        },
        "batch_stats": {"norm": {"BatchNorm_0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}},
    }
    x = jnp.asarray([[[[10.0, -3.0]]]])
    batch = jax.random.normal(jax.random.key(1), (4, 3, 5, 2)) + 2.0

    @jit
    def run(variables, x, batch):
        evaluated = conv.apply(variables, x, train=False)
        _, updates = conv.apply(variables, batch, train=True, mutable=["batch_stats"])
        return evaluated, updates

    y, updates = run(variables, x, batch)
    # Epsilon 1e-3: with unit running variance, evaluation divides by sqrt(1 + 1e-3); then SiLU.
    z = np.asarray(x) / np.sqrt(1 + 1e-3)
    np.testing.assert_allclose(np.asarray(y), z / (1 + np.exp(-z)), rtol=1e-6)
    # Momentum 0.03 (PyTorch's terms): one training step moves the running mean 3% of the way.
    stats = updates["batch_stats"]["norm"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], 0.03 * batch.mean(axis=(0, 1, 2)), rtol=1e-5)
    assert jax.tree.structure(updates) == jax.tree.structure(
        {"batch_stats": variables["batch_stats"]}
    )


def test_batch_norm_trains_with_mutable_batch_stats():
    model = get_model("yolov5n", NUM_CLASSES, norm="batch")
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))

    @jit
    def init_and_train_step(key, x):  # one compilation
        variables = model.init(key, x, train=False)
        return variables, model.apply(variables, x, train=True, mutable=["batch_stats"])

    variables, (outputs, updates) = init_and_train_step(jax.random.key(0), x)
    assert shapes_of(outputs) == expected_shapes(2, 64, 64)
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    # One step moves every running mean and variance (from 0 and 1) towards the batch's.
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old, new)
    assert all(jax.tree.leaves(changed))
    assert "BatchNorm_0" in new["backbone"]["stem"]["norm"]
    # FedBN finds every norm layer's scale and bias by name: as many as running statistics.
    local = select(variables["params"], NORM_LAYERS)
    assert count_params(local) == count_params(new) > 0


def test_mobilenet_v2_backbone_gives_the_same_outputs_and_is_the_zoo_model():
    default = get_model("yolov5n", NUM_CLASSES)
    model = get_model("yolov5n", NUM_CLASSES, backbone="mobilenet_v2")
    for shape in ((1, 64, 96, 3), (2, 320, 320, 3)):
        outputs, variables = trace(model, shape)
        assert shapes_of(outputs) == shapes_of(trace(default, shape)[0])
    params = shape_tree(variables["params"])
    assert sorted(params) == ["backbone", "detect", "neck"]
    zoo = get_model(
        "mobilenet_v2",
        NUM_CLASSES,
        return_features=True,
        head_conv=False,
        feature_strides=STRIDES,
    )
    assert params["backbone"] == shape_tree(trace(zoo, (1, 64, 96, 3))[1]["params"])
    assert params["detect"] == shape_tree(trace(default, (1, 64, 96, 3))[1]["params"]["detect"])

    outputs, variables = trace(
        get_model("yolov3", NUM_CLASSES, backbone="resnet50"), (1, 64, 96, 3)
    )
    assert shapes_of(outputs) == expected_shapes(1, 64, 96)
    assert "stage4_block2" in variables["params"]["backbone"]


def test_frozen_backbone_trains_neck_and_detect():
    model = get_model("yolov5s", NUM_CLASSES, backbone="mobilenet_v2")
    assert head_modules(model) == ("neck", "detect")
    params = trace(model, (1, 64, 64, 3))[1]["params"]
    rules = freeze_except(head_modules(model))
    frozen = multipliers(params, rules)
    assert set(jax.tree.leaves(frozen["backbone"])) == {0.0}
    assert set(jax.tree.leaves({k: frozen[k] for k in ("neck", "detect")})) == {1.0}
    share = count_params(params["backbone"]) / count_params(params)
    assert frozen_fraction(params, rules) == pytest.approx(share)
