"""Attacks by a fraction of each round's clients, to evaluate robust aggregation and DP.

Which clients attack in round r is drawn on the host from (seed, r): exactly
round(fraction x cohort size) of the round's clients, whatever the strategy or device count.
Two kinds:

- on the data, before the client trains (`poison_examples`, host side): `label_flip` maps a
  label y to C - 1 - y (masks pixel by pixel, 255 kept); `backdoor` stamps a white square
  trigger in the bottom-right corner of a share of the attacker's images and relabels them
  with a target class (Bagdasaryan et al. 2020's semantic goal in its simplest pixel form).
  Its success rate is measured on the test images whose label is not the target: the share
  of them the model assigns to the target once the trigger is stamped
  (`eval/backdoor_success`, beside the clean accuracy).
- on the update, after it trains (`corrupt_stage`, a client-side stage of the aggregation
  pipeline): `sign_flip` sends -scale x delta (scale 1 unless set: plain -delta only
  slows the mean down, 7 honest votes against 3 still point downhill; scale 4 reverses it),
  `scale` sends scale x delta (scale 10 unless set; model replacement, Bagdasaryan et al.
  2020), `gaussian` sends N(0, stddev^2) noise in place of the delta.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_cv.algorithms.aggregation import Stage

ATTACKS = ("none", "sign_flip", "scale", "gaussian", "label_flip", "backdoor")
DATA_ATTACKS = ("label_flip", "backdoor")
LABEL_TASKS = {"label_flip": ("classification", "segmentation"), "backdoor": ("classification",)}
ATTACK_STREAM = 7  # the host rng stream of attacker choice, beside sampling's streams
DEFAULT_SCALE = {"sign_flip": 1.0, "scale": 10.0}  # `attack.scale` left unset
TRIGGER_VALUE = 1.0  # white after `normalize_images` ((255 / 255 - 0.5) / 0.5)


class Attack(NamedTuple):
    """The `attack` config section."""

    name: str = "none"
    fraction: float = 0.0  # of each round's clients
    scale: float | None = None  # the factor on the delta; None: DEFAULT_SCALE[name]
    stddev: float = 1.0  # `gaussian`: the noise's standard deviation
    target_label: int = 0  # `backdoor`
    patch_size: int = 3  # `backdoor`: the trigger's side in pixels
    poison_fraction: float = 0.5  # `backdoor`: the share of an attacker's examples stamped

    @property
    def active(self) -> bool:
        return self.name != "none" and self.fraction > 0

    @property
    def factor(self) -> float:
        """The factor `sign_flip` (negated) and `scale` multiply the delta by."""
        return DEFAULT_SCALE.get(self.name, 1.0) if self.scale is None else float(self.scale)


def check_attack(attack: Attack, num_classes: int | None = None, task: str | None = None) -> None:
    """Refuses a bad `attack` section in one line naming the field."""
    if attack.name not in ATTACKS:
        raise ValueError(f"attack.name={attack.name!r} is unknown; known: {', '.join(ATTACKS)}")
    for field, value, ok, allowed in (
        ("fraction", attack.fraction, 0 <= attack.fraction <= 1, "in [0, 1]"),
        ("stddev", attack.stddev, attack.stddev >= 0, ">= 0"),
        ("poison_fraction", attack.poison_fraction, 0 < attack.poison_fraction <= 1, "in (0, 1]"),
        ("patch_size", attack.patch_size, int(attack.patch_size) >= 1, "an integer >= 1"),
    ):
        if not ok:
            raise ValueError(f"attack.{field}={value!r} is not allowed; must be {allowed}")
    if attack.scale is not None and not np.isfinite(attack.scale):
        raise ValueError(f"attack.scale={attack.scale!r} is not allowed; must be finite")
    if attack.name in DATA_ATTACKS and task is not None:
        allowed = LABEL_TASKS[attack.name]
        if task not in allowed:
            raise ValueError(
                f"attack.name={attack.name!r} is not implemented for {task} data; it needs "
                f"{' or '.join(allowed)} labels"
            )
    if attack.name == "backdoor" and num_classes is not None:
        if not 0 <= attack.target_label < num_classes:
            raise ValueError(
                f"attack.target_label={attack.target_label!r} is not allowed; must be in "
                f"[0, {num_classes - 1}]"
            )


def choose_attackers(attack: Attack, seed: int, round_index: int, num_clients: int) -> np.ndarray:
    """bool [num_clients]: which of the round's cohort slots attack, exactly
    round(fraction x num_clients) of them, drawn from (seed, round)."""
    attackers = np.zeros(num_clients, bool)
    if not attack.active:
        return attackers
    count = int(round(attack.fraction * num_clients))
    rng = np.random.default_rng([seed, round_index, ATTACK_STREAM])
    attackers[rng.permutation(num_clients)[:count]] = True
    return attackers


def stamp_trigger(images: np.ndarray, patch_size: int) -> np.ndarray:
    """Images `[..., height, width, channels]` (normalised) with the trigger square set white."""
    stamped = np.array(images, copy=True)
    stamped[..., -patch_size:, -patch_size:, :] = TRIGGER_VALUE
    return stamped


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """y -> C - 1 - y; the ignore label 255 of masks stays."""
    labels = np.asarray(labels)
    return np.where(labels == 255, labels, num_classes - 1 - labels).astype(labels.dtype)


def poison_examples(
    attack: Attack, examples: dict, attackers: np.ndarray, num_classes: int
) -> dict:
    """The cohort's examples (leaves `[clients, slots, ...]`, normalised) after the data
    attack of the attacking clients; unchanged for update attacks."""
    if attack.name not in DATA_ATTACKS or not attackers.any():
        return examples
    out = dict(examples)
    if attack.name == "label_flip":
        labels = out["label"].copy()
        labels[attackers] = flip_labels(labels[attackers], num_classes)
        out["label"] = labels
        return out
    slots = out["label"].shape[1]
    stamped = np.zeros(out["label"].shape, bool)
    stamped[:, : max(1, int(round(attack.poison_fraction * slots)))] = True
    stamped &= attackers[:, None]
    images = out["image"].copy()
    images[stamped] = stamp_trigger(images[stamped], attack.patch_size)
    labels = out["label"].copy()
    labels[stamped] = attack.target_label
    out["image"], out["label"] = images, labels
    return out


def backdoor_test_batch(attack: Attack, batch: dict, mask: np.ndarray) -> tuple[dict, np.ndarray]:
    """A test batch turned into the backdoor's success test: trigger stamped, labels set to
    the target, and only the images whose true label is not the target kept, so its accuracy
    is the backdoor's success rate."""
    keep = np.asarray(mask) & (np.asarray(batch["label"]) != attack.target_label)
    poisoned = dict(batch)
    poisoned["image"] = stamp_trigger(batch["image"], attack.patch_size)
    poisoned["label"] = np.full_like(batch["label"], attack.target_label)
    return poisoned, keep


