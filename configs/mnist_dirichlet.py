"""FedAvg on real MNIST split over 100 clients by the Dirichlet partition of Hsu et al.

    python launch/train.py --config=configs/mnist_dirichlet.py:alpha=0.5 --workdir=/tmp/mnist

100 clients of 600 examples, q_k ~ Dir(alpha * p), the EMNIST CNN of Reddi et al. (2021);
10 clients a round, batch 20, one local epoch of momentum SGD, 200 rounds. Variants:
`alpha=<float>` (default 0.5), `runlocal` (3 rounds).
"""

from fedjax_cv.config_base import dirichlet_classification


def get_config(arg=None):
    return dirichlet_classification("mnist", "cnn_emnist", arg, num_rounds=200)
