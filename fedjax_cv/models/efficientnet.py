"""EfficientNet-B0..B7: Tan & Le (2019), "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks".

The B0 baseline (Table 1 of the paper: MBConv blocks with squeeze-excitation and SiLU), scaled
by a width coefficient (channels, rounded to multiples of 8) and a depth coefficient (blocks per
stage, rounded up). Stochastic depth rises linearly over the blocks; dropout precedes the head.
"""

from __future__ import annotations

import functools
import math

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

# (expansion, kernel, first stride, output channels, repeats): Table 1 of Tan & Le for B0.
_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class EfficientNet(nn.Module):
    """EfficientNet classifier, or backbone with `return_features=True`.

    `return_features=True` returns {4, 8, 16, 32: map} keyed by nominal stride (stride 32 is the
    map the classifier pools) and creates no classifier parameters; `output_stride` 16 or 8
    dilates the last stages instead of striding. The resolutions the variants were designed for
    (224, 240, 260, 300, 380, 456, 528, 600 for B0..B7) are not enforced: any size works.
    """

    num_classes: int
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    dropout_rate: float = 0.2
    drop_path_rate: float = 0.2
    norm: str = "group"
    output_stride: int = 32
    return_features: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray | dict[int, jnp.ndarray]:
        check_norm(self.norm)

        def scaled(channels: int) -> int:
            return make_divisible(channels * self.width_coefficient)

        blocks = [
            (expansion, kernel, stride if i == 0 else 1, scaled(channels))
            for expansion, kernel, stride, channels, repeats in _STAGES
            for i in range(math.ceil(repeats * self.depth_coefficient))
        ]
        schedule = stride_schedule([b[2] for b in blocks], self.output_stride, input_stride=2)

        x = ConvNormAct(scaled(32), 3, strides=2, norm=self.norm, activation=nn.silu, name="stem")(
            x, train=train
        )
        features = {}
        for index, ((expansion, kernel, _, channels), layer) in enumerate(
            zip(blocks, schedule, strict=True)
        ):
            in_channels = x.shape[-1]
            x = InvertedResidual(
                channels,
                make_divisible(in_channels * expansion),
                kernel_size=kernel,
                strides=layer.stride,
                dilation=layer.dilation,
                norm=self.norm,
                activation=nn.silu,
                # Squeeze ratio 0.25 of the block's input, not of its expanded width.
                se_features=max(1, in_channels // 4),
                se_activation=nn.silu,
                se_gate=nn.sigmoid,
                drop_path_rate=self.drop_path_rate * index / len(blocks),
                name=f"block{index}",
            )(x, train=train)
            features[layer.level] = x
        x = ConvNormAct(4 * x.shape[-1], norm=self.norm, activation=nn.silu, name="head")(
            x, train=train
        )
        features[32] = x
        if self.return_features:
            return select_features(features)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


# (width, depth, dropout) of Tan & Le, Table/Section 4 and the reference code.
_VARIANTS = {
    "b0": (1.0, 1.0, 0.2),
    "b1": (1.0, 1.1, 0.2),
    "b2": (1.1, 1.2, 0.3),
    "b3": (1.2, 1.4, 0.3),
    "b4": (1.4, 1.8, 0.4),
    "b5": (1.6, 2.2, 0.4),
    "b6": (1.8, 2.6, 0.5),
    "b7": (2.0, 3.1, 0.5),
}

EFFICIENTNETS = {
    f"efficientnet_{variant}": functools.partial(
        EfficientNet, width_coefficient=width, depth_coefficient=depth, dropout_rate=dropout
    )
    for variant, (width, depth, dropout) in _VARIANTS.items()
}
