"""Client-examples/s of a federated round, beside centralized training of the same model.

    python benchmarks/throughput.py --out=/tmp/throughput.json [--workloads=T,C,R] [--cohorts=10]

Workloads (the core issue's): T logistic and C cnn_emnist on 100 clients x 50 examples of
28x28x1 with 62 classes; R cnn_hsu on 32x32x3 with 10 classes; batch 10, one local epoch.
Every federated figure is printed beside centralized SGD of the same model at batch 10 and at
batch = cohort x 10, measured in the same run, with the ratios: timings on a shared machine are
noisy, ratios much less so: the runners take turns in timing windows and each keeps its best.
With several devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2, one a core)
it also times the vmap and sequential rounds sharded over all of them (`strategy@devices`).
Inputs of both sides are prebuilt on the device (the input pipeline has its own benchmark,
benchmarks/data_pipeline.py).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_cv import algorithms
from fedjax_cv.engine import ClientInfo, Cohort, client_mesh, resolve_strategy
from fedjax_cv.models import get_model
from fedjax_cv.tasks import get_task, make_centralized_step

WORKLOADS = {
    # name: (model, image shape, classes, cohorts)
    "T": ("logistic", (28, 28, 1), 62, (10, 50)),
    "C": ("cnn_emnist", (28, 28, 1), 62, (10,)),
    "R": ("cnn_hsu", (32, 32, 3), 10, (10,)),
}
EXAMPLES_PER_CLIENT, BATCH = 50, 10


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


def make_cohort(rng, cohort: int, shape, num_classes: int) -> Cohort:
    steps = EXAMPLES_PER_CLIENT // BATCH
    images = rng.normal(size=(cohort, steps, BATCH) + shape).astype(np.float32)
    labels = rng.integers(0, num_classes, (cohort, steps, BATCH)).astype(np.int32)
    info = ClientInfo(
        client_id=np.arange(cohort, dtype=np.int32),
        occurrence=np.zeros(cohort, np.int32),
        num_examples=np.full(cohort, EXAMPLES_PER_CLIENT, np.float32),
        label_counts=np.ones((cohort, num_classes), np.float32),
    )
    return Cohort({"image": images, "label": labels}, np.ones((cohort, steps, BATCH), bool), info)


def centralized(model, params, shape, num_classes, batch, rng):
    """A runner of 8 plain SGD steps dispatched from Python on prebuilt batches."""
    optimizer = optax.sgd(0.01)
    step = make_centralized_step(get_task("classification"), model, optimizer)

    batches = [
        jax.device_put(
            {
                "image": rng.normal(size=(batch,) + shape).astype(np.float32),
                "label": rng.integers(0, num_classes, batch).astype(np.int32),
            }
        )
        for _ in range(8)
    ]
    state = [params, optimizer.init(params)]
    key = jax.random.key(0)

    def run():
        for b in batches:
            state[0], state[1] = step(state[0], state[1], b, key)
        return state[0]

    return run, 8 * batch


def federated(model, params, cohort, strategy, mesh=None):
    """A runner of one FedAvg round on `cohort` with `strategy` (sharded over `mesh`)."""
    algorithm = algorithms.fedavg(
        get_task("classification").make_loss_fn(model),
        0.01,
        strategy=strategy,
        mesh=mesh,
        metric_names=get_task("classification").metric_names,
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
    parser.add_argument("--workloads", default="T,C,R")
    parser.add_argument("--strategies", default="auto,vmap,sequential,host")
    parser.add_argument("--windows", type=int, default=3, help="timing windows per runner")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum length of a window")
    parser.add_argument("--cohorts", default="", help="only these cohort sizes, e.g. 10")
    args = parser.parse_args()
    only = {int(c) for c in args.cohorts.split(",") if c}
    rng = np.random.default_rng(0)
    mesh = client_mesh()  # several devices: also time the sharded round
    rows = []
    for name in args.workloads.split(","):
        model_name, shape, num_classes, cohorts = WORKLOADS[name]
        model = get_model(model_name, num_classes)
        params = model.init(jax.random.key(0), jnp.zeros((1,) + shape), train=False)["params"]
        for cohort_size in (c for c in cohorts if not only or c in only):
            cohort = jax.device_put(make_cohort(rng, cohort_size, shape, num_classes))
            runners = {
                "b10": centralized(model, params, shape, num_classes, BATCH, rng),
                "big": centralized(model, params, shape, num_classes, BATCH * cohort_size, rng),
            }
            for strategy in args.strategies.split(","):
                runners[strategy] = federated(model, params, cohort, strategy)
                if mesh is not None and strategy in ("vmap", "sequential"):
                    runners[f"{strategy}@{len(mesh.devices)}"] = federated(
                        model, params, cohort, strategy, mesh
                    )
            strategies = [s for s in runners if s not in ("b10", "big")]
            rates = interleaved_rates(runners, args.windows, args.seconds)
            for strategy in strategies:
                label = strategy
                if strategy == "auto":
                    label = f"auto->{resolve_strategy('auto', params)}"
                rows.append(
                    {
                        "workload": f"{name}:{model_name}",
                        "strategy": label,
                        "cohort": cohort_size,
                        "client_examples_per_s": rates[strategy],
                        "centralized_b10_examples_per_s": rates["b10"],
                        "centralized_big_examples_per_s": rates["big"],
                    }
                )
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
    cells = (
        row["workload"],
        row["strategy"],
        str(row["cohort"]),
        f"{fed:,.0f}",
        f"{b10:,.0f}",
        f"{big:,.0f}",
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
