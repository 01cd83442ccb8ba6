"""The vision model zoo: parameter counts, forward/backward, norms, features, ViT, reports.

Execution tests run at 32x32 with fewer blocks or channels (same block types) so the file stays
within minutes on a 2-core CPU; parameter counts use `jax.eval_shape` at full size.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from fedjax_cv.models import count_params, get_model, model_names, model_report
from fedjax_cv.models.layers import StochasticDepth, make_divisible, stride_schedule
from fedjax_cv.models.mobilenet_v2 import STAGES
from fedjax_cv.models.mobilenet_v3 import LARGE_BLOCKS, SMALL_BLOCKS
from fedjax_cv.models.vit import resize_position_embedding
from tests.xla import jit

CONV_ZOO = (
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    *(f"efficientnet_b{i}" for i in range(8)),
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
)
VIT_ZOO = ("vit_ti16", "vit_s16", "vit_b16", "vit_l16")
ZOO = CONV_ZOO + VIT_ZOO
NUM_CLASSES = 7

# Reference counts at 1000 classes, 224x224, BatchNorm: torchvision's model metadata
# (MobileNets, EfficientNets, ResNets, ViT-L/16) and timm (ViT-Ti/S/B/16).
REFERENCE_PARAMS = {
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_large": 5_483_032,
    "mobilenet_v3_small": 2_542_856,
    "efficientnet_b0": 5_288_548,
    "efficientnet_b7": 66_347_960,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "vit_ti16": 5_717_416,
    "vit_s16": 22_050_664,
    "vit_b16": 86_567_656,
    "vit_l16": 304_326_632,
}


def _short(blocks: tuple) -> tuple:
    # Every strided block, and the last one for a residual: all block kinds, five blocks.
    return tuple(block for block in blocks if block.stride == 2) + blocks[-1:]


def small_kwargs(name: str) -> dict:
    """Fewer blocks and channels for execution tests; block types and registry entries kept."""
    if name == "mobilenet_v2":
        return {"width_multiplier": 0.35, "stages": tuple((t, c, 1, s) for t, c, _, s in STAGES)}
    if name == "mobilenet_v3_large":
        return {"width_multiplier": 0.35, "blocks": _short(LARGE_BLOCKS)}
    if name == "mobilenet_v3_small":
        return {"width_multiplier": 0.35, "blocks": _short(SMALL_BLOCKS)}
    if name.startswith("efficientnet"):
        # Depthwise-conv gradients are slow on XLA:CPU at B7's 3840 channels: a quarter of the
        # variant's width keeps the variants distinct. Depth 0.1: one block per stage.
        width = get_model(name, NUM_CLASSES).width_coefficient / 4
        return {"width_coefficient": width, "depth_coefficient": 0.1}
    if name.startswith("resnet"):
        return {"stage_sizes": (1, 1, 1, 1)}
    return {"depth": 1}  # ViT: configured for 224, so 32x32 inputs also resize the embedding


def images(size: int = 32, batch: int = 2) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(1), (batch, size, size, 3))


def init(model: nn.Module, x: jnp.ndarray) -> dict:
    return jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(0), x)


def host_variables(model: nn.Module, x: jnp.ndarray) -> dict:
    """Variables of the shapes `model.init` gives, drawn on the host and scaled by 1/sqrt(fan-in).

    Compiling `model.init` costs more than the forward and backward passes together (one random
    kernel per parameter shape); the BatchNorm and ViT tests run the real initialisers.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(0)

    def draw(leaf):
        fan_in = max(1, math.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(size=leaf.shape) / math.sqrt(fan_in), leaf.dtype)

    return jax.tree.map(draw, shapes)


def test_registry_has_the_zoo():
    assert set(ZOO) <= set(model_names())


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_matches_reference(name):
    model = get_model(name, 1000, norm="batch") if name in CONV_ZOO else get_model(name, 1000)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )
    reference = REFERENCE_PARAMS[name]
    assert abs(count_params(shapes) - reference) <= 0.01 * reference
    assert count_params(shapes) == reference


