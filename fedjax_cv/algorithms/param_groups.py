"""Learning-rate multipliers by parameter name, and frozen parameters.

FedCV (He et al. 2021) fine-tunes segmentation models with the decoder at 10x the encoder's
learning rate, and trains some models with a frozen backbone ('FZ'). Both are one mechanism
here: rules `(regex, multiplier)` matched with `re.search` against a parameter's name, its
path joined by '/' (`stem/conv/kernel`, `classifier/bias`); the first matching rule wins and
unmatched parameters keep multiplier 1. Multiplier 0 freezes: the client update of those
parameters is exactly zero, so they stay bit-identical through any number of rounds.

    rules = parse_multipliers(("classifier=10",))     # head at 10x
    rules = freeze_except(("classifier",)) + rules    # FZ: only the head trains
    optimizer = scale_by_multipliers(optax.sgd(0.1), rules)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax

from fedjax_cv.tree_names import key_name

Rule = tuple[str, float]
_FROZEN = "frozen"


def parse_multipliers(specs: Sequence[str], field: str = "algorithm.client.lr_multipliers"):
    """('decoder=10', '^stem/=0') -> (('decoder', 10.0), ('^stem/', 0.0)); one-line errors."""
    rules = []
    for index, spec in enumerate(specs):
        pattern, sep, value = str(spec).rpartition("=")
        try:
            multiplier = float(value)
            re.compile(pattern)
        except (ValueError, re.error):
            multiplier = -1.0
        if not sep or not pattern or not multiplier >= 0:
            raise ValueError(
                f"{field}[{index}]={spec!r} is not allowed; must be 'regex=multiplier' with a "
                "valid regex and a multiplier >= 0"
            )
        rules.append((pattern, multiplier))
    return tuple(rules)


def freeze_except(head_modules: Sequence[str]) -> tuple[Rule, ...]:
    """The rule freezing every parameter outside the top-level `head_modules` (FedCV 'FZ')."""
    heads = "|".join(re.escape(name) for name in head_modules)
    return ((rf"^(?!(?:{heads})/)", 0.0),)


def head_rules(
    head_modules: Sequence[str], *, freeze_backbone: bool = False, head_lr: float = 1.0
) -> tuple[Rule, ...]:
    """Rules from the model's head: the backbone frozen, the head's learning rate scaled."""
    rules = freeze_except(head_modules) if freeze_backbone else ()
    if head_lr != 1.0:
        heads = "|".join(re.escape(name) for name in head_modules)
        rules += ((rf"^(?:{heads})/", float(head_lr)),)
    return rules


def multiplier_of(name: str, rules: Sequence[Rule]) -> float:
    for pattern, multiplier in rules:
        if re.search(pattern, name):
            return multiplier
    return 1.0


def multipliers(params, rules: Sequence[Rule]):
    """The multiplier of every parameter, as a pytree shaped like `params`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: multiplier_of(key_name(path), rules), params
    )


def _label(multiplier: float) -> str:
    return _FROZEN if multiplier == 0 else f"x{multiplier!r}"


def scale_by_multipliers(
    optimizer: optax.GradientTransformation, rules: Sequence[Rule]
) -> optax.GradientTransformation:
    """`optimizer` whose updates are scaled per parameter by `rules`; frozen ones get zeros.

    Scaling the update equals scaling the learning rate for SGD with momentum and weight decay
    (the decay term is part of the scaled update). Each group keeps its own optimizer state.
    """
    if not rules:
        return optimizer
    values = {1.0, *(multiplier for _, multiplier in rules)}
    transforms = {}
    for multiplier in values:
        if multiplier == 0:
            transforms[_FROZEN] = optax.set_to_zero()
        elif multiplier == 1:
            transforms[_label(multiplier)] = optimizer
        else:
            transforms[_label(multiplier)] = optax.chain(optimizer, optax.scale(multiplier))

    def labels(params):
        return jax.tree.map(_label, multipliers(params, rules))

    return optax.multi_transform(transforms, labels)


def frozen_fraction(params, rules: Sequence[Rule]) -> float:
    """Share of the parameters (by count) that `rules` freeze."""
    sizes = jax.tree.leaves(jax.tree.map(lambda x: x.size, params))
    frozen = jax.tree.leaves(multipliers(params, rules))
    total = sum(sizes)
    return sum(s for s, m in zip(sizes, frozen, strict=True) if m == 0) / max(total, 1)
