"""Pretrained weights: read them from local files, load what fits into a model, export.

Names. A tensor is named by its path in the Flax variables joined by '/', collection first:
`params/stem/conv/kernel`, `batch_stats/block0/norm/BatchNorm_0/mean`. Flax's automatic module
names are part of the path (`params/Conv_0/kernel`). A stored name whose first component is not
a known collection (`params`, `batch_stats`) is read as `params/<name>`, so bare params files
work as they are.

Formats, all local (nothing is ever downloaded):

- `.npz`: one array per name (`save_weights` writes these);
- `.msgpack`: `flax.serialization.msgpack_serialize` of a nested variables or params dict;
- an orbax directory: a fedjax_cv training workdir (its newest `checkpoints/<step>`), one
  step directory, or anything `ocp.StandardCheckpointer().save` wrote of a variables or params
  dict. From a fedjax_cv server state only `params` and the `model_state` collections are read.

Mapping. Files written by other code name their modules otherwise; `rename` is a sequence of
`(regex, replacement)` pairs applied in order with `re.sub` to every name after reading. For a
file whose blocks live under `features` and whose output layer is `fc`:

    weights = read_weights("other.npz", rename=[
        (r"^params/features/", "params/block"),  # params/features/3/... -> params/block3/...
        (r"^params/fc/", "params/classifier/"),
    ])
    variables, report = load_pretrained(variables, weights, model=model)
    print(report.summary())

Loading keeps the model's fresh initialisation for head modules (`head_modules(model)`, the
classifier by default) that are absent from the file or shaped for another number of classes;
every other tensor must fit, or nothing is loaded.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fedjax_cv.tree_names import key_name

COLLECTIONS = ("params", "batch_stats")
_FORMATS = (
    "allowed: a .npz or .msgpack file, or an orbax checkpoint directory (a training workdir, "
    "one of its checkpoints/<step> folders, or a folder written by ocp.StandardCheckpointer)"
)
_SHOWN_PROBLEMS = 3


class WeightsError(ValueError):
    """A weights file that cannot be read, or whose tensors do not fit the model."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_pretrained` did with each tensor, for the user to check."""

    loaded: tuple[str, ...]
    reinitialised: tuple[tuple[str, str], ...]  # (name, why)
    unused: tuple[str, ...]  # in the file, not in the model

    def summary(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors, re-initialised {len(self.reinitialised)}, "
            f"{len(self.unused)} in the file unused"
        ]
        lines += [f"re-initialised {name}: {why}" for name, why in self.reinitialised]
        lines += [f"unused {name}" for name in self.unused]
        return "\n".join(lines)


def head_modules(model: Any) -> tuple[str, ...]:
    """The top-level modules that depend on the number of classes."""
    return tuple(getattr(model, "head_modules", ("classifier",)))


# ----------------------------------------------------------------------------------------------
# Reading.


def read_weights(
    path: str | os.PathLike, rename: Sequence[tuple[str, str]] = ()
) -> dict[str, np.ndarray]:
    """{name: array} from a local .npz, .msgpack or orbax directory, names mapped by `rename`."""
    rules = _compile_rename(rename)
    text = os.fspath(path)
    location = pathlib.Path(text)
    if "://" in text:
        raise WeightsError(f"model.weights={text!r} is a URL; download it first; {_FORMATS}")
    if not location.exists():
        raise WeightsError(f"model.weights={text!r} does not exist; {_FORMATS}")
    if location.is_dir():
        tree = _read_orbax(location, text)
    elif location.suffix.lower() == ".npz":
        tree = _read_npz(location, text)
    elif location.suffix.lower() == ".msgpack":
        tree = _read_msgpack(location, text)
    else:
        raise WeightsError(
            f"model.weights={text!r} has the unknown suffix {location.suffix!r}; {_FORMATS}"
        )
    names = _flatten(tree)
    if not names:
        raise WeightsError(f"model.weights={text!r} holds no arrays; {_FORMATS}")
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for stored, array in names.items():
        name = _apply_rename(_with_collection(stored), rules)
        if name in out:
            raise WeightsError(
                f"model.weights={text!r}: {stored!r} and {origin[name]!r} both become {name!r}; "
                "fix the rename rules or the file"
            )
        out[name], origin[name] = array, stored
    return out


