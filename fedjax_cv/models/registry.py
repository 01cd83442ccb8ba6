"""One registry of model constructors: `get_model(name, num_classes, **kwargs)`."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable

import flax.linen as nn

ModelFactory = Callable[..., nn.Module]

_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str, factory: ModelFactory) -> None:
    """Registers `factory(num_classes=..., **kwargs) -> nn.Module` under `name`."""
    if name in _MODELS:
        raise ValueError(f"model name {name!r} is registered twice")
    _MODELS[name] = factory


def model_names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def _field_names(factory: ModelFactory) -> set[str]:
    target = getattr(factory, "func", factory)
    if dataclasses.is_dataclass(target):
        return {f.name for f in dataclasses.fields(target)} - {"parent", "name"}
    return set()


def model_fields(name: str) -> dict[str, type]:
    """The fields `get_model(name, ...)` takes as keywords, with their annotated types, less
    `num_classes`; empty for a factory that is not a Flax module."""
    target = getattr(_MODELS[name], "func", _MODELS[name])
    if not dataclasses.is_dataclass(target):
        return {}
    hints = typing.get_type_hints(target)
    return {
        f.name: hints.get(f.name, f.type)
        for f in dataclasses.fields(target)
        if f.name not in ("parent", "name", "num_classes")
    }


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds the registered model `name` with a `num_classes`-way output.

    Raises ValueError naming the field when the name, `num_classes` or a keyword is not allowed.
    """
    if name not in _MODELS:
        raise ValueError(
            f"model.name={name!r} is unknown; known models: {', '.join(model_names())}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes={num_classes!r} is not allowed; must be a positive integer")
    factory = _MODELS[name]
    fields = _field_names(factory)
    unknown = sorted(set(kwargs) - fields) if fields else []
    if unknown:
        raise ValueError(
            f"model.{unknown[0]}={kwargs[unknown[0]]!r} is not a field of {name}; "
            f"fields: {', '.join(sorted(fields - {'num_classes'}))}"
        )
    return factory(num_classes=num_classes, **kwargs)
