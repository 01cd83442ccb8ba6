"""Checks of a training config before anything is written.

Each failure is a `ConfigError`: one line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import collections.abc
import math
import typing

from fedjax_cv.algorithms.param_groups import parse_multipliers
from fedjax_cv.algorithms.registry import check_algorithm_config, lr_schedule
from fedjax_cv.algorithms.server import AGGREGATIONS, SERVER_OPTIMIZERS
from fedjax_cv.data.augment import make_augmentation
from fedjax_cv.data.partition import PARTITIONERS
from fedjax_cv.data.registry import DATASETS
from fedjax_cv.data.shapes import SHAPE_NAMES
from fedjax_cv.engine.strategies import STRATEGIES
from fedjax_cv.models import NORMS, model_fields, model_names

FREEZE = ("none", "backbone")


class ConfigError(ValueError):
    """A config value that is not allowed."""


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# (field, test, what is allowed)
_RULES = [
    # jax.random.key keeps a seed's low 32 bits: 2**32 would train as seed 0
    ("seed", lambda v: _integer(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    ("num_rounds", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("eval_every_rounds", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("log_every_rounds", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("checkpoint.every_rounds", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("checkpoint.keep", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("model.name", lambda v: v in model_names(), f"one of {', '.join(model_names())}"),
    ("model.norm", lambda v: v in ("auto",) + NORMS, f"one of auto, {', '.join(NORMS)}"),
    ("model.weights", lambda v: isinstance(v, str), "a path ('' for none)"),
    ("model.freeze", lambda v: v in FREEZE, f"one of {', '.join(FREEZE)}"),
    ("model.head_lr", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("algorithm.clients_per_round", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("algorithm.local_epochs", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("algorithm.batch_size", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("algorithm.virtual_client_size", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("algorithm.strategy", lambda v: v in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
    (
        "algorithm.aggregation",
        lambda v: v in ("auto",) + AGGREGATIONS,
        f"one of auto, {', '.join(AGGREGATIONS)}",
    ),
    (
        "algorithm.client_sampling",
        lambda v: v in ("auto", "uniform", "size_proportional"),
        "one of auto, uniform, size_proportional",
    ),
    ("algorithm.client.learning_rate", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("algorithm.client.momentum", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("algorithm.client.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    (
        "algorithm.client.proximal_mu",
        lambda v: v is None or (_number(v) and v >= 0),
        "a number >= 0 (None: by name)",
    ),
    (
        "algorithm.server.optimizer",
        lambda v: v in ("auto",) + SERVER_OPTIMIZERS,
        f"one of auto, {', '.join(SERVER_OPTIMIZERS)}",
    ),
    (
        "algorithm.server.learning_rate",
        lambda v: v is None or (_number(v) and v >= 0),
        "a number >= 0 (None: by name)",
    ),
    (
        "algorithm.server.momentum",
        lambda v: v is None or (_number(v) and 0 <= v < 1),
        "a number in [0, 1) (None: by name)",
    ),
    ("algorithm.server.b1", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("algorithm.server.b2", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("algorithm.server.eps", lambda v: _number(v) and v > 0, "a number > 0"),
    ("data.name", lambda v: v in DATASETS, f"one of {', '.join(sorted(DATASETS))}"),
    ("data.num_clients", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("data.num_classes", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("data.image_size", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("data.num_train_examples", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("data.num_test_examples", lambda v: _integer(v) and v > 0, "a positive integer"),
    ("data.num_workers", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("data.poisoned_clients", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("checkpoint.allow_config_change", lambda v: isinstance(v, bool), "True or False"),
    (
        "data.partition.name",
        lambda v: v in PARTITIONERS,
        f"one of {', '.join(sorted(PARTITIONERS))}",
    ),
    ("eval.batch_size", lambda v: _integer(v) and v > 0, "a positive integer"),
]


def validate_config(config) -> None:
    """Raises ConfigError on the first field that is not allowed."""
    for field, test, allowed in _RULES:
        try:
            value = _get(config, field)
        except (KeyError, AttributeError):
            raise ConfigError(f"{field} is missing from the config; must be {allowed}") from None
        if not test(value):
            raise ConfigError(f"{field}={value!r} is not allowed; must be {allowed}")
    data = config.data
    if data.name.startswith("shapes"):  # the embedded data draws from its 6 shapes
        if data.num_classes > len(SHAPE_NAMES):
            raise ConfigError(
                f"data.num_classes={data.num_classes} is not allowed for data.name="
                f"{data.name!r}; must be in [1, {len(SHAPE_NAMES)}] ({', '.join(SHAPE_NAMES)})"
            )
        if data.image_size < 8:
            raise ConfigError(
                f"data.image_size={data.image_size} is not allowed for data.name={data.name!r}; "
                "must be >= 8"
            )
    if data.poisoned_clients > data.num_clients:
        raise ConfigError(
            f"data.poisoned_clients={data.poisoned_clients} is not allowed; must be at most "
            f"data.num_clients={data.num_clients}"
        )
    partition = data.partition
    if partition.name == "natural" and "client_ids" not in partition:
        others = ", ".join(sorted(set(PARTITIONERS) - {"natural"}))
        raise ConfigError(
            f"data.partition.name='natural' is not allowed for data.name={data.name!r}: it needs "
            f"data.partition.client_ids (one client id per train example), which this config "
            f"lacks; must be one of {others}"
        )
    _check_model_kwargs(config.model)
    if partition.name in ("dirichlet", "lda") and not (
        _number(partition.get("alpha")) and partition.alpha > 0
    ):
        raise ConfigError(
            f"data.partition.alpha={partition.get('alpha')!r} is not allowed; must be > 0"
        )
    try:
        make_augmentation(config.data.augmentation)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    algorithm = config.algorithm
    if algorithm.clients_per_round > config.data.num_clients:
        raise ConfigError(
            f"algorithm.clients_per_round={algorithm.clients_per_round} is not allowed; must be "
            f"at most data.num_clients={config.data.num_clients}"
        )
    try:
        check_algorithm_config(algorithm)
        parse_multipliers(algorithm.client.lr_multipliers)
        lr_schedule(algorithm, config.num_rounds)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _model_field_allowed(field: str, annotation) -> tuple[typing.Callable, str]:
    """(test, what is allowed) for a model field of this name and type: every int or float
    field of the models is a size or a multiplier (> 0), but a `*_rate` (in [0, 1))."""
    origin = typing.get_origin(annotation) or annotation
    if field == "norm":
        return (lambda v: v in NORMS), f"one of {', '.join(NORMS)}"
    if annotation is bool:
        return (lambda v: isinstance(v, bool)), "True or False"
    if annotation is int:
        return (lambda v: _integer(v) and v > 0), "a positive integer"
    if annotation is float and field.endswith("_rate"):
        return (lambda v: _number(v) and 0 <= v < 1), "a number in [0, 1)"
    if annotation is float:
        return (lambda v: _number(v) and v > 0), "a number > 0"
    if annotation is str:
        return (lambda v: isinstance(v, str)), "a string"
    if isinstance(origin, type) and issubclass(origin, tuple | collections.abc.Sequence):
        return (lambda v: isinstance(v, tuple | list)), "a tuple"
    return (lambda v: True), ""


def _check_model_kwargs(model) -> None:
    """`model.kwargs` against the fields of `model.name`, each by its type."""
    fields = model_fields(model.name)
    for key, value in model.kwargs.items():
        if key == "num_classes":
            raise ConfigError(
                f"model.kwargs.num_classes={value!r} is not allowed; the dataset sets it"
            )
        if fields and key not in fields:
            raise ConfigError(
                f"model.kwargs.{key}={value!r} is not a field of {model.name}; fields: "
                f"{', '.join(sorted(fields))}"
            )
        test, allowed = _model_field_allowed(key, fields.get(key))
        if not test(value):
            raise ConfigError(
                f"model.kwargs.{key}={value!r} is not allowed; {model.name}.{key} must be {allowed}"
            )
