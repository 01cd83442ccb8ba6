"""FedAvg semantic segmentation on PASCAL VOC 2012 + SBD (trainaug): FedCV's setting (He et al.
2021, §6.2 / Table 4), for users who have the full dataset.

    python launch/train.py \
        --config=configs/voc_segmentation.py:model=deeplabv3plus_resnet101,mode=ft,weights=W \
        --config.data.root=/data/pascal_voc --workdir=/tmp/voc_seg

`data.root` is the VOC2012 folder (with ImageSets/Segmentation, JPEGImages,
SegmentationClassAug and the trainaug list), or a folder holding VOCdevkit/VOC2012; `W` is a
local classification checkpoint of the backbone (.npz, .msgpack, orbax checkpoint or training
workdir, e.g. ImageNet weights converted to .npz), placed under the model's `backbone`.

Args:
- `model=<name>`: deeplabv3plus_resnet101 (default), deeplabv3plus_resnet50,
  deeplabv3plus_mobilenet_v2, unet_resnet101, unet_resnet50, unet_mobilenet_v2;
- `mode=ft|fz|sfl`: FedCV's training modes. ft fine-tunes everything from `weights=<path>`;
  fz trains only the head (everything but the backbone) on the frozen pretrained backbone
  (`weights=<path>` too); sfl (the default) trains from scratch. They are
  `config_base.transfer`'s finetune, frozen and scratch;
- `alpha=<float>`: multi-label LDA alpha over the classes present in each mask, > 0 (FedCV:
  0.1, 0.5 (default) or 100);
- `clients=4|8`: clients, all of them in every round (default 4);
- `head_lr=<float>`: the decoder's learning-rate multiplier, default 10;
- `lr_schedule=constant|poly|linear`: the learning rate over rounds (FedCV §6.2 compares the
  three and found decay no help to FedAvg: constant is the default; poly has power 0.9);
- `runlocal`: 2 rounds at 64x64 with the backbone shrunk (MobileNetV2 width 0.25, ResNet
  width 8), a smoke test; its `weights=` must then come from the same shrunk classifier.

Settings. The 10,582 trainaug images (`data.train_split="trainaug"`) are split over the
clients by `lda_multilabel`; the 1,449 val images are the test split. Training images go through
DeepLab's geometry (the "segmentation" preset: scale by U(0.5, 2), crop or pad to 513x513 with
the ignore label, flip); evaluation resizes to 513x513. Every round all clients run 2 local
epochs of SGD with momentum 0.9 and weight decay 5e-4 in batches of 10, learning rate 0.001 for
the backbone and 10x for the head (ASPP or U-Net decoder, and classifier: `model.head_lr=10`),
for 200 rounds.

Sources. The paper gives batch sizes of 4 to 16; its Table 4 could not be read when this file
was written, so the rest follows FedCV's released code (github.com/FedML-AI/FedCV):
`experiments/distributed/segmentation/main_fedseg.py` (defaults: lr 0.001, momentum 0.9, weight
decay 5e-4, batch 10, output stride 16, LDA alpha 0.5), its `run.sh` (4 clients, all a round,
2 local epochs, lr 0.001; 200 rounds as its log name says, though the command passes 500) and
`training/segmentation_trainer.py` (the head at 10x the learning rate; with a frozen backbone
only the head trains, at 10x). FedCV uses BatchNorm; the models here use GroupNorm, the
project's default (`--config.model.norm=batch` switches). At 513x513 these models are meant
for an accelerator; on a CPU use `runlocal`.
"""

import math

import ml_collections

from fedjax_cv.config_base import base_config, parse_arg, set_rounds, transfer

KNOWN_ARGS = (
    "runlocal",
    "model",
    "mode",
    "weights",
    "alpha",
    "clients",
    "head_lr",
    "lr_schedule",
)
SCHEDULES = ("constant", "poly", "linear")
MODELS = (
    "deeplabv3plus_resnet101",
    "deeplabv3plus_resnet50",
    "deeplabv3plus_mobilenet_v2",
    "unet_resnet101",
    "unet_resnet50",
    "unet_mobilenet_v2",
)
# FedCV's mode names -> config_base.transfer's.
MODES = {"ft": "finetune", "fz": "frozen", "sfl": "scratch"}
CLIENTS = (4, 8)
# The backbone shrunk for `runlocal`: the same blocks, far fewer FLOPs.
TINY = {"mobilenet_v2": {"width_multiplier": 0.25}, "resnet": {"width": 8}}


def _bad(arg: str, value: str, allowed: str) -> ValueError:
    return ValueError(f"{arg}={value!r} is not allowed; must be {allowed}")


def _positive_float(value: str, arg: str, allowed: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _bad(arg, value, allowed) from None
    if not math.isfinite(number) or number <= 0:
        raise _bad(arg, value, allowed)
    return number


def get_config(arg=None):
    args = parse_arg(arg, KNOWN_ARGS)
    model = args.get("model", "deeplabv3plus_resnet101")
    if model not in MODELS:
        raise _bad("model", model, f"one of {', '.join(MODELS)}")
    mode = args.get("mode", "sfl")
    if mode not in MODES:
        raise _bad("mode", mode, f"one of {', '.join(MODES)} (fine-tune, frozen, scratch)")
    weights = args.get("weights", "")
    if mode != "sfl" and not weights:
        raise ValueError(f"mode={mode} needs weights=<path to the backbone's classifier weights>")
    if mode == "sfl" and weights:
        raise ValueError("weights=... is given with mode=sfl (scratch); use mode=ft or fz")
    clients = args.get("clients", "4")
    if clients not in {str(c) for c in CLIENTS}:
        raise _bad("clients", clients, " or ".join(map(str, CLIENTS)))
    alpha = _positive_float(
        args.get("alpha", "0.5"), "alpha", "a number > 0 (FedCV: 0.1, 0.5, 100)"
    )
    head_lr = _positive_float(args.get("head_lr", "10"), "head_lr", "a number > 0")
    schedule = args.get("lr_schedule", "constant")
    if schedule not in SCHEDULES:
        raise _bad("lr_schedule", schedule, f"one of {', '.join(SCHEDULES)}")

    config = base_config()
    config.seed = 0
    set_rounds(config, 200, 10)

    config.model.name = model

    num_clients = int(clients)
    config.algorithm.name = "fedavg"
    config.algorithm.clients_per_round = num_clients
    config.algorithm.batch_size = 10
    config.algorithm.local_epochs = 2
    config.algorithm.client.learning_rate = 0.001
    config.algorithm.client.momentum = 0.9
    config.algorithm.client.weight_decay = 5e-4
    config.algorithm.client.lr_schedule = schedule

    config.data.name = "voc_segmentation"
    config.data.train_split = "trainaug"
    config.data.num_clients = num_clients
    del config.data.augmentation  # a preset name in the base config; here the preset with a size
    config.data.augmentation = ml_collections.ConfigDict(
        {"name": "segmentation", "image_size": (513, 513)}
    )
    config.data.partition.name = "lda_multilabel"
    config.data.partition.alpha = alpha
    config.data.partition.min_client_size = 10
    config.eval.batch_size = 8

    if "runlocal" in args:
        set_rounds(config, 2, 2)
        config.algorithm.local_epochs = 1
        config.algorithm.batch_size = 2
        config.eval.batch_size = 2
        config.data.augmentation.image_size = (64, 64)
        config.model.kwargs.update(next(v for k, v in TINY.items() if k in model))

    transfer_args = {"mode": MODES[mode], "weights": weights, "head_lr": str(head_lr)}
    return transfer(config, transfer_args)
