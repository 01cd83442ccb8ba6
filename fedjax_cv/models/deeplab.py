"""DeepLabV3+: Chen et al. (2018), "Encoder-Decoder with Atrous Separable Convolution for
Semantic Image Segmentation".

A zoo backbone run dilated at `output_stride` 16 or 8 (Chen et al. 2017, "Rethinking Atrous
Convolution"), atrous spatial pyramid pooling (ASPP) on its deepest map, and a light decoder that
joins the ASPP output to the backbone's stride-4 map before a classifier and bilinear upsampling
to the input size. ASPP and decoder use plain (not depthwise-separable) convs, as the PyTorch
implementation FedCV (He et al. 2021) counts parameters of; the paper's separable convs belong to
its Xception variant.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_cv.models.backbones import mobilenet_v2_backbone, resnet_backbone
from fedjax_cv.models.layers import ConvNormAct
from fedjax_cv.models.mobilenet_v2 import STAGES
from fedjax_cv.models.norm import check_norm

# ASPP rates per output stride: doubling the resolution doubles the rates (Chen et al. 2017).
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def resize_to(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
    """Bilinear resize of [batch, height, width, channels] maps to `size` = (height, width).

    Half-pixel centres without antialiasing: PyTorch's `interpolate(..., align_corners=False)`.
    """
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    shape = (x.shape[0], *size, x.shape[-1])
    return jax.image.resize(x, shape, method="bilinear", antialias=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017, Sec. 3.3): a 1x1 conv, 3x3 convs at
    `rates`, and image pooling (global mean, 1x1 conv, broadcast back), concatenated and
    projected by a 1x1 conv; dropout in training (the 'dropout' rng).
    """

    rates: tuple[int, ...]
    features: int = 256
    norm: str = "group"
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        branches = [ConvNormAct(self.features, 1, norm=self.norm, name="conv1x1")(x, train=train)]
        for index, rate in enumerate(self.rates):
            branches.append(
                ConvNormAct(self.features, 3, dilation=rate, norm=self.norm, name=f"atrous{index}")(
                    x, train=train
                )
            )
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled = ConvNormAct(self.features, 1, norm=self.norm, name="pooling")(pooled, train=train)
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
        x = jnp.concatenate(branches, axis=-1)
        x = ConvNormAct(self.features, 1, norm=self.norm, name="project")(x, train=train)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class DeepLabV3PlusDecoder(nn.Module):
    """The DeepLabV3+ decoder (Chen et al. 2018, Sec. 3.1): the low-level map reduced to
    `low_level_features` channels by a 1x1 conv, joined to the upsampled ASPP output, and two
    3x3 convs.
    """

    features: int = 256
    low_level_features: int = 48
    norm: str = "group"

    @nn.compact
    def __call__(self, high: jnp.ndarray, low: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        low = ConvNormAct(self.low_level_features, 1, norm=self.norm, name="reduce")(
            low, train=train
        )
        x = jnp.concatenate([resize_to(high, low.shape[1:3]), low], axis=-1)
        x = ConvNormAct(self.features, 3, norm=self.norm, name="conv1")(x, train=train)
        return ConvNormAct(self.features, 3, norm=self.norm, name="conv2")(x, train=train)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on the backbone a subclass builds in `build_backbone`.

    Returns logits [batch, height, width, num_classes] at the input's height and width, whatever
    they are. `output_stride` (16 or 8) is the stride of the backbone's deepest map; the ASPP
    rates follow it. Parameters: `backbone` (the zoo classifier's, without its head), `aspp`,
    `decoder`, and the 1x1 `classifier`, the only module that depends on `num_classes`.
    `head_modules` lists all but the backbone.
    """

    # The layers a new task re-initialises when a checkpoint lacks them (a classification
    # checkpoint has only the backbone) and a frozen backbone trains.
    head_modules: ClassVar[tuple[str, ...]] = ("aspp", "decoder", "classifier")

    num_classes: int
    norm: str = "group"
    output_stride: int = 16
    dropout_rate: float = 0.5

    def build_backbone(self) -> nn.Module:
        """The backbone, named 'backbone', returning at least {4, 32: map}."""
        raise NotImplementedError(f"{type(self).__name__} does not define a backbone")

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_norm(self.norm)
        if self.output_stride not in ASPP_RATES:
            raise ValueError(
                f"model.output_stride={self.output_stride!r} is not allowed; "
                f"allowed: {', '.join(map(str, sorted(ASPP_RATES)))}"
            )
        size = x.shape[1:3]
        features = self.build_backbone()(x, train=train)
        high = ASPP(
            ASPP_RATES[self.output_stride],
            norm=self.norm,
            dropout_rate=self.dropout_rate,
            name="aspp",
        )(features[32], train=train)
        x = DeepLabV3PlusDecoder(norm=self.norm, name="decoder")(high, features[4], train=train)
        x = nn.Conv(self.num_classes, (1, 1), name="classifier")(x)
        return resize_to(x, size)


class DeepLabV3PlusMobileNetV2(DeepLabV3Plus):
    """DeepLabV3+ on MobileNetV2 (Sandler et al. 2018): ASPP on the last inverted-residual
    block's output (320 channels at width 1), not the 1280-channel head conv, which is not built;
    the decoder's low-level map is the stride-4 block output (24 channels).
    """

    width_multiplier: float = 1.0
    stages: tuple[tuple[int, int, int, int], ...] = STAGES

    def build_backbone(self) -> nn.Module:
        return mobilenet_v2_backbone(self, output_stride=self.output_stride, head_conv=False)


class DeepLabV3PlusResNet(DeepLabV3Plus):
    """DeepLabV3+ on ResNet (He et al. 2016): ASPP on the stage-4 output (2048 channels for
    bottleneck ResNets), low-level map from stage 1 (256 channels).
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"
    width: int = 64

    def build_backbone(self) -> nn.Module:
        return resnet_backbone(self, output_stride=self.output_stride)


DeepLabV3PlusResNet50 = functools.partial(DeepLabV3PlusResNet, stage_sizes=(3, 4, 6, 3))
DeepLabV3PlusResNet101 = functools.partial(DeepLabV3PlusResNet, stage_sizes=(3, 4, 23, 3))
