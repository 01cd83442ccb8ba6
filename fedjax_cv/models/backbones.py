"""The zoo's classifiers as backbones of dense-prediction models (DeepLabV3+, U-Net).

A model with a backbone declares the backbone's fields (`width_multiplier`, `stages` for
MobileNetV2; `stage_sizes`, `block`, `width` for ResNet) beside its own `num_classes` and
`norm`; these build the backbone from them, as the submodule `backbone` (so a classifier's
checkpoint maps onto `params/backbone/...`), returning multi-scale features.
"""

from __future__ import annotations

import flax.linen as nn

from fedjax_cv.models.mobilenet_v2 import MobileNetV2
from fedjax_cv.models.resnet import ResNet


def mobilenet_v2_backbone(owner: nn.Module, **fields) -> MobileNetV2:
    """MobileNetV2 features with `owner`'s width, stages and norm; `fields` add the rest."""
    return MobileNetV2(
        num_classes=owner.num_classes,
        width_multiplier=owner.width_multiplier,
        stages=owner.stages,
        norm=owner.norm,
        return_features=True,
        name="backbone",
        **fields,
    )


def resnet_backbone(owner: nn.Module, **fields) -> ResNet:
    """ResNet features with `owner`'s stage sizes, block, width and norm."""
    return ResNet(
        num_classes=owner.num_classes,
        stage_sizes=owner.stage_sizes,
        block=owner.block,
        width=owner.width,
        norm=owner.norm,
        return_features=True,
        name="backbone",
        **fields,
    )
