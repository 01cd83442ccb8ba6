"""Federated object detection on coco128 (data side: partition and inspection).

    python -m fedjax_cv.data.inspect --config=configs/coco128_detection.py --out=/tmp/coco128

8 clients, split by the classes of their images' boxes with the greedy partition of FedCV
(He et al. 2021, App. 7.1.2); arg `lda,alpha=<float>` uses multi-label LDA instead. Training
comes with the detection task (YOLO head, mAP@0.5).
"""

from fedjax_cv.config_base import detection_partition


def get_config(arg=None):
    return detection_partition("coco128", num_clients=8, clients_per_round=4, arg=arg)
