"""U-Net: Ronneberger et al. (2015), "U-Net: Convolutional Networks for Biomedical Image
Segmentation", and U-Nets on the zoo's backbones.

- `UNet`: the paper's network with size-keeping (padded) convs, so the logits have the input's
  height and width, odd sizes included.
- `UNetMobileNetV2`, `UNetResNet` (`UNetResNet50`, `UNetResNet101`): a zoo backbone as encoder
  (features at strides 2 to 32) and a decoder of five blocks, the layout of
  segmentation_models_pytorch's `Unet` that FedCV (He et al. 2021) counts parameters of.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from fedjax_cv.models.backbones import mobilenet_v2_backbone, resnet_backbone
from fedjax_cv.models.deeplab import resize_to
from fedjax_cv.models.layers import ConvNormAct, conv_kernel_init
from fedjax_cv.models.mobilenet_v2 import STAGES
from fedjax_cv.models.norm import check_norm

# Encoder strides of the backbone U-Nets, deepest first; the decoder returns to stride 1.
ENCODER_STRIDES = (32, 16, 8, 4, 2)
DECODER_FEATURES = (256, 128, 64, 32, 16)


class UNetBlock(nn.Module):
    """Two 3x3 ConvNormAct that keep the spatial size."""

    features: int
    norm: str = "group"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = ConvNormAct(self.features, 3, norm=self.norm, name="conv1")(x, train=train)
        return ConvNormAct(self.features, 3, norm=self.norm, name="conv2")(x, train=train)


class UNet(nn.Module):
    """The U-Net of Ronneberger et al. (2015, Fig. 1) with padded convs and `norm`.

    Five levels of two 3x3 convs, `base_width` channels doubled per level, joined by four 2x2
    max-pools (ceil mode: an odd size keeps its last row and column). The up path is the paper's:
    a 2x2 stride-2 transposed conv halving the channels, concatenation with the skip of that
    level, two 3x3 convs; on odd sizes the upsampled map is one pixel larger than the skip and
    is resized to it bilinearly. A 1x1 `classifier` gives logits at the input's size.
    """

    num_classes: int
    base_width: int = 64
    norm: str = "group"

    depth = 4  # downsamplings, as in the paper

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_norm(self.norm)
        skips = []
        for level in range(self.depth + 1):
            if level:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            width = self.base_width * 2**level
            x = UNetBlock(width, norm=self.norm, name=f"encoder{level}")(x, train=train)
            skips.append(x)
        for level in reversed(range(self.depth)):
            skip = skips[level]
            x = nn.ConvTranspose(
                skip.shape[-1],
                (2, 2),
                strides=(2, 2),
                padding="VALID",
                kernel_init=conv_kernel_init,
                name=f"upconv{level}",
            )(x)
            x = jnp.concatenate([skip, resize_to(x, skip.shape[1:3])], axis=-1)
            x = UNetBlock(skip.shape[-1], norm=self.norm, name=f"decoder{level}")(x, train=train)
        return nn.Conv(self.num_classes, (1, 1), name="classifier")(x)


class UNetDecoder(nn.Module):
    """Blocks of (upsample, concatenate the skip, two 3x3 convs) from the deepest encoder map.

    Each block upsamples bilinearly straight to its skip's size, which is 2x except for odd
    input sizes, where one interpolation does both the 2x and the fit; the block after the last
    skip returns to `size`, the input's, so the logits need no further resize.
    """

    features: tuple[int, ...] = DECODER_FEATURES
    norm: str = "group"

    @nn.compact
    def __call__(
        self,
        deepest: jnp.ndarray,
        skips: Sequence[jnp.ndarray],
        size: Sequence[int],
        *,
        train: bool,
    ) -> jnp.ndarray:
        x = deepest
        targets = [skip.shape[1:3] for skip in skips] + [tuple(size)]
        for index, (channels, target) in enumerate(zip(self.features, targets, strict=True)):
            x = resize_to(x, target)
            if index < len(skips):
                x = jnp.concatenate([x, skips[index]], axis=-1)
            x = UNetBlock(channels, norm=self.norm, name=f"block{index}")(x, train=train)
        return x


class BackboneUNet(nn.Module):
    """U-Net decoder on the backbone a subclass builds in `build_backbone`.

    The backbone's maps at strides 32, 16, 8, 4, 2 feed `decoder_features` (one entry per
    block: 16, 8, 4, 2 with skips, then stride 1); a 3x3 `classifier` conv, the only module that
    depends on `num_classes`, gives logits at the input's height and width. `head_modules`
    lists all but the backbone.
    """

    # The layers a new task re-initialises when a checkpoint lacks them (a classification
    # checkpoint has only the backbone) and a frozen backbone trains.
    head_modules: ClassVar[tuple[str, ...]] = ("decoder", "classifier")

    num_classes: int
    norm: str = "group"
    decoder_features: tuple[int, ...] = DECODER_FEATURES

    def build_backbone(self) -> nn.Module:
        """The backbone, named 'backbone', returning {2, 4, 8, 16, 32: map}."""
        raise NotImplementedError(f"{type(self).__name__} does not define a backbone")

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_norm(self.norm)
        if len(self.decoder_features) != len(ENCODER_STRIDES):
            raise ValueError(
                f"model.decoder_features={tuple(self.decoder_features)!r} is not allowed; "
                f"needs {len(ENCODER_STRIDES)} entries, one per decoder block (strides 16, 8, "
                "4, 2, 1)"
            )
        size = x.shape[1:3]
        features = self.build_backbone()(x, train=train)
        deepest, *skips = (features[stride] for stride in ENCODER_STRIDES)
        x = UNetDecoder(tuple(self.decoder_features), norm=self.norm, name="decoder")(
            deepest, skips, size, train=train
        )
        return nn.Conv(self.num_classes, (3, 3), padding=((1, 1), (1, 1)), name="classifier")(x)


class UNetMobileNetV2(BackboneUNet):
    """U-Net on MobileNetV2 (Sandler et al. 2018). Skips: the first block (stride 2, 16
    channels) and the last block at strides 4, 8, 16 (24, 32, 96); the deepest map is the
    1280-channel head conv. 6.63 M parameters at 21 classes: FedCV's Table 7 lists 7.91 M
    because it also counts MobileNetV2's unused 1280x1000 ImageNet classifier, which is left out.
    """

    width_multiplier: float = 1.0
    stages: tuple[tuple[int, int, int, int], ...] = STAGES

    def build_backbone(self) -> nn.Module:
        return mobilenet_v2_backbone(self, feature_strides=ENCODER_STRIDES)


class UNetResNet(BackboneUNet):
    """U-Net on ResNet (He et al. 2016). Skips: the stem conv (stride 2, before max-pooling)
    and the outputs of stages 1-3; the deepest map is stage 4's.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"
    width: int = 64

    def build_backbone(self) -> nn.Module:
        return resnet_backbone(self, feature_strides=ENCODER_STRIDES)


UNetResNet50 = functools.partial(UNetResNet, stage_sizes=(3, 4, 6, 3))
UNetResNet101 = functools.partial(UNetResNet, stage_sizes=(3, 4, 23, 3))
