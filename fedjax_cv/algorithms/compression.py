"""Compression of what clients upload, and the accounting of the bytes they upload.

Client-side stages of the aggregation pipeline (`fedjax_cv.algorithms.aggregation`), one per
pipeline, named "compression". The simulation decodes each upload on the client right away
and sends floats, so the aggregators see what a server would after decoding; the bytes a real
client would send are counted and reported by the stage's server part as `upload_bytes`
(`train/upload_bytes` in metrics.jsonl): the sum over the round's voting clients (weight > 0)
of the bytes each uploads for its params delta. Model state that is averaged (BatchNorm
statistics) is not counted.

- `upload_accounting()` (`none`): the float32 delta, 4 bytes a coordinate (the leaf's dtype
  size);
- `stochastic_quantization(bits)`: per leaf, ceil(size x bits / 8) bytes of packed levels plus
  its minimum and maximum as two float32 (8 bytes); at 32 bits the float32 values themselves,
  4 bytes a coordinate, with nothing added;
- `top_k(fraction)`: k x (4 bytes of float32 value + 4 bytes of int32 index into the flattened
  delta), so fraction 1 counts 8 bytes a coordinate: the sparse format, kept as it is;
- `layer_selection(fraction)`: 4 bytes a coordinate of the selected leaves, plus a bitmask of
  one bit a leaf, ceil(leaves / 8) bytes.

Order in the pipeline (`registry.build_pipeline`): clients clip, then compress, as TFF's
`DifferentiallyPrivateFactory` hands the clipped records to its inner aggregation factory:
norm bounding and DP clipping bound the update the client computed, and compression encodes
what is sent. Stochastic quantization and error feedback can send a vector
of larger norm than the clip, so `registry` refuses them with DP, whose accountant assumes the
clip bounds what each client sends; layer selection only zeroes leaves and keeps the bound.
With secure aggregation every upload is a dense masked ring vector (4 bytes a coordinate, what
`none` counts), so `registry` refuses any compression with it.

The stage sums count clients (and, for layer selection, clients per leaf), exact in float32;
the bytes are float32 too: exact below 2^24 bytes a round, relative error below 1e-7 above.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_cv.algorithms.aggregation import Stage

COMPRESSIONS = ("none", "quantization", "top_k", "layer_selection")
NAME = "compression"  # every compression stage's name: one per pipeline
INDEX_BYTES = 4  # int32 index of a kept coordinate (top-k)
VALUE_BYTES = 4  # float32 value of a kept coordinate (top-k)
RANGE_BYTES = 8  # a quantized leaf's minimum and maximum, two float32


def check_bits(bits) -> None:
    """Refuses a quantization width outside [1, 32] in one line."""
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 1 <= bits <= 32:
        raise ValueError(
            f"algorithm.compression.bits={bits!r} is not allowed; must be an integer in [1, 32]"
        )


def check_fraction(fraction) -> None:
    """Refuses a kept fraction outside (0, 1] in one line."""
    number = isinstance(fraction, int | float | np.floating) and not isinstance(fraction, bool)
    if not number or not 0 < fraction <= 1:
        raise ValueError(
            f"algorithm.compression.fraction={fraction!r} is not allowed; must be in (0, 1]"
        )


def num_kept(fraction: float, size: int) -> int:
    """ceil(fraction x size), at least 1; the product's rounding (0.3 x 10 =
    3.0000000000000004) does not add one."""
    return max(1, math.ceil(fraction * size * (1 - 1e-12)))


def dense_bytes(tree) -> int:
    """The bytes of `tree` sent uncompressed: size x dtype size, summed over leaves."""
    return sum(int(np.size(x)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def quantized_bytes(tree, bits: int) -> int:
    """Per leaf ceil(size x bits / 8) + the 8 bytes of its range; at 32 bits the dense bytes."""
    if bits == 32:
        return dense_bytes(tree)
    return sum(math.ceil(int(np.size(x)) * bits / 8) + RANGE_BYTES for x in jax.tree.leaves(tree))


def top_k_bytes(tree, fraction: float) -> int:
    """k values and k int32 indices, k = ceil(fraction x the delta's size)."""
    size = sum(int(np.size(x)) for x in jax.tree.leaves(tree))
    return num_kept(fraction, size) * (VALUE_BYTES + INDEX_BYTES)


def _count_uploads(sums, per_client_bytes: int) -> jax.Array:
    return sums["upload_clients"] * jnp.float32(per_client_bytes)


def _fixed_size_stage(client, per_client_bytes, local_init=None) -> Stage:
    """A stage whose every client uploads the same number of bytes, `per_client_bytes(delta)`
    (static shapes: a Python int at trace time)."""

    def counted_client(state, delta, own, view):
        sent, own = client(delta, own, view)
        return sent, own, {"upload_clients": jnp.float32(1.0)}

    def server(state, aggregate, sums, view):
        return aggregate, state, {"upload_bytes": _count_uploads(sums, per_client_bytes(aggregate))}

    return Stage(NAME, client=counted_client, server=server, local_init=local_init)


def upload_accounting() -> Stage:
    """No compression: reports the bytes of the float32 deltas the voting clients upload."""
    return _fixed_size_stage(lambda delta, own, view: (delta, own), dense_bytes)


def with_upload_accounting(pipeline):
    """`pipeline` with `upload_accounting()` last when it has no compression stage: every
    algorithm, from a config or composed in Python, reports `upload_bytes` with the same
    program."""
    if any(stage.name == NAME for stage in pipeline.stages):
        return pipeline
    return pipeline._replace(stages=tuple(pipeline.stages) + (upload_accounting(),))


def quantize(x: jax.Array, bits: int, key: jax.Array) -> jax.Array:
    """Unbiased stochastic uniform quantization of `x` to 2^bits levels between its minimum
    and maximum (QSGD, Alistarh et al. 2017, one bucket; Suresh et al. 2017), dequantized:
    each value rounds to one of its two neighbouring levels with the probabilities that make
    E[q(x)] = x. A constant leaf is sent as it is (its range carries it)."""
    if bits == 32:
        return x
    levels = float(2**bits - 1)
    low, high = jnp.min(x), jnp.max(x)
    step = (high - low) / levels
    spread = step > 0
    position = (x - low) / jnp.where(spread, step, 1.0)
    floor = jnp.floor(position)
    up = jax.random.uniform(key, x.shape, x.dtype) < position - floor
    level = jnp.clip(floor + up.astype(x.dtype), 0.0, levels)
    return jnp.where(spread, low + level * step, x)


def stochastic_quantization(bits: int) -> Stage:
    """Each leaf of each client's delta quantized to `bits` bits between the leaf's minimum
    and maximum, stochastically rounded so that the upload is unbiased (see `quantize`), with
    the stage's key for the client (a leaf's key folds in its index). At 32 bits the delta is
    sent unchanged, bit for bit."""
    check_bits(bits)

    def client(delta, own, view):
        leaves, treedef = jax.tree.flatten(delta)
        sent = [
            quantize(leaf, bits, jax.random.fold_in(view.key, index))
            for index, leaf in enumerate(leaves)
        ]
        return jax.tree.unflatten(treedef, sent), own

    return _fixed_size_stage(client, lambda tree: quantized_bytes(tree, bits))


def error_feedback_top_k(delta, residual, fraction: float):
    """(sent, new residual): the k = ceil(fraction x size) largest-magnitude coordinates of
    delta + residual over the whole delta (ties: the lower flattened index), and the rest.
    sent + new residual = delta + residual exactly: every coordinate is in one of them."""
    leaves, treedef = jax.tree.flatten(delta)
    old = treedef.flatten_up_to(residual)
    # x + 0.0 turns -0.0 into +0.0: add only where there is a residual, so a zero residual
    # (fraction 1) leaves the delta bit for bit.
    corrected = [jnp.where(r == 0, d, d + r) for d, r in zip(leaves, old, strict=True)]
    flat = jnp.concatenate([c.ravel() for c in corrected])
    k = num_kept(fraction, flat.size)
    _, index = jax.lax.top_k(jnp.abs(flat), k)
    kept = jnp.zeros(flat.shape, bool).at[index].set(True)
    sent_flat = jnp.where(kept, flat, 0.0)
    residual_flat = jnp.where(kept, 0.0, flat)

    def unflatten(vector):
        out, start = [], 0
        for leaf in leaves:
            out.append(vector[start : start + leaf.size].reshape(leaf.shape))
            start += leaf.size
        return jax.tree.unflatten(treedef, out)

    return unflatten(sent_flat), unflatten(residual_flat)


def top_k(fraction: float) -> Stage:
    """Top-k sparsification with error feedback (Stich, Cordonnier and Jaggi 2018;
    Karimireddy et al. 2019): each client adds its residual to its delta, sends the k =
    ceil(fraction x size) largest-magnitude coordinates of the whole delta (one top-k over all
    leaves, as the papers' single vector), and keeps the rest as its new residual in the
    client-local store (zeros at first; checkpointed with the server state). With fraction 1
    every coordinate is sent and the residual stays exactly zero."""
    check_fraction(fraction)

    def client(delta, residual, view):
        return error_feedback_top_k(delta, residual, fraction)

    return _fixed_size_stage(
        client,
        lambda tree: top_k_bytes(tree, fraction),
        local_init=lambda params: jax.tree.map(jnp.zeros_like, params),
    )


def select_layers(delta, fraction: float):
    """(sent, chosen): the delta with only the m = ceil(fraction x leaves) leaves of largest
    L2 norm kept (ties: the lower leaf index), the others zero; `chosen` [leaves] says which."""
    leaves, treedef = jax.tree.flatten(delta)
    norms = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(leaf))) for leaf in leaves])
    _, index = jax.lax.top_k(norms, num_kept(fraction, len(leaves)))
    chosen = jnp.zeros(len(leaves), bool).at[index].set(True)
    sent = [jnp.where(chosen[i], leaf, 0.0) for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(treedef, sent), chosen


def layer_selection(fraction: float) -> Stage:
    """FedVision's layer selection (Liu et al. 2020): each client uploads only the layers
    (parameter leaves: a kernel and its bias are two) whose update has an L2 norm in the top
    `fraction` of its leaves; the others send zero, which the mean counts as a zero update.
    The part not sent is dropped, with no error feedback: the client keeps nothing across
    rounds."""
    check_fraction(fraction)

    def client(state, delta, own, view):
        sent, chosen = select_layers(delta, fraction)
        return sent, own, {"upload_clients": jnp.float32(1.0), "upload_leaves": chosen}

    def server(state, aggregate, sums, view):
        leaves = jax.tree.leaves(aggregate)
        leaf_bytes = jnp.asarray([dense_bytes(leaf) for leaf in leaves], jnp.float32)
        mask_bytes = math.ceil(len(leaves) / 8)
        total = jnp.sum(sums["upload_leaves"] * leaf_bytes) + _count_uploads(sums, mask_bytes)
        return aggregate, state, {"upload_bytes": total}

    return Stage(NAME, client=client, server=server)


def get_compression(name: str, *, bits: int = 8, fraction: float = 0.1) -> Stage:
    """The compression stage by name (`algorithm.compression.name`); 'none' only counts."""
    if name == "none":
        return upload_accounting()
    if name == "quantization":
        return stochastic_quantization(bits)
    if name == "top_k":
        return top_k(fraction)
    if name == "layer_selection":
        return layer_selection(fraction)
    raise ValueError(
        f"algorithm.compression.name={name!r} is unknown; known: {', '.join(COMPRESSIONS)}"
    )
