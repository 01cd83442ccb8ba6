"""One writer per workdir, verified checkpoints with fallback, workdir faults, damaged workdir
files, and errors that stay the last line: each said in one line that names the path."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from fedjax_cv import train as train_module
from fedjax_cv.train import train_and_evaluate
from fedjax_cv.validation import ConfigError
from fedjax_cv.workdir import WorkdirError, WorkdirLock
from tests.configs_loader import load_config, override
from tests.test_train import read_metrics, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def said(capsys) -> list[str]:
    """The lines a run wrote to stderr, less the progress bar."""
    text = capsys.readouterr().err.replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("rounds")]


# launch/train.py run under a file-size limit (RLIMIT_FSIZE), set in the child itself: a write
# past it fails with EFBIG, as one on a full disk fails with ENOSPC.
UNDER_LIMIT = (
    "import resource, runpy, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)); "
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def launch(workdir, *overrides, config="configs/shapes_fedavg.py:runlocal", file_limit=None):
    """launch/train.py with the logistic model on a small runlocal; a Popen."""
    limit = [] if file_limit is None else ["-c", UNDER_LIMIT, str(file_limit)]
    command = [
        sys.executable,
        *limit,
        "launch/train.py",
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.model.name=logistic",
        "--config.data.num_train_examples=400",
        *overrides,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def error_lines(stderr: str) -> list[str]:
    """stderr split into the lines a console shows (the bar redraws with carriage returns)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- one writer


def test_two_concurrent_launches_one_finishes_the_other_is_refused(tmp_path):
    workdir = tmp_path / "run"
    rounds = ["--config.num_rounds=8", "--config.checkpoint.every_rounds=2"]
    processes = [launch(workdir, *rounds) for _ in range(2)]
    results = [(p, *p.communicate(timeout=300)) for p in processes]
    finished = [r for r in results if r[0].returncode == 0]
    refused = [r for r in results if r[0].returncode == 2]
    assert len(finished) == 1 and len(refused) == 1, [
        (r[0].returncode, r[2][-500:]) for r in results
    ]
    winner = finished[0][0].pid
    assert error_lines(refused[0][2]) == [
        f"error: workdir {workdir} is in use by another run (process {winner} holds "
        f"{workdir}/.lock); wait for it to end or stop it, or use another workdir"
    ]
    records = read_metrics(workdir)
    assert [r["round"] for r in records] == list(range(1, 9))  # each round once
    config = override(
        load_config("configs/shapes_fedavg.py:runlocal"),
        {
            "model.name": "logistic",
            "data.num_train_examples": 400,
            "num_rounds": 8,
            "checkpoint.every_rounds": 2,
        },
    )
    alone = train_and_evaluate(config, str(tmp_path / "alone"))
    assert records[-1]["params_sha256"] == alone["params_sha256"]


