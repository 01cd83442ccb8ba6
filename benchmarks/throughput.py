"""Client-examples/s of a federated round, beside centralized training of the same model.

    python benchmarks/throughput.py --out=/tmp/throughput.json [--workloads=T,C,R,S,D]
        [--cohorts=10]

Workloads (the table `WORKLOADS`; each names its task, model and how to build random examples):
T logistic and C cnn_emnist on 100 clients x 50 examples of 28x28x1 with 62 classes; R cnn_hsu
on 32x32x3 with 10 classes; S segmentation with a U-Net of base width 16 on 64x64x3 images and
uint8 masks of 5 classes with about 10% of pixels 255 (ignored), cohort 4, 20 examples a client;
D detection with YOLOv5n (GroupNorm) on 64x64x3 images with 1-8 random boxes of 4 classes,
cohort 4, 20 examples a client. Batch 10 and one local epoch throughout. Every federated figure
is printed beside centralized SGD of the same model at batch 10
(`centralized_b10_examples_per_s`: for every workload, S included, the federated batch size) and
at batch = cohort x 10, measured in the same run, with the ratios: timings on a shared machine
are noisy, ratios much less so: the runners take turns in timing windows and each keeps its
best. Dense workloads (S) also report `client_pixels_per_s`, image pixels trained on per second
(ignored pixels included: the model computes them all), so the ratio of pixels/s equals that of
examples/s. With several devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2,
one a core) it also times the vmap and sequential rounds sharded over all of them
(`strategy@devices`). Inputs of both sides are prebuilt on the device (the input pipeline has
its own benchmark, benchmarks/data_pipeline.py); compilation happens in a warm-up call outside
the windows.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
import optax

from fedjax_cv import algorithms
from fedjax_cv.engine import ClientInfo, Cohort, client_mesh, resolve_strategy
from fedjax_cv.models import get_model
from fedjax_cv.tasks import get_task, make_centralized_step

BATCH = 10
IGNORE_LABEL = 255  # the segmentation task's label of pixels without a loss

# (rng, leading shape) -> examples whose leaves are [*leading shape, ...].
ExampleMaker = Callable[[np.random.Generator, tuple[int, ...]], dict]


def labelled_images(shape: tuple[int, ...], num_classes: int) -> ExampleMaker:
    """Random images with one class label each."""

    def make(rng, leading):
        return {
            "image": rng.normal(size=leading + shape).astype(np.float32),
            "label": rng.integers(0, num_classes, leading).astype(np.int32),
        }

    return make


def masked_images(
    shape: tuple[int, ...], num_classes: int, ignored_fraction: float = 0.1
) -> ExampleMaker:
    """Random images with a uint8 class mask each, `ignored_fraction` of pixels ignored."""

    def make(rng, leading):
        mask = rng.integers(0, num_classes, leading + shape[:2]).astype(np.uint8)
        mask[rng.random(mask.shape) < ignored_fraction] = IGNORE_LABEL
        return {"image": rng.normal(size=leading + shape).astype(np.float32), "mask": mask}

    return make


def boxed_images(shape: tuple[int, ...], num_classes: int, max_boxes: int = 8) -> ExampleMaker:
    """Random images with 1 to `max_boxes` random boxes each (normalised yxyx, padded)."""

    def make(rng, leading):
        corner = rng.uniform(0.0, 0.7, leading + (max_boxes, 2))
        size = rng.uniform(0.1, 0.3, leading + (max_boxes, 2))
        count = rng.integers(1, max_boxes + 1, leading)
        return {
            "image": rng.normal(size=leading + shape).astype(np.float32),
            "boxes": np.concatenate([corner, corner + size], -1).astype(np.float32),
            "box_labels": rng.integers(0, num_classes, leading + (max_boxes,)).astype(np.int32),
            "box_mask": np.arange(max_boxes) < count[..., None],
        }

    return make


class Workload(NamedTuple):
    """A model of `model(num_classes, **model_kwargs)` trained on the task `task`."""

    model: str
    task: str
    num_classes: int
    examples: ExampleMaker
    cohorts: tuple[int, ...]
    model_kwargs: tuple[tuple[str, object], ...] = ()
    examples_per_client: int = 50
    central_steps: int = 8  # SGD steps in one call of a centralized runner
    pixels_per_example: int = 0  # dense tasks: image pixels an example trains on


WORKLOADS = {
    "T": Workload("logistic", "classification", 62, labelled_images((28, 28, 1), 62), (10, 50)),
    "C": Workload("cnn_emnist", "classification", 62, labelled_images((28, 28, 1), 62), (10,)),
    "R": Workload("cnn_hsu", "classification", 10, labelled_images((32, 32, 3), 10), (10,)),
    "S": Workload(
        "unet",
        "segmentation",
        5,
        masked_images((64, 64, 3), 5),
        (4,),
        model_kwargs=(("base_width", 16),),
        examples_per_client=20,
        central_steps=2,
        pixels_per_example=64 * 64,
    ),
    "D": Workload(
        "yolov5n",
        "detection",
        4,
        boxed_images((64, 64, 3), 4),
        (4,),
        examples_per_client=20,
        central_steps=2,
    ),
}


def interleaved_rates(runners: dict, windows: int, seconds: float) -> dict[str, float]:
    """Examples/s of each `runners[name] = (run, examples_per_call)`.

    After one warm-up call each, the runners take turns in `windows` timing windows of at
    least `seconds` and one call; each keeps its best window. Taking turns exposes every
    runner to the same background load, so the ratios hold even on a busy machine.
    """
    for run, _ in runners.values():
        jax.block_until_ready(run())
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(windows):
        for name, (run, _) in runners.items():
            calls, started = 0, time.perf_counter()
            while calls < 1 or time.perf_counter() - started < seconds:
                jax.block_until_ready(run())
                calls += 1
            best[name] = min(best[name], (time.perf_counter() - started) / calls)
    return {name: runners[name][1] / best[name] for name in runners}


def make_cohort(rng, workload: Workload, cohort: int) -> Cohort:
    steps = workload.examples_per_client // BATCH
    info = ClientInfo(
        client_id=np.arange(cohort, dtype=np.int32),
        occurrence=np.zeros(cohort, np.int32),
        num_examples=np.full(cohort, workload.examples_per_client, np.float32),
        label_counts=np.ones((cohort, workload.num_classes), np.float32),
    )
    return Cohort(
        workload.examples(rng, (cohort, steps, BATCH)),
        np.ones((cohort, steps, BATCH), bool),
        info,
    )


def centralized(workload: Workload, model, params, batch: int, rng):
    """A runner of `central_steps` plain SGD steps dispatched from Python on prebuilt batches."""
    optimizer = optax.sgd(0.01)
    step = make_centralized_step(get_task(workload.task), model, optimizer)
    batches = [
        jax.device_put(workload.examples(rng, (batch,))) for _ in range(workload.central_steps)
    ]
    state = [params, optimizer.init(params)]
    key = jax.random.key(0)

    def run():
        for b in batches:
            state[0], state[1] = step(state[0], state[1], b, key)
        return state[0]

    return run, workload.central_steps * batch


def federated(workload: Workload, model, params, cohort, strategy, mesh=None):
    """A runner of one FedAvg round on `cohort` with `strategy` (sharded over `mesh`)."""
    task = get_task(workload.task)
    algorithm = algorithms.fedavg(
        task.make_loss_fn(model),
        0.01,
        strategy=strategy,
        mesh=mesh,
        metric_names=task.metric_names,
    )
    state = [algorithm.init(params)]
    key = jax.random.key(1)

    def run():
        state[0], metrics = algorithm.apply(state[0], cohort, key)
        return metrics["loss"]

    return run, int(cohort.mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the measurements")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="e.g. S, or T,C")
    parser.add_argument("--strategies", default="auto,vmap,sequential,host")
    parser.add_argument("--windows", type=int, default=3, help="timing windows per runner")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum length of a window")
    parser.add_argument("--cohorts", default="", help="only these cohort sizes, e.g. 10")
    args = parser.parse_args()
    names = args.workloads.split(",")
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        parser.error(f"--workloads={args.workloads}: unknown {unknown}; known: {list(WORKLOADS)}")
    only = {int(c) for c in args.cohorts.split(",") if c}
    rng = np.random.default_rng(0)
    mesh = client_mesh()  # several devices: also time the sharded round
    rows = []
    for name in names:
        workload = WORKLOADS[name]
        model = get_model(workload.model, workload.num_classes, **dict(workload.model_kwargs))
        sample = workload.examples(rng, (1,))["image"]
        params = model.init(jax.random.key(0), sample, train=False)["params"]
        for cohort_size in (c for c in workload.cohorts if not only or c in only):
            cohort = jax.device_put(make_cohort(rng, workload, cohort_size))
            runners = {
                "b10": centralized(workload, model, params, BATCH, rng),
                "big": centralized(workload, model, params, BATCH * cohort_size, rng),
            }
            for strategy in args.strategies.split(","):
                runners[strategy] = federated(workload, model, params, cohort, strategy)
                if mesh is not None and strategy in ("vmap", "sequential"):
                    runners[f"{strategy}@{len(mesh.devices)}"] = federated(
                        workload, model, params, cohort, strategy, mesh
                    )
            strategies = [s for s in runners if s not in ("b10", "big")]
            rates = interleaved_rates(runners, args.windows, args.seconds)
            for strategy in strategies:
                label = strategy
                if strategy == "auto":
                    label = f"auto->{resolve_strategy('auto', params)}"
                rows.append(
                    {
                        "workload": f"{name}:{workload.model}",
                        "strategy": label,
                        "cohort": cohort_size,
                        "client_examples_per_s": rates[strategy],
                        "centralized_b10_examples_per_s": rates["b10"],
                        "centralized_big_examples_per_s": rates["big"],
                    }
                )
                if workload.pixels_per_example:
                    rows[-1]["client_pixels_per_s"] = rates[strategy] * workload.pixels_per_example
                print(_format_row(rows[-1]), flush=True)
    print()
    print(_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


_HEADER = (
    "workload",
    "strategy",
    "cohort",
    "fed ex/s",
    "fed px/s",
    "central b10",
    "central big",
    "fed/b10",
    "fed/big",
)


def _format_row(row: dict) -> str:
    fed, b10, big = (
        row["client_examples_per_s"],
        row["centralized_b10_examples_per_s"],
        row["centralized_big_examples_per_s"],
    )
    pixels = row.get("client_pixels_per_s")
    cells = (
        row["workload"],
        row["strategy"],
        str(row["cohort"]),
        f"{fed:,.1f}" if fed < 100 else f"{fed:,.0f}",
        "-" if pixels is None else f"{pixels:,.0f}",
        f"{b10:,.1f}" if b10 < 100 else f"{b10:,.0f}",
        f"{big:,.1f}" if big < 100 else f"{big:,.0f}",
        f"{fed / b10:.2f}",
        f"{fed / big:.2f}",
    )
    return " | ".join(cells)


def _table(rows: list[dict]) -> str:
    lines = [" | ".join(_HEADER), " | ".join("---" for _ in _HEADER)]
    lines += [_format_row(row) for row in rows]
    return "\n".join(f"| {line} |" for line in lines)


if __name__ == "__main__":
    main()
