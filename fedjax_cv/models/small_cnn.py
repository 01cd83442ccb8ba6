"""The small models of the federated-learning literature.

- `logistic`: multinomial logistic regression on flattened pixels.
- `cnn_hsu`: the CIFAR CNN of Hsu, Qi and Brown (2020), "Federated Visual Classification with
  Real-World Data Distribution": two 5x5 convs of 64 channels, each followed by 2x2 max-pooling,
  dense 384, dense 192, linear classifier.
- `cnn_emnist`: the EMNIST CNN of Reddi et al. (2021), "Adaptive Federated Optimization", as
  FedJAX ships it: conv 3x3 32, conv 3x3 64 (VALID), 2x2 max-pool, dropout 0.25, dense 128,
  dropout 0.5, classifier.

The papers define these without normalisation, so their `norm` field defaults to 'none'; any
value of `fedjax_cv.models.norm.NORMS` inserts that layer after each conv.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from fedjax_cv.models.norm import Norm


class Logistic(nn.Module):
    # Flax's automatic names; the zoo's classifiers are named `classifier`. These keep the names
    # of checkpoints written before fine-tuning existed.
    head_modules: ClassVar[tuple[str, ...]] = ("Dense_0",)

    num_classes: int
    norm: str = "none"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        del train
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class CNNHsu(nn.Module):
    head_modules: ClassVar[tuple[str, ...]] = ("Dense_2",)

    num_classes: int
    norm: str = "none"
    conv_features: int = 64

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        for _ in range(2):
            x = nn.Conv(self.conv_features, (5, 5), padding="SAME")(x)
            x = nn.relu(Norm(self.norm)(x, train=train))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(384)(x))
        x = nn.relu(nn.Dense(192)(x))
        return nn.Dense(self.num_classes)(x)


class CNNEmnist(nn.Module):
    head_modules: ClassVar[tuple[str, ...]] = ("Dense_1",)

    num_classes: int
    norm: str = "none"
    dropout_rate: float = 0.25
    dense_dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        for features in (32, 64):
            x = nn.Conv(features, (3, 3), padding="VALID")(x)
            x = nn.relu(Norm(self.norm)(x, train=train))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128)(x))
        x = nn.Dropout(self.dense_dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)
