"""The accelerator table: FedAvg client-images/s beside centralized training, per model.

    python benchmarks/gpu.py --out=gpu.json [--models=resnet50,vit_b16] [--dtypes=bf16]
    python benchmarks/gpu.py --toy --out=/tmp/gpu_toy.json    # CPU smoke test (CI)

For each model of `BENCHMARKS` (mobilenet_v2, efficientnet_b0, resnet50 and vit_b16 at 224,
deeplabv3plus_mobilenet_v2 at 512, yolov5s at 640): one FedAvg round of a cohort of 10 clients,
batch 32 and `--steps` local steps each, with the strategies vmap and sequential (and the one
`auto` picks on this backend when it is neither), in float32 and bfloat16, against centralized
SGD at batch 32 of the same model and dtype measured in the same run: the ratio
federated/centralized is the figure to read, bare rates vary with the machine. With several
local devices it adds the weak-scaling efficiency from 1 to all of them, the cohort per device
fixed: rate(d) / (d * rate(1)).

bf16: fedjax_cv has no mixed-precision switch, so the benchmark casts the parameters and the
images to bfloat16 itself and the whole step (client optimizer included) runs in bfloat16.

Peak device memory is `device.memory_stats()["peak_bytes_in_use"]`, a peak over the process's
life: with `--isolate` (the default on accelerators) every figure is measured in a fresh
process, so the peak is that configuration's (parameters, cohort and round together). On CPU
there are no memory stats; the runners of a model share one process and take turns in timing
windows (see benchmarks/throughput.py).

A full run compiles some 40 programs, each in a fresh process with `--isolate`: on a timed
device lease, split it with `--models` (one JSON per call). `--toy` (automatic on CPU) runs the
same code at toy sizes: 32x32 images, a cohort of 2 with one step of batch 2, narrow variants
of each model, one timing call: a smoke test, not a figure.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import traceback
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from fedjax_cv.engine import ClientInfo, Cohort, client_mesh, resolve_strategy, shard_cohort  # noqa: E402
from fedjax_cv.models import get_model  # noqa: E402

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
CENTRALIZED = "centralized"
BF16_NOTE = (
    "bf16: parameters and images cast to bfloat16 inside the benchmark "
    "(fedjax_cv has no mixed-precision switch)"
)


TOY_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


class Benchmark(NamedTuple):
    """`model` trained on `task` at `image_size`; `toy_kwargs` narrow it for the smoke test."""

    model: str
    task: str
    image_size: int
    num_classes: int
    examples: object  # (shape, num_classes) -> throughput.ExampleMaker
    toy_kwargs: tuple[tuple[str, object], ...]


TOY_IMAGE = 32  # a multiple of every model's deepest stride (YOLO needs 32)
# The fewest blocks each family allows: XLA:CPU compiles a conv block's gradient in about a
# second, and a smoke test compiles dozens of rounds. DeepLabV3+ needs a stride-32 map.
TOY_MOBILENET_STAGES = ((1, 16, 1, 1), (6, 24, 1, 2))
TOY_DEEPLAB_STAGES = ((1, 16, 1, 1), (6, 24, 1, 2), (6, 32, 1, 2), (6, 64, 1, 2), (6, 160, 1, 2))

BENCHMARKS = {
    b.model: b
    for b in (
        Benchmark(
            "mobilenet_v2",
            "classification",
            224,
            1000,
            throughput.labelled_images,
            (("width_multiplier", 0.25), ("stages", TOY_MOBILENET_STAGES)),
        ),
        Benchmark(
            "efficientnet_b0",
            "classification",
            224,
            1000,
            throughput.labelled_images,
            (("width_coefficient", 0.25), ("depth_coefficient", 0.01)),  # 1 block a stage
        ),
        Benchmark(
            "resnet50",
            "classification",
            224,
            1000,
            throughput.labelled_images,
            (("stage_sizes", (1,)), ("width", 8)),
        ),
        Benchmark(
            "vit_b16",
            "classification",
            224,
            1000,
            throughput.labelled_images,
            (
                ("image_size", TOY_IMAGE),
                ("hidden_size", 32),
                ("depth", 1),
                ("num_heads", 2),
                ("mlp_dim", 64),
            ),
        ),
        Benchmark(
            "deeplabv3plus_mobilenet_v2",
            "segmentation",
            512,
            21,
            throughput.masked_images,
            (("width_multiplier", 0.25), ("stages", TOY_DEEPLAB_STAGES)),
        ),
        Benchmark(
            "yolov5s",
            "detection",
            640,
            80,
            throughput.boxed_images,
            (("width_multiple", 0.125), ("depth_multiple", 0.01)),
        ),
    )
}


class Sizes(NamedTuple):
    """How big one measurement is."""

    toy: bool
    cohort: int  # clients per round (per device in the weak-scaling rows)
    batch: int
    steps: int  # local steps per client
    central_steps: int  # SGD steps in one call of the centralized runner
    windows: int
    seconds: float


class Cell(NamedTuple):
    """One measured configuration: a model in a dtype with a runner on `devices` devices."""

    model: str
    dtype: str
    runner: str  # CENTRALIZED or a client strategy
    devices: int = 1


def pooled(examples: throughput.ExampleMaker, rng, pool_size: int = 64):
    """Examples drawn from a pool made once: the values do not change a round's cost, and
    drawing a cohort of 640x640 images afresh would take longer than timing it."""
    pool = examples(rng, (pool_size,))

    def make(rng, leading):
        index = rng.integers(0, pool_size, leading)
        return jax.tree.map(lambda x: x[index], pool)

    return make


def with_image_dtype(examples: throughput.ExampleMaker, dtype):
    def make(rng, leading):
        batch = examples(rng, leading)
        return {**batch, "image": batch["image"].astype(dtype)}

    return make


def cast_floats(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def make_cohort(examples, rng, num_classes: int, sizes: Sizes, num_clients: int) -> Cohort:
    """`num_clients` full clients of `sizes.steps` batches of `sizes.batch` examples each."""
    leading = (num_clients, sizes.steps, sizes.batch)
    info = ClientInfo(
        client_id=np.arange(num_clients, dtype=np.int32),
        occurrence=np.zeros(num_clients, np.int32),
        num_examples=np.full(num_clients, sizes.steps * sizes.batch, np.float32),
        label_counts=np.ones((num_clients, num_classes), np.float32),
    )
    return Cohort(examples(rng, leading), np.ones(leading, bool), info)


def build_model(bench: Benchmark, sizes: Sizes):
    kwargs = dict(bench.toy_kwargs) if sizes.toy else {}
    num_classes = min(bench.num_classes, 10) if sizes.toy else bench.num_classes
    image_size = TOY_IMAGE if sizes.toy else bench.image_size
    return get_model(bench.model, num_classes, **kwargs), num_classes, image_size


def _peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _failure(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    if "RESOURCE_EXHAUSTED" in first or "out of memory" in first.lower():
        return f"OOM: {first[:200]}"
    return f"{type(error).__name__}: {first[:200]}"


def measure(cells: list[Cell], sizes: Sizes) -> list[dict]:
    """Images/s (and, for a single cell, the process's peak device memory) of `cells`, all of
    one model, taking turns in timing windows. A cell that fails (out of memory, say) gets
    its error instead of a rate; the others are still measured."""
    bench = BENCHMARKS[cells[0].model]
    model, num_classes, image_size = build_model(bench, sizes)
    rng = np.random.default_rng(0)
    shape = (image_size, image_size, 3)
    base = pooled(bench.examples(shape, num_classes), rng)
    init = jax.jit(functools.partial(model.init, train=False))
    params32 = init(jax.random.key(0), jnp.zeros((1, *shape), jnp.float32))["params"]
    auto = resolve_strategy("auto", params32)
    cohorts = {}
    runners, results = {}, {}
    for cell in cells:
        dtype = DTYPES[cell.dtype]
        params = cast_floats(params32, dtype)
        examples = with_image_dtype(base, dtype)
        workload = throughput.Workload(
            bench.model,
            bench.task,
            num_classes,
            examples,
            (),
            central_steps=sizes.central_steps,
        )
        results[cell] = {"auto": auto, "image_size": image_size}
        try:
            if cell.runner == CENTRALIZED:
                runner = throughput.centralized(workload, model, params, sizes.batch, rng)
            else:
                mesh = client_mesh(jax.local_devices()[: cell.devices])
                key = (cell.dtype, cell.devices)
                if key not in cohorts:
                    cohort = make_cohort(
                        examples, rng, num_classes, sizes, sizes.cohort * cell.devices
                    )
                    cohorts[key] = shard_cohort(cohort, mesh) if mesh else jax.device_put(cohort)
                runner = throughput.federated(
                    workload, model, params, cohorts[key], cell.runner, mesh
                )
            jax.block_until_ready(runner[0]())  # compiles; an out-of-memory shows here
            runners[cell] = runner
        except Exception as error:  # noqa: BLE001  (one failing configuration ends no table)
            traceback.print_exc()
            results[cell]["error"] = _failure(error)
    rates = throughput.interleaved_rates(runners, sizes.windows, sizes.seconds) if runners else {}
    peak = _peak_bytes() if len(cells) == 1 else None
    for cell, rate in rates.items():
        results[cell].update(images_per_s=rate, peak_bytes=peak)
    return [{**cell._asdict(), **results[cell]} for cell in cells]


def _cell_argv(sizes: Sizes, cell: Cell) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(cell._asdict())]
    argv += [f"--{name}={value}" for name, value in sizes._asdict().items() if name != "toy"]
    return argv + (["--toy"] if sizes.toy else [])


def measure_isolated(cell: Cell, sizes: Sizes) -> dict:
    """`measure([cell])` in a fresh process: the peak device memory is this cell's alone."""
    done = subprocess.run(_cell_argv(sizes, cell), capture_output=True, text=True)
    sys.stderr.write(done.stderr[-4000:] if done.returncode else "")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**cell._asdict(), "error": f"process exited {done.returncode}: {last[:200]}"}
    return json.loads(lines[-1])


