"""FedAvg on real CIFAR-10 split over 100 clients by the Dirichlet partition of Hsu et al.

    python launch/train.py --config=configs/cifar10_dirichlet.py:alpha=0.5 --workdir=/tmp/c10

The setting of Hsu, Qi and Brown (2019): 100 clients of 500 examples, q_k ~ Dir(alpha * p),
the CNN of two 5x5 conv layers; 10 clients a round, batch 20, one local epoch of momentum SGD,
CIFAR augmentation (pad 4, random crop, flip). Variants: `alpha=<float>` (default 0.5),
`runlocal` (3 rounds).
"""

from fedjax_cv.config_base import dirichlet_classification


def get_config(arg=None):
    config = dirichlet_classification("cifar10", "cnn_hsu", arg)
    config.data.augmentation = "cifar"
    return config
