"""MobileNetV2: Sandler et al. (2018), "MobileNetV2: Inverted Residuals and Linear Bottlenecks".

A 3x3 stride-2 stem, 17 inverted-residual blocks with linear bottlenecks (Table 2 of the paper),
a 1x1 conv to 1280 channels, global pooling, dropout and a linear classifier.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fedjax_cv.models.layers import (
    FEATURE_STRIDES,
    ConvNormAct,
    InvertedResidual,
    make_divisible,
    select_features,
    stride_schedule,
)
from fedjax_cv.models.norm import check_norm

# (expansion t, output channels c, repeats n, first stride s): Table 2 of Sandler et al.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier, or backbone with `return_features=True`.

    `stages` lists (expansion, channels, repeats, first stride) per stage, the paper's table by
    default. `return_features=True` returns {4, 8, 16, 32: map} (keys are nominal strides; the
    last map at each stride, stride 32 being the map the classifier pools) instead of logits, and
    creates no classifier parameters; `feature_strides` chooses the keys, 2 (the first block's
    output) included. `output_stride` 16 or 8 replaces the last strides by dilation, so the
    deeper maps keep that resolution. `head_conv=False` leaves out the 1x1 conv to 1280 channels
    (no parameters): stride 32 is then the last inverted-residual block's output, the feature
    DeepLabV3+ uses.
    """

    num_classes: int
    width_multiplier: float = 1.0
    stages: tuple[tuple[int, int, int, int], ...] = STAGES
    norm: str = "group"
    dropout_rate: float = 0.2
    output_stride: int = 32
    return_features: bool = False
    feature_strides: tuple[int, ...] = FEATURE_STRIDES
    head_conv: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray | dict[int, jnp.ndarray]:
        check_norm(self.norm)
        width = self.width_multiplier
        blocks = [
            (t, make_divisible(c * width), s if i == 0 else 1)
            for t, c, n, s in self.stages
            for i in range(n)
        ]
        schedule = stride_schedule([s for _, _, s in blocks], self.output_stride, input_stride=2)

        x = ConvNormAct(
            make_divisible(32 * width),
            3,
            strides=2,
            norm=self.norm,
            activation=nn.relu6,
            name="stem",
        )(x, train=train)
        features = {}
        for index, ((expansion, channels, _), layer) in enumerate(
            zip(blocks, schedule, strict=True)
        ):
            x = InvertedResidual(
                channels,
                int(round(x.shape[-1] * expansion)),
                kernel_size=3,
                strides=layer.stride,
                dilation=layer.dilation,
                norm=self.norm,
                activation=nn.relu6,
                name=f"block{index}",
            )(x, train=train)
            features[layer.level] = x
        if self.head_conv:
            # The paper keeps 1280 head channels for multipliers below 1: they are cheap at 7x7.
            x = ConvNormAct(
                make_divisible(1280 * max(1.0, width)),
                norm=self.norm,
                activation=nn.relu6,
                name="head",
            )(x, train=train)
            features[32] = x
        if self.return_features:
            return select_features(features, self.feature_strides)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)