def probe_backend() -> tuple[str, int, str]:
    """(backend, local device count, device kind) from a child process, so that this one
    leaves the accelerator's memory to the processes that measure."""
    code = (
        "import jax; d = jax.local_devices(); "
        "print(jax.default_backend(), len(d), d[0].device_kind, sep='|')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    backend, count, kind = out.stdout.strip().splitlines()[-1].split("|")
    return backend, int(count), kind


def scaling_devices(num_devices: int) -> list[int]:
    """1, 2, 4, ... and all of them."""
    counts = [1]
    while counts[-1] * 2 < num_devices:
        counts.append(counts[-1] * 2)
    return counts + [num_devices] if num_devices > 1 else counts


def assemble(measured: list[dict], sizes: Sizes, meta: dict) -> dict:
    """The JSON report: one row per model x dtype x strategy (with centralized of the same model
    and dtype beside it), `auto`'s choice per model, and the weak-scaling rows."""
    by_cell = {Cell(m["model"], m["dtype"], m["runner"], m["devices"]): m for m in measured}
    rows, auto_rows, scaling = [], [], []
    for model in dict.fromkeys(m["model"] for m in measured):
        bench = BENCHMARKS[model]
        fastest = {}
        for cell, m in by_cell.items():
            if cell.model != model or cell.runner == CENTRALIZED or cell.devices != 1:
                continue
            central = by_cell.get(Cell(model, cell.dtype, CENTRALIZED))
            central_rate = (central or {}).get("images_per_s")
            rate = m.get("images_per_s")
            rows.append(
                {
                    "model": model,
                    "task": bench.task,
                    "image_size": m.get("image_size"),
                    "dtype": cell.dtype,
                    "strategy": cell.runner,
                    "cohort": sizes.cohort,
                    "batch": sizes.batch,
                    "local_steps": sizes.steps,
                    "client_images_per_s": rate,
                    "centralized_images_per_s": central_rate,
                    "federated_over_centralized": (
                        rate / central_rate if rate and central_rate else None
                    ),
                    "peak_device_bytes": m.get("peak_bytes"),
                    "centralized_peak_device_bytes": (central or {}).get("peak_bytes"),
                    "error": m.get("error") or (central or {}).get("error"),
                }
            )
            if rate and rate > fastest.get(cell.dtype, ("", 0.0))[1]:
                fastest[cell.dtype] = (cell.runner, rate)
        auto = next(
            (m["auto"] for c, m in by_cell.items() if c.model == model and "auto" in m), None
        )
        auto_rows.append(
            {
                "model": model,
                "auto_picks": auto,
                "fastest": {dtype: name for dtype, (name, _) in fastest.items()},
                "auto_is_fastest": bool(fastest) and all(n == auto for n, _ in fastest.values()),
            }
        )
        for cell, m in by_cell.items():
            if cell.model != model or cell.devices == 1 or cell.runner == CENTRALIZED:
                continue
            one = by_cell.get(cell._replace(devices=1), {}).get("images_per_s")
            rate = m.get("images_per_s")
            scaling.append(
                {
                    "model": model,
                    "dtype": cell.dtype,
                    "strategy": cell.runner,
                    "devices": cell.devices,
                    "cohort": sizes.cohort * cell.devices,
                    "client_images_per_s": rate,
                    "efficiency": rate / (cell.devices * one) if rate and one else None,
                    "error": m.get("error"),
                }
            )
    return {**meta, "sizes": sizes._asdict(), "rows": rows, "auto": auto_rows, "scaling": scaling}


def _rate(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def markdown(report: dict) -> str:
    s = report["sizes"]
    toy = ", TOY SIZES (smoke test)" if s["toy"] else ""
    lines = [
        f"Accelerator table, {report['date']}: {report['device']} x{report['num_devices']} "
        f"({report['backend']}), jax {report['jax']}{toy}. "
        f"FedAvg, cohort {s['cohort']}, batch {s['batch']}, {s['steps']} local steps; "
        f"centralized SGD at batch {s['batch']}. {BF16_NOTE}. "
        "Peak memory: memory_stats()['peak_bytes_in_use'] of a process that ran that figure "
        "alone ('-': not available).",
        "",
        "| model | image | dtype | strategy | fed img/s | central img/s | fed/central "
        "| fed peak MiB | central peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        ratio = r["federated_over_centralized"]
        cells = [
            r["model"],
            str(r["image_size"]),
            r["dtype"],
            r["strategy"],
            _rate(r["client_images_per_s"]),
            _rate(r["centralized_images_per_s"]),
            "-" if ratio is None else f"{ratio:.2f}",
            _mib(r["peak_device_bytes"]),
            _mib(r["centralized_peak_device_bytes"]),
        ]
        if r["error"]:
            cells[-1] += f" ({r['error'][:60]})"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | auto picks | fastest measured | auto is fastest |"]
    lines.append("| --- | --- | --- | --- |")
    for a in report["auto"]:
        fastest = ", ".join(f"{d}: {n}" for d, n in a["fastest"].items()) or "-"
        lines.append(
            f"| {a['model']} | {a['auto_picks']} | {fastest} | "
            f"{'yes' if a['auto_is_fastest'] else 'no'} |"
        )
    lines.append("")
    if report["scaling"]:
        lines += [
            "Weak scaling (cohort per device fixed): efficiency = rate(d) / (d * rate(1)).",
            "",
            "| model | dtype | strategy | devices | cohort | fed img/s | efficiency |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in report["scaling"]:
            eff = r["efficiency"]
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['strategy']} | {r['devices']} | "
                f"{r['cohort']} | {_rate(r['client_images_per_s'])} | "
                f"{'-' if eff is None else f'{eff:.2f}'} |"
            )
    else:
        lines.append(f"Weak scaling: {report['num_devices']} local device(s), nothing to scale.")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the report")
    parser.add_argument("--models", default=",".join(BENCHMARKS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--strategies", default="vmap,sequential")
    parser.add_argument(
        "--scaling_strategies", default=None, help="default: --strategies; '' for none"
    )
    parser.add_argument("--toy", action="store_true", help="toy sizes (automatic on CPU)")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--cohort", type=int, default=None, help="default 10 (toy 2)")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (toy 2)")
    parser.add_argument("--steps", type=int, default=None, help="default 4 (toy 1)")
    parser.add_argument("--central_steps", type=int, default=None, help="default 4 (toy 1)")
    parser.add_argument("--windows", type=int, default=None, help="default 3 (toy 1)")
    parser.add_argument("--seconds", type=float, default=None, help="default 2 (toy 0)")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: one isolated cell
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in BENCHMARKS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {', '.join(BENCHMARKS)}")
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {bad}; known: {', '.join(DTYPES)}")
    return args


def make_sizes(args: argparse.Namespace) -> Sizes:
    full = Sizes(False, 10, 32, 4, 4, 3, 2.0)
    toy = Sizes(True, 2, 2, 1, 1, 1, 0.0)
    base = toy if args.toy else full
    fields = {f: getattr(args, f) for f in Sizes._fields if f != "toy"}
    return base._replace(**{f: v for f, v in fields.items() if v is not None})


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.cell:
        print(json.dumps(measure([Cell(**json.loads(args.cell))], make_sizes(args))[0]))
        return
    backend, num_devices, kind = probe_backend()
    args.toy = args.toy or backend == "cpu"
    if args.toy and backend == "cpu":
        # Read when this process's backend starts (below): XLA's cheapest CPU code generation.
        # A smoke test compiles dozens of rounds and runs each once or twice.
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *TOY_XLA_FLAGS])
    isolate = args.isolate == "yes" or (args.isolate == "auto" and backend != "cpu")
    sizes = make_sizes(args)
    strategies = args.strategies.split(",")
    scaling_strategies = (
        strategies if args.scaling_strategies is None else args.scaling_strategies.split(",")
    )
    dtypes = args.dtypes.split(",")
    measured = []
    for model in args.models.split(","):
        cells = [Cell(model, dtype, CENTRALIZED) for dtype in dtypes]
        cells += [Cell(model, dtype, s) for dtype in dtypes for s in strategies]
        cells += [
            Cell(model, "fp32", s, d)
            for s in scaling_strategies
            if s
            for d in scaling_devices(num_devices)[1:]
        ]
        if not isolate:
            found = measure(cells, sizes)
        else:
            found = [measure_isolated(cell, sizes) for cell in cells]
        auto = next((m["auto"] for m in found if "auto" in m), None)
        if auto and auto not in strategies:  # time auto's pick too, to tell if it is fastest
            extra = [Cell(model, dtype, auto) for dtype in dtypes]
            found += (
                measure(extra, sizes)
                if not isolate
                else [measure_isolated(cell, sizes) for cell in extra]
            )
        for m in found:
            print(json.dumps(m), file=sys.stderr, flush=True)
        measured += found
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": kind,
        "backend": backend,
        "num_devices": num_devices,
        "jax": jax.__version__,
        "isolated": isolate,
        "bf16": BF16_NOTE,
    }
    report = assemble(measured, sizes, meta)
    print(markdown(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
