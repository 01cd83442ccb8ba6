"""Issue 13: one run as several processes on one global mesh (jax.distributed, gloo on CPU).

The main job's config (`configs/shapes_fedavg.py:runlocal`, with the logistic model and three
rounds so that a run takes seconds) runs as 2 processes of 4 CPU devices and as 1 process of
8: the same global mesh, so the final params agree up to the order of the cross-process sum.
Every run compiles with XLA's fast settings (as tests/xla.py), the same for both paths.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
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


def test_killed_process_ends_the_other_and_the_same_command_resumes(runs, tmp_path):
    """Process 1 dies (SIGKILL, the test-only fault seam) while round 2 is being saved:
    process 0 ends non-zero within 60 s, and relaunching finishes with the digest of the
    uninterrupted run."""
    root, _ = runs
    workdir = tmp_path / "killed"
    port = free_port()
    processes = []
    for index in range(2):
        env = cpu_env(4)
        if index == 1:
            env["FEDJAX_CV_FAULT_KILL_DURING_SAVE"] = "2"
        processes.append(
            subprocess.Popen(
                [sys.executable, "launch/train.py", *JOB, f"--workdir={workdir}"]
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
    assert (workdir / "checkpoints" / "1").is_dir()
    resumed = local_multiprocess(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = metrics(workdir)
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert lines[-1]["params_sha256"] == metrics(root / "two")[-1]["params_sha256"]


def test_two_process_fedbn_equals_one_process(tmp_path):
    """FedBN's clients keep their BatchNorm layers across rounds (the state's client_local):
    2 processes x 4 devices end with the state of 1 process x 8, client-local values too."""
    job = (
        "--config=configs/shapes_fedavg.py:runlocal",
        "--config.num_rounds=2",
        "--config.eval_every_rounds=2",
        "--config.algorithm.name=fedbn",
        "--config.model.name=cnn_hsu",
        "--config.model.norm=batch",
        "--config.model.kwargs.conv_features=4",
        "--config.algorithm.strategy=sequential",  # 'auto' is 'host' with one process
    )
    single = one_process(tmp_path / "one", job=job)
    assert single.returncode == 0, single.stderr[-3000:]
    double = local_multiprocess(tmp_path / "two", job=job)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = final_state(tmp_path / "one", None), final_state(tmp_path / "two", None)
    local_one = final_state(tmp_path / "one", "client_local")
    assert local_one and np.any(np.concatenate([a.ravel() for a in local_one]) != 0)
    assert relative_difference(one, two) <= 1e-6
    assert relative_difference(local_one, final_state(tmp_path / "two", "client_local")) <= 1e-6


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
