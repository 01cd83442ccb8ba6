"""Checkpoints that resume exactly, and the checks that refuse a mismatched resume.

The whole run state is the server state (params, optimizer state, model state, round): the
root key derives from the seed and every cohort from (seed, round), so a restored round
number puts the samplers and the input pipeline back where they were. orbax writes each
checkpoint to a temporary folder and renames it when complete; an unfinished one is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

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
    saved_fp, current_fp = fingerprint(saved), fingerprint(current)
    for key in sorted(set(saved_fp) | set(current_fp)):
        old, new = saved_fp.get(key, "<absent>"), current_fp.get(key, "<absent>")
        if _normal(old) != _normal(new):
            return f"{key}={new!r} differs from {old!r} in the workdir's config.json"
    return None


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


def _leaf_specs(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {key_name(p, sep="."): _spec(x.shape, x.dtype) for p, x in flat}


def _spec(shape, dtype) -> str:
    return f"{np.dtype(dtype).name}{tuple(shape)}"


def state_difference(manager: ocp.CheckpointManager, step: int, state) -> str | None:
    """The first leaf whose name, shape or dtype differs between checkpoint and state."""
    metadata = manager.item_metadata(step)
    saved = {
        m.name: _spec(m.shape, m.dtype) for m in jax.tree.leaves(metadata) if hasattr(m, "shape")
    }
    current = _leaf_specs(state)
    for name in sorted(set(saved) | set(current)):
        if name not in saved:
            return f"state leaf {name} {current[name]} is not in checkpoint {step}"
        if name not in current:
            return f"checkpoint {step} holds {name} {saved[name]}, which this run does not have"
        if saved[name] != current[name]:
            return (
                f"state leaf {name} is {current[name]} here but {saved[name]} in checkpoint {step}"
            )
    return None


def manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(
        workdir / "checkpoints", options=options, item_handlers=ocp.StandardCheckpointHandler()
    )


def latest_step(workdir: pathlib.Path) -> int | None:
    """The newest finished checkpoint's round, without creating anything."""
    root = workdir / "checkpoints"
    if not root.is_dir():
        return None
    steps = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps) if steps else None


def read_saved_config(workdir: pathlib.Path) -> dict | None:
    path = workdir / "config.json"
    return json.loads(path.read_text()) if path.exists() else None


def restore(manager: ocp.CheckpointManager, step: int, state):
    """Checkpoint `step` into `state`'s structure (call `state_difference` first: it compares
    every leaf).

    Only the state's fields present in the checkpoint are read, so a field added to the state
    since, empty in this run (`ServerState.client_local = {}`), leaves older checkpoints
    readable.
    """
    saved = set(manager.item_metadata(step).keys())
    item = {
        field.name: getattr(state, field.name)
        for field in dataclasses.fields(state)
        if field.name in saved
    }
    restored = manager.restore(step, args=ocp.args.StandardRestore(item))
    return state.replace(**restored)