def test_a_held_workdir_is_refused_before_the_run_is_built(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.setattr(train_module, "build_experiment", _must_not_build)
    with WorkdirLock(workdir) as lock:
        lock.acquire()
        with pytest.raises(WorkdirError) as error:
            train_and_evaluate(tiny_config(), str(workdir))
    assert str(error.value) == (
        f"workdir {workdir} is in use by another run (process {os.getpid()} holds "
        f"{workdir}/.lock); wait for it to end or stop it, or use another workdir"
    )


def test_a_killed_holder_does_not_block_the_next_run(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fedjax_cv.workdir import WorkdirLock; "
            "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
            str(workdir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirError, match=f"process {holder.pid} holds"):
        WorkdirLock(workdir).acquire()
    holder.kill()
    holder.wait()
    with WorkdirLock(workdir) as lock:
        lock.acquire()
        assert lock.held


def _must_not_build(config):
    raise AssertionError("the experiment was built before the workdir was checked")


# ------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-round run, and a 4-round run (checkpoints 2 and 4) to resume to 6."""
    root = tmp_path_factory.mktemp("runs")
    reference = train_and_evaluate(tiny_config(num_rounds=6), str(root / "reference"))
    train_and_evaluate(tiny_config(num_rounds=4), str(root / "four"))
    return root, reference["params_sha256"]


def copy_of(runs, name: str, tmp_path) -> pathlib.Path:
    workdir = tmp_path / name
    shutil.copytree(runs[0] / name, workdir)
    return workdir


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(step):
    path = _largest_file(step)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return f"its file {path.relative_to(step)} differs from the SHA-256 saved with it"


def zero_bytes(step):
    path = _largest_file(step)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return f"its file {path.relative_to(step)} differs from the SHA-256 saved with it"


def delete_manifest(step):
    for path in step.rglob("manifest.ocdbt"):
        path.unlink()
    return "its file default/manifest.ocdbt is missing"


def delete_metadata(step):
    for path in step.rglob("*METADATA*"):
        path.unlink()
    return "its file _CHECKPOINT_METADATA is missing"


def empty_folder(step):
    shutil.rmtree(step)
    step.mkdir()
    return "its folder is empty"


def replace_arrays(step):
    """Checkpoint 2's arrays under checkpoint 4's metadata, without the file digests: orbax
    restores them without complaint; only the state digest sees it."""
    (step / "fedjax_cv_files.json").unlink(missing_ok=True)  # checkpointing.FILES_RECORD
    shutil.rmtree(step / "default")
    shutil.copytree(step.parent / "2" / "default", step / "default")
    return "its arrays differ from the SHA-256 saved with them"


@pytest.mark.parametrize(
    "damage",
    [truncate, zero_bytes, delete_manifest, delete_metadata, empty_folder, replace_arrays],
)
def test_a_damaged_newest_checkpoint_falls_back_one_step(tmp_path, runs, capsys, damage):
    workdir = copy_of(runs, "four", tmp_path)
    why = damage(workdir / "checkpoints" / "4")
    capsys.readouterr()
    record = train_and_evaluate(tiny_config(num_rounds=6), str(workdir))
    assert said(capsys) == [
        f"skipped checkpoint 4 of {workdir}: {why}; moved it to {workdir}/checkpoints_set_aside/4"
    ]
    assert record["params_sha256"] == runs[1]
    assert [r["round"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]
    assert (workdir / "checkpoints_set_aside" / "4").is_dir()  # kept, not deleted


def test_resume_step_goes_back_to_an_earlier_checkpoint(tmp_path, runs, capsys):
    workdir = copy_of(runs, "four", tmp_path)
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(tiny_config(num_rounds=6), str(workdir), resume_step=3)
    assert str(error.value) == (
        f"resume_step=3: {workdir}/checkpoints holds no checkpoint of round 3; kept: 2, 4 "
        "(0 starts over)"
    )
    capsys.readouterr()
    record = train_and_evaluate(tiny_config(num_rounds=6), str(workdir), resume_step=2)
    assert said(capsys) == [
        f"set aside checkpoint 4 (after resume_step=2) in {workdir}/checkpoints_set_aside/4"
    ]
    assert record["params_sha256"] == runs[1]
    assert [r["round"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]


def test_launcher_resume_step_flag_is_documented():
    result = subprocess.run(
        [sys.executable, "launch/train.py", "--helpfull"], cwd=ROOT, capture_output=True, text=True
    )
    assert "--resume_step" in result.stdout
    readme = (ROOT / "README.md").read_text()
    assert "--resume_step" in readme


# ------------------------------------------------------------------------ workdir faults


def _workdir_faults(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    with_checkpoints_file = tmp_path / "ckpt_file"
    with_checkpoints_file.mkdir()
    (with_checkpoints_file / "checkpoints").write_text("")
    with_metrics_folder = tmp_path / "metrics_folder"
    (with_metrics_folder / "metrics.jsonl").mkdir(parents=True)
    return [
        (a_file, f"workdir {a_file} is a file, not a folder"),
        (a_file / "run", f"workdir {a_file}/run lies under {a_file}, which is a file"),
        (
            with_checkpoints_file,
            f"workdir {with_checkpoints_file}: {with_checkpoints_file}/checkpoints is a file, "
            "but the run needs a folder there",
        ),
        (
            with_metrics_folder,
            f"workdir {with_metrics_folder}: {with_metrics_folder}/metrics.jsonl is a folder, "
            "but the run writes a file there",
        ),
    ]


def test_workdir_faults_are_one_line_within_3_s_and_nothing_is_written(tmp_path):
    for workdir, message in _workdir_faults(tmp_path):
        before = sorted(tmp_path.rglob("*"))
        started = time.perf_counter()
        process = launch(workdir)
        first = process.stderr.readline()
        elapsed = time.perf_counter() - started
        _, rest = process.communicate(timeout=60)
        assert process.returncode == 2
        assert error_lines(first + rest) == [f"error: {message}"]
        assert elapsed < 3.0, (workdir, elapsed)
        assert sorted(tmp_path.rglob("*")) == before


def test_workdir_faults_in_process_come_before_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "build_experiment", _must_not_build)
    for workdir, message in _workdir_faults(tmp_path):
        with pytest.raises(WorkdirError) as error:
            train_and_evaluate(tiny_config(), str(workdir))
        assert str(error.value) == message


def _read_only_command(folder: pathlib.Path) -> list[str] | None:
    """A prefix that runs a command with `folder` read-only: as a non-root user a chmod does
    (the caller's), as root a read-only bind mount in a private mount namespace, if allowed."""
    if os.geteuid() != 0:
        for path in [*folder.iterdir(), folder]:
            path.chmod(0o555)
        return []
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder}"], capture_output=True
    )
    if probe.returncode != 0:
        return None
    remount = f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec "$@"'
    return ["unshare", "-m", "sh", "-c", remount, "sh"]


def test_a_read_only_workdir_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    (folder / "existing").mkdir(parents=True)
    prefix = _read_only_command(folder)
    if prefix is None:
        pytest.skip("root without a private mount namespace: no honest read-only folder")
    try:
        for workdir, where in [
            (folder / "existing", f"workdir {folder}/existing "),
            (folder / "new", f"workdir {folder}/new cannot be made: {folder} "),
        ]:
            result = subprocess.run(
                [
                    *prefix,
                    sys.executable,
                    "launch/train.py",
                    "--config=configs/shapes_fedavg.py:runlocal",
                    f"--workdir={workdir}",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 2, result.stderr
            cause = "is on a read-only file system" if os.geteuid() == 0 else "is not writable"
            [line] = error_lines(result.stderr)
            assert line.startswith(f"error: {where}{cause}"), line
    finally:
        for path in [folder, *folder.iterdir()]:
            path.chmod(0o755)


def test_a_failed_save_is_one_line_and_metrics_claim_no_digest(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, as a full disk) that the 64x64 logistic model's
    checkpoint passes but nothing before it does: the final save fails."""
    workdir = tmp_path / "run"
    process = launch(
        workdir,
        "--config.num_rounds=2",
        "--config.checkpoint.every_rounds=10",
        "--config.data.image_size=64",
        "--config.data.num_test_examples=40",
        file_limit=160_000,
    )
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert error_lines(stderr)[-1] == (
        f"error: cannot save checkpoint 2 in {workdir}/checkpoints: [Errno 27] File too large"
    )
    assert sum(line.startswith("error") for line in error_lines(stderr)) == 1
    assert "Traceback" not in stderr
    assert not [p for p in (workdir / "checkpoints").iterdir()]  # no step, no tmp folder
    assert not any("params_sha256" in r for r in read_metrics(workdir))


# ---------------------------------------------------------------- damaged workdir files


def test_invalid_utf8_in_metrics_finished_run_changes_nothing(tmp_path, runs, capsys):
    workdir = copy_of(runs, "reference", tmp_path)
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join(lines[:2] + [b"\xff\xfe garbage\n"] + lines[2:]))
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    capsys.readouterr()
    record = train_and_evaluate(tiny_config(num_rounds=6), str(workdir))
    assert record["params_sha256"] == runs[1]
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == before
    assert said(capsys) == [f"{metrics}: left alone line 3, not a JSON object with a round"]


def test_invalid_utf8_in_metrics_resume_drops_that_line(tmp_path, runs, capsys):
    workdir = copy_of(runs, "four", tmp_path)
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join(lines[:1] + [b'{"round": \xff}\n'] + lines[1:]))
    capsys.readouterr()
    record = train_and_evaluate(tiny_config(num_rounds=6), str(workdir))
    assert record["params_sha256"] == runs[1]
    assert said(capsys) == [f"{metrics}: dropped line 2, not a JSON object with a round"]
    assert [r["round"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]


def test_a_garbage_config_json_is_named(tmp_path, runs):
    workdir = copy_of(runs, "four", tmp_path)
    (workdir / "config.json").write_bytes(b"\x00\x00garbage")
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(tiny_config(num_rounds=6), str(workdir))
    assert str(error.value).startswith(
        f"cannot resume in {workdir}: {workdir}/config.json is not valid JSON ("
    )
    assert "\n" not in str(error.value)


def test_a_deleted_config_json_cannot_mix_two_configs(tmp_path, runs):
    workdir = copy_of(runs, "four", tmp_path)
    (workdir / "config.json").unlink()
    other = tiny_config(num_rounds=6, **{"algorithm.client.learning_rate": 0.5})
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(other, str(workdir))
    assert str(error.value) == (
        f"cannot resume in {workdir}: algorithm.client.learning_rate=0.5 differs from 0.05 in "
        "the config checkpoint 4 was made with; use the same config, another workdir, or "
        "--config.checkpoint.allow_config_change=True"
    )
    assert not (workdir / "config.json").exists()
    record = train_and_evaluate(tiny_config(num_rounds=6), str(workdir))
    assert record["params_sha256"] == runs[1]
    assert json.loads((workdir / "config.json").read_text())["num_rounds"] == 6


# ------------------------------------------------------------------ the last line is the error


def test_a_training_error_is_the_last_line_on_the_console(tmp_path):
    workdir = tmp_path / "run"
    process = launch(workdir, "--config.algorithm.server.learning_rate=1e300")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert error_lines(stderr)[-1] == (
        "error: round 1: the server params became non-finite; stopped with no checkpoint yet"
    )


SHIPPED_CONFIGS = sorted(pathlib.Path(__file__).resolve().parents[1].glob("configs/*.py"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_refuses_a_misspelled_argument_in_one_line(path):
    """Issue 11 item 5: `:runlcal` used to run the full experiment silently."""
    from fedjax_cv.config_base import load_config as load_file

    with pytest.raises(ValueError, match=r"config argument 'runlcal' is unknown; known: ") as error:
        load_file(path, "runlcal")
    assert "\n" not in str(error.value)


# ------------------------------------------- config files, arguments and values (items 5, 6, 9)


def run_launcher(*args, script="launch/train.py"):
    """A launch that fails before any run: (exit status, the console's non-empty lines)."""
    command = [sys.executable, *(["-m", script] if "/" not in script else [script]), *args]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, error_lines(result.stdout + result.stderr)


def test_config_file_faults_and_stray_arguments_are_one_line(tmp_path):
    """Issue 11 item 5: a missing config file or one with a syntax error printed a long
    traceback, a stray positional argument ten lines of usage."""
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None:\n    return None\n")
    workdir = f"--workdir={tmp_path / 'run'}"
    cases = [
        (["--config=configs/nope.py"], "error: config file configs/nope.py does not exist"),
        (
            [f"--config={broken}"],
            f"error: config file {broken} has a syntax error at line 1 (invalid syntax): "
            "'def get_config(arg=None:'",
        ),
        (
            ["--config=configs/shapes_fedavg.py:runlocal", "stray"],
            "error: unexpected argument 'stray'; train.py takes only flags (--name=value; see "
            "--help)",
        ),
        (
            ["--config=configs/shapes_fedavg.py:runlocal", "--config.num_roundz=3"],
            "error: --config.num_roundz: unknown config key 'num_roundz'; did you mean "
            "'num_rounds'?",
        ),
    ]
    for args, line in cases:
        assert run_launcher(*args, workdir) == (2, [line])
    assert not (tmp_path / "run").exists()


def test_config_file_errors_in_process_name_the_file(tmp_path):
    from fedjax_cv.cli import CommandLineError, check_override_keys, load_config_file

    raising = tmp_path / "raising.py"
    raising.write_text("def get_config(arg=None):\n    return {}['width']\n")
    empty = tmp_path / "empty.py"
    empty.write_text("CONFIG = 1\n")
    for spec, message in [
        (f"{raising}:x", f"config file {raising}: get_config('x') raised KeyError: 'width'"),
        (str(empty), f"config file {empty} defines no get_config(arg)"),
        (str(tmp_path), f"config file {tmp_path} is not a file; must be a Python file"),
        (
            "configs/shapes_fedavg.py:runlcal",
            "config file configs/shapes_fedavg.py: config argument 'runlcal' is unknown; "
            "known: runlocal, alpha",
        ),
    ]:
        with pytest.raises(CommandLineError) as error:
            load_config_file(spec)
        assert str(error.value) == message
    config = load_config_file("configs/shapes_fedavg.py")
    check_override_keys(config, ["model.kwargs.width", "data.partition.alpha"])  # open, known
    for key, message in [
        ("data.nme", "--config.data.nme: unknown config key 'nme'; did you mean 'name'?"),
        (
            "seed.x",
            "--config.seed.x: unknown config key 'x'; config key 'seed' is a value, not "
            "a group of keys",
        ),
    ]:
        with pytest.raises(CommandLineError) as error:
            check_override_keys(config, [key])
        assert str(error.value) == message


def _must_not_build_data(*args, **kwargs):
    raise AssertionError("the dataset was built before the config was checked")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.num_classes": 0}, "data.num_classes=0 is not allowed; must be a positive integer"),
        (
            {"data.num_classes": 7},
            "data.num_classes=7 is not allowed for data.name='shapes'; must be in [1, 6] "
            "(circle, square, triangle, cross, diamond, ring)",
        ),
        (
            {"data.num_train_examples": 0},
            "data.num_train_examples=0 is not allowed; must be a positive integer",
        ),
        (
            {"data.num_test_examples": 0},
            "data.num_test_examples=0 is not allowed; must be a positive integer",
        ),
        ({"seed": 2**64}, f"seed={2**64} is not allowed; must be an integer in [0, 2**32)"),
        ({"seed": 2**32}, f"seed={2**32} is not allowed; must be an integer in [0, 2**32)"),
        (
            {"data.partition.name": "natural"},
            "data.partition.name='natural' is not allowed for data.name='shapes': it needs "
            "data.partition.client_ids (one client id per train example), which this config "
            "lacks; must be one of dirichlet, fedcv_detection, iid, lda, lda_multilabel, "
            "lognormal, shards",
        ),
        (
            {"model.name": "resnet18", "model.kwargs.width": 0},
            "model.kwargs.width=0 is not allowed; resnet18.width must be a positive integer",
        ),
        (
            {"model.name": "resnet18", "model.kwargs.width": 8.5},
            "model.kwargs.width=8.5 is not allowed; resnet18.width must be a positive integer",
        ),
        (
            {"model.kwargs.width": 0},
            "model.kwargs.width=0 is not a field of logistic; fields: norm",
        ),
        (
            {"data.poisoned_clients": 7},
            "data.poisoned_clients=7 is not allowed; must be at most data.num_clients=6",
        ),
    ],
)
def test_values_are_checked_before_anything_is_built(tmp_path, monkeypatch, overrides, message):
    """Issue 11 item 6: each of these failed late (`high <= 0`, `need at least one array to
    stack`, OverflowError, TypeError, ZeroDivisionError) or was accepted."""
    monkeypatch.setattr(train_module, "build_dataset", _must_not_build_data)
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"))
    assert str(error.value) == message
    assert not (tmp_path / "run").exists()


def test_model_kwargs_are_settable_from_the_command_line(tmp_path):
    """Issue 11 item 9: `--config.model.kwargs.<field>` was refused (`error: "'width'"`);
    now set, and checked against the model's typed fields."""
    config = ["--config=configs/shapes_fedavg.py:runlocal", "--config.model.name=resnet18"]
    assert run_launcher(*config, "--config.model.kwargs.width=0", f"--workdir={tmp_path}/a") == (
        2,
        ["error: model.kwargs.width=0 is not allowed; resnet18.width must be a positive integer"],
    )
    assert run_launcher(*config, "--config.model.kwargs.widht=8", f"--workdir={tmp_path}/b") == (
        2,
        [
            "error: model.kwargs.widht=8 is not a field of resnet18; fields: block, "
            "feature_strides, norm, output_stride, return_features, stage_sizes, width"
        ],
    )
    assert not list(tmp_path.iterdir())
    workdir = tmp_path / "run"
    process = launch(workdir, "--config.num_rounds=1", "--config.model.kwargs.norm=layer")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert json.loads((workdir / "config.json").read_text())["model"]["kwargs"] == {"norm": "layer"}


def test_inspect_faults_are_one_line_before_the_dataset(tmp_path, monkeypatch):
    """Issue 11 item 6: `python -m fedjax_cv.data.inspect` with an unknown key or an --out
    that is a file printed tracebacks."""
    from fedjax_cv.data import inspect as inspect_module

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    monkeypatch.setattr(inspect_module, "build_dataset", _must_not_build_data)
    for out, message in [
        (a_file, f"--out={a_file} is a file; must be a folder (or a path to make one)"),
        (a_file / "out", f"--out={a_file}/out lies under {a_file}, which is a file"),
    ]:
        with pytest.raises(ValueError) as error:
            inspect_module.inspect_partition(tiny_config(), out)
        assert str(error.value) == message
    config = "--config=configs/shapes_fedavg.py:runlocal"
    assert run_launcher(
        config, f"--out={tmp_path}/out", "--config.data.nme=x", script="fedjax_cv.data.inspect"
    ) == (2, ["error: --config.data.nme: unknown config key 'nme'; did you mean 'name'?"])
    assert run_launcher(config, f"--out={a_file}", script="fedjax_cv.data.inspect") == (
        2,
        [f"error: --out={a_file} is a file; must be a folder (or a path to make one)"],
    )
    assert sorted(tmp_path.iterdir()) == [a_file]


def test_a_metrics_line_cut_short_is_written_again(tmp_path, runs, capsys):
    """Issue 11 item 9: a crash that keeps checkpoint 4 but cuts its metrics line short lost
    round 4's line for good (the resume started after it)."""
    workdir = copy_of(runs, "four", tmp_path)
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    assert json.loads(lines[-1])["round"] == 4
    metrics.write_bytes(b"".join(lines[:-1]) + lines[-1][:30])
    capsys.readouterr()
    record = train_and_evaluate(tiny_config(num_rounds=6), str(workdir))
    assert said(capsys) == [
        f"{metrics}: its last line is cut short after round 3; resuming from checkpoint 2",
        f"set aside checkpoint 4 (after resume_step=2) in {workdir}/checkpoints_set_aside/4",
    ]
    assert record["params_sha256"] == runs[1]
    assert [r["round"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------- data faults (item 7)


def _image_folder(root: pathlib.Path, odd: tuple[str, str, int] | None = None) -> None:
    """`<root>/<split>/<class>/<i>.png`, 8x8 RGB, the `odd` one 9x8."""
    from PIL import Image

    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                shape = (9, 8, 3) if (split, name, i) == odd else (8, 8, 3)
                Image.fromarray(np.full(shape, 40 * i, np.uint8)).save(
                    root / split / name / f"{i}.png"
                )


def _folder_config(root, cache):
    return override(
        tiny_config(),
        {
            "data.name": "image_folder",
            "data.root": str(root),
            "data.cache_dir": str(cache),
            "data.num_clients": 2,
            "algorithm.clients_per_round": 2,
            "data.partition.name": "iid",
        },
    )


def test_an_image_of_another_shape_is_named_and_nothing_is_cached(tmp_path):
    from fedjax_cv.data.registry import build_dataset

    cache = tmp_path / "cache"
    for odd, like in [(("train", "b", 1), "the others"), (("test", "a", 2), "the train images")]:
        root = tmp_path / odd[0]
        _image_folder(root, odd)
        with pytest.raises(ValueError) as error:
            build_dataset(_folder_config(root, cache).data, 0)
        assert str(error.value) == (
            f"{root}/{odd[0]}/{odd[1]}/{odd[2]}.png: image is 9x8x3 (HxWxC), {like} are 8x8x3 "
            "(1 of 6 images differ); every image must have one shape"
        )
        assert not cache.exists()  # not even the train split's entry of the second case
    archive = tmp_path / "odd.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "train", arcname="top")
    with pytest.raises(ValueError) as error:
        build_dataset(_folder_config(archive, cache).data, 0)
    assert str(error.value).startswith(f"{archive}:top/train/b/1.png: image is 9x8x3 (HxWxC)")
    assert not cache.exists()


def test_a_truncated_archive_is_named_with_its_member_and_nothing_is_cached(tmp_path):
    """Issue 11 item 7: a truncated .tar.gz raised a bare EOFError."""
    from fedjax_cv.data.registry import build_dataset

    _image_folder(tmp_path / "folder")
    cache = tmp_path / "cache"
    for suffix in ("tar", "tar.gz"):
        whole = tmp_path / f"whole.{suffix}"
        with tarfile.open(whole, "w:gz" if suffix == "tar.gz" else "w") as tar:
            for path in sorted((tmp_path / "folder").rglob("*.png")):  # a known member order
                tar.add(path, arcname=f"top/{path.relative_to(tmp_path / 'folder')}")
        with tarfile.open(whole) as tar:
            last_data = tar.getmembers()[-1].offset_data
        data = whole.read_bytes()
        archive = tmp_path / f"cut.{suffix}"
        cut, where, why = {
            "tar": (last_data + 10, "in member top/train/b/2.png", "unexpected end of data"),
            "tar.gz": (
                20,
                "at its start",
                "Compressed file ended before the end-of-stream marker was reached",
            ),
        }[suffix]
        archive.write_bytes(data[:cut])
        with pytest.raises(ValueError) as error:
            build_dataset(_folder_config(archive, cache).data, 0)
        assert str(error.value) == (
            f"{archive}: the archive is cut short or damaged {where} ({why}); must be a "
            "complete .tar or .tar.gz"
        )
        assert not cache.exists()
    archive.write_bytes(data[: len(data) // 2])  # the .tar.gz cut in its middle
    with pytest.raises(ValueError, match=f"^{archive}: the archive is cut short or damaged "):
        build_dataset(_folder_config(archive, cache).data, 0)
    assert not cache.exists()