def _read_npz(location: pathlib.Path, text: str) -> dict[str, np.ndarray]:
    try:
        with np.load(location, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as error:  # zip, pickle and format errors all mean 'not a usable .npz'
        raise WeightsError(
            f"model.weights={text!r} could not be read as .npz ({_one_line(error)}); {_FORMATS}"
        ) from error


def _read_msgpack(location: pathlib.Path, text: str) -> Any:
    try:
        tree = flax.serialization.msgpack_restore(location.read_bytes())
    except Exception as error:
        raise WeightsError(
            f"model.weights={text!r} could not be read as .msgpack ({_one_line(error)}); {_FORMATS}"
        ) from error
    if not isinstance(tree, dict):
        raise WeightsError(
            f"model.weights={text!r} holds a {type(tree).__name__}, not a dict of arrays; "
            f"{_FORMATS}"
        )
    return tree


def _orbax_item(location: pathlib.Path, text: str) -> pathlib.Path:
    """The folder holding the pytree: workdir -> newest finished step -> its `default` item."""
    if not _is_orbax_tree(location) and not (location / "default").is_dir():
        root = location / "checkpoints" if (location / "checkpoints").is_dir() else location
        # orbax writes into a temporary folder and renames it to the step number when complete.
        steps = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
        if steps:
            location = max(steps, key=lambda p: int(p.name))
        elif root != location:
            raise WeightsError(
                f"model.weights={text!r} is a workdir without a finished checkpoint; {_FORMATS}"
            )
    if not _is_orbax_tree(location) and (location / "default").is_dir():
        location = location / "default"
    if not _is_orbax_tree(location):
        raise WeightsError(
            f"model.weights={text!r} is a directory but not an orbax checkpoint "
            f"(no _METADATA in {str(location)!r}); {_FORMATS}"
        )
    return location


def _is_orbax_tree(location: pathlib.Path) -> bool:
    return (location / "_METADATA").is_file() or (location / "manifest.ocdbt").is_file()


def _read_orbax(location: pathlib.Path, text: str) -> Any:
    item = _orbax_item(location, text)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(epath.Path(item))
        metadata = getattr(metadata, "tree", metadata)
        # Host numpy arrays, whatever devices or sharding the checkpoint was written with.
        restore_args = jax.tree.map(
            lambda m: ocp.RestoreArgs(restore_type=np.ndarray if hasattr(m, "shape") else None),
            metadata,
        )
        tree = handler.restore(
            epath.Path(item), args=ocp.args.PyTreeRestore(restore_args=restore_args)
        )
    except Exception as error:
        raise WeightsError(
            f"model.weights={text!r}: orbax could not restore {str(item)!r} "
            f"({_one_line(error)}); {_FORMATS}"
        ) from error
    finally:
        if hasattr(handler, "close"):
            handler.close()
    if isinstance(tree, dict) and "params" in tree and "model_state" in tree:
        # A fedjax_cv ServerState: the optimizer state and round are not model weights.
        return {"params": tree["params"], **dict(tree["model_state"] or {})}
    return tree


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    if tree is None:
        return {}
    if isinstance(tree, Mapping):
        items = [(str(key), value) for key, value in tree.items()]
    elif isinstance(tree, list | tuple):
        items = [(str(index), value) for index, value in enumerate(tree)]
    else:
        return {prefix: np.asarray(tree)}
    out: dict[str, np.ndarray] = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}/{key}" if prefix else key))
    return out


def _with_collection(name: str) -> str:
    return name if name.split("/", 1)[0] in COLLECTIONS else f"params/{name}"


