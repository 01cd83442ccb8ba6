"""Issue 13: one run as several processes on one global mesh (jax.distributed, gloo on CPU).

The main job's config (`configs/shapes_fedavg.py:runlocal`, with the logistic model and three
rounds so that a run takes seconds) runs as 2 processes of 4 CPU devices and as 1 process of
8: the same global mesh, so the final params agree up to the order of the cross-process sum.
FedBN's client-local store is split over that mesh, each process holding its own rows.
Every run compiles with XLA's fast settings (as tests/xla.py), the same for both paths.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.xla import ROOT

pytestmark = pytest.mark.slow

# XLA:CPU compiles 3-5x faster at optimisation level 0 with the older loop emitters.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
JOB = (
    "--config=configs/shapes_fedavg.py:runlocal",
    "--config.model.name=logistic",
    "--config.num_rounds=3",
    "--config.eval_every_rounds=3",
    "--config.checkpoint.every_rounds=1",
)


def cpu_env(devices: int, **more) -> dict:
    flags = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **more)


def one_process(workdir, *flags, devices=8, job=JOB):
    return subprocess.run(
        [sys.executable, "launch/train.py", *job, f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=cpu_env(devices),
        capture_output=True,
        text=True,
        timeout=300,
    )


def local_multiprocess(workdir, *flags, processes=2, devices=4, job=JOB):
    return subprocess.run(
        ["bash", "launch/local_multiprocess.sh", str(processes), str(devices), *job]
        + [f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS=FAST_COMPILE),
        capture_output=True,
        text=True,
        timeout=300,
    )


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def final_state(workdir, part="params") -> list[np.ndarray]:
    """The leaves of `part` of the workdir's newest checkpoint (all of it: None), read by
    orbax onto one device."""
    root = pathlib.Path(workdir) / "checkpoints"
    step = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    path = (root / str(step) / "default").absolute()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(path)
        saved = getattr(saved, "item_metadata", saved)
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(saved)
        )
        state = checkpointer.restore(path, target)
    state = state if part is None else state[part]
    return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(state)]


def relative_difference(one: list[np.ndarray], two: list[np.ndarray]) -> float:
    assert [a.shape for a in one] == [b.shape for b in two]
    difference = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(one, two, strict=True)))
    return difference / np.sqrt(sum(np.sum(a**2) for a in one))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The job as 1 process of 8 devices and as 2 processes of 4."""
    root = tmp_path_factory.mktemp("multiprocess")
    single = one_process(root / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    double = local_multiprocess(root / "two")
    assert double.returncode == 0, double.stderr[-3000:]
    return root, double


def test_two_processes_equal_one_process_and_write_once(runs):
    root, double = runs
    assert relative_difference(final_state(root / "one"), final_state(root / "two")) <= 1e-6
    lines_one, lines_two = metrics(root / "one"), metrics(root / "two")
    # One writer: every round's line once, the same rounds and keys as the 1-process run.
    assert [r["round"] for r in lines_two] == [r["round"] for r in lines_one] == [1, 2, 3]
    assert [sorted(r) for r in lines_two] == [sorted(r) for r in lines_one]
    # Evaluation is split over the processes and merged: every test example counted once.
    details_one, details_two = (
        json.loads((root / r / "eval_details.json").read_text()) for r in ("one", "two")
    )
    assert details_two == details_one and details_one["num_examples"] > 0
    assert lines_two[-1]["eval/loss"] == pytest.approx(lines_one[-1]["eval/loss"], rel=1e-5)
    assert double.stdout.count("params_sha256") == 1  # the final record, printed once
    assert sorted(p.name for p in (root / "two" / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_two_process_runs_repeat_exactly(runs, tmp_path):
    root, _ = runs
    again = local_multiprocess(tmp_path / "again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        metrics(tmp_path / "again")[-1]["params_sha256"]
        == metrics(root / "two")[-1]["params_sha256"]
    )


FEDBN_JOB = (
    "--config=configs/shapes_fedavg.py:runlocal",  # 20 clients: 24 store rows on 8 devices
    "--config.num_rounds=2",
    "--config.eval_every_rounds=2",
    "--config.checkpoint.every_rounds=1",
    "--config.algorithm.name=fedbn",
    "--config.model.name=cnn_hsu",
    "--config.model.norm=batch",
    "--config.model.kwargs.conv_features=4",
    "--config.algorithm.strategy=sequential",  # 'auto' is 'host' with one process
)


@pytest.fixture(scope="module")
def fedbn_runs(tmp_path_factory):
    """The FedBN job as 1 process of 8 devices and as 2 processes of 4."""
    root = tmp_path_factory.mktemp("fedbn")
    single = one_process(root / "one", job=FEDBN_JOB)
    assert single.returncode == 0, single.stderr[-3000:]
    double = local_multiprocess(root / "two", job=FEDBN_JOB)
    assert double.returncode == 0, double.stderr[-3000:]
    return root


def test_killed_process_ends_the_other_and_the_same_command_resumes(fedbn_runs, tmp_path):
    """Process 1 dies (SIGKILL, the test-only fault seam) while round 2 of the FedBN job is
    being saved: process 0 ends non-zero within 60 s, and relaunching resumes from checkpoint
    1, the store restored split over both processes, and ends with the uninterrupted run's
    state, bit for bit."""
    workdir = tmp_path / "killed"
    port = free_port()
    processes = []
    for index in range(2):
        env = cpu_env(4)
        if index == 1:
            env["FEDJAX_CV_FAULT_KILL_DURING_SAVE"] = "2"
        processes.append(
            subprocess.Popen(
                [sys.executable, "launch/train.py", *FEDBN_JOB, f"--workdir={workdir}"]
                + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
                + [f"--process_id={index}", "--heartbeat_timeout_s=10"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    survivor, victim = processes
    assert victim.wait(timeout=240) == -9
    died = time.monotonic()
    _, stderr = survivor.communicate(timeout=120)
    assert survivor.returncode != 0
    assert time.monotonic() - died < 60
    assert "another task died" in stderr  # JAX's own line when a peer is gone
    assert checkpoint_steps(workdir) == [1]
    resumed = local_multiprocess(workdir, job=FEDBN_JOB)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # It went on from checkpoint 1 (one that failed to restore would be set aside and the run
    # would start over, to the same numbers).
    assert not (workdir / "checkpoints_set_aside").exists(), resumed.stderr[-3000:]
    assert "skipped checkpoint" not in resumed.stderr
    lines = metrics(workdir)
    assert [r["round"] for r in lines] == [1, 2] and checkpoint_steps(workdir) == [1, 2]
    uninterrupted = fedbn_runs / "two"
    assert lines[-1]["params_sha256"] == metrics(uninterrupted)[-1]["params_sha256"]
    for a, b in zip(final_state(workdir, None), final_state(uninterrupted, None), strict=True):
        np.testing.assert_array_equal(a, b)  # the client-local store too


def checkpoint_metadata(workdir, step) -> dict:
    """{leaf name: orbax's ArrayMetadata} of checkpoint `step`: its global shape and the
    sharding it was saved with."""
    path = (pathlib.Path(workdir) / "checkpoints" / str(step) / "default").absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(path)
    saved = getattr(saved, "item_metadata", saved)
    return {m.name: m for m in jax.tree.leaves(saved) if hasattr(m, "shape")}


def test_two_process_fedbn_equals_one_process_with_the_store_split(fedbn_runs):
    """FedBN's clients keep their BatchNorm layers across rounds (the state's client_local):
    2 processes x 4 devices end with the state of 1 process x 8, client-local values too.
    Each process holds only its 12 of the store's 24 rows (20 clients padded to the 8
    devices, 4 of each process): the checkpoints were saved from a store split over the
    devices of both processes, 3 rows a device."""
    two = fedbn_runs / "two"
    assert [r["round"] for r in metrics(two)] == [1, 2] and checkpoint_steps(two) == [1, 2]
    one = final_state(fedbn_runs / "one", None)
    assert relative_difference(one, final_state(two, None)) <= 1e-6
    local_one = final_state(fedbn_runs / "one", "client_local")
    assert local_one and np.any(np.concatenate([a.ravel() for a in local_one]) != 0)
    assert relative_difference(local_one, final_state(two, "client_local")) <= 1e-6

    for step in (1, 2):
        saved = checkpoint_metadata(two, step)
        store = {name: m for name, m in saved.items() if name.startswith("client_local.")}
        assert store, sorted(saved)
        for name, m in store.items():
            assert m.shape[0] == 24, (name, m.shape)
            # Rows over the `clients` axis of the 8 devices of both processes.
            assert tuple(m.sharding.partition_spec) == ("clients",), (name, m.sharding)
            assert list(m.sharding.shape) == [8], (name, m.sharding)
            assert len({d.id for d in m.sharding.device_mesh.mesh}) == 8, (name, m.sharding)
        # The rest of the state is replicated, and saved so: the check tells the two apart.
        params = [m for name, m in saved.items() if name.startswith("params.")]
        assert params and all(tuple(m.sharding.partition_spec) == () for m in params)


def checkpoint_steps(workdir) -> list[int]:
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


SPLIT_STORE_SCRIPT = """
import pathlib, sys, tempfile
import jax, numpy as np
from fedjax_cv import algorithms, checkpointing
from fedjax_cv.engine import client_mesh
from tests import linear_problem as lp

NUM_CLIENTS, ROWS = 75, 80  # padded to 80 rows: 10 on each of the 8 devices
assert jax.device_count() == 8, jax.devices()
mesh = client_mesh()
cohort = lp.make_cohort(num_clients=5, num_steps=3, sizes=[12, 30, 5, 12, 7])
makers = {
    "fedbn": lambda m: algorithms.fedbn(
        lp.loss_fn, 0.1, local=algorithms.ClientLocal(params="^b$"), strategy="vmap", mesh=m
    ),
    "scaffold": lambda m: algorithms.scaffold(
        lp.loss_fn, 0.1, num_clients=NUM_CLIENTS, strategy="sequential", mesh=m
    ),
}
BLOCKS = [(10 * d, 10 * d + 10) for d in range(8)]


def blocks(x):
    return sorted((s.index[0].indices(x.shape[0])[:2], s.data.shape) for s in x.addressable_shards)


def assert_split(store):
    for leaf in jax.tree.leaves(store):
        assert leaf.shape[0] == ROWS, leaf.shape
        assert blocks(leaf) == [(b, (10,) + leaf.shape[1:]) for b in BLOCKS], blocks(leaf)


def poison_padding(x):
    x = np.array(x)
    x[NUM_CLIENTS:] = np.nan
    return x


for name, make in makers.items():
    split, whole = make(mesh), make(None)
    state = split.init(lp.initial_params(), num_clients=NUM_CLIENTS)
    reference = whole.init(lp.initial_params(), num_clients=NUM_CLIENTS)
    assert_split(state.client_local)
    # No client reads a padding row: NaN there reaches nothing.
    state = state.replace(
        client_local=jax.tree.map(
            lambda x: jax.device_put(poison_padding(x), x.sharding), state.client_local
        )
    )
    placed = jax.tree.map(lambda x: x.sharding, state.client_local)
    for r in range(2):
        state, _ = split.apply(state, cohort, jax.random.key(r))
        reference, _ = whole.apply(reference, cohort, jax.random.key(r))
    assert jax.tree.map(lambda x: x.sharding, state.client_local) == placed
    assert_split(state.client_local)
    got, want = jax.device_get((state, reference))
    for a, b in zip(jax.tree.leaves(got.client_local), jax.tree.leaves(want.client_local)):
        assert np.isnan(a[NUM_CLIENTS:]).all()
        assert not np.allclose(b, b[0])  # the sampled clients' rows moved
        np.testing.assert_allclose(a[:NUM_CLIENTS], b, rtol=1e-6, atol=1e-7, err_msg=name)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=name)

# A checkpoint restores the store split as it was saved, every bit.
with tempfile.TemporaryDirectory() as tmp:
    algorithm = makers["fedbn"](mesh)
    state = algorithm.init(lp.initial_params(), num_clients=NUM_CLIENTS)
    state, _ = algorithm.apply(state, cohort, jax.random.key(0))
    manager = checkpointing.manager(pathlib.Path(tmp), 2)
    checkpointing.save(manager, 1, state, {"seed": 0})
    target = algorithm.init(lp.initial_params(), num_clients=NUM_CLIENTS)
    record = checkpointing.read_record(manager, 1)
    restored, difference = checkpointing.restore_verified(manager, 1, target, record)
    manager.close()
    assert difference is None, difference
    assert_split(restored.client_local)
    for a, b in zip(jax.tree.leaves(restored.client_local), jax.tree.leaves(state.client_local)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

# The blocks a checkpoint's digest reads a split store in: every row once, in order, the
# last block shorter (80 rows of 3 floats in blocks of 36 bytes: 3 rows).
from fedjax_cv.engine import hosts
scaffold = makers["scaffold"](mesh).init(lp.initial_params(), num_clients=NUM_CLIENTS)
w = scaffold.client_local["stages"]["scaffold"]["w"]
w = jax.device_put(np.arange(w.size, dtype=np.float32).reshape(w.shape), w.sharding)
assert w.shape == (ROWS, 3), w.shape
read = list(hosts.row_blocks(w, max_bytes=36))
assert [len(b) for b in read] == [3] * 26 + [2], [len(b) for b in read]
np.testing.assert_array_equal(np.concatenate(read), np.asarray(w))

# Another device count pads the store to other rows: a run resumes on one device from 8
# devices' checkpoint (rows past the 75 clients cut) and on 8 from one device's (rows added).
for source, target in ((mesh, None), (None, mesh)):
    with tempfile.TemporaryDirectory() as tmp:
        state = makers["fedbn"](source).init(lp.initial_params(), num_clients=NUM_CLIENTS)
        state, _ = makers["fedbn"](source).apply(state, cohort, jax.random.key(0))
        manager = checkpointing.manager(pathlib.Path(tmp), 2)
        checkpointing.save(manager, 1, state, {"seed": 0})
        empty = makers["fedbn"](target).init(lp.initial_params(), num_clients=NUM_CLIENTS)
        record = checkpointing.read_record(manager, 1)
        restored, difference = checkpointing.restore_verified(manager, 1, empty, record)
        manager.close()
        assert difference is None, difference
        got, saved = restored.client_local["params"]["b"], state.client_local["params"]["b"]
        assert got.shape == empty.client_local["params"]["b"].shape
        assert got.sharding == empty.client_local["params"]["b"].sharding
        got, saved = np.asarray(got), np.asarray(saved)
        np.testing.assert_array_equal(got[:NUM_CLIENTS], saved[:NUM_CLIENTS])
        assert np.all(got[NUM_CLIENTS:] == np.float32(lp.initial_params()["b"]))
        assert not np.all(saved[:NUM_CLIENTS] == np.float32(lp.initial_params()["b"]))
print("split ok")
"""


def test_the_store_is_split_over_eight_devices_and_padding_is_never_read(tmp_path):
    """One process, 8 devices: FedBN's and SCAFFOLD's stores (75 clients) live as 10 rows on
    each device, before and after rounds and through a checkpoint, and the rounds equal one
    device's; a checkpoint of 8 devices' store (80 rows) resumes on one device (75) and back.
    The compiled rounds hold no array of the whole store: every one of its shapes with 75 or
    80 rows is gone once XLA has split the round over the devices."""
    dump = tmp_path / "hlo"
    env = cpu_env(8)
    env["XLA_FLAGS"] += f" --xla_dump_to={dump} --xla_dump_hlo_module_re=round_fn"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SPLIT_STORE_SCRIPT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "split ok" in result.stdout
    rounds = {
        path.name: path.read_text()
        for path in dump.glob("*jit_round_fn.cpu_after_optimizations.txt")
    }
    split = {name: text for name, text in rounds.items() if "sharding={devices=[8" in text}
    assert len(split) >= 2, sorted(rounds)  # fedbn and scaffold over the mesh, at least
    for name, text in split.items():
        assert "[10]" in text or "[10," in text, name  # one device's rows
        assert "[75" not in text and "[80" not in text, name
    # The one-device rounds hold the whole store: the check sees it where it is.
    assert any("[75" in text for name, text in rounds.items() if name not in split)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("share", [(0, 3), (3, 5), (4, 8), (5, 8)])
def test_a_process_share_equals_those_rows_of_the_whole_cohort(share):
    """What one process assembles (`CohortBuilder.rows`, augmentation and a data attack on)
    equals those rows of the cohort one process builds, padded past the last client."""
    from fedjax_cv.algorithms.attacks import Attack
    from fedjax_cv.engine.cohort import pad_clients
    from tests.test_pipeline import _assert_same, _builder

    builder = _builder(
        _small_dataset(),
        augmentation="cifar",
        attack=Attack(name="backdoor", fraction=0.4),
        clients_per_round=5,
    )
    start, stop = share
    whole = pad_clients(builder(2), 8)
    got = pad_clients(builder.rows(2, start, stop), stop - start)
    _assert_same(got, jax.tree.map(lambda x: x[start:stop], whole))


def _small_dataset():
    from fedjax_cv.config_base import base_config
    from fedjax_cv.data.registry import shapes_dataset

    config = base_config().data
    config.num_clients, config.num_train_examples, config.num_test_examples = 12, 360, 8
    config.image_size = 12
    config.partition.name, config.partition.alpha = "lda", 0.5
    return shapes_dataset(config, seed=0)


@pytest.mark.parametrize(
    "flags, line",
    [
        (
            ["--num_processes=2"],
            "error: --num_processes=2 needs --coordinator_address=HOST:PORT",
        ),
        (
            ["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=2"],
            "error: --process_id=2 is not allowed; must be in 0 .. 1 (--num_processes=2)",
        ),
        (
            ["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"],
            "error: --coordinator_address='localhost' is not allowed; must be HOST:PORT",
        ),
    ],
)
def test_bad_distributed_flags_are_one_line(tmp_path, flags, line):
    result = one_process(tmp_path / "run", *flags, devices=1)
    assert result.returncode == 2
    assert len(error_lines(result.stderr)) == 1
    assert error_lines(result.stderr)[0].startswith(line)
    assert not (tmp_path / "run").exists()


def test_local_launcher_refuses_bad_counts_in_one_line(tmp_path):
    result = local_multiprocess(tmp_path / "run", processes=0)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "error: NUM_PROCESSES=0 is not allowed; must be an integer >= 1"
    ]


def test_a_workdir_in_use_stops_every_process_in_one_line(tmp_path):
    """Process 0 alone takes the workdir's lock; when another run holds it, process 1 stops
    too, naming process 0's reason, before anything is built."""
    import fcntl

    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(workdir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = local_multiprocess(workdir)
    said = result.stderr[-3000:]
    assert result.returncode == 2, said
    reason = f"workdir {workdir} is in use by another run"
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith(f"error: {reason}")], said
    assert [line for line in lines if line.startswith(f"[process 1] error: process 0: {reason}")], (
        said
    )
    assert lines[-1].startswith("error: process ") and "nothing was written" in lines[-1], said
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]


def test_host_strategy_is_refused_with_two_processes(tmp_path):
    result = local_multiprocess(tmp_path / "run", "--config.algorithm.strategy=host")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert lines[0].startswith(
        "error: algorithm.strategy='host' is not allowed with 2 processes"
    ), result.stderr[-2000:]
    assert not (tmp_path / "run").exists()