def attack_stage(attack: Attack) -> Stage | None:
    """The attack's stage, the pipeline's first client-side one (None without an attack): an
    update attack corrupts the attackers' deltas there; every attack reports
    `attack_clients`, the number of attacking clients with a vote."""
    if not attack.active:
        return None
    scale = jnp.float32(attack.factor)
    stddev = jnp.float32(attack.stddev)

    def corrupt(delta, key):
        if attack.name == "sign_flip":
            return jax.tree.map(lambda d: (-scale * d).astype(d.dtype), delta)
        if attack.name == "scale":
            return jax.tree.map(lambda d: (d * scale).astype(d.dtype), delta)
        leaves, structure = jax.tree.flatten(delta)
        keys = jax.random.split(key, max(len(leaves), 1))
        noise = [
            (stddev * jax.random.normal(k, d.shape, jnp.float32)).astype(d.dtype)
            for d, k in zip(leaves, keys, strict=False)
        ]
        return jax.tree.unflatten(structure, noise)

    def client(state, delta, own, view):
        attacking = view.info.attacker
        if attack.name not in DATA_ATTACKS:
            corrupted = corrupt(delta, view.key)
            delta = jax.tree.map(lambda c, d: jnp.where(attacking, c, d), corrupted, delta)
        return delta, own, {"attack_clients": attacking.astype(jnp.float32)}

    def server(state, aggregate, sums, view):
        return aggregate, state, {"attack_clients": sums["attack_clients"]}

    return Stage("attack", client=client, server=server)
