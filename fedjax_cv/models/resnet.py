"""ResNet-18/34/50/101/152: He et al. (2016), "Deep Residual Learning for Image Recognition".

A 7x7 stride-2 stem and 3x3 max-pool, four stages of basic (18, 34) or bottleneck (50, 101,
152) blocks, global pooling and a linear classifier. Bottlenecks stride in the 3x3 conv
("ResNet v1.5", as torchvision and flax/examples/imagenet), which changes no parameter count.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedjax_cv.models.layers import (
    FEATURE_STRIDES,
    ConvNormAct,
    select_features,
    stride_schedule,
)
from fedjax_cv.models.norm import check_norm

# Zero-initialised last norm of each residual branch: every block starts as the identity, which
# stabilises early training (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
_zero_init = nn.initializers.zeros


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut (He et al. 2016, Fig. 2 left)."""

    features: int
    strides: int = 1
    dilation: int = 1
    norm: str = "group"

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        shortcut = x
        y = ConvNormAct(
            self.features, 3, self.strides, self.dilation, norm=self.norm, name="conv1"
        )(x, train=train)
        y = ConvNormAct(
            self.features,
            3,
            dilation=self.dilation,
            norm=self.norm,
            activation=None,
            norm_scale_init=_zero_init,
            name="conv2",
        )(y, train=train)
        if shortcut.shape != y.shape:
            shortcut = ConvNormAct(
                self.features, 1, self.strides, norm=self.norm, activation=None, name="shortcut"
            )(x, train=train)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4, with a shortcut (He et al. 2016, Fig. 5 right)."""

    features: int
    strides: int = 1
    dilation: int = 1
    norm: str = "group"

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        shortcut = x
        y = ConvNormAct(self.features, 1, norm=self.norm, name="conv1")(x, train=train)
        y = ConvNormAct(
            self.features, 3, self.strides, self.dilation, norm=self.norm, name="conv2"
        )(y, train=train)
        y = ConvNormAct(
            self.features * self.expansion,
            1,
            norm=self.norm,
            activation=None,
            norm_scale_init=_zero_init,
            name="conv3",
        )(y, train=train)
        if shortcut.shape != y.shape:
            shortcut = ConvNormAct(
                y.shape[-1], 1, self.strides, norm=self.norm, activation=None, name="shortcut"
            )(x, train=train)
        return nn.relu(y + shortcut)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet classifier, or backbone with `return_features=True`.

    `return_features=True` returns the outputs of the four stages as {4, 8, 16, 32: map} (keys
    are nominal strides) and creates no classifier parameters; `feature_strides` chooses the
    keys, 2 (the stem conv's output, before max-pooling) included. `output_stride` 16 or 8
    replaces the strides of the last stages by dilation, so their maps keep that resolution.
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    width: int = 64
    norm: str = "group"
    output_stride: int = 32
    return_features: bool = False
    feature_strides: tuple[int, ...] = FEATURE_STRIDES

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray | dict[int, jnp.ndarray]:
        check_norm(self.norm)
        if self.block not in _BLOCKS:
            raise ValueError(
                f"model.block={self.block!r} is unknown; allowed: {', '.join(_BLOCKS)}"
            )
        block_cls = _BLOCKS[self.block]
        strides = [
            (2 if stage > 0 and i == 0 else 1)
            for stage, size in enumerate(self.stage_sizes)
            for i in range(size)
        ]
        schedule = iter(stride_schedule(strides, self.output_stride, input_stride=4))

        x = ConvNormAct(self.width, 7, strides=2, norm=self.norm, name="stem")(x, train=train)
        features = {2: x}
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, size in enumerate(self.stage_sizes):
            for i in range(size):
                layer = next(schedule)
                x = block_cls(
                    self.width * 2**stage,
                    strides=layer.stride,
                    dilation=layer.dilation,
                    norm=self.norm,
                    name=f"stage{stage + 1}_block{i}",
                )(x, train=train)
                features[layer.level] = x
        if self.return_features:
            return select_features(features, self.feature_strides)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic")
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic")
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck")
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck")
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block="bottleneck")
