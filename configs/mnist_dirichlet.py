"""FedAvg on real MNIST split over 100 clients by the Dirichlet partition of Hsu et al.

    python launch/train.py --config=configs/mnist_dirichlet.py:alpha=0.5 --workdir=/tmp/mnist

The setting of Hsu, Qi and Brown (2019): 100 clients of 600 examples, q_k ~ Dir(alpha * p),
the EMNIST CNN of Reddi et al. (2021), 10 clients a round, batch 20, one local epoch.
Variants: `alpha=<float>` (default 0.5), `runlocal` (a few rounds on a 2-core CPU).
"""

from fedjax_cv.config_base import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    config = base_config()
    config.num_rounds = 200
    config.eval_every_rounds = 10
    config.checkpoint.every_rounds = 25

    config.model.name = "cnn_emnist"

    config.algorithm.name = "fedavg"
    config.algorithm.clients_per_round = 10
    config.algorithm.batch_size = 20
    config.algorithm.local_epochs = 1
    config.algorithm.client.learning_rate = 0.05
    config.algorithm.client.momentum = 0.9

    config.data.name = "mnist"
    config.data.num_clients = 100
    config.data.partition.name = "dirichlet"
    config.data.partition.alpha = float(args.get("alpha", 0.5))
    config.eval.batch_size = 1000

    if "runlocal" in args:
        config.num_rounds = 3
        config.eval_every_rounds = 3
        config.checkpoint.every_rounds = 3
    return config
