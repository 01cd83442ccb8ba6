"""FedAvg on real CIFAR-10 split over 100 clients by the Dirichlet partition of Hsu et al.

    python launch/train.py --config=configs/cifar10_dirichlet.py:alpha=0.5 --workdir=/tmp/c10

The setting of Hsu, Qi and Brown (2019): 100 clients of 500 examples, q_k ~ Dir(alpha * p),
the CNN of two 5x5 conv layers; 10 clients a round, batch 20, one local epoch of momentum SGD.
Variants: `alpha=<float>` (default 0.5), `runlocal` (a few rounds on a 2-core CPU).
"""

from fedjax_cv.config_base import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    config = base_config()
    config.num_rounds = 500
    config.eval_every_rounds = 10
    config.checkpoint.every_rounds = 25

    config.model.name = "cnn_hsu"

    config.algorithm.name = "fedavg"
    config.algorithm.clients_per_round = 10
    config.algorithm.batch_size = 20
    config.algorithm.local_epochs = 1
    config.algorithm.client.learning_rate = 0.02
    config.algorithm.client.momentum = 0.9

    config.data.name = "cifar10"
    config.data.num_clients = 100
    config.data.partition.name = "dirichlet"
    config.data.partition.alpha = float(args.get("alpha", 0.5))
    config.data.augmentation = "cifar"  # pad 4, random crop, horizontal flip
    config.eval.batch_size = 1000

    if "runlocal" in args:
        config.num_rounds = 3
        config.eval_every_rounds = 3
        config.checkpoint.every_rounds = 3
    return config
