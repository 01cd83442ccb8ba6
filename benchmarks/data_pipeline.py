"""Cohort-assembly images/s of the grain pipeline, beside training examples/s of the same run.

    python benchmarks/data_pipeline.py [--data_root=DIR] [--out=/tmp/data_pipeline.json]

Workloads, each with grain worker threads 0 and 2:
- cifar10: real CIFAR-10 32x32, 100 clients of 500 by the Dirichlet partition of Hsu et al.,
  cohort 10 clients x 500 examples, batch 20, augmentation "cifar" (pad 4, crop 32, flip).
- coco128: the 128 real photos of coco128 (640 px on the long side) with their YOLO boxes,
  8 clients by the FedCV detection partition, the whole set as one cohort, batch 8; resized
  to 320x320 in the pipeline (the YOLO source decodes at full size), scale jitter 0.75-1.25,
  flip, boxes padded to 64.
Training: `cnn_hsu` on CIFAR-10 cohort batches, one jit-compiled SGD step at batch 20
dispatched from Python. `ratio` = pipeline images/s over training examples/s (the mean of a
measurement before and one after the pipelines): above 1, input does not bound a round. On a
shared machine wall times swing with the load, so `CPU ratio` compares CPU time per example
(process time, all threads) instead. coco128 rows are compared with the same CIFAR CNN; a
detector at 320x320 costs far more per image, so they understate its margin.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import optax

from fedjax_cv.algorithms import sampling
from fedjax_cv.config_base import base_config, default_data_root
from fedjax_cv.data import sources
from fedjax_cv.data.augment import Augmentation
from fedjax_cv.data.federated import FederatedDataset
from fedjax_cv.data.partition import make_partition
from fedjax_cv.data.pipeline import GrainCohortBuilder
from fedjax_cv.data.registry import image_folder_dataset
from fedjax_cv.models import get_model
from fedjax_cv.tasks import get_task, make_centralized_step

TRAIN_BATCH = 20
COCO_AUGMENTATION = Augmentation(
    "coco320", image_size=(320, 320), channels=3, scale_range=(0.75, 1.25), flip=True, max_boxes=64
)


@dataclasses.dataclass(frozen=True)
class Measurement:
    workload: str
    num_workers: int
    images: int
    wall_s: float
    cpu_s: float  # process CPU time, all threads

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def cpu_ms_per_image(self) -> float:
        return 1e3 * self.cpu_s / self.images


def cifar10_builder(data_root: str, num_workers: int) -> GrainCohortBuilder:
    config = base_config().data
    config.name, config.root, config.num_clients = "cifar10", data_root, 100
    config.partition.name, config.partition.alpha = "dirichlet", 0.5
    return GrainCohortBuilder(
        dataset=image_folder_dataset(config, seed=0),
        client_sampler=sampling.uniform_clients(),
        example_sampler=sampling.local_epochs(1),
        clients_per_round=10,
        batch_size=TRAIN_BATCH,
        seed=0,
        augmentation="cifar",
        num_workers=num_workers,
    )


def coco128_builder(data_root: str, num_workers: int) -> GrainCohortBuilder:
    source = sources.yolo_detection(pathlib.Path(data_root) / "coco128", "train2017")
    num_clients = 8
    dataset = FederatedDataset(
        name="coco128",
        train={"image": source.images, "boxes": source.boxes, "box_labels": source.box_labels},
        test={},
        clients=tuple(make_partition("fedcv_detection", source.box_labels, num_clients, 0)),
        num_classes=source.num_classes,
        class_names=source.class_names,
        label_key="box_labels",
    )
    return GrainCohortBuilder(
        dataset=dataset,
        client_sampler=sampling.uniform_clients(),
        example_sampler=sampling.local_epochs(1),
        clients_per_round=num_clients,
        batch_size=8,
        seed=0,
        augmentation=COCO_AUGMENTATION,
        num_workers=num_workers,
    )


def time_pipeline(name: str, builder: GrainCohortBuilder, min_seconds: float) -> Measurement:
    builder(0)  # warm-up: page cache, imports
    images, rounds = 0, 0
    wall, cpu = time.perf_counter(), time.process_time()
    while rounds < 2 or time.perf_counter() - wall < min_seconds:
        rounds += 1
        images += int(builder(rounds).mask.sum())
    return Measurement(
        name, builder.num_workers, images, time.perf_counter() - wall, time.process_time() - cpu
    )


def training_examples_per_s(builder: GrainCohortBuilder, min_seconds: float) -> Measurement:
    """Plain SGD steps of cnn_hsu at batch 20 on real cohort batches, dispatched from Python."""
    cohort = builder(0)
    images = cohort.examples["image"].reshape((-1, TRAIN_BATCH) + (32, 32, 3))
    labels = cohort.examples["label"].reshape(-1, TRAIN_BATCH)
    batches = [
        {"image": jnp.asarray(images[i]), "label": jnp.asarray(labels[i])} for i in range(16)
    ]
    model = get_model("cnn_hsu", 10)
    params = model.init(jax.random.key(0), batches[0]["image"], train=False)["params"]
    optimizer = optax.sgd(0.01)
    step = make_centralized_step(get_task("classification"), model, optimizer)

    key = jax.random.key(1)
    opt_state = optimizer.init(params)
    params, opt_state = jax.block_until_ready(step(params, opt_state, batches[0], key))
    steps, wall, cpu = 0, time.perf_counter(), time.process_time()
    while steps < 32 or time.perf_counter() - wall < min_seconds:
        params, opt_state = step(params, opt_state, batches[steps % len(batches)], key)
        steps += 1
    jax.block_until_ready(params)
    return Measurement(
        "train cnn_hsu b20",
        0,
        steps * TRAIN_BATCH,
        time.perf_counter() - wall,
        time.process_time() - cpu,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data_root",
        default=default_data_root(),
        help="folder with cifar10-images.tar.gz and coco128/ (default: $FEDJAX_CV_DATA, else "
        "<repo>/../shared/data)",
    )
    parser.add_argument("--out", help="JSON file for the measurements")
    parser.add_argument("--workers", default="0,2", help="grain worker threads to compare")
    parser.add_argument("--min_seconds", type=float, default=3.0)
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    train = training_examples_per_s(cifar10_builder(args.data_root, 0), args.min_seconds)
    results = [
        time_pipeline(name, make(args.data_root, w), args.min_seconds)
        for name, make in (("cifar10", cifar10_builder), ("coco128", coco128_builder))
        for w in workers
    ]
    # Measured again after the pipelines, so that a change in the machine's load shows.
    train_after = training_examples_per_s(cifar10_builder(args.data_root, 0), args.min_seconds)
    train_rate = (train.images_per_s + train_after.images_per_s) / 2
    train_cpu_ms = (train.cpu_ms_per_image + train_after.cpu_ms_per_image) / 2

    print(
        f"\ntraining {train.workload}: {train.images_per_s:.0f} then "
        f"{train_after.images_per_s:.0f} examples/s, {train_cpu_ms:.2f} CPU-ms each"
    )
    header = (
        f"{'workload':<10} {'workers':>7} {'images/s':>9} {'CPU-ms/img':>10} {'ratio':>7} "
        f"{'CPU ratio':>9}"
    )
    print(header + "\n" + "-" * len(header))
    rows = []
    for m in results:
        ratio = m.images_per_s / train_rate
        cpu_ratio = train_cpu_ms / m.cpu_ms_per_image
        print(
            f"{m.workload:<10} {m.num_workers:>7} {m.images_per_s:>9.0f} "
            f"{m.cpu_ms_per_image:>10.3f} {ratio:>7.1f} {cpu_ratio:>9.1f}"
        )
        rows.append(
            {
                "workload": m.workload,
                "num_workers": m.num_workers,
                "images_per_s": m.images_per_s,
                "cpu_ms_per_image": m.cpu_ms_per_image,
                "training_examples_per_s": train_rate,
                "training_cpu_ms_per_example": train_cpu_ms,
                "ratio": ratio,
                "cpu_ratio": cpu_ratio,
            }
        )
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
