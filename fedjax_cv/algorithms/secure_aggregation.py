"""Secure summation, simulated: the server learns the sum of the client deltas, none of them.

Bonawitz et al. (2017), "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", without the key agreement and dropout recovery: each client maps its weighted
delta to the ring Z_{2^32} (fixed point, `frac_bits` fractional bits, saturated so that the
sum of the cohort cannot overflow int32) and adds, for every other real client j of the
cohort, +PRG(s_kj) if it sorts before j and -PRG(s_kj) otherwise. The masks cancel in the
wrap-around sum the engine already computes over clients (and devices: a `psum` of uint32),
so the server decodes the exact sum of the fixed-point values and never an individual one.

The pairwise seed s_kj, which the protocol agrees by Diffie-Hellman, is simulated here by a
round key folded with both clients' identities (client_id, occurrence) in sorted order. A
padded client (num_examples == 0) sends nothing and is nobody's pair; a client whose update is
not finite still sends its masks on a zero value, so the masks cancel. Only the linear
aggregator's weighted sum is protected: the sum of weights, the model state (normalisation
statistics) and the metrics stay plain metadata.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Folded into the round key for the pairwise seeds; far above any client id (see
# aggregation.STAGE_STREAM and SERVER_STREAM).
SECURE_STREAM = 0x7FFFFFF2
RING_MAX = 2**31 - 1  # the largest int32: the ring sum, read as int32, must not pass it
# The largest float32 below 2^31: a rounded value clipped to it converts to int32 safely.
_FLOAT_BELOW_2_31 = 2147483520.0
FRAC_BITS = (1, 30)


def check_frac_bits(frac_bits: Any) -> None:
    low, high = FRAC_BITS
    if (
        isinstance(frac_bits, bool)
        or not isinstance(frac_bits, int)
        or not low <= frac_bits <= high
    ):
        raise ValueError(
            f"algorithm.secure_aggregation.frac_bits={frac_bits!r} is not allowed; must be an "
            f"integer in [{low}, {high}]"
        )


class SecureCohort(NamedTuple):
    """What every client of a round knows of the cohort for its pairwise masks (`RoundShared`);
    leaves `[clients]`, replicated on every device."""

    key: jax.Array  # the round's secure-aggregation key
    client_id: jax.Array  # int32
    occurrence: jax.Array  # int32
    real: jax.Array  # bool: num_examples > 0; a padded client has no pair


class SecureSum(NamedTuple):
    """One client's upload (summed over the cohort by the engine): the masked ring values and
    the plain count of its saturated coordinates."""

    ring: Any  # uint32 leaves shaped like the delta
    saturated: jax.Array  # float32: coordinates clipped to the saturation bound
    senders: jax.Array  # float32: 1 for a real client


def secure_cohort(round_key: jax.Array, clients) -> SecureCohort:
    """The cohort's identities and the round's secure-aggregation key (`clients`: the
    cohort's `ClientInfo`, padded clients included)."""
    return SecureCohort(
        key=jax.random.fold_in(round_key, SECURE_STREAM),
        client_id=jnp.asarray(clients.client_id, jnp.int32),
        occurrence=jnp.asarray(clients.occurrence, jnp.int32),
        real=jnp.asarray(clients.num_examples) > 0,
    )


def saturation_bound(num_senders: jax.Array) -> jax.Array:
    """int32 (2^31 - 1) // n: n clients' values of at most this size sum inside int32."""
    return jnp.int32(RING_MAX) // jnp.maximum(num_senders.astype(jnp.int32), 1)


def quantize(x: jax.Array, frac_bits: int, bound: jax.Array) -> tuple[jax.Array, jax.Array]:
    """round(x 2^frac_bits) saturated to [-bound, bound], as int32 reinterpreted as uint32;
    and whether each coordinate saturated."""
    scaled = jnp.round(x.astype(jnp.float32) * jnp.float32(2.0**frac_bits))
    as_int = jnp.clip(scaled, -_FLOAT_BELOW_2_31, _FLOAT_BELOW_2_31).astype(jnp.int32)
    clipped = jnp.clip(as_int, -bound, bound)
    saturated = (clipped != as_int) | (jnp.abs(scaled) >= _FLOAT_BELOW_2_31)
    return lax.bitcast_convert_type(clipped, jnp.uint32), saturated


def dequantize(ring: jax.Array, frac_bits: int) -> jax.Array:
    """The ring value read as int32, over 2^frac_bits, in float32. (A sum widened to uint64,
    as jnp.sum does under x64, is cut back to its residue mod 2^32 first.)"""
    signed = lax.bitcast_convert_type(ring.astype(jnp.uint32), jnp.int32).astype(jnp.float32)
    return signed / jnp.float32(2.0**frac_bits)


def pair_key(key: jax.Array, own: tuple, other: tuple) -> tuple[jax.Array, jax.Array]:
    """The seed both clients of a pair derive (identities in sorted order) and whether `own`
    sorts before `other`."""
    (own_id, own_occurrence), (other_id, other_occurrence) = own, other
    before = (own_id < other_id) | ((own_id == other_id) & (own_occurrence < other_occurrence))
    low_id = jnp.where(before, own_id, other_id)
    low_occurrence = jnp.where(before, own_occurrence, other_occurrence)
    high_id = jnp.where(before, other_id, own_id)
    high_occurrence = jnp.where(before, other_occurrence, own_occurrence)
    for part in (low_id, low_occurrence, high_id, high_occurrence):
        key = jax.random.fold_in(key, part)
    return key, before


def expand(key: jax.Array, tree) -> Any:
    """PRG(seed): uniform uint32 leaves shaped like `tree`, one stream a leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    masks = [
        jax.random.bits(jax.random.fold_in(key, i), jnp.shape(leaf), jnp.uint32)
        for i, leaf in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, masks)


def pairwise_mask(cohort: SecureCohort, client_id, occurrence, tree) -> Any:
    """sum over the other real clients j of +-PRG(s_kj), uint32 leaves shaped like `tree`;
    one pair at a time, so memory is one delta whatever the cohort size."""
    zeros = jax.tree.map(lambda leaf: jnp.zeros(jnp.shape(leaf), jnp.uint32), tree)
    own = (jnp.asarray(client_id, jnp.int32), jnp.asarray(occurrence, jnp.int32))

    def add_pair(j, total):
        other = (cohort.client_id[j], cohort.occurrence[j])
        seed, before = pair_key(cohort.key, own, other)
        itself = (own[0] == other[0]) & (own[1] == other[1])
        paired = cohort.real[j] & ~itself
        mask = expand(seed, tree)
        # Unsigned arithmetic wraps: 0 - m is -m in the ring.
        signed = jax.tree.map(lambda m: jnp.where(before, m, jnp.uint32(0) - m), mask)
        return jax.tree.map(lambda t, m: t + jnp.where(paired, m, jnp.uint32(0)), total, signed)

    return lax.fori_loop(0, cohort.client_id.shape[0], add_pair, zeros)


class SecureAggregation(NamedTuple):
    """Secure summation of the linear aggregator (`Pipeline.secure`).

    `masks=False` sends the bare fixed-point values: the same sum, for tests only.
    """

    frac_bits: int = 20
    masks: bool = True

    def encode(self, weighted_delta, cohort: SecureCohort, info) -> SecureSum:
        """One client's upload: its weighted delta (zero where it has no vote) in the ring,
        plus its pairwise masks if it is a real client."""
        real = info.num_examples > 0
        bound = saturation_bound(jnp.sum(cohort.real))
        leaves, treedef = jax.tree.flatten(weighted_delta)
        quantized = [quantize(leaf, self.frac_bits, bound) for leaf in leaves]
        ring = jax.tree.unflatten(treedef, [values for values, _ in quantized])
        saturated = sum(
            (jnp.sum(clipped).astype(jnp.float32) for _, clipped in quantized), jnp.float32(0)
        )
        if self.masks:
            mask = pairwise_mask(cohort, info.client_id, info.occurrence, ring)
            ring = jax.tree.map(lambda r, m: r + jnp.where(real, m, jnp.uint32(0)), ring, mask)
        return SecureSum(
            ring=ring,
            saturated=jnp.where(real, saturated, 0.0),
            senders=real.astype(jnp.float32),
        )

    def decode(self, total: SecureSum) -> tuple[Any, dict[str, jax.Array]]:
        """The weighted sum from the cohort's summed uploads, and the saturated fraction."""
        weighted_sum = jax.tree.map(lambda r: dequantize(r, self.frac_bits), total.ring)
        size = sum(leaf.size for leaf in jax.tree.leaves(total.ring))
        fraction = total.saturated / jnp.maximum(total.senders * size, 1.0)
        return weighted_sum, {"secure_saturated_fraction": fraction}
