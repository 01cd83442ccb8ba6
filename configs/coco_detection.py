"""FedAvg YOLOv5 object detection on COCO 2017: FedCV's setting (He et al. 2021, §6.3), for users
who have the full dataset in Ultralytics' YOLO-txt layout.

    python launch/train.py --config=configs/coco_detection.py:model=yolov5s,clients=4 \
        --config.data.root=/data/coco --workdir=/tmp/coco_det

    # fine-tuning an Ultralytics checkpoint converted as docs/yolo_weights.md says:
    python launch/train.py \
        --config=configs/coco_detection.py:model=yolov5s,clients=4,mode=ft,weights=W \
        --config.model.norm=batch --config.data.root=/data/coco --workdir=/tmp/coco_det_ft

`data.root` holds `images/train2017/*.jpg`, `labels/train2017/*.txt` and the same for val2017
(what Ultralytics' `get_coco.sh` unpacks; `data.images_dir`, `data.labels_dir`,
`data.train_split`, `data.test_split` and `data.names_file` change the layout, the default class
names are COCO's 80). `W` is a local `.npz` of named arrays in this project's names (see
docs/yolo_weights.md for an Ultralytics checkpoint; Ultralytics' models use BatchNorm, hence
`--config.model.norm=batch`), or a fedjax_cv workdir / checkpoint of the same model.

Args:
- `model=yolov5s|yolov5m|yolov5l|yolov5x` (default yolov5s), FedCV's four sizes;
- `clients=4|8` (default 4): clients, all of them in every round;
- `fedcv` (the default) or `lda`: FedCV's greedy detection partition (App. 7.1.2: each client
  in turn takes every remaining image of the most frequent remaining class) or multi-label LDA
  over each image's rarest class, with `alpha=<float>` (> 0, default 0.5);
- `size=<int>`: the letterbox size, a multiple of 32 (default 640);
- `mode=ft|fz|sfl`: FedCV's training modes. ft fine-tunes everything from `weights=<path>`; fz
  freezes the backbone (`model.freeze=backbone`: the PAN neck and Detect train) on the weights
  at `weights=<path>`; sfl (the default) trains from scratch. A Detect head shaped for another
  number of classes is re-initialised;
- `runlocal`: a smoke test, 2 rounds at 64x64 of the chosen family shrunk to 8 channels a layer
  (width 1/128) and depth 0.33, 2 clients a round; its `weights=` must come from that shrunk
  model.

Settings. FedAvg over the train2017 images split by the partition; val2017 is the test split,
scored by COCO mAP@0.5 (and @0.5:0.95). Every round all clients train 1 local epoch of SGD with
momentum 0.937 in batches of 4 at 0.04 (YOLOv5's lr0 0.01 per image of a batch-summed loss,
`config_base.detection_training`), warmed up linearly over the first 3 rounds, weight decay
5e-4 / 64 (below), for 300 rounds, evaluated every 10. Inputs: the "detection" preset (letterbox
to 640x640, mosaic, scale, shift, HSV jitter, flip; evaluation: the letterbox alone).

Sources. FedCV's released detection code (github.com/FedML-AI/FedCV,
`experiments/distributed/detection`): its README's example command (on coco128: 4 clients, all 4
every round, 300 rounds, 1 local epoch, batch 4, lr 0.01, yolov5s from yolov5s.pt),
`main_fedavg_yolo.py`
(image size 640, hyperparameters from Ultralytics' `data/hyp.scratch.yaml`: lr0 0.01, momentum
0.937, weight decay 5e-4 scaled by batch x accumulation / 64 as YOLOv5's train.py does, warm-up
3 epochs; SGD with Nesterov momentum; the partition is its `--partition_method`). The paper's
§6.3 gives the models, COCO, 4 or 8 clients, the greedy partition and mAP@0.5; its numbers
could not be read when this file was written. Differences, all deliberate: the loss here is a
per-image mean, so the rate is 0.01 x batch; weight decay is added to the gradient of that mean
(optax.add_decayed_weights) and stepped at that rate, so 5e-4 / 64 shrinks the weights as much
per image as YOLOv5's 5e-4 per nominal batch of 64 images, and it applies to every parameter
(YOLOv5 spares BatchNorm and biases); plain (not Nesterov) momentum; a constant rate after the
warm-up (the FedCV app in FedML, FedML-AI/FedML python/app/fedcv/object_detection, builds its
optimizer and cosine scheduler anew every round, so with 1 local epoch the rate stays at lr0;
`--config.algorithm.client.lr_schedule=linear` decays it); GroupNorm by default (the project's
choice for non-IID clients; FedCV uses BatchNorm: `--config.model.norm=batch`). At 640x640 these
models are meant for an accelerator; on a CPU use `runlocal`.
"""

from fedjax_cv.config_base import (
    check_detection_args,
    detection_partition,
    detection_training,
    fedcv_transfer,
    parse_arg,
    transfer,
    yolo_runlocal,
    yolo_txt_data,
)

KNOWN_ARGS = ("runlocal", "model", "clients", "mode", "weights", "fedcv", "lda", "alpha", "size")
MODELS = ("yolov5s", "yolov5m", "yolov5l", "yolov5x")
CLIENTS = (4, 8)
IMAGE_SIZE = 640
BATCH_SIZE = 4
# YOLOv5's weight decay, 5e-4 for a nominal batch of 64 images of a batch-summed loss, as a decay
# added to the gradient of a per-image mean loss stepped at 0.01 x the batch size.
WEIGHT_DECAY = 5e-4 / 64


def _bad(arg: str, value: str, allowed: str) -> ValueError:
    return ValueError(f"{arg}={value!r} is not allowed; must be {allowed}")


def get_config(arg=None):
    args = parse_arg(arg, KNOWN_ARGS)
    model = args.get("model", "yolov5s")
    if model not in MODELS:
        raise _bad("model", model, f"one of {', '.join(MODELS)}")
    clients = args.get("clients", "4")
    if clients not in {str(c) for c in CLIENTS}:
        raise _bad("clients", clients, " or ".join(map(str, CLIENTS)))
    transfer_args = fedcv_transfer(args)
    check_detection_args(args, IMAGE_SIZE, "a number > 0 (FedCV: 0.1, 0.5, 100)")

    num_clients = int(clients)
    config = detection_partition(
        "coco_detection",
        num_clients=num_clients,
        clients_per_round=num_clients,
        arg=arg,
        partition="fedcv_detection",
        image_size=IMAGE_SIZE,
        extra_args=("runlocal", "model", "mode", "weights"),
    )
    detection_training(
        config,
        {**args, "model": model},
        num_rounds=300,
        eval_every=10,
        batch_size=BATCH_SIZE,
        local_epochs=1,
        warmup_rounds=3,
    )
    config.algorithm.client.weight_decay = WEIGHT_DECAY
    yolo_txt_data(config, "train2017", "val2017", names_file="")  # COCO in Ultralytics' layout
    if "runlocal" in args:
        yolo_runlocal(config, num_clients)
    return transfer(config, transfer_args)
