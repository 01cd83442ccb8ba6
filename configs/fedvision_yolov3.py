"""Federated YOLOv3 on darknet-format (YOLO txt) data at a path: FedVision's setting (Liu et al.
2020, "FedVision: An Online Visual Object Detection Platform Powered by Federated Learning").

    python launch/train.py --config=configs/fedvision_yolov3.py \
        --config.data.root=/data/street --workdir=/tmp/fedvision

    # from a pretrained YOLOv3 (a .npz in this project's names, see docs/yolo_weights.md):
    python launch/train.py --config=configs/fedvision_yolov3.py:mode=ft,weights=W \
        --config.model.norm=batch --config.data.root=/data/street --workdir=/tmp/fedvision_ft

`data.root` holds `images/train/*.jpg` with `labels/train/*.txt` (one box a line,
`class x_center y_center width height` normalised to [0, 1]: darknet's format, as FedVision's
annotation tool writes it), the same under `val` for the test split, and `data.yaml` whose
`names:` entry lists the class names (Ultralytics' and Roboflow's exports have one; for
darknet's `obj.names`, write its lines as `names: [a, b, ...]`). `data.images_dir`,
`data.labels_dir`, `data.train_split`, `data.test_split` and `data.names_file` change the layout.

Args:
- `clients=<int>` (default 5): clients, all of them in every round (the Street data set of the
  same group comes as 5 or 20 camera groups);
- `lda` (the default) or `fedcv`: multi-label LDA over each image's rarest class with
  `alpha=<float>` (> 0, default 0.5), or FedCV's greedy detection partition. Neither is a
  camera's own data: a data set that comes split by owner is not read as such yet;
- `size=<int>`: the letterbox size, a multiple of 32 (default 416);
- `mode=ft|fz|sfl` with `weights=<path>`: fine-tune everything, freeze the Darknet-53 backbone
  (`model.freeze=backbone`: neck and Detect train), or train from scratch (the default);
- `runlocal`: a smoke test, 2 rounds at 64x64 of YOLOv3 shrunk to 8 channels a layer (width
  1/128) and depth 0.33, 2 clients a round; its `weights=` must come from that shrunk model.

Settings. YOLOv3 (`model.name=yolov3`: Darknet-53 and the three-scale head, Ultralytics'
yolov3.yaml; GroupNorm unless `--config.model.norm=batch`) at 416x416, trained by FedAvg: every
round all clients run 1 local epoch of SGD with momentum 0.937 in batches of 8 at 0.08 (YOLOv5's
lr0 0.01 per image, `config_base.detection_training`), warmed up over the first 3 rounds, weight
decay 5e-4 / 64 (YOLOv5's 5e-4 per 64 images, see configs/coco_detection.py), for 100 rounds,
evaluated (mAP@0.5 and @0.5:0.95) every 5. Inputs: the "detection" preset (letterbox, mosaic,
scale, shift, HSV jitter, flip).

Sources. From the FedVision paper: the detector (FedYOLOv3: YOLOv3 with its Darknet-53
backbone), darknet-format annotations made by each data owner, and federated averaging of the
owners' locally trained models by a server. The paper's model compression (pruning the layers
that contribute least before upload) is not implemented. Its optimiser settings could not be
read when this file was written, so the rest are defaults: 416x416 is YOLOv3's usual input
(Redmon & Farhadi 2018) and the default of PyTorch-YOLOv3, which the Street benchmark of the
same group trains with Adam from an ImageNet Darknet-53 (Luo et al. 2019, "Real-World Image
Datasets for Federated Learning"); batch 8 is that of FedVision's released PaddleDetection
example (FederatedAI/FedVision, examples/paddle_detection: a YOLOv3 on MobileNetV1 with
momentum 0.9, L2 5e-4 and base lr 1e-4 for its own loss); SGD at YOLOv5's settings because
the YOLOv3 here trains with YOLOv5's loss (as Ultralytics' port does); 100 rounds of 1 local
epoch and 5 clients are this project's defaults for data sets of about a thousand images.
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

KNOWN_ARGS = ("runlocal", "clients", "mode", "weights", "lda", "fedcv", "alpha", "size")
IMAGE_SIZE = 416
BATCH_SIZE = 8
# YOLOv5's weight decay (5e-4 per nominal batch of 64 images) for a per-image mean loss.
WEIGHT_DECAY = 5e-4 / 64


def get_config(arg=None):
    args = parse_arg(arg, KNOWN_ARGS)
    clients = args.get("clients", "5")
    if not clients.isdigit() or int(clients) < 1:
        raise ValueError(f"clients={clients!r} is not allowed; must be a positive integer")
    transfer_args = fedcv_transfer(args)
    check_detection_args(args, IMAGE_SIZE, "a number > 0")

    num_clients = int(clients)
    config = detection_partition(
        "coco_detection",
        num_clients=num_clients,
        clients_per_round=num_clients,
        arg=arg,
        partition="lda_multilabel",
        image_size=IMAGE_SIZE,
        extra_args=("runlocal", "mode", "weights"),
    )
    detection_training(
        config,
        {"model": "yolov3"},
        num_rounds=100,
        eval_every=5,
        batch_size=BATCH_SIZE,
        local_epochs=1,
        warmup_rounds=3,
    )
    config.algorithm.client.weight_decay = WEIGHT_DECAY
    # Darknet-format data in the YOLO-txt layout, class names from data.yaml.
    yolo_txt_data(config, "train", "val", names_file="data.yaml")
    if "runlocal" in args:
        yolo_runlocal(config, num_clients)
    return transfer(config, transfer_args)
