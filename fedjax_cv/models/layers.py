"""Building blocks shared by the conv models of the zoo.

- `ConvNormAct`: conv, `Norm`, activation: the unit every conv model is made of.
- `InvertedResidual`: the MBConv block of MobileNetV2 (Sandler et al. 2018), MobileNetV3 (Howard
  et al. 2019) and EfficientNet (Tan & Le 2019); the three differ only in activation,
  squeeze-excitation and stochastic depth.
- `SqueezeExcitation` (Hu et al. 2018) and `StochasticDepth` (Huang et al. 2016).
- `stride_schedule`: the strides and dilations that stop a backbone at `output_stride`
  (Chen et al. 2017, DeepLab), and the nominal stride that keys its multi-scale features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_cv.models.norm import Norm

Activation = Callable[[jnp.ndarray], jnp.ndarray]

# Nominal strides of the multi-scale features every conv backbone returns.
FEATURE_STRIDES = (4, 8, 16, 32)
OUTPUT_STRIDES = (8, 16, 32)

# He et al. (2015) init, fan-out as in the reference implementations of every conv model here.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds a channel count to a multiple of `divisor`, losing at most 10% of `value`.

    The rule of the MobileNet and EfficientNet reference code, which parameter counts depend on.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def check_output_stride(output_stride: int) -> None:
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"model.output_stride={output_stride!r} is not allowed; "
            f"allowed: {', '.join(map(str, OUTPUT_STRIDES))}"
        )


class LayerStride(NamedTuple):
    """How one strided layer of a backbone runs under an `output_stride`."""

    stride: int  # the stride it applies
    dilation: int  # the dilation of its spatial conv
    level: int  # the stride of its output in the undilated network: the feature key


def stride_schedule(
    strides: Sequence[int], output_stride: int, input_stride: int = 1
) -> tuple[LayerStride, ...]:
    """Replaces strides past `output_stride` by dilation (DeepLab, Chen et al. 2017).

    `strides` are the nominal strides of consecutive layers whose input is already at
    `input_stride`. A layer that would exceed `output_stride` runs with stride 1 at the dilation
    reached so far, and multiplies the dilation of the layers after it: the rule of DeepLab and
    of torchvision's `replace_stride_with_dilation`, so receptive fields match the undilated net.
    """
    check_output_stride(output_stride)
    current, dilation, level = input_stride, 1, input_stride
    schedule = []
    for stride in strides:
        level *= stride
        if current * stride > output_stride:
            schedule.append(LayerStride(1, dilation, level))
            dilation *= stride
        else:
            current *= stride
            schedule.append(LayerStride(stride, dilation, level))
    return tuple(schedule)


def select_features(
    features: dict[int, jnp.ndarray], strides: Sequence[int] = FEATURE_STRIDES
) -> dict[int, jnp.ndarray]:
    """The maps at `strides` (`FEATURE_STRIDES` by default), from maps keyed by nominal stride.

    A backbone whose `feature_strides` field sets `strides` offers stride 2 too, for decoders
    such as U-Net's that return to full resolution.
    """
    missing = [stride for stride in strides if stride not in features]
    if missing:
        raise ValueError(
            f"model.feature_strides={tuple(strides)!r} is not allowed; "
            f"available: {', '.join(map(str, sorted(features)))}"
        )
    return {stride: features[stride] for stride in strides}


class ConvNormAct(nn.Module):
    """Conv (no bias), `Norm`, activation.

    Padding is symmetric, `dilation * (kernel - 1) // 2` a side as in the reference
    implementations, rather than XLA's 'SAME' which pads strided convs on one side only.
    """

    features: int
    kernel_size: int = 1
    strides: int = 1
    dilation: int = 1
    groups: int = 1
    norm: str = "group"
    activation: Activation | None = nn.relu
    norm_scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        pad = self.dilation * (self.kernel_size - 1) // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.strides,
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=self.dilation,
            feature_group_count=self.groups,
            use_bias=False,
            kernel_init=conv_kernel_init,
            name="conv",
        )(x)
        x = Norm(self.norm, scale_init=self.norm_scale_init, name="norm")(x, train=train)
        return x if self.activation is None else self.activation(x)


class SqueezeExcitation(nn.Module):
    """Channel gating by globally pooled features (Hu et al. 2018, "Squeeze-and-Excitation")."""

    squeeze_features: int
    activation: Activation = nn.relu
    gate: Activation = nn.sigmoid

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = self.activation(nn.Conv(self.squeeze_features, (1, 1), name="reduce")(scale))
        scale = self.gate(nn.Conv(x.shape[-1], (1, 1), name="expand")(scale))
        return x * scale


class StochasticDepth(nn.Module):
    """Drops a residual branch per example in training (Huang et al. 2016, "Deep Networks with
    Stochastic Depth"); survivors are scaled by 1/(1 - rate) so evaluation needs no rescaling.

    Uses the 'dropout' rng.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if not train or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, shape)
        return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise kxk, optional squeeze-excitation, linear 1x1 projection, and a
    residual connection when shapes allow (Sandler et al. 2018, "MobileNetV2").
    """

    features: int
    expanded_features: int
    kernel_size: int = 3
    strides: int = 1
    dilation: int = 1
    norm: str = "group"
    activation: Activation = nn.relu6
    se_features: int = 0  # 0: no squeeze-excitation
    se_activation: Activation = nn.relu
    se_gate: Activation = nn.sigmoid
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        inputs = x
        if self.expanded_features != x.shape[-1]:
            x = ConvNormAct(
                self.expanded_features, norm=self.norm, activation=self.activation, name="expand"
            )(x, train=train)
        x = ConvNormAct(
            self.expanded_features,
            self.kernel_size,
            strides=self.strides,
            dilation=self.dilation,
            groups=self.expanded_features,
            norm=self.norm,
            activation=self.activation,
            name="depthwise",
        )(x, train=train)
        if self.se_features:
            x = SqueezeExcitation(
                self.se_features, activation=self.se_activation, gate=self.se_gate, name="se"
            )(x)
        x = ConvNormAct(self.features, norm=self.norm, activation=None, name="project")(
            x, train=train
        )
        if self.strides == 1 and inputs.shape[-1] == self.features:
            x = inputs + StochasticDepth(self.drop_path_rate)(x, train=train)
        return x
