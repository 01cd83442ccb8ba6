"""Checkpoints that resume exactly, and the checks that refuse a mismatched resume.

The whole run state is the server state (params, optimizer state, model state, round): the
root key derives from the seed and every cohort from (seed, round), so a restored round
number puts the samplers and the input pipeline back where they were. orbax writes each
checkpoint to a temporary folder and renames it when complete; an unfinished one is ignored
and removed by the next run.

Each checkpoint carries a record in orbax's step metadata (`custom_metadata`, written with the
step): the SHA-256 of the whole state and the fingerprint of the config that made it. A restore
is verified against it (`restore_verified`): orbax reads it, the tree matches, every value is
finite and the digest is equal; a checkpoint that fails any check is `Damaged`, and the run
moves it to `checkpoints_set_aside/` and falls back to the one before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from fedjax_cv.engine import hosts
from fedjax_cv.tree_names import key_name

# Keys that may change between a run and its resumption: they steer the loop, not the math.
_FREE_KEYS = ("num_rounds", "eval_every_rounds", "log_every_rounds", "checkpoint.", "eval.")
_FREE_KEYS += ("data.root",)


def flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, object]:
    """{'algorithm.client.learning_rate': 0.05, ...}."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict | ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(config.to_dict() if hasattr(config, "to_dict") else config, "")
    return out


def fingerprint(config) -> dict[str, object]:
    """The config keys that define the run's math (all but loop and checkpoint settings)."""
    return {
        key: value
        for key, value in flat_config(config).items()
        if not key.startswith(_FREE_KEYS) and key not in _FREE_KEYS
    }


def config_difference(saved: dict, current: dict) -> str | None:
    """The first key whose value differs, as a sentence, or None."""
    return fingerprint_difference(
        fingerprint(saved), fingerprint(current), "the workdir's config.json"
    )


def fingerprint_difference(saved_fp: dict, current_fp: dict, where: str) -> str | None:
    """The first key whose value differs between two fingerprints, as a sentence, or None."""
    for key in sorted(set(saved_fp) | set(current_fp)):
        old, new = saved_fp.get(key, "<absent>"), current_fp.get(key, "<absent>")
        if _normal(old) != _normal(new):
            return f"{key}={new!r} differs from {old!r} in {where}"
    return None


def _normal(value):
    if isinstance(value, tuple | list):
        return [_normal(v) for v in value]
    return value


def _leaf_specs(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {key_name(p, sep="."): _spec(x.shape, x.dtype) for p, x in flat}


def _spec(shape, dtype) -> str:
    return f"{np.dtype(dtype).name}{tuple(shape)}"


# The state's client-local store: one row per client, padded to a multiple of the run's
# devices (`fedjax_cv.engine.store`), so a run on other devices may hold other padding rows.
STORE = "client_local"


def _saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple]:
    metadata = manager.item_metadata(step)
    return {
        m.name: (tuple(m.shape), m.dtype) for m in jax.tree.leaves(metadata) if hasattr(m, "shape")
    }


def _only_padding_differs(name: str, saved_shape: tuple, current_shape: tuple) -> bool:
    """Whether a leaf of the store differs only in its number of rows: padded for other
    devices (the rows past the clients belong to no client; see `restore_verified`)."""
    return (
        name.startswith(STORE + ".")
        and len(saved_shape) == len(current_shape) >= 1
        and saved_shape[1:] == current_shape[1:]
    )


