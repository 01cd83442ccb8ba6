"""DeepLabV3+ and U-Net: parameter counts, output sizes, output stride, norms, training, weights.

Full-size models are only traced (`jax.eval_shape`: shapes, no compute); execution tests run tiny
variants (few blocks, narrow widths) at small odd sizes so the file stays fast on a 2-core CPU.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_cv.models import NORMS, count_params, get_model, model_names
from fedjax_cv.models.deeplab import resize_to
from fedjax_cv.models.mobilenet_v2 import STAGES
from fedjax_cv.models.weights import head_modules, load_pretrained
from tests.xla import jit

SEGMENTATION = (
    "deeplabv3plus_mobilenet_v2",
    "deeplabv3plus_resnet50",
    "deeplabv3plus_resnet101",
    "unet",
    "unet_mobilenet_v2",
    "unet_resnet50",
    "unet_resnet101",
)
NUM_CLASSES = 21

# FedCV (He et al. 2021) Table 7, 21 classes, PyTorch models with BatchNorm. U-Net MobileNetV2
# is listed there as 7.91 M because it counts MobileNetV2's unused 1280x1000 ImageNet
# classifier (1,281,000 parameters); it is left out here.
REFERENCE_PARAMS = {
    "deeplabv3plus_resnet101": 59.34e6,
    "deeplabv3plus_mobilenet_v2": 5.81e6,
    "unet_resnet101": 51.51e6,
    "unet_mobilenet_v2": 7.91e6 - 1280 * 1000 - 1000,
}


def small_kwargs(name: str) -> dict:
    """Fewer blocks and channels for tests; block types and registry entries kept."""
    kwargs = {}
    if "mobilenet_v2" in name:
        kwargs = {"width_multiplier": 0.35, "stages": tuple((t, c, 1, s) for t, c, _, s in STAGES)}
    elif "resnet" in name:
        kwargs = {"stage_sizes": (1, 1, 1, 1), "width": 8}
    elif name == "unet":
        kwargs = {"base_width": 8}
    if name.startswith("unet_"):
        kwargs["decoder_features"] = (32, 16, 16, 8, 8)
    return kwargs


def trace(model: nn.Module, shape: tuple[int, ...], **kwargs):
    """(logits, variables) of `model.init_with_output` as shapes: nothing is computed."""
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False, **kwargs), images
    )


def shape_tree(tree):
    return jax.tree.map(lambda leaf: leaf.shape, tree)


def test_registry_has_the_segmentation_models():
    assert set(SEGMENTATION) <= set(model_names())


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_matches_fedcv(name):
    counts = {
        norm: count_params(trace(get_model(name, NUM_CLASSES, norm=norm), (1, 64, 64, 3))[1])
        for norm in ("batch", "group")
    }
    reference = REFERENCE_PARAMS[name]
    assert abs(counts["batch"] - reference) / reference < 0.01
    # GroupNorm's scale and bias are BatchNorm's two parameters per channel.
    assert counts["group"] == counts["batch"]


def test_unet_parameter_count_by_hand():
    def conv3(cin, cout):  # 3x3 conv without bias, then a norm's scale and bias
        return 9 * cin * cout + 2 * cout

    base = 64
    widths = [base * 2**level for level in range(5)]
    inputs = [3, *widths[:-1]]
    expected = sum(conv3(cin, w) + conv3(w, w) for cin, w in zip(inputs, widths, strict=True))
    for level in range(4):
        w = widths[level]
        expected += 4 * widths[level + 1] * w + w  # 2x2 transposed conv with bias
        expected += conv3(2 * w, w) + conv3(w, w)
    expected += base * NUM_CLASSES + NUM_CLASSES  # 1x1 classifier
    model = get_model("unet", NUM_CLASSES, norm="batch")
    assert count_params(trace(model, (1, 64, 64, 3))[1]) == expected


@pytest.mark.parametrize("name", SEGMENTATION)
def test_logits_have_the_input_size(name):
    model = get_model(name, NUM_CLASSES)
    for height, width in ((513, 513), (97, 131)):
        logits, _ = trace(model, (1, height, width, 3))
        assert logits.shape == (1, height, width, NUM_CLASSES)


def test_output_stride_changes_no_parameter_and_only_8_or_16_are_allowed():
    model = get_model("deeplabv3plus_mobilenet_v2", NUM_CLASSES)
    shapes = {}
    for output_stride in (16, 8):
        # The backbone's outputs show the stride of its deepest map: 65 -> 33 -> 17 -> 9 (-> 5).
        _, variables = trace(
            model.clone(output_stride=output_stride),
            (1, 65, 65, 3),
            mutable=True,
            capture_intermediates=True,
        )
        features = variables["intermediates"]["backbone"]["__call__"][0]
        assert features[4].shape[1:3] == (17, 17)
        assert features[32].shape[1:3] == {16: (5, 5), 8: (9, 9)}[output_stride]
        assert features[32].shape[-1] == 320  # the last block's output, not the 1280 head conv
        shapes[output_stride] = shape_tree(variables["params"])
    assert shapes[16] == shapes[8]
    assert "head" not in shapes[16]["backbone"]

    for output_stride in (32, 4):
        with pytest.raises(ValueError, match=r"model\.output_stride=") as error:
            trace(model.clone(output_stride=output_stride), (1, 65, 65, 3))
        message = str(error.value)
        assert message == (f"model.output_stride={output_stride} is not allowed; allowed: 8, 16")


@pytest.mark.parametrize("name", SEGMENTATION)
def test_every_norm_builds(name):
    counts = {}
    for norm in NORMS:
        model = get_model(name, NUM_CLASSES, norm=norm, **small_kwargs(name))
        logits, variables = trace(model, (1, 33, 47, 3))
        assert logits.shape == (1, 33, 47, NUM_CLASSES)
        assert ("batch_stats" in variables) == (norm == "batch")
        counts[norm] = count_params(variables)
    # Group, batch and layer norms have a scale and a bias per channel; none has none.
    assert counts["group"] == counts["batch"] == counts["layer"] > counts["none"]


def test_backbones_return_stride_2_when_asked():
    x = (1, 33, 47, 3)
    resnet = get_model("resnet50", NUM_CLASSES, return_features=True, stage_sizes=(1, 1, 1, 1))
    features, _ = trace(resnet.clone(feature_strides=(2, 4, 8, 16, 32)), x)
    assert {stride: f.shape for stride, f in features.items()} == {
        2: (1, 17, 24, 64),  # the stem conv, before max-pooling
        4: (1, 9, 12, 256),
        8: (1, 5, 6, 512),
        16: (1, 3, 3, 1024),
        32: (1, 2, 2, 2048),
    }
    mobilenet = get_model("mobilenet_v2", NUM_CLASSES, return_features=True)
    features, _ = trace(mobilenet.clone(feature_strides=(2, 4, 8, 16, 32)), x)
    channels = {stride: f.shape[-1] for stride, f in features.items()}
    assert channels == {2: 16, 4: 24, 8: 32, 16: 96, 32: 1280}
    features, variables = trace(mobilenet.clone(head_conv=False), x)
    assert sorted(features) == [4, 8, 16, 32]
    assert features[32].shape[-1] == 320
    assert "head" not in variables["params"]
    with pytest.raises(ValueError, match=r"model\.feature_strides=\(1, 4\) is not allowed"):
        trace(mobilenet.clone(feature_strides=(1, 4)), x)


FIRST_CONV = {
    "unet": ("encoder0", "conv1", "conv", "kernel"),
    "deeplabv3plus_mobilenet_v2": ("backbone", "stem", "conv", "kernel"),
}


@pytest.mark.parametrize("name", sorted(FIRST_CONV))
def test_training_step_updates_batch_stats_and_gradients_reach_both_ends(name):
    model = get_model(name, NUM_CLASSES, norm="batch", **small_kwargs(name))
    height, width = (33, 47) if name == "unet" else (65, 65)
    x = jax.random.normal(jax.random.key(1), (2, height, width, 3))
    variables = jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(0), x)

    @jit
    def step(variables, x):
        def loss(params):
            logits, updates = model.apply(
                {**variables, "params": params},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(2)},
            )
            return jnp.mean(logits), (logits, updates)

        return jax.grad(loss, has_aux=True)(variables["params"])

    grads, (logits, updates) = step(variables, x)
    assert logits.shape == (2, height, width, NUM_CLASSES)
    assert np.all(np.isfinite(logits))
    changed = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), variables["batch_stats"], updates["batch_stats"]
    )
    assert all(jax.tree.leaves(changed))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    first_conv = functools.reduce(lambda tree, key: tree[key], FIRST_CONV[name], grads)
    assert np.any(first_conv != 0)
    assert np.any(grads["classifier"]["kernel"] != 0)


@pytest.mark.parametrize("prefix", ["backbone/", ""])
@pytest.mark.parametrize("name", ["deeplabv3plus_mobilenet_v2", "unet_resnet50"])
def test_classification_checkpoint_loads_into_the_backbone(name, prefix):
    """A zoo classifier's weights, renamed under `backbone/` or as the classifier saved them
    (FedCV's fine-tuning from classification weights), fill the backbone; the other modules
    (`head_modules`) keep their initialisation."""
    kwargs = small_kwargs(name)
    model = get_model(name, NUM_CLASSES, **kwargs)
    assert head_modules(model)[-1] == "classifier" and "backbone" not in head_modules(model)
    classifier_name = "mobilenet_v2" if "mobilenet" in name else "resnet50"
    backbone_kwargs = {k: v for k, v in kwargs.items() if k != "decoder_features"}
    classifier = get_model(classifier_name, 1000, **backbone_kwargs)
    x = (1, 33, 47, 3)
    zeros = functools.partial(jax.tree.map, lambda leaf: np.zeros(leaf.shape, leaf.dtype))
    checkpoint = {
        f"params/{prefix}{'/'.join(key.key for key in path)}": leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            zeros(trace(classifier, x)[1]["params"])
        )[0]
    }
    _, report = load_pretrained(zeros(trace(model, x)[1]), checkpoint, model=model)
    assert report.loaded and all(name.startswith("params/backbone/") for name in report.loaded)
    assert {name.split("/")[1] for name, _ in report.reinitialised} == set(head_modules(model))
    # Only the classifier's own head is left over: DeepLab's MobileNetV2 also builds no head conv.
    assert {name.split("/")[2] for name in report.unused} <= {"classifier", "head"}


def test_resize_is_pytorch_bilinear_without_align_corners():
    # Output pixel i samples input coordinate (i + 0.5) / 2 - 0.5, clamped at the borders:
    # -0.25, 0.25, 0.75, 1.25 on the row [0, 1].
    row = jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1)
    np.testing.assert_allclose(resize_to(row, (1, 4))[0, 0, :, 0], [0.0, 0.25, 0.75, 1.0])
    # 4 -> 3 (an odd U-Net size): output pixel 0 samples (0 + 0.5) * 4 / 3 - 0.5 = 1/6 on each
    # axis of the grid 4 * row + col, so 4/6 + 1/6; the same size is left alone.
    grid = jnp.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_allclose(resize_to(grid, (3, 3))[0, 0, 0, 0], 5 / 6, rtol=1e-6)
    assert resize_to(grid, (4, 4)) is grid
