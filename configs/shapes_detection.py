"""FedAvg YOLOv5n detection on the embedded `shapes` boxes: the detection main job.

    python launch/train.py --config=configs/shapes_detection.py --workdir=/tmp/shapes_det

Variants: `:runlocal` (a few rounds, for a smoke test), `:alpha=<float>` (multi-label LDA alpha
over each image's box classes), `:model=<name>` (another detector, e.g. `yolov5s`).

20 clients hold 1,600 64x64 images with 1 to 3 non-touching shapes of 4 classes each, split by
multi-label LDA over the images' box classes, each client in its own style; 4 clients a round
train YOLOv5n (GroupNorm) for 2 local epochs of momentum SGD (0.937, YOLOv5's) with a warm-up
over the first rounds; inputs flipped at random.
"""

import ml_collections

from fedjax_cv.config_base import base_config, parse_arg, set_rounds


def get_config(arg=None):
    args = parse_arg(arg, ("runlocal", "alpha", "model"))
    config = base_config()
    config.seed = 0
    set_rounds(config, 100, 10)

    config.model.name = args.get("model", "yolov5n")

    config.algorithm.name = "fedavg"
    config.algorithm.clients_per_round = 4
    config.algorithm.batch_size = 16
    config.algorithm.local_epochs = 2
    config.algorithm.client.learning_rate = 0.16
    config.algorithm.client.momentum = 0.937
    config.algorithm.client.lr_warmup_rounds = 3

    config.data.name = "shapes_detection"
    config.data.num_clients = 20
    config.data.num_classes = 4
    config.data.max_shapes = 3
    config.data.image_size = 64
    config.data.num_train_examples = 1_600
    config.data.num_test_examples = 200
    config.data.partition.name = "lda_multilabel"
    config.data.partition.alpha = float(args.get("alpha", 1.0))
    del config.data.augmentation  # a preset name in the base config; here a detection recipe
    config.data.augmentation = ml_collections.ConfigDict({"name": "flip", "max_boxes": 4})
    config.eval.batch_size = 50

    if "runlocal" in args:
        set_rounds(config, 2, 2)
        config.data.num_clients = 6
        config.data.num_train_examples = 96
        config.data.num_test_examples = 16
        config.algorithm.clients_per_round = 2
        config.algorithm.local_epochs = 1
    return config