def state_difference(manager: ocp.CheckpointManager, step: int, state) -> str | None:
    """The first leaf whose name, shape or dtype differs between checkpoint and state (the
    store's leaves may differ in their padding rows)."""
    shapes = _saved_shapes(manager, step)
    saved = {name: _spec(*shape_dtype) for name, shape_dtype in shapes.items()}
    current = _leaf_specs(state)
    current_shapes = {
        key_name(path, sep="."): tuple(np.shape(x))
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    for name in sorted(set(saved) | set(current)):
        if name not in saved:
            return f"state leaf {name} {current[name]} is not in checkpoint {step}"
        if name not in current:
            return f"checkpoint {step} holds {name} {saved[name]}, which this run does not have"
        if saved[name] != current[name]:
            same_dtype = saved[name].split("(")[0] == current[name].split("(")[0]
            if same_dtype and _only_padding_differs(name, shapes[name][0], current_shapes[name]):
                continue
            return (
                f"state leaf {name} is {current[name]} here but {saved[name]} in checkpoint {step}"
            )
    return None


def manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    """The workdir's orbax CheckpointManager (creates `checkpoints/`)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    with _quiet_orbax():  # its warnings about a damaged step: restore_verified says why, once
        return ocp.CheckpointManager(
            workdir / "checkpoints", options=options, item_handlers=ocp.StandardCheckpointHandler()
        )


def steps(workdir: pathlib.Path) -> list[int]:
    """The rounds of the finished (renamed) checkpoint folders, oldest first; creates nothing."""
    root = workdir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def latest_step(workdir: pathlib.Path) -> int | None:
    """The newest finished checkpoint's round, without creating anything."""
    found = steps(workdir)
    return found[-1] if found else None


TMP_MARK = ".orbax-checkpoint-tmp"


def remove_unfinished(workdir: pathlib.Path) -> None:
    """Removes the temporary folders of saves that never finished (a kill, a failed write)."""
    root = workdir / "checkpoints"
    if root.is_dir():
        for path in root.iterdir():
            if TMP_MARK in path.name:
                shutil.rmtree(path, ignore_errors=True)


def read_saved_config(workdir: pathlib.Path) -> dict | None:
    """The workdir's config.json (None when absent); ValueError naming the file when it is not
    a JSON object."""
    path = workdir / "config.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({_first_line(error)})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not valid JSON (holds a {type(saved).__name__}, not a config)")
    return saved


class Damaged(Exception):
    """A checkpoint that does not hold what was saved; the message says why."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved (one line naming the step, the folder and the cause)."""


def _host_leaves(state):
    """(path, shape, dtype, blocks of its values on this host) for every leaf of `state`.
    An array split over processes (the client-local store) comes block by block from all of
    them (`hosts.host_blocks`; every process must call this together), any other at once."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    whole = jax.device_get([None if hosts.is_split(leaf) else leaf for _, leaf in flat])
    for (path, leaf), value in zip(flat, whole, strict=True):
        if hosts.is_split(leaf):
            yield path, leaf.shape, leaf.dtype, hosts.host_blocks(leaf)
        else:
            array = np.ascontiguousarray(value)
            yield path, array.shape, array.dtype, iter([array])


def state_sha256(state) -> str:
    """SHA-256 of every leaf of `state` (names, dtypes, shapes and bytes, in tree order): the
    same however the state is split over devices and processes."""
    digest = hashlib.sha256()
    for path, shape, dtype, blocks in _host_leaves(state):
        digest.update(f"{key_name(path, sep='.')}:{_spec(shape, dtype)}".encode())
        for block in blocks:
            digest.update(np.ascontiguousarray(block).tobytes())
    return digest.hexdigest()


def _json_fingerprint(config) -> dict:
    """`fingerprint(config)` through JSON, as a checkpoint's record reads it back."""
    return json.loads(json.dumps(fingerprint(config), default=str))


def record(state, config) -> dict:
    """What a checkpoint carries beside its arrays: the state's digest and the config's
    fingerprint."""
    return {"fedjax_cv": {"state_sha256": state_sha256(state), "config": _json_fingerprint(config)}}


def _orbax_leftover(unraisable) -> bool:
    """An exception of orbax's asyncio work stranded by a failed read or write: a tensorstore
    callback meeting the closed event loop, or an orbax coroutine that failed unawaited."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == (
        "Event loop is closed"
    ):
        return True
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


_previous_unraisablehook = sys.unraisablehook


def _drop_orbax_leftovers(unraisable) -> None:
    if not _orbax_leftover(unraisable):
        _previous_unraisablehook(unraisable)


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs a failed save with tracebacks from its threads, and its stranded asyncio
    work prints more later (sys.unraisablehook); the caller says what failed in one line
    instead."""
    global _previous_unraisablehook
    if sys.unraisablehook is not _drop_orbax_leftovers:  # installed once, for the process
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _drop_orbax_leftovers
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state,
    config,
    *,
    in_flight: Callable[[], None] | None = None,
) -> None:
    """Saves checkpoint `step` with its record and waits until it is finished; on failure
    removes the unfinished folder and raises CheckpointError."""
    root = pathlib.Path(manager.directory)
    try:
        with _quiet_orbax():
            manager.save(
                step, args=ocp.args.StandardSave(state), custom_metadata=record(state, config)
            )
            if in_flight is not None:
                in_flight()
            manager.wait_until_finished()
        # orbax has every process write its shards and process 0 finish the folder; the
        # files' digests are process 0's too.
        if (root / str(step)).is_dir() and jax.process_index() == 0:
            _write_file_digests(root / str(step))
    except Exception as error:  # any failure of a save is said in one line
        if jax.process_index() == 0:
            remove_unfinished(root.parent)
            if (root / str(step)).exists():  # renamed, but not all of it written
                set_aside(root.parent, step)
        raise CheckpointError(
            f"cannot save checkpoint {step} in {root}: {_root_cause(error)}"
        ) from error
    if not (root / str(step)).is_dir():  # orbax skips a step it considers already saved
        raise CheckpointError(f"cannot save checkpoint {step} in {root}: orbax did not write it")


