"""MobileNetV3-Large and -Small: Howard et al. (2019), "Searching for MobileNetV3".

Inverted-residual blocks found by architecture search (Tables 1 and 2 of the paper), with
squeeze-excitation in some blocks and hard-swish in the deeper half, a 1x1 conv to 6x the last
block's channels, global pooling, a hard-swish dense layer (1280 or 1024) and the classifier.
"""

from __future__ import annotations

import functools
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from fedjax_cv.models.layers import (
    ConvNormAct,
    InvertedResidual,
    make_divisible,
    select_features,
    stride_schedule,
)
from fedjax_cv.models.norm import check_norm


class BlockSpec(NamedTuple):
    """One row of Table 1/2 of Howard et al."""

    kernel_size: int
    expanded: int
    features: int
    use_se: bool
    hard_swish: bool
    stride: int


LARGE_BLOCKS = (
    BlockSpec(3, 16, 16, False, False, 1),
    BlockSpec(3, 64, 24, False, False, 2),
    BlockSpec(3, 72, 24, False, False, 1),
    BlockSpec(5, 72, 40, True, False, 2),
    BlockSpec(5, 120, 40, True, False, 1),
    BlockSpec(5, 120, 40, True, False, 1),
    BlockSpec(3, 240, 80, False, True, 2),
    BlockSpec(3, 200, 80, False, True, 1),
    BlockSpec(3, 184, 80, False, True, 1),
    BlockSpec(3, 184, 80, False, True, 1),
    BlockSpec(3, 480, 112, True, True, 1),
    BlockSpec(3, 672, 112, True, True, 1),
    BlockSpec(5, 672, 160, True, True, 2),
    BlockSpec(5, 960, 160, True, True, 1),
    BlockSpec(5, 960, 160, True, True, 1),
)

SMALL_BLOCKS = (
    BlockSpec(3, 16, 16, True, False, 2),
    BlockSpec(3, 72, 24, False, False, 2),
    BlockSpec(3, 88, 24, False, False, 1),
    BlockSpec(5, 96, 40, True, True, 2),
    BlockSpec(5, 240, 40, True, True, 1),
    BlockSpec(5, 240, 40, True, True, 1),
    BlockSpec(5, 120, 48, True, True, 1),
    BlockSpec(5, 144, 48, True, True, 1),
    BlockSpec(5, 288, 96, True, True, 2),
    BlockSpec(5, 576, 96, True, True, 1),
    BlockSpec(5, 576, 96, True, True, 1),
)


class MobileNetV3(nn.Module):
    """MobileNetV3 classifier, or backbone with `return_features=True`.

    `return_features=True` returns {4, 8, 16, 32: map} keyed by nominal stride (stride 32 is the
    map the classifier pools) and creates no classifier parameters; `output_stride` 16 or 8
    dilates the last stages instead of striding.
    """

    # The layers a new task re-initialises (pretrained loading) and a frozen backbone trains.
    head_modules: ClassVar[tuple[str, ...]] = ("pre_classifier", "classifier")

    num_classes: int
    blocks: tuple[BlockSpec, ...] = LARGE_BLOCKS
    head_features: int = 1280
    width_multiplier: float = 1.0
    norm: str = "group"
    dropout_rate: float = 0.2
    output_stride: int = 32
    return_features: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray | dict[int, jnp.ndarray]:
        check_norm(self.norm)

        def scaled(channels: int) -> int:
            return make_divisible(channels * self.width_multiplier)

        schedule = stride_schedule([b.stride for b in self.blocks], self.output_stride, 2)
        x = ConvNormAct(
            scaled(16), 3, strides=2, norm=self.norm, activation=nn.hard_swish, name="stem"
        )(x, train=train)
        features = {}
        for index, (block, layer) in enumerate(zip(self.blocks, schedule, strict=True)):
            expanded = scaled(block.expanded)
            x = InvertedResidual(
                scaled(block.features),
                expanded,
                kernel_size=block.kernel_size,
                strides=layer.stride,
                dilation=layer.dilation,
                norm=self.norm,
                activation=nn.hard_swish if block.hard_swish else nn.relu,
                se_features=make_divisible(expanded // 4) if block.use_se else 0,
                se_activation=nn.relu,
                se_gate=nn.hard_sigmoid,
                name=f"block{index}",
            )(x, train=train)
            features[layer.level] = x
        x = ConvNormAct(6 * x.shape[-1], norm=self.norm, activation=nn.hard_swish, name="head")(
            x, train=train
        )
        features[32] = x
        if self.return_features:
            return select_features(features)
        x = jnp.mean(x, axis=(1, 2))
        # The pre-classifier layer has no norm in the paper: it acts on pooled features.
        x = nn.hard_swish(nn.Dense(scaled(self.head_features), name="pre_classifier")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


MobileNetV3Large = functools.partial(MobileNetV3, blocks=LARGE_BLOCKS, head_features=1280)
MobileNetV3Small = functools.partial(MobileNetV3, blocks=SMALL_BLOCKS, head_features=1024)
