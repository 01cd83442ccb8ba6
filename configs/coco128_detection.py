"""Federated object detection on coco128 (data side: partition, inspection, input pipeline).

    python -m fedjax_cv.data.inspect --config=configs/coco128_detection.py --out=/tmp/coco128

coco128's train2017 images (128 photos, 80 classes, 929 boxes) over 8 clients by the greedy
partition of FedCV (He et al. 2021, App. 7.1.2); val2017 is the test split. Inputs: the
"detection" augmentation, letterboxed to 320x320. Args: `lda` (multi-label LDA instead),
`alpha=<float>`, `clients=<int>`, `size=<int>` (a multiple of 32).
"""

from fedjax_cv.config_base import detection_partition


def get_config(arg=None):
    return detection_partition("coco128", num_clients=8, clients_per_round=4, arg=arg)
