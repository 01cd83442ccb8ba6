"""Transfer on the embedded shapes data: a model trained on 4 shape classes learns 6.

    python launch/train.py --config=configs/shapes_fedavg.py --workdir=/tmp/shapes_fedavg
    python launch/train.py \
        --config=configs/shapes_finetune.py:mode=frozen,weights=/tmp/shapes_fedavg \
        --workdir=/tmp/shapes_frozen

Args: `mode=scratch|finetune|frozen` (FedCV's training modes), `weights=<path>` (a workdir, an
orbax checkpoint, .npz or .msgpack; needed by finetune and frozen), `head_lr=<float>` (the
head's learning-rate multiplier), `runlocal`. The new task has two more classes, so the
head (the last dense layer) is re-initialised, as the workdir's weights_report.txt lists;
`frozen` trains it alone. Everything else is configs/shapes_fedavg.py, with another seed for
new data.
"""

import pathlib

from fedjax_cv.config_base import TRANSFER_ARGS, join_arg, load_config, parse_arg, transfer

BASE_ARGS = ("runlocal", "alpha")  # those of configs/shapes_fedavg.py


def get_config(arg=None):
    args = parse_arg(arg, BASE_ARGS + TRANSFER_ARGS)
    config = load_config(
        pathlib.Path(__file__).with_name("shapes_fedavg.py"), join_arg(args, BASE_ARGS)
    )
    config.seed = 1
    config.num_rounds = 20 if "runlocal" not in args else config.num_rounds
    config.data.num_classes = 6
    return transfer(config, args)
