"""Peak host memory (RSS) of a FedAvg round against its cohort size, per client strategy.

    python benchmarks/memory.py [--cohorts=10,100] [--vmap_cohorts=2,10] [--out=m.json]

Each figure comes from a fresh process (`resource.getrusage`'s ru_maxrss, the peak resident set
size) that builds mobilenet_v2 for 32x32x3 images and 10 classes, a cohort of `--cohorts`
clients with `--steps` local steps of batch `--batch`, and runs two FedAvg rounds. Columns:
- input MB: the cohort's examples, [clients, steps, batch, 32, 32, 3] float32 on the host:
  this part grows with the cohort whatever the strategy;
- before MB: the resident set before the first round (runtime, model, cohort);
- peak MB: ru_maxrss over the whole process, compilation included;
- first round MB: peak minus before: what the first round (compilation, the cohort's copy on
  the device, the round's buffers) adds;
- round MB: the peak of the second round alone (the high-water mark is reset before it by
  writing 5 to /proc/self/clear_refs) minus the resident set just before it: the round's
  working memory, on top of what the process already holds.
`sequential` (`lax.map` over clients) should keep `round MB` flat from cohort 10 to 100. `vmap`
holds every client's activations (and, on CPU, a per-client-weights convolution's buffers) at
once and grows with the cohort: on the development CPU it takes gigabytes at cohort 10, so it is
measured at `--vmap_cohorts` (2 and 10) rather than at 100, which would not fit in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

MODEL = "mobilenet_v2"
IMAGE = 32
NUM_CLASSES = 10


def rss_bytes() -> int:
    """The current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak_rss() -> None:
    """Resets the process's high-water RSS (and so ru_maxrss) to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(strategy: str, cohort_size: int, steps: int, batch: int) -> dict:
    """One process's figures for `strategy` at `cohort_size` (see the module docstring)."""
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import throughput

    from fedjax_cv import algorithms
    from fedjax_cv.engine import ClientInfo, Cohort
    from fedjax_cv.models import get_model
    from fedjax_cv.tasks import get_task

    rng = np.random.default_rng(0)
    examples = throughput.labelled_images((IMAGE, IMAGE, 3), NUM_CLASSES)
    leading = (cohort_size, steps, batch)
    cohort = Cohort(
        examples(rng, leading),
        np.ones(leading, bool),
        ClientInfo(
            client_id=np.arange(cohort_size, dtype=np.int32),
            occurrence=np.zeros(cohort_size, np.int32),
            num_examples=np.full(cohort_size, steps * batch, np.float32),
            label_counts=np.ones((cohort_size, NUM_CLASSES), np.float32),
        ),
    )
    input_bytes = sum(x.nbytes for x in jax.tree.leaves(cohort.examples))
    model = get_model(MODEL, NUM_CLASSES)
    params = model.init(jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 3), np.float32), train=False)
    task = get_task("classification")
    algorithm = algorithms.fedavg(
        task.make_loss_fn(model), 0.01, strategy=strategy, metric_names=task.metric_names
    )
    state = algorithm.init(params["params"])
    before = rss_bytes()
    state, metrics = algorithm.apply(state, cohort, jax.random.key(1))  # compiles
    jax.block_until_ready((state, metrics))
    peak = peak_rss_bytes()
    reset_peak_rss()
    before_round = rss_bytes()
    state, metrics = algorithm.apply(state, cohort, jax.random.key(2))
    jax.block_until_ready((state, metrics))
    round_peak = peak_rss_bytes()
    return {
        "model": MODEL,
        "image_size": IMAGE,
        "strategy": strategy,
        "cohort": cohort_size,
        "local_steps": steps,
        "batch": batch,
        "input_bytes": input_bytes,
        "rss_before_bytes": before,
        "peak_rss_bytes": max(peak, round_peak),
        "round_peak_rss_bytes": round_peak,
        "round_working_bytes": round_peak - before_round,
        "loss": float(metrics["loss"]),
    }


def measure_in_fresh_process(strategy: str, cohort: int, args: argparse.Namespace) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), f"--steps={args.steps}"]
    argv += [f"--batch={args.batch}", f"--measure={strategy},{cohort}"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{strategy} at cohort {cohort}: the process exited {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    def mb(value: int) -> str:
        return f"{value / 1e6:,.0f}"

    header = (
        "strategy",
        "cohort",
        "input MB",
        "before MB",
        "peak MB",
        "first round MB",
        "round MB",
        "peak / smallest",
        "round / smallest",
    )
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        first = next(r for r in rows if r["strategy"] == row["strategy"])
        lines.append(
            " | ".join(
                (
                    row["strategy"],
                    str(row["cohort"]),
                    f"{row['input_bytes'] / 1e6:,.1f}",
                    mb(row["rss_before_bytes"]),
                    mb(row["peak_rss_bytes"]),
                    mb(row["peak_rss_bytes"] - row["rss_before_bytes"]),
                    mb(row["round_working_bytes"]),
                    f"{row['peak_rss_bytes'] / first['peak_rss_bytes']:.2f}",
                    f"{row['round_working_bytes'] / max(first['round_working_bytes'], 1):.2f}",
                )
            )
        )
    return "\n".join(f"| {line} |" for line in lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", default="10,100")
    parser.add_argument("--vmap_cohorts", default="2,10", help="'' for no vmap rows")
    parser.add_argument("--steps", type=int, default=2, help="local steps per client")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--out", help="JSON file for the rows")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: STRATEGY,COHORT
    args = parser.parse_args(argv)
    if args.measure:
        strategy, cohort = args.measure.split(",")
        print(json.dumps(measure(strategy, int(cohort), args.steps, args.batch)))
        return
    rows = []
    for strategy, cohorts in (("sequential", args.cohorts), ("vmap", args.vmap_cohorts)):
        for cohort in (int(c) for c in cohorts.split(",") if c):
            rows.append(measure_in_fresh_process(strategy, cohort, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        f"{MODEL} at {IMAGE}x{IMAGE}, FedAvg, {args.steps} local steps of batch {args.batch}; "
        "one fresh process per row (MB = 1e6 bytes)"
    )
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
