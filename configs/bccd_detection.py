"""Federated object detection on bccd (data side: partition and inspection).

    python -m fedjax_cv.data.inspect --config=configs/bccd_detection.py --out=/tmp/bccd

Images are split over clients by the classes of their boxes with the greedy partition of FedCV
(He et al. 2021, App. 7.1.2); arg `lda,alpha=<float>` uses the multi-label LDA partition
instead. Training comes with the detection task (YOLO head, mAP@0.5).
"""

from fedjax_cv.config_base import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    config = base_config()
    config.data.name = "bccd"
    config.data.num_clients = 4
    config.algorithm.clients_per_round = 2
    config.data.partition.name = "lda_multilabel" if "lda" in args else "fedcv_detection"
    config.data.partition.alpha = float(args.get("alpha", 0.5))
    return config
