"""What a model costs: parameters, FLOPs per image, and bytes a client uploads per round.

FedCV (He et al. 2021) compares models for federated training by these numbers: compute bounds
a client's round time and the parameter count bounds its upload.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BYTES_PER_PARAM = 4  # float32 uploads


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """Cost of one model at one input shape.

    `flops_per_example` comes from XLA's cost analysis of the compiled forward pass, which counts
    a multiply-add as 2 FLOPs (torchvision's "GFLOPS" column counts it as 1).
    """

    num_params: int
    flops_per_example: float
    bytes_per_round: int


def count_params(variables_or_params: Mapping[str, Any]) -> int:
    """Number of parameters: of the 'params' collection when given all variables.

    Leaves may be arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`), so counting a model
    needs no memory.
    """
    tree = variables_or_params
    if isinstance(tree, Mapping) and "params" in tree:
        tree = tree["params"]
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _flops(cost: Mapping[str, float] | Sequence[Mapping[str, float]] | None) -> float:
    # jax returns a dict; older versions a list with one dict per compiled program.
    if cost is None:
        return 0.0
    if isinstance(cost, Mapping):
        return float(cost.get("flops", 0.0))
    return sum(_flops(entry) for entry in cost)


def model_report(model: nn.Module, image_shape: Sequence[int], batch: int = 1) -> ModelReport:
    """Parameters, FLOPs per example and upload bytes of `model` on images of `image_shape`
    (height, width, channels), in evaluation mode.

    Nothing runs: variables are shapes from `jax.eval_shape` and FLOPs come from compiling, not
    executing, the forward pass.
    """
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    forward = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
    cost = forward.lower(variables, images).compile().cost_analysis()
    num_params = count_params(variables)
    return ModelReport(
        num_params=num_params,
        flops_per_example=_flops(cost) / batch,
        bytes_per_round=num_params * BYTES_PER_PARAM,
    )
