"""The command line of the entry points (launch/train.py, python -m fedjax_cv.data.inspect).

A config file, its `--config.<key>=<value>` overrides and the other flags are read before
anything is built or written, and every fault in them is one line `error: ...` on stderr with
exit status 2: a config file that does not exist or does not parse, an error raised by its
`get_config`, an unknown or mistyped key, a stray positional argument.

`model.kwargs` takes keys the config does not set (the model's fields, e.g.
`--config.model.kwargs.width_multiplier=0.5`); `validation.validate_config` checks them
against the model's typed fields.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
import re
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

# Config dicts that take new keys from the command line (checked by validation, not here).
OPEN_KEYS = ("model.kwargs",)


class CommandLineError(ValueError):
    """A bad config file, config key or argument."""


def define_config_flag(help_text: str = "Experiment config file.") -> flags.FlagHolder:
    """`--config=FILE[:arg]` with `--config.<key>=<value>` overrides; `parse_flags` checks
    every key before the config is handed out, and locks it."""
    return config_flags.DEFINE_config_file(
        "config", None, help_text, lock_config=False, accept_new_attributes=True
    )


def print_error(message: object) -> None:
    """`error: <message>` on stderr as one line, in one write: `print` writes the text and its
    newline apart, and a line of another process sharing the stream could land in between."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()


def fail(message: object) -> None:
    """One line `error: <message>` on stderr, exit status 2."""
    print_error(message)
    sys.exit(2)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config()` of `FILE`, or `get_config(arg)` of `FILE:arg`, as ml_collections calls
    it; a missing file, a syntax error or an error raised by `get_config` is a
    CommandLineError of one line naming the file."""
    path, colon, arg = spec.partition(":")
    if not path:
        raise CommandLineError("--config is empty; must be a config file, e.g. configs/x.py")
    file = pathlib.Path(path)
    if not file.exists():
        raise CommandLineError(f"config file {path} does not exist")
    if not file.is_file():
        raise CommandLineError(f"config file {path} is not a file; must be a Python file")
    try:
        tree = ast.parse(file.read_bytes(), filename=path)
    except SyntaxError as error:
        line = f": {error.text.strip()!r}" if error.text and error.text.strip() else ""
        raise CommandLineError(
            f"config file {path} has a syntax error at line {error.lineno} ({error.msg}){line}"
        ) from None
    except (OSError, ValueError) as error:
        raise CommandLineError(f"config file {path} cannot be read: {error}") from None
    if not any(
        isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body
    ):
        raise CommandLineError(f"config file {path} defines no get_config(arg)")
    call = f"get_config({arg!r})" if colon else "get_config()"
    try:
        module_spec = importlib.util.spec_from_file_location(f"config_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(*([arg] if colon else []))
    except (ValueError, TypeError) as error:  # the config's own one-line argument checks
        raise CommandLineError(f"config file {path}: {error}") from None
    except Exception as error:
        raise CommandLineError(
            f"config file {path}: {call} raised {type(error).__name__}: {error}"
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise CommandLineError(
            f"config file {path}: {call} returned {type(config).__name__}; must return an "
            "ml_collections.ConfigDict"
        )
    return config


def check_override_keys(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """Every `--config.<key>` names a key of `config`, or a new key directly under one of
    OPEN_KEYS; else a CommandLineError naming the key, with the nearest known one."""
    for key in keys:
        parent, value = "", config
        for part in key.split("."):
            if parent in OPEN_KEYS and isinstance(value, ml_collections.ConfigDict):
                break  # a new field of an open dict: validation checks it
            if isinstance(value, ml_collections.ConfigDict) and part in value:
                parent, value = f"{parent}.{part}".lstrip("."), value[part]
                continue
            if not isinstance(value, ml_collections.ConfigDict):
                raise CommandLineError(
                    f"--config.{key}: unknown config key {part!r}; config key {parent!r} is a "
                    "value, not a group of keys"
                )
            known = sorted(value.keys())
            hint = difflib.get_close_matches(part, known, n=1)
            also = f"did you mean {hint[0]!r}?" if hint else f"known: {', '.join(known) or 'none'}"
            raise CommandLineError(f"--config.{key}: unknown config key {part!r}; {also}")


def _config_spec(argv: Sequence[str]) -> str | None:
    """The value of `--config` in argv (`--config=X` or `--config X`), the last one given."""
    spec = None
    for i, arg in enumerate(argv):
        match = re.fullmatch(r"--?config(=(.*))?", arg, re.DOTALL)
        if match:
            spec = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
    return spec


def _override_keys(argv: Sequence[str]) -> list[str]:
    keys = []
    for arg in argv:
        match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
        if match and match.group(1) not in keys:
            keys.append(match.group(1))
    return keys


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`: each fault in one
    line (see the module docstring); the config is locked once its overrides are applied."""
    spec = _config_spec(argv[1:])
    try:
        if spec is not None:
            check_override_keys(load_config_file(spec), _override_keys(argv[1:]))
        rest = flags.FLAGS(argv)
    except CommandLineError as error:
        fail(error)
    except KeyError as error:  # a key ml_collections refuses after all
        fail(f"unknown config key {error.args[0] if error.args else error}")
    except (flags.Error, ValueError, TypeError, AttributeError, OSError) as error:
        fail(error)
    if len(rest) > 1:
        fail(
            f"unexpected argument {rest[1]!r}; {pathlib.Path(argv[0]).name} takes only flags "
            "(--name=value; see --help)"
        )
    if "config" in flags.FLAGS and isinstance(flags.FLAGS.config, ml_collections.ConfigDict):
        flags.FLAGS.config.lock()
    return rest