def _compile_rename(rename: Sequence[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    rules = []
    for index, rule in enumerate(rename):
        if isinstance(rule, str) or len(rule) != 2:
            raise WeightsError(f"rename[{index}]={rule!r} is not a (regex, replacement) pair")
        pattern, replacement = rule
        try:
            rules.append((re.compile(pattern), replacement))
        except re.error as error:
            raise WeightsError(
                f"rename[{index}]: {pattern!r} is not a regular expression ({error})"
            ) from error
    return rules


def _apply_rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        try:
            name = pattern.sub(replacement, name)
        except re.error as error:
            raise WeightsError(
                f"rename ({pattern.pattern!r}, {replacement!r}) fails on {name!r} ({error})"
            ) from error
    return name


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Writing.


def save_weights(path: str | os.PathLike, variables: Any, *, overwrite: bool = False) -> None:
    """Writes variables (nested, or flat {name: array}) as .npz or .msgpack by suffix.

    Refuses to replace an existing file unless `overwrite=True`; the file appears complete or
    not at all (written aside, then renamed).
    """
    location = pathlib.Path(path)
    suffix = location.suffix.lower()
    if suffix not in (".npz", ".msgpack"):
        raise WeightsError(
            f"cannot save weights to {str(location)!r}: the suffix must be .npz or .msgpack"
        )
    if location.exists() and not overwrite:
        raise WeightsError(
            f"cannot save weights to {str(location)!r}: it exists; pass overwrite=True to "
            "replace it"
        )
    flat: dict[str, np.ndarray] = {}
    for stored, array in _flatten(jax.device_get(variables)).items():
        name = _with_collection(stored)
        if name in flat:
            raise WeightsError(
                f"cannot save weights to {str(location)!r}: two arrays are named {name!r}"
            )
        flat[name] = _storable(array)
    if not flat:
        raise WeightsError(f"cannot save weights to {str(location)!r}: no arrays given")
    buffer = io.BytesIO()
    if suffix == ".npz":
        np.savez(buffer, **flat)
    else:
        buffer.write(flax.serialization.msgpack_serialize(_unflatten(flat)))
    location.parent.mkdir(parents=True, exist_ok=True)
    partial = location.with_name(f".{location.name}.partial-{os.getpid()}")
    try:
        partial.write_bytes(buffer.getvalue())
        os.replace(partial, location)
    finally:
        partial.unlink(missing_ok=True)


def _storable(array: np.ndarray) -> np.ndarray:
    # numpy stores extension float types (bfloat16, float8) as raw bytes; float32 holds them
    # exactly and load_pretrained casts back to the model's dtype.
    array = np.asarray(array)
    return array.astype(np.float32) if array.dtype.kind == "V" else array


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, array in flat.items():
        *path, leaf = name.split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = array
    return out


# ----------------------------------------------------------------------------------------------
# Loading into a model.


def _place(array: np.ndarray, like: Any) -> Any:
    """`array` in `like`'s dtype, on `like`'s devices when it is a jax array."""
    array = np.asarray(array).astype(np.dtype(like.dtype))
    if isinstance(like, jax.Array):
        return jax.device_put(array, like.sharding)
    return array


def into_backbone(weights: Mapping[str, np.ndarray], variables: Any) -> Mapping[str, np.ndarray]:
    """A classifier's tensors placed under `backbone/` when the model keeps its backbone there
    (the segmentation models) and the file has no `backbone/` of its own: FedCV's fine-tuning of
    a segmentation model from classification weights. Other files come back unchanged."""
    names = {key_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}
    has_backbone = lambda keys: any(k.split("/")[1:2] == ["backbone"] for k in keys)
    if not has_backbone(names) or has_backbone(weights):
        return weights
    moved = {
        "/".join([name.split("/")[0], "backbone", *name.split("/")[1:]]): value
        for name, value in weights.items()
    }
    return moved if len(names & set(moved)) > len(names & set(weights)) else weights


def load_pretrained(
    variables: Any,
    weights: Mapping[str, np.ndarray] | str | os.PathLike,
    *,
    model: Any = None,
    head: Sequence[str] | None = None,
    strict: bool = True,
) -> tuple[Any, LoadReport]:
    """New variables with the file's tensors where they fit, and a report of what happened.

    Head modules absent from the file or of another shape keep their fresh initialisation (the
    new-num_classes case). Any other tensor of another shape, or absent when `strict`, is an
    error; all such problems are raised together and nothing is loaded.
    """
    if isinstance(weights, str | os.PathLike):
        weights = read_weights(weights)
    weights = into_backbone(weights, variables)
    if head is None:
        head = head_modules(model) if model is not None else ("classifier",)
    head = (head,) if isinstance(head, str) else tuple(head)
    label = type(model).__name__ if model is not None else "the model"

    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    names = [key_name(path) for path, _ in leaves]
    loaded, reinitialised, problems = [], [], []
    for name, (_, leaf) in zip(names, leaves, strict=True):
        model_shape = tuple(np.shape(leaf))
        parts = name.split("/")
        in_head = len(parts) > 2 and parts[1] in head
        if name in weights:
            file_shape = tuple(np.shape(weights[name]))
            if file_shape == model_shape:
                loaded.append(name)
            elif in_head:
                why = f"shape {file_shape} in the file, {model_shape} in the model"
                reinitialised.append((name, why))
            else:
                problems.append(
                    f"{name} is {file_shape} in the file but {model_shape} in the model"
                )
        elif in_head or not strict:
            reinitialised.append((name, "not in the file"))
        else:
            problems.append(f"{name} {model_shape} is not in the file")

    if not set(names) & set(weights):
        raise WeightsError(
            f"model.weights: no tensor name of the file matches {label} (file: "
            f"{_examples(weights)}; model: {_examples(names)}); map the names with "
            "rename=[(regex, replacement), ...]; nothing was loaded"
        )
    if problems:
        shown = "; ".join(problems[:_SHOWN_PROBLEMS])
        more = (
            f"; and {len(problems) - _SHOWN_PROBLEMS} more"
            if len(problems) > _SHOWN_PROBLEMS
            else ""
        )
        count = f"{len(problems)} tensor{'s do' if len(problems) > 1 else ' does'}"
        raise WeightsError(
            f"model.weights: {count} not fit {label}: {shown}{more}; nothing was loaded"
        )
    if not loaded:
        raise WeightsError(
            f"model.weights: no tensor of the file fits {label} (only head tensors of other "
            "shapes matched); nothing was loaded"
        )

    chosen = set(loaded)
    new_leaves = [
        _place(weights[name], leaf) if name in chosen else _copy(leaf)
        for name, (_, leaf) in zip(names, leaves, strict=True)
    ]
    treedef = jax.tree_util.tree_structure(variables)
    report = LoadReport(
        loaded=tuple(loaded),
        reinitialised=tuple(reinitialised),
        unused=tuple(sorted(set(weights) - set(names))),
    )
    return jax.tree_util.tree_unflatten(treedef, new_leaves), report


def _copy(leaf: Any) -> Any:
    # jax arrays are immutable and can be shared; a numpy leaf is copied so that writing to the
    # result never changes the input.
    return leaf.copy() if isinstance(leaf, np.ndarray) else leaf


def _examples(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:2])
    return f"{shown}, ..." if len(names) > 2 else shown or "none"


__all__ = [
    "COLLECTIONS",
    "LoadReport",
    "WeightsError",
    "head_modules",
    "load_pretrained",
    "read_weights",
    "save_weights",
]
