"""FedAvg on CIFAR-10 with a model of the zoo (FedCV's classification benchmark setting).

    python launch/train.py --config=configs/cifar10_models.py:model=mobilenet_v2 --workdir=DIR

100 clients split by Dirichlet(alpha=0.5) (Hsu et al. 2019), 10 a round, GroupNorm models at
32x32 (ViT with 4x4 patches). Args: `model=<name>` (default mobilenet_v2), `alpha=<float>`,
`runlocal`: 2 rounds of 2 clients with the model shrunk (`TINY`) so it runs on a laptop CPU.
Transfer (fedjax_cv.config_base.transfer): `mode=finetune|frozen,weights=<path>` starts from
local pretrained weights, e.g. ImageNet weights converted to .npz, the classifier re-initialised
for 10 classes; `head_lr=<float>` scales the head's learning rate.
"""

from fedjax_cv.config_base import (
    TRANSFER_ARGS,
    dirichlet_classification,
    join_arg,
    parse_arg,
    transfer,
)

BASE_ARGS = ("runlocal", "alpha")  # those of config_base.dirichlet_classification

# Reduced widths and depths of each family for `runlocal`: the same blocks, far fewer FLOPs.
TINY = {
    "mobilenet": {"width_multiplier": 0.25},
    "efficientnet": {"width_coefficient": 0.25, "depth_coefficient": 0.1},
    "resnet": {"width": 8},
    "vit": {"hidden_size": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64},
}
VIT_CIFAR = {"image_size": 32, "patch_size": 4}


def get_config(arg=None):
    args = parse_arg(arg, BASE_ARGS + ("model",) + TRANSFER_ARGS)
    name = args.get("model", "mobilenet_v2")
    config = dirichlet_classification("cifar10", name, join_arg(args, BASE_ARGS), num_rounds=1000)
    config.data.augmentation = "cifar"
    config.algorithm.client.momentum = 0.0
    config.algorithm.client.learning_rate = 0.05
    kwargs = dict(VIT_CIFAR) if name.startswith("vit") else {}
    if "runlocal" in args:
        config.num_rounds = 2
        config.eval_every_rounds = 2
        config.checkpoint.every_rounds = 2
        config.algorithm.clients_per_round = 2
        kwargs.update(next(v for k, v in TINY.items() if name.startswith(k)))
    config.model.kwargs.update(kwargs)
    return transfer(config, args)