def vit_params(width: int, depth: int, mlp: int, patch: int = 16, image: int = 224) -> int:
    """ViT's parameter count by hand (Dosovitskiy et al. 2021; timm / torchvision layout)."""
    tokens = (image // patch) ** 2 + 1  # patches and the class token
    embedding = patch * patch * 3 * width + width + width + tokens * width  # conv, cls, pos
    block = (
        2 * 2 * width  # two LayerNorms: scale and bias
        + (width * 3 * width + 3 * width)  # qkv
        + (width * width + width)  # attention output
        + (width * mlp + mlp + mlp * width + width)  # MLP
    )
    return embedding + depth * block + 2 * width + width * 1000 + 1000  # final norm, head


def test_vit_reference_counts_follow_from_the_architecture():
    """The ViT rows of REFERENCE_PARAMS, derived by hand: the table is not copied from the code."""
    assert vit_params(192, 12, 768) == REFERENCE_PARAMS["vit_ti16"]
    assert vit_params(384, 12, 1536) == REFERENCE_PARAMS["vit_s16"]
    assert vit_params(768, 12, 3072) == REFERENCE_PARAMS["vit_b16"]
    assert vit_params(1024, 24, 4096) == REFERENCE_PARAMS["vit_l16"]


@pytest.mark.parametrize("name", ZOO)
def test_forward_backward(name):
    model = get_model(name, NUM_CLASSES, **small_kwargs(name))
    x = images()
    variables = host_variables(model, x)

    @jit
    def forward_backward(variables, x, key):
        def loss(params):
            # Train mode: dropout and stochastic depth draw from the 'dropout' rng.
            logits = model.apply(
                {**variables, "params": params}, x, train=True, rngs={"dropout": key}
            )
            return jnp.sum(logits), logits

        return jax.grad(loss, has_aux=True)(variables["params"])

    grads, logits = forward_backward(variables, x, jax.random.key(2))
    assert logits.shape == (2, NUM_CLASSES)
    assert np.all(np.isfinite(logits))
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.any(g != 0) for g in leaves)
    # Same key, same result.
    again_grads, again_logits = forward_backward(variables, x, jax.random.key(2))
    np.testing.assert_array_equal(logits, again_logits)
    jax.tree.map(np.testing.assert_array_equal, grads, again_grads)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_batch_norm_statistics_update_only_in_training(name):
    model = get_model(name, NUM_CLASSES, norm="batch", **small_kwargs(name))
    x = images()
    init_model = jit(lambda key, x: model.init(key, x, train=False))
    variables = init_model(jax.random.key(0), x)
    assert "batch_stats" in variables
    # The real initialisers: finite, and the same for the same key.
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(variables))
    jax.tree.map(np.testing.assert_array_equal, variables, init_model(jax.random.key(0), x))

    def apply(variables, x, train):
        return jit(
            functools.partial(
                model.apply,
                train=train,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(2)},
            )
        )(variables, x)

    _, trained = apply(variables, x, True)
    changed = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), variables["batch_stats"], trained["batch_stats"]
    )
    assert all(jax.tree.leaves(changed))

    _, evaluated = apply(variables, x, False)
    jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], evaluated["batch_stats"])


@pytest.mark.parametrize("name", ZOO)
def test_unknown_norm_is_rejected(name):
    model = get_model(name, NUM_CLASSES, norm="instance")
    with pytest.raises(ValueError, match=r"model\.norm='instance'") as error:
        model.init(jax.random.key(0), images(), train=False)
    if name in CONV_ZOO:
        assert "group, batch, layer, none" in str(error.value)


DILATED = ("mobilenet_v2", "resnet50")


