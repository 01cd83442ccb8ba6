"""FedAvg on the embedded `shapes` data: the README's main job.

    python launch/train.py --config=configs/shapes_fedavg.py --workdir=/tmp/shapes_fedavg

Variants: `:runlocal` (a few rounds, for a smoke test), `:alpha=<float>` (Dirichlet alpha).
"""

from fedjax_cv.config_base import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    config = base_config()
    config.seed = 0
    config.num_rounds = 60
    config.eval_every_rounds = 10
    config.checkpoint.every_rounds = 20

    config.model.name = "cnn_emnist"

    config.algorithm.name = "fedavg"
    config.algorithm.clients_per_round = 10
    config.algorithm.batch_size = 10
    config.algorithm.local_epochs = 1
    config.algorithm.client.learning_rate = 0.05

    config.data.name = "shapes"
    config.data.num_clients = 100
    config.data.num_classes = 4
    config.data.image_size = 28
    config.data.num_train_examples = 10_000
    config.data.num_test_examples = 2_000
    config.data.partition.name = "dirichlet"
    config.data.partition.alpha = float(args.get("alpha", 1.0))

    if "runlocal" in args:
        config.num_rounds = 3
        config.eval_every_rounds = 3
        config.checkpoint.every_rounds = 3
        config.data.num_clients = 20
        config.data.num_train_examples = 1_000
        config.data.num_test_examples = 200
        config.algorithm.clients_per_round = 4
    return config
