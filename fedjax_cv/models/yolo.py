"""YOLO detectors: YOLOv5 n/s/m/l/x (Ultralytics, v6.0 architecture) and YOLOv3 (Redmon & Farhadi
2018, "YOLOv3: An Incremental Improvement", as Ultralytics' yolov3.yaml builds it).

Every block is `Conv`: a conv without bias, `norm`, SiLU. A backbone returns multi-scale features
{stride: map}; a neck joins the maps at strides 8, 16 and 32; `Detect` turns each joined map into
raw predictions for 3 anchors a cell.

- YOLOv5: CSP-Darknet backbone (a 6x6 stride-2 stem, four stages of a stride-2 conv and a C3
  block of 3, 6, 9, 3 bottlenecks times the depth multiple, SPPF with k=5 after the last; Wang
  et al. 2020, "CSPNet"), a PAN neck (Liu et al. 2018, "PANet": top-down then bottom-up, C3
  blocks without shortcuts). Channels are the reference's times the width multiple, rounded up
  to a multiple of 8; repeats are max(round(n * depth multiple), 1).
- YOLOv3: Darknet-53 backbone (residual bottlenecks 1, 2, 8, 8, 4) and the three-scale head of
  the paper, with the v5 `Conv` (SiLU) and `Detect`, as in Ultralytics' port.

Output (the contract the detection loss and NMS build on): a tuple of 3 arrays, one a level at
strides 8, 16, 32 in that order, shaped [batch, height / stride, width / stride, anchors,
5 + num_classes], raw: the last axis is (tx, ty, tw, th, objectness, class_0, ...). Decoding is
YOLOv5's, for YOLOv3 too: xy = (sigmoid(txy) * 2 - 0.5 + grid_xy) * stride and
wh = (sigmoid(twh) * 2) ** 2 * anchor. `model.anchors` ((w, h) in input pixels, per level) and
`model.strides` are readable from the unbound module; `detection_geometry(model)` gives them as
arrays. Images must be letterboxed to a multiple of 32 in height and width.

`backbone` also takes the zoo's classifiers (through `fedjax_cv.models.backbones`): the neck and
head are then built on that backbone's maps at strides 8, 16 and 32, so
`get_model("yolov5s", 80, backbone="mobilenet_v2")` is YOLOv5s's neck and head on MobileNetV2.
Zoo backbones keep their own widths (the width and depth multiples scale only CSP-Darknet,
Darknet-53 and the neck) and their own norm settings.

`norm="batch"` is Ultralytics' BatchNorm: epsilon 1e-3 and momentum 0.03 in PyTorch's terms
(Flax momentum 0.97). Conv kernels, including `Detect`'s, are initialised as PyTorch's default
(uniform, variance 1 / (3 fan_in)), which Ultralytics keeps; `Detect`'s biases start at YOLOv5's
priors (Lin et al. 2017, "Focal Loss", Sec. 3.3): objectness log(8 / (640 / stride) ** 2), so
about 8 objects a 640x640 image, classes log(0.6 / (num_classes - 0.99)), box terms 0.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fedjax_cv.models.backbones import mobilenet_v2_backbone, resnet_backbone
from fedjax_cv.models.layers import select_features
from fedjax_cv.models.mobilenet_v2 import STAGES
from fedjax_cv.models.norm import Norm, batch_norm, check_norm
from fedjax_cv.models.resnet import ResNet18, ResNet34, ResNet50, ResNet101, ResNet152

Anchors = tuple[tuple[tuple[float, float], ...], ...]

# YOLOv5's default anchors, (w, h) in input pixels, for the levels at strides 8, 16, 32 (also
# Ultralytics' YOLOv3 anchors, the k-means anchors of Redmon & Farhadi 2018 on COCO).
ANCHORS: Anchors = (
    ((10.0, 13.0), (16.0, 30.0), (33.0, 23.0)),
    ((30.0, 61.0), (62.0, 45.0), (59.0, 119.0)),
    ((116.0, 90.0), (156.0, 198.0), (373.0, 326.0)),
)
STRIDES = (8, 16, 32)
INPUT_MULTIPLE = 32  # the deepest stride: inputs must be a multiple of it

# Ultralytics' BatchNorm2d(eps=1e-3, momentum=0.03): PyTorch's momentum weighs the new batch,
# Flax's the running average.
BATCH_NORM_EPSILON = 1e-3
BATCH_NORM_MOMENTUM = 0.97

# PyTorch's default conv init (kaiming_uniform with a=sqrt(5)): uniform, variance 1 / (3 fan_in).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def scale_channels(channels: int, width_multiple: float, divisor: int = 8) -> int:
    """`channels * width_multiple` rounded up to a multiple of `divisor` (Ultralytics' rule)."""
    return int(math.ceil(channels * width_multiple / divisor) * divisor)


def scale_depth(repeats: int, depth_multiple: float) -> int:
    """Ultralytics' repeats: max(round(n * depth_multiple), 1) for n > 1, else n."""
    return max(round(repeats * depth_multiple), 1) if repeats > 1 else repeats


def prior_bias(stride: int, num_classes: int, num_anchors: int = 3) -> np.ndarray:
    """`Detect`'s initial bias at `stride`, [num_anchors, 5 + num_classes] (YOLOv5's priors)."""
    bias = np.zeros((num_anchors, 5 + num_classes), np.float32)
    bias[:, 4] = math.log(8 / (640 / stride) ** 2)
    bias[:, 5:] = math.log(0.6 / (num_classes - 0.99))
    return bias


def upsample2(x: jnp.ndarray) -> jnp.ndarray:
    """Nearest-neighbour 2x upsampling of [batch, height, width, channels] maps."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UltralyticsBatchNorm(nn.Module):
    """BatchNorm with Ultralytics' epsilon and momentum.

    Its parameters sit where `Norm(kind="batch")` puts them (`.../norm/BatchNorm_0/...`), so
    weight files and FedBN's norm-layer regex see the same names; like it, its batch statistics
    leave out padded examples (`fedjax_cv.models.norm.example_mask`).
    """

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        return batch_norm(x, train=train, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON)


class Conv(nn.Module):
    """Ultralytics' Conv: a kxk conv without bias (padding k // 2 unless given), `norm`, SiLU."""

    features: int
    kernel_size: int = 1
    strides: int = 1
    padding: int | None = None
    norm: str = "group"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        pad = self.kernel_size // 2 if self.padding is None else self.padding
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.strides,
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=torch_conv_init,
            name="conv",
        )(x)
        if self.norm == "batch":
            x = UltralyticsBatchNorm(name="norm")(x, train=train)
        else:
            x = Norm(self.norm, name="norm")(x, train=train)
        return nn.silu(x)


