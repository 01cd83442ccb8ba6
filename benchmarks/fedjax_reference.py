"""FedJAX 0.0.17's client-examples/s on workload T, the reference of the throughput target.

Standalone: it runs in its own virtualenv and never imports fedjax_cv.

    /work/venvs/fedjax/bin/python benchmarks/fedjax_reference.py --out=/tmp/fedjax_T.json

Workload T the way FedJAX's README runs FedAvg: `fedjax.models.emnist.create_logistic_model()`
(Flatten + Linear, 28x28x1 -> 62 classes), `fedjax.algorithms.fed_avg.federated_averaging` with
client SGD 0.1, server SGD 1.0 and `ShuffleRepeatBatchHParams(batch_size=10)` (one epoch), a
cohort of 10 clients drawn by `UniformGetClientSampler` from an `InMemoryFederatedData` of 100
synthetic clients x 50 examples, and the default `for_each_client` backend (jit per step).

Two timing scopes take turns in windows of at least `--seconds` and whole rounds, after
`--warmup` untimed rounds of each (compilation excluded):

- `apply` (the reported figure): `algorithm.apply` alone, on a pool of cohorts sampled
  beforehand, the scope throughput.py times (a round on a prebuilt cohort). FedJAX's batching
  of the client datasets happens inside `apply` and so stays in.
- `loop`: `sampler.sample()` + `algorithm.apply`, a FedJAX training loop as its README runs it.

Each prints the median window (the JSON's figure) and the best (throughput.py's statistic).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib import metadata

import fedjax
import haiku
import jax
import numpy as np
from fedjax.version import __version__ as fedjax_version

NUM_CLIENTS, EXAMPLES_PER_CLIENT, NUM_CLASSES, BATCH = 100, 50, 62, 10


def make_federated_data(seed: int = 0) -> fedjax.FederatedData:
    """100 clients of 50 synthetic EMNIST-shaped examples: `x` 28x28x1 float32, `y` in [0, 62)."""
    rng = np.random.default_rng(seed)
    clients = {
        f"{i:03d}".encode(): {
            "x": rng.random((EXAMPLES_PER_CLIENT, 28, 28, 1), dtype=np.float32),
            "y": rng.integers(0, NUM_CLASSES, EXAMPLES_PER_CLIENT).astype(np.int32),
        }
        for i in range(NUM_CLIENTS)
    }
    return fedjax.InMemoryFederatedData(clients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the measurement")
    parser.add_argument("--cohort", type=int, default=10, help="clients per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds per scope")
    parser.add_argument("--windows", type=int, default=5, help="timing windows")
    parser.add_argument("--seconds", type=float, default=1.5, help="minimum length of a window")
    parser.add_argument("--pool", type=int, default=64, help="cohorts sampled for `apply`")
    args = parser.parse_args()

    train_fd = make_federated_data()
    model = fedjax.models.emnist.create_logistic_model()
    grad_fn = fedjax.model_grad(model)
    client_optimizer = fedjax.optimizers.sgd(learning_rate=0.1)
    server_optimizer = fedjax.optimizers.sgd(learning_rate=1.0)
    client_batch_hparams = fedjax.ShuffleRepeatBatchHParams(batch_size=BATCH, num_epochs=1)
    algorithm = fedjax.algorithms.fed_avg.federated_averaging(
        grad_fn, client_optimizer, server_optimizer, client_batch_hparams
    )
    server_state = algorithm.init(model.init(jax.random.PRNGKey(17)))
    sampler = fedjax.client_samplers.UniformGetClientSampler(
        train_fd, num_clients=args.cohort, seed=0
    )

    # A pool of sampled cohorts, so the `apply` windows time `algorithm.apply` alone.
    pool = [sampler.sample() for _ in range(args.pool)]
    examples_per_round = [sum(len(dataset) for _, dataset, _ in c) for c in pool]

    def round_apply(i: int) -> int:
        nonlocal server_state
        server_state, _ = algorithm.apply(server_state, pool[i % args.pool])
        return examples_per_round[i % args.pool]

    def round_loop(i: int) -> int:
        nonlocal server_state
        clients = sampler.sample()
        server_state, _ = algorithm.apply(server_state, clients)
        return sum(len(dataset) for _, dataset, _ in clients)

    scopes = {"apply": round_apply, "loop": round_loop}
    for run_round in scopes.values():
        for i in range(args.warmup):
            run_round(i)
    jax.block_until_ready(server_state.params)

    # The scopes take turns, so both see the same background load.
    windows = {scope: [] for scope in scopes}
    for _ in range(args.windows):
        for scope, run_round in scopes.items():
            examples, rounds, started = 0, 0, time.perf_counter()
            while rounds < 1 or time.perf_counter() - started < args.seconds:
                examples += run_round(rounds)
                rounds += 1
            jax.block_until_ready(server_state.params)
            windows[scope].append(examples / (time.perf_counter() - started))

    median = {scope: statistics.median(w) for scope, w in windows.items()}
    print(f"fedjax {fedjax_version} (jax {jax.__version__}, haiku {haiku.__version__}) T logistic")
    for scope, w in windows.items():
        print(
            f"cohort {args.cohort} {scope:5s} client-examples/s: median {median[scope]:,.0f}, "
            f"best {max(w):,.0f}; windows " + ", ".join(f"{x:,.0f}" for x in w)
        )
    if args.out:
        result = {
            "workload": "T",
            "framework": f"fedjax {fedjax_version}",
            "cohort": args.cohort,
            "scope": "algorithm.apply on sampled cohorts (as throughput.py times its rounds)",
            "client_examples_per_s": median["apply"],
            "best_client_examples_per_s": max(windows["apply"]),
            "windows": windows["apply"],
            "loop_scope": "sampler.sample() + algorithm.apply, a FedJAX training loop",
            "loop_client_examples_per_s": median["loop"],
            "loop_best_client_examples_per_s": max(windows["loop"]),
            "loop_windows": windows["loop"],
            "versions": {
                name: metadata.version(name)
                for name in ("fedjax", "jax", "jaxlib", "dm-haiku", "optax", "numpy")
            }
            | {"python": platform.python_version()},
            "backend": type(fedjax.get_for_each_client_backend()).__name__,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
