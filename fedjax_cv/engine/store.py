"""The client-local store split over the mesh: each device holds one block of its rows.

The store (`fedjax_cv.algorithms.local_state`) has one row per client, leaves
`[num_clients, ...]`. On a mesh its rows are padded to a multiple of the devices
(`hosts.padded_size`) and split over the `clients` axis, each device's block of rows next to
its block of the cohort: a device holds `rows / devices` rows, a process only its devices'
blocks. The padding rows belong to no client (no client id reaches them): they keep their
initial values and are never read.

A round takes the cohort's rows from the store and writes back what its clients kept, inside
its compiled computation, and only arrays of the cohort's size travel between devices:

- `take`: each device looks the cohort's ids up among its own rows (zeros where it holds none)
  and one reduce-scatter hands each device its block of the cohort's rows. The sum is taken
  over the values' bits as unsigned integers, where exactly one device adds nonzero bits, so
  every value comes through as it was (-0.0 included).
- `put`: each device receives the cohort's rows to write (an all-gather of them) and writes
  those that fall into its own block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_cv.engine import hosts

CLIENT_AXIS = hosts.CLIENT_AXIS


def splits(mesh: Mesh | None) -> bool:
    """Whether a store on `mesh` is split (more than one device on its clients axis)."""
    return mesh is not None and mesh.shape[CLIENT_AXIS] > 1


def store_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over the mesh's `clients` axis, as the cohort's clients."""
    return NamedSharding(mesh, P(CLIENT_AXIS))


def _rows(store) -> int:
    return jax.tree.leaves(store)[0].shape[0]


def _is_split(store, mesh: Mesh | None) -> bool:
    """Whether `store` can be handled block by block: a mesh of several devices, and rows
    that divide over them (a store `spread` made; any other falls back to plain indexing)."""
    if not (jax.tree.leaves(store) and splits(mesh)):
        return False
    return _rows(store) % mesh.shape[CLIENT_AXIS] == 0


def seed_rows(num_clients):
    """The rows of the store to build before `spread` makes every client's from the first:
    one (`num_clients` as it is when it is no count of clients, for the builder to refuse)."""
    return 1 if isinstance(num_clients, int) and num_clients > 0 else num_clients


def spread(one_row, num_clients: int, mesh: Mesh):
    """The store of `num_clients` copies of one client's values (`one_row`, leaves
    `[1, ...]`), padded to a multiple of the mesh's devices and split over them: each device
    computes only its own rows."""
    total = hosts.padded_size(num_clients, mesh)
    seed = jax.device_put(one_row, NamedSharding(mesh, P()))

    def fill(tree):
        return jax.tree.map(lambda x: jnp.broadcast_to(x[0], (total,) + x.shape[1:]), tree)

    return jax.jit(fill, out_shardings=store_sharding(mesh))(seed)


def _as_bits(x: jax.Array) -> jax.Array:
    """`x` as unsigned integers of its width (floats) or as it is (integers); bool as uint8."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint8)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return x


def _from_bits(bits: jax.Array, dtype) -> jax.Array:
    if dtype == jnp.bool_:
        return bits != 0
    if jnp.issubdtype(dtype, jnp.floating):
        return lax.bitcast_convert_type(bits, dtype)
    return bits


def take(store, client_ids: jax.Array, mesh: Mesh | None):
    """The rows `client_ids` of `store`, leaves `[cohort, ...]`: split over the mesh like the
    cohort when its size divides over the devices (a cohort the engine placed), else
    replicated. Every id must be a row of the store."""
    if not _is_split(store, mesh):
        return jax.tree.map(lambda s: s[client_ids], store)
    by_block = client_ids.shape[0] % mesh.shape[CLIENT_AXIS] == 0

    def body(block, ids):
        rows = _rows(block)
        local = ids - lax.axis_index(CLIENT_AXIS) * rows
        mine = (local >= 0) & (local < rows)
        local = jnp.where(mine, local, 0)

        def one(s):
            found = _as_bits(s[local])
            found = jnp.where(mine.reshape((-1,) + (1,) * (s.ndim - 1)), found, 0)
            if by_block:
                found = lax.psum_scatter(found, CLIENT_AXIS, scatter_dimension=0, tiled=True)
            else:
                found = lax.psum(found, CLIENT_AXIS)
            return _from_bits(found, s.dtype)

        return jax.tree.map(one, block)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(CLIENT_AXIS), P()),
        out_specs=P(CLIENT_AXIS) if by_block else P(),
        check_vma=False,
    )(store, client_ids)


def put(store, rows: jax.Array, values, mesh: Mesh | None):
    """`store` with row `rows[i]` set to `values`' row i; rows outside the store are dropped
    (every row must appear at most once)."""
    if not _is_split(store, mesh):
        return jax.tree.map(lambda s, v: s.at[rows].set(v, mode="drop"), store, values)

    def body(block, rows, values):
        size = _rows(block)
        local = rows - lax.axis_index(CLIENT_AXIS) * size
        local = jnp.where((local >= 0) & (local < size), local, size)  # not mine: dropped
        return jax.tree.map(lambda s, v: s.at[local].set(v, mode="drop"), block, values)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(CLIENT_AXIS), P(), P()),
        out_specs=P(CLIENT_AXIS),
        check_vma=False,
    )(store, rows, values)