class Bottleneck(nn.Module):
    """1x1 conv to `features * expansion`, 3x3 conv to `features`, and a residual connection
    when `shortcut` is set and the input has `features` channels."""

    features: int
    shortcut: bool = True
    expansion: float = 0.5
    norm: str = "group"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        hidden = int(self.features * self.expansion)
        y = Conv(hidden, 1, norm=self.norm, name="cv1")(x, train=train)
        y = Conv(self.features, 3, norm=self.norm, name="cv2")(y, train=train)
        return x + y if self.shortcut and x.shape[-1] == self.features else y


class C3(nn.Module):
    """CSP block with 3 convs: `repeats` bottlenecks on half the channels (cv1), concatenated
    with a 1x1 projection of the input (cv2), fused by a 1x1 conv (cv3)."""

    features: int
    repeats: int = 1
    shortcut: bool = True
    norm: str = "group"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        hidden = int(self.features * 0.5)
        y = Conv(hidden, 1, norm=self.norm, name="cv1")(x, train=train)
        for index in range(self.repeats):
            y = Bottleneck(hidden, self.shortcut, expansion=1.0, norm=self.norm, name=f"m{index}")(
                y, train=train
            )
        skip = Conv(hidden, 1, norm=self.norm, name="cv2")(x, train=train)
        return Conv(self.features, 1, norm=self.norm, name="cv3")(
            jnp.concatenate([y, skip], axis=-1), train=train
        )


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained kxk stride-1 max-pools on a 1x1 reduction to
    half the input channels, concatenated with it and fused by a 1x1 conv (equal to SPP's
    parallel 5, 9, 13 pools for k=5; He et al. 2015, "Spatial Pyramid Pooling")."""

    features: int
    pool_size: int = 5
    norm: str = "group"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = Conv(x.shape[-1] // 2, 1, norm=self.norm, name="cv1")(x, train=train)
        k, pad = self.pool_size, self.pool_size // 2
        pooled = [x]
        for _ in range(3):
            pooled.append(
                nn.max_pool(pooled[-1], (k, k), strides=(1, 1), padding=((pad, pad), (pad, pad)))
            )
        return Conv(self.features, 1, norm=self.norm, name="cv2")(
            jnp.concatenate(pooled, axis=-1), train=train
        )


class CSPDarknet(nn.Module):
    """YOLOv5's backbone (v6.0), returning {4, 8, 16, 32: map}; stride 32 is SPPF's output."""

    width_multiple: float = 1.0
    depth_multiple: float = 1.0
    norm: str = "group"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[int, jnp.ndarray]:
        def width(channels):
            return scale_channels(channels, self.width_multiple)

        x = Conv(width(64), 6, strides=2, padding=2, norm=self.norm, name="stem")(x, train=train)
        features = {}
        for stage, (channels, repeats) in enumerate(((128, 3), (256, 6), (512, 9), (1024, 3))):
            x = Conv(width(channels), 3, strides=2, norm=self.norm, name=f"down{stage + 1}")(
                x, train=train
            )
            x = C3(
                width(channels),
                scale_depth(repeats, self.depth_multiple),
                norm=self.norm,
                name=f"c3_{stage + 1}",
            )(x, train=train)
            features[4 * 2**stage] = x
        features[32] = SPPF(width(1024), 5, norm=self.norm, name="sppf")(features[32], train=train)
        return features


class Darknet53(nn.Module):
    """Darknet-53 (Redmon & Farhadi 2018, Table 1): a 3x3 conv, then five stages of a stride-2
    3x3 conv and 1, 2, 8, 8, 4 residual bottlenecks; returns {4, 8, 16, 32: map}."""

    width_multiple: float = 1.0
    depth_multiple: float = 1.0
    norm: str = "group"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[int, jnp.ndarray]:
        def width(channels):
            return scale_channels(channels, self.width_multiple)

        x = Conv(width(32), 3, norm=self.norm, name="stem")(x, train=train)
        features = {}
        for stage, (channels, repeats) in enumerate(
            ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4))
        ):
            x = Conv(width(channels), 3, strides=2, norm=self.norm, name=f"down{stage + 1}")(
                x, train=train
            )
            for index in range(scale_depth(repeats, self.depth_multiple)):
                x = Bottleneck(width(channels), norm=self.norm, name=f"stage{stage + 1}_{index}")(
                    x, train=train
                )
            features[2 * 2**stage] = x
        return select_features(features)


class PANNeck(nn.Module):
    """YOLOv5's neck: a top-down path (1x1 lateral conv, 2x upsampling, concatenation, C3) from
    stride 32 to 8, then a bottom-up path (stride-2 3x3 conv, concatenation with the lateral
    map, C3) back to 32; C3 blocks without shortcuts. Returns the maps at strides 8, 16, 32."""

    width_multiple: float = 1.0
    depth_multiple: float = 1.0
    norm: str = "group"

    @nn.compact
    def __call__(
        self, features: dict[int, jnp.ndarray], *, train: bool
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        def width(channels):
            return scale_channels(channels, self.width_multiple)

        repeats = scale_depth(3, self.depth_multiple)
        c3 = functools.partial(C3, repeats=repeats, shortcut=False, norm=self.norm)
        conv = functools.partial(Conv, norm=self.norm)

        lateral5 = conv(width(512), 1, name="lateral5")(features[32], train=train)
        x = jnp.concatenate([upsample2(lateral5), features[16]], axis=-1)
        x = c3(width(512), name="top_down16")(x, train=train)
        lateral4 = conv(width(256), 1, name="lateral4")(x, train=train)
        x = jnp.concatenate([upsample2(lateral4), features[8]], axis=-1)
        out8 = c3(width(256), name="top_down8")(x, train=train)

        x = conv(width(256), 3, strides=2, name="down8")(out8, train=train)
        x = jnp.concatenate([x, lateral4], axis=-1)
        out16 = c3(width(512), name="bottom_up16")(x, train=train)
        x = conv(width(512), 3, strides=2, name="down16")(out16, train=train)
        x = jnp.concatenate([x, lateral5], axis=-1)
        out32 = c3(width(1024), name="bottom_up32")(x, train=train)
        return out8, out16, out32


class YOLOv3Neck(nn.Module):
    """YOLOv3's head before its output convs (Ultralytics' yolov3.yaml): at stride 32 a
    bottleneck without shortcut and alternating 1x1/3x3 convs; a 1x1 conv, 2x upsampling and
    concatenation pass each level's 512 (then 256) channel map down to the next, which repeats
    the pattern. Returns the maps at strides 8, 16, 32."""

    width_multiple: float = 1.0
    depth_multiple: float = 1.0
    norm: str = "group"

    @nn.compact
    def __call__(
        self, features: dict[int, jnp.ndarray], *, train: bool
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        def width(channels):
            return scale_channels(channels, self.width_multiple)

        conv = functools.partial(Conv, norm=self.norm)
        block = functools.partial(Bottleneck, shortcut=False, norm=self.norm)

        x = block(width(1024), name="block32_0")(features[32], train=train)
        x = conv(width(512), 1, name="reduce32_0")(x, train=train)
        x = conv(width(1024), 3, name="expand32_0")(x, train=train)
        lateral32 = conv(width(512), 1, name="reduce32_1")(x, train=train)
        out32 = conv(width(1024), 3, name="expand32_1")(lateral32, train=train)

        x = conv(width(256), 1, name="lateral32")(lateral32, train=train)
        x = jnp.concatenate([upsample2(x), features[16]], axis=-1)
        x = block(width(512), name="block16_0")(x, train=train)
        x = block(width(512), name="block16_1")(x, train=train)
        lateral16 = conv(width(256), 1, name="reduce16")(x, train=train)
        out16 = conv(width(512), 3, name="expand16")(lateral16, train=train)

        x = conv(width(128), 1, name="lateral16")(lateral16, train=train)
        x = jnp.concatenate([upsample2(x), features[8]], axis=-1)
        x = block(width(256), name="block8_0")(x, train=train)
        for index in range(scale_depth(2, self.depth_multiple)):
            x = block(width(256), name=f"block8_{index + 1}")(x, train=train)
        return x, out16, out32


class Detect(nn.Module):
    """A 1x1 conv with bias a level, to `num_anchors * (5 + num_classes)` channels, reshaped to
    [batch, height, width, num_anchors, 5 + num_classes]; biases start at `prior_bias`."""

    num_classes: int
    num_anchors: int = 3
    strides: tuple[int, ...] = STRIDES

    @nn.compact
    def __call__(self, maps: Sequence[jnp.ndarray]) -> tuple[jnp.ndarray, ...]:
        outputs = []
        for level, (x, stride) in enumerate(zip(maps, self.strides, strict=True)):
            bias = prior_bias(stride, self.num_classes, self.num_anchors).reshape(-1)
            y = nn.Conv(
                bias.size,
                (1, 1),
                kernel_init=torch_conv_init,
                bias_init=lambda key, shape, dtype=jnp.float32, bias=bias: jnp.asarray(
                    bias, dtype
                ).reshape(shape),
                name=f"level{level}",
            )(x)
            outputs.append(y.reshape(*y.shape[:3], self.num_anchors, 5 + self.num_classes))
        return tuple(outputs)


# ----------------------------------------------------------------------------------------------
# Backbones by name.

_RESNETS = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
}


def _zoo_owner(model: YOLO, **fields: Any) -> types.SimpleNamespace:
    """The fields `fedjax_cv.models.backbones` reads from a model that owns a zoo backbone."""
    return types.SimpleNamespace(num_classes=model.num_classes, norm=model.norm, **fields)


def _csp_darknet(model: YOLO) -> nn.Module:
    return CSPDarknet(model.width_multiple, model.depth_multiple, norm=model.norm, name="backbone")


def _darknet53(model: YOLO) -> nn.Module:
    return Darknet53(model.width_multiple, model.depth_multiple, norm=model.norm, name="backbone")


def _mobilenet_v2(model: YOLO) -> nn.Module:
    # The last inverted-residual block's output (320 channels) at stride 32, as DeepLabV3+ takes
    # it: the 1280-channel head conv is not built.
    owner = _zoo_owner(model, width_multiplier=1.0, stages=STAGES)
    return mobilenet_v2_backbone(owner, feature_strides=STRIDES, head_conv=False)


def _resnet(factory: functools.partial) -> Callable[[YOLO], nn.Module]:
    def build(model: YOLO) -> nn.Module:
        owner = _zoo_owner(model, width=64, **factory.keywords)
        return resnet_backbone(owner, feature_strides=STRIDES)

    return build


BACKBONES: dict[str, Callable[[YOLO], nn.Module]] = {
    "csp_darknet": _csp_darknet,
    "darknet53": _darknet53,
    "mobilenet_v2": _mobilenet_v2,
    **{name: _resnet(factory) for name, factory in _RESNETS.items()},
}


# ----------------------------------------------------------------------------------------------
# Detectors.


def _check_anchors(anchors: Anchors) -> None:
    try:
        values = np.asarray(anchors, dtype=np.float64)
    except (TypeError, ValueError):  # ragged or not numbers
        values = np.zeros((0,))
    levels, per_level, pair = values.shape if values.ndim == 3 else (0, 0, 0)
    if levels != len(STRIDES) or per_level == 0 or pair != 2:
        raise ValueError(
            f"model.anchors={anchors!r} is not allowed; must be {len(STRIDES)} levels (strides "
            f"{', '.join(map(str, STRIDES))}) of equally many (w, h) pairs"
        )
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"model.anchors={anchors!r} is not allowed; sizes must be positive")


class YOLO(nn.Module):
    """A YOLO detector: `backbone` features at strides 8, 16, 32, the neck a subclass builds in
    `build_neck`, and `Detect`. Returns 3 raw prediction maps (see the module's docstring).

    Parameters: `backbone`, `neck` and `detect`, the only module that depends on `num_classes`;
    `head_modules` lists all but the backbone, so a frozen backbone trains neck and detect.
    """

    head_modules: ClassVar[tuple[str, ...]] = ("neck", "detect")
    strides: ClassVar[tuple[int, ...]] = STRIDES

    num_classes: int
    norm: str = "group"
    backbone: str = "csp_darknet"
    depth_multiple: float = 1.0
    width_multiple: float = 1.0
    anchors: Anchors = ANCHORS

    def build_neck(self) -> nn.Module:
        """The neck, named 'neck', mapping {8, 16, 32: map} to the 3 maps `Detect` takes."""
        raise NotImplementedError(f"{type(self).__name__} does not define a neck")

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, ...]:
        check_norm(self.norm)
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"model.backbone={self.backbone!r} is unknown; allowed: {', '.join(BACKBONES)}"
            )
        _check_anchors(self.anchors)
        if x.ndim != 4 or x.shape[1] % INPUT_MULTIPLE or x.shape[2] % INPUT_MULTIPLE:
            raise ValueError(
                f"input shape {tuple(x.shape)} is not allowed: YOLO needs [batch, height, width, "
                f"channels] images letterboxed to a multiple of {INPUT_MULTIPLE} in height and "
                "width"
            )
        features = BACKBONES[self.backbone](self)(x, train=train)
        maps = self.build_neck()({s: features[s] for s in STRIDES}, train=train)
        return Detect(self.num_classes, len(self.anchors[0]), self.strides, name="detect")(maps)


class YOLOv5(YOLO):
    """YOLOv5 (v6.0): CSP-Darknet (or a zoo backbone), PAN neck, Detect."""

    def build_neck(self) -> nn.Module:
        return PANNeck(self.width_multiple, self.depth_multiple, norm=self.norm, name="neck")


class YOLOv3(YOLO):
    """YOLOv3: Darknet-53 (or another backbone), the paper's three-scale head, Detect."""

    backbone: str = "darknet53"

    def build_neck(self) -> nn.Module:
        return YOLOv3Neck(self.width_multiple, self.depth_multiple, norm=self.norm, name="neck")


YOLOv5n = functools.partial(YOLOv5, depth_multiple=0.33, width_multiple=0.25)
YOLOv5s = functools.partial(YOLOv5, depth_multiple=0.33, width_multiple=0.50)
YOLOv5m = functools.partial(YOLOv5, depth_multiple=0.67, width_multiple=0.75)
YOLOv5l = functools.partial(YOLOv5, depth_multiple=1.0, width_multiple=1.0)
YOLOv5x = functools.partial(YOLOv5, depth_multiple=1.33, width_multiple=1.25)

DETECTORS: dict[str, Callable[..., YOLO]] = {
    "yolov5n": YOLOv5n,
    "yolov5s": YOLOv5s,
    "yolov5m": YOLOv5m,
    "yolov5l": YOLOv5l,
    "yolov5x": YOLOv5x,
    "yolov3": YOLOv3,
}


def detection_geometry(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """(anchors float32 [levels, anchors, 2] as (w, h) in pixels, strides [levels]) of a
    detector such as `get_model("yolov5s", 80)`; ValueError for any other model."""
    anchors, strides = getattr(model, "anchors", None), getattr(model, "strides", None)
    if anchors is None or strides is None:
        raise ValueError(
            f"model {type(model).__name__} is not a detector (no anchors and strides); "
            f"detection needs one of {', '.join(DETECTORS)}"
        )
    _check_anchors(anchors)
    return np.asarray(anchors, np.float32), np.asarray(strides, np.int32)