FILES_RECORD = "fedjax_cv_files.json"


def _file_digests(folder: pathlib.Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != FILES_RECORD
    }


def _write_file_digests(folder: pathlib.Path) -> None:
    """The SHA-256 of every file of a finished checkpoint, beside them: a damaged file is then
    found before orbax reads it. (A kill before it is written leaves a checkpoint that the
    state digest in its metadata still verifies.)"""
    temporary = folder / (FILES_RECORD + ".tmp")
    temporary.write_text(json.dumps(_file_digests(folder), indent=0) + "\n")
    temporary.replace(folder / FILES_RECORD)


def _check_files(folder: pathlib.Path) -> None:
    """Damaged when a file of the checkpoint is missing or differs from its saved SHA-256."""
    record_path = folder / FILES_RECORD
    if not record_path.exists():
        return
    try:
        saved = json.loads(record_path.read_bytes())
        assert isinstance(saved, dict)
    except (ValueError, AssertionError):
        raise Damaged(f"its {FILES_RECORD} is not valid JSON") from None
    for name, digest in saved.items():
        path = folder / name
        if not path.is_file():
            raise Damaged(f"its file {name} is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise Damaged(f"its file {name} differs from the SHA-256 saved with it")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def _brief(error: BaseException) -> str:
    """The innermost message of an exception chain, without tensorstore's spec dump."""
    text = _first_line(_chain(error)[-1])
    for cut in (" [tensorstore_spec", " See full TensorStore details"):
        text = text.split(cut)[0]
    return text[:200]


def _chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _root_cause(error: BaseException) -> str:
    """The file system's word on an exception chain: its innermost OSError, or the OS error
    that a tensorstore message quotes, else the innermost message."""
    chain = _chain(error)
    for item in reversed(chain):
        if isinstance(item, OSError) and item.strerror:
            where = f": {item.filename}" if item.filename else ""
            return f"[Errno {item.errno}] {item.strerror}{where}"
    for item in reversed(chain):
        quoted = re.search(r"os_error_code='?(\d+)|OS error (\d+)", str(item))
        if quoted:
            code = int(quoted.group(1) or quoted.group(2))
            return f"[Errno {code}] {os.strerror(code)}"
    return _brief(error)


def set_aside(workdir: pathlib.Path, step: int) -> pathlib.Path:
    """Moves checkpoint `step` out of orbax's sight into `checkpoints_set_aside/` (nothing is
    deleted); returns where it went."""
    target_root = workdir / "checkpoints_set_aside"
    target_root.mkdir(exist_ok=True)
    target, n = target_root / str(step), 1
    while target.exists():
        n += 1
        target = target_root / f"{step}-{n}"
    (workdir / "checkpoints" / str(step)).rename(target)
    return target


def read_record(manager: ocp.CheckpointManager, step: int) -> dict:
    """The record checkpoint `step` carries ({'state_sha256', 'config'}); Damaged when it
    cannot be read or a file of it differs from the SHA-256 saved beside it."""
    folder = pathlib.Path(manager.directory) / str(step)
    if not any(folder.iterdir()):
        raise Damaged("its folder is empty")
    _check_files(folder)
    try:
        with _quiet_orbax():
            saved = manager.metadata(step).custom_metadata or {}
    except Exception as error:  # whatever orbax raises, the step is unreadable
        raise Damaged(f"orbax cannot read its metadata ({_brief(error)})") from None
    ours = saved.get("fedjax_cv")
    if not isinstance(ours, dict) or not {"state_sha256", "config"} <= set(ours):
        missing = not (folder / "_CHECKPOINT_METADATA").exists()
        detail = "_CHECKPOINT_METADATA is missing" if missing else "an older fedjax_cv wrote it"
        raise Damaged(f"it carries no digest of its state ({detail})")
    return ours


def record_difference(saved: dict, step: int, config) -> str | None:
    """The first config key whose value differs from the one checkpoint `step` was made with."""
    return fingerprint_difference(
        saved["config"], _json_fingerprint(config), f"the config checkpoint {step} was made with"
    )


def restore_verified(
    manager: ocp.CheckpointManager, step: int, state, saved: dict
) -> tuple[object, str | None]:
    """Checkpoint `step` restored into `state`'s structure and verified against its record
    `saved` (`read_record`): orbax restores it, every value is finite, the digest is equal.

    Returns (restored state, None), or (None, the first leaf whose name, shape or dtype differs
    from `state`); raises Damaged when the checkpoint does not hold what was saved.
    """
    try:
        item_metadata = manager.item_metadata(step)
    except Exception as error:
        raise Damaged(f"orbax cannot read its array metadata ({_brief(error)})") from None
    if item_metadata is None or not jax.tree.leaves(item_metadata):
        raise Damaged("its array metadata (default/_METADATA) is missing")
    difference = state_difference(manager, step, state)
    if difference:
        return None, difference
    try:
        with _quiet_orbax():
            restored = jax.block_until_ready(restore(manager, step, state))
    except Exception as error:
        raise Damaged(f"orbax cannot restore it ({_brief(error)})") from None
    for path, _, dtype, blocks in _host_leaves(restored):
        finite = [
            np.all(np.isfinite(block)) for block in blocks if np.issubdtype(dtype, np.inexact)
        ]
        if not all(finite):
            raise Damaged(f"its {key_name(path, sep='.')} holds non-finite values")
    if state_sha256(restored) != saved["state_sha256"]:
        raise Damaged("its arrays differ from the SHA-256 saved with them")
    held = getattr(restored, "round", None)
    if held is not None and int(jax.device_get(held)) != step:
        raise Damaged(f"it holds round {int(jax.device_get(held))}, not {step}")
    return _fit_store(restored, state), None


def _fit_store(restored, state):
    """`restored` with each leaf of its store cut or padded to the rows of `state`'s (padded
    for this run's devices) and placed as `state`'s. Rows past the clients belong to no
    client and keep their initial values in every run, so the rows `state` adds are its own
    initial ones, and the rows cut are padding."""
    if STORE not in {field.name for field in dataclasses.fields(state)}:
        return restored

    def fit(saved, target):
        if np.shape(saved) == np.shape(target):
            return saved
        rows = np.shape(target)[0]

        def cut_or_pad(saved, target):
            if saved.shape[0] >= rows:
                return saved[:rows]
            return jnp.concatenate([saved, target[saved.shape[0] :]])

        if not isinstance(target, jax.Array):
            return np.asarray(cut_or_pad(jnp.asarray(saved), jnp.asarray(target)))
        return jax.jit(cut_or_pad, out_shardings=target.sharding)(saved, target)

    return restored.replace(
        **{STORE: jax.tree.map(fit, getattr(restored, STORE), getattr(state, STORE))}
    )


def restore(manager: ocp.CheckpointManager, step: int, state):
    """Checkpoint `step` into `state`'s structure (call `state_difference` first: it compares
    every leaf).

    Only the state's fields present in the checkpoint are read, so a field added to the state
    since, empty in this run (`ServerState.client_local = {}`), leaves older checkpoints
    readable. The store's leaves come with the rows they were saved with (`restore_verified`
    then fits them to `state`'s); those whose rows differ from `state`'s come whole onto
    each device.
    """
    saved = set(manager.item_metadata(step).keys())
    item = {
        field.name: getattr(state, field.name)
        for field in dataclasses.fields(state)
        if field.name in saved
    }
    if STORE in item:
        shapes = _saved_shapes(manager, step)

        def as_saved(path, x):
            shape = shapes.get(f"{STORE}.{key_name(path, sep='.')}", (np.shape(x),))[0]
            if tuple(shape) == np.shape(x):
                return x
            if not isinstance(x, jax.Array):
                return np.zeros(shape, x.dtype)
            sharding = x.sharding
            if isinstance(sharding, NamedSharding):
                sharding = NamedSharding(sharding.mesh, PartitionSpec())
            return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)

        item[STORE] = jax.tree_util.tree_map_with_path(as_saved, item[STORE])
    restored = manager.restore(step, args=ocp.args.StandardRestore(item))
    return state.replace(**restored)