@pytest.mark.parametrize(
    "name", ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "resnet50"]
)
def test_features_have_strides_4_to_32_and_output_stride_keeps_resolution(name):
    backbone = get_model(name, NUM_CLASSES, return_features=True, **small_kwargs(name))
    x = images(64)
    variables = host_variables(backbone, x)

    # Dilation changes no parameter shape: one set of weights serves every output stride.
    undilated = None
    for output_stride in (32, 16, 8) if name in DILATED else (32,):
        features = features_at(backbone, output_stride, variables, x)
        assert sorted(features) == [4, 8, 16, 32]
        for stride, feature in features.items():
            size = 64 // min(stride, output_stride)
            assert feature.shape[:3] == (2, size, size)
            assert np.all(np.isfinite(feature))
        undilated = undilated or features
        assert_shallow_features_equal(features, undilated)

    # The backbone's parameters are the classifier's without the head: one checkpoint serves both.
    classifier = get_model(name, NUM_CLASSES, **small_kwargs(name))
    classifier_params = jax.eval_shape(lambda: classifier.init(jax.random.key(0), x, train=False))
    head = set(classifier_params["params"]) - set(variables["params"])
    assert set(variables["params"]) < set(classifier_params["params"])
    assert all("classifier" in key for key in head)


# FAST_COMPILE's older loop emitters reassociate some float sums differently in a program with
# dilated convs (measured: up to 2.5e-6 of a feature map's largest value at stride 8); at
# optimisation level 0 with the fusion emitters (set here over the suite's XLA_FLAGS, see
# conftest.py) the maps before the first dilated layer stay bit-identical.
FEATURE_COMPILE = (
    {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": True}
    if jax.default_backend() == "cpu"
    else {}
)


def features_at(backbone: nn.Module, output_stride: int, variables, x) -> dict:
    apply = functools.partial(backbone.clone(output_stride=output_stride).apply, train=False)
    return jax.jit(apply, compiler_options=FEATURE_COMPILE)(variables, x)


def assert_shallow_features_equal(features: dict, reference: dict) -> None:
    """Strides 4 and 8 are computed before any dilated layer, at every output stride: the
    same maps bit for bit (on CPU; other backends may pick other conv algorithms per program).
    """
    for stride in (4, 8):
        if jax.default_backend() == "cpu":
            np.testing.assert_array_equal(features[stride], reference[stride], err_msg=str(stride))
        else:
            np.testing.assert_allclose(features[stride], reference[stride], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_output_stride_changes_no_feature_at_strides_4_and_8(name):
    """mobilenet_v2 and resnet50: in the test above."""
    backbone = get_model(name, NUM_CLASSES, return_features=True, **small_kwargs(name))
    x = images(32)
    variables = host_variables(backbone, x)
    features = {s: features_at(backbone, s, variables, x) for s in (32, 16, 8)}
    for output_stride in (16, 8):
        assert_shallow_features_equal(features[output_stride], features[32])
        # The deepest map does keep a finer resolution.
        assert features[output_stride][32].shape[1] == 32 // output_stride


GRADIENT_MODELS = {
    "logistic": ({}, (2, 4, 4, 1)),
    "cnn_emnist": ({}, (2, 8, 8, 1)),
    "resnet18": ({"norm": "group", "stage_sizes": (1, 1), "width": 8}, (2, 16, 16, 3)),
}


@pytest.mark.parametrize("name", sorted(GRADIENT_MODELS))
def test_gradients_match_finite_differences_in_float64(name):
    """Reverse-mode gradients of the training loss against central finite differences
    (`jax.test_util.check_grads`), in float64 so that steps of 1e-6 resolve them.

    Random values for every variable: at the initial ones ResNet's zero-initialised last norm
    of each residual branch puts ReLU inputs at exactly 0, a kink where the one-sided slopes of
    a finite difference and autodiff's derivative rightly disagree.
    """
    kwargs, shape = GRADIENT_MODELS[name]
    model = get_model(name, 3, **kwargs)
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), shape, jnp.float64)
        labels = jnp.arange(shape[0]) % 3
        variables = jax.tree.map(lambda v: v.astype(jnp.float64), host_variables(model, x))

        def loss(params):
            logits = model.apply({**variables, "params": params}, x, train=False)
            log_probs = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

        params = variables["params"]
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(params))
        jax.test_util.check_grads(jax.jit(loss), (params,), order=1, modes=["rev"], eps=1e-6)


def test_invalid_output_stride_is_rejected():
    model = get_model("resnet18", NUM_CLASSES, output_stride=4)
    with pytest.raises(ValueError, match=r"model\.output_stride=4"):
        model.init(jax.random.key(0), images(), train=False)


def test_vit_image_size_not_divisible_by_patch_is_rejected():
    with pytest.raises(ValueError, match=r"model\.image_size=30 .*model\.patch_size=16"):
        get_model("vit_ti16", NUM_CLASSES, image_size=30, depth=1).init(
            jax.random.key(0), images(30), train=False
        )
    with pytest.raises(ValueError, match=r"input image height=40 .*model\.patch_size=16"):
        get_model("vit_ti16", NUM_CLASSES, image_size=32, depth=1).init(
            jax.random.key(0), images(40), train=False
        )


def test_vit_runs_at_its_configured_and_other_sizes():
    model = get_model("vit_ti16", NUM_CLASSES, image_size=32, patch_size=8, depth=1)
    variables = init(model, images(32))
    assert variables["params"]["pos_embedding"].shape == (1, 1 + 4 * 4, 192)
    forward = jit(lambda variables, x: model.apply(variables, x, train=False))
    for size in (32, 48):
        assert forward(variables, images(size)).shape == (2, NUM_CLASSES)


def test_resize_position_embedding():
    posemb = jax.random.normal(jax.random.key(0), (1, 1 + 14 * 14, 8))
    assert resize_position_embedding(posemb, (14, 14)) is posemb

    resized = resize_position_embedding(posemb, (2, 3))
    assert resized.shape == (1, 1 + 2 * 3, 8)
    np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])  # class token kept

    # Interpolating a constant grid gives the same constant.
    constant = jnp.concatenate([posemb[:, :1], jnp.full((1, 16, 8), 0.5)], axis=1)
    np.testing.assert_allclose(resize_position_embedding(constant, (7, 7))[:, 1:], 0.5, rtol=1e-6)


def test_make_divisible_and_stride_schedule_by_hand():
    assert make_divisible(32 * 0.35) == 16  # 11.2 rounds to 8, which loses over 10%: 16
    assert make_divisible(96 * 1.1) == 104
    assert make_divisible(1280) == 1280
    # ResNet stages after the stride-4 stem at output stride 8: the last two stages dilate, the
    # first block of each at the dilation reached so far (DeepLab).
    schedule = stride_schedule([1, 2, 1, 2, 1, 2, 1], output_stride=8, input_stride=4)
    assert [tuple(layer) for layer in schedule] == [
        (1, 1, 4),
        (2, 1, 8),
        (1, 1, 8),
        (1, 1, 16),
        (1, 2, 16),
        (1, 2, 32),
        (1, 4, 32),
    ]


def test_stochastic_depth_drops_whole_examples_in_training_only():
    x = jnp.ones((64, 2, 2, 3))
    drop = StochasticDepth(rate=0.5)
    np.testing.assert_array_equal(drop.apply({}, x, train=False), x)
    y = drop.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    per_example = np.unique(np.asarray(y).reshape(64, -1), axis=1)
    assert per_example.shape == (64, 1)  # one value an example: kept whole or dropped whole
    assert set(np.unique(per_example)) == {0.0, 2.0}  # survivors scaled by 1 / (1 - rate)


class TinyConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(4, (3, 3))(x)  # 3*3*2*4 + 4 = 76
        x = nn.BatchNorm(use_running_average=not train)(x)  # scale and bias: 8
        return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))  # 4*5 + 5 = 25


def test_count_params_by_hand():
    variables = init(TinyConvNet(), jnp.zeros((1, 6, 6, 2)))
    assert count_params(variables) == 76 + 8 + 25  # batch_stats are not parameters
    assert count_params(variables["params"]) == 76 + 8 + 25
    report = model_report(TinyConvNet(), (6, 6, 2))
    assert report.num_params == 109
    assert report.bytes_per_round == 109 * 4


def test_flops_grow_with_resolution():
    model = get_model("mobilenet_v2", NUM_CLASSES, **small_kwargs("mobilenet_v2"))
    small, large = model_report(model, (32, 32, 3)), model_report(model, (64, 64, 3))
    assert 0 < small.flops_per_example < large.flops_per_example
    assert small.num_params == large.num_params
    assert small.bytes_per_round == 4 * small.num_params
