"""Many processes, one global mesh: joining them, and what each process does alone.

Every process runs the same command. `initialize` joins them with `jax.distributed`
(JAX's multi-controller runtime: a coordinator, heartbeats, collectives over gloo on CPU,
NCCL/ICI on accelerators); `client_mesh` then spans every process's devices. Each process
assembles only its own block of the cohort's client rows (`process_rows`) and
`global_cohort` stitches the blocks into global arrays with
`jax.make_array_from_process_local_data`. Only process 0 writes files (`is_writer`);
evaluation batches are dealt round-robin over the processes and their statistics collected on
every process in batch order (`gather_in_order`), so the merged statistics are those of one
process evaluating every batch.

The client-local store is the one array split over the processes (`fedjax_cv.engine.store`);
`host_blocks` brings it to every host block by block when a checkpoint's digest needs it.

With one process every function here is a no-op and nothing of this module runs in a round.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_cv.engine.cohort import Cohort, pad_clients

CLIENT_AXIS = "clients"
# A dead peer is noticed by the coordination service within this many seconds; every other
# process then ends (JAX's own default, 100 s, is longer than a user waits for a hung run).
DEFAULT_HEARTBEAT_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
    """The command line's `--coordinator_address/--num_processes/--process_id`
    (all None: decide from the environment)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def check_flags(flags: DistributedFlags) -> None:
    """ValueError of one line for flags that cannot describe a run; checks nothing else."""
    address, count, index = flags.coordinator_address, flags.num_processes, flags.process_id
    if count is not None and count < 1:
        raise ValueError(f"--num_processes={count} is not allowed; must be >= 1")
    if address is None and (count is not None or index is not None):
        given = "--num_processes" if count is not None else "--process_id"
        raise ValueError(
            f"{given}={count if count is not None else index} needs --coordinator_address="
            "HOST:PORT (where process 0 listens); give all three flags, or none"
        )
    if address is not None:
        if not re.fullmatch(r"\[?[\w.\-:]+\]?:\d{1,5}", address):
            raise ValueError(
                f"--coordinator_address={address!r} is not allowed; must be HOST:PORT, "
                "e.g. 127.0.0.1:12345"
            )
        if count is None or index is None:
            raise ValueError(
                f"--coordinator_address={address} needs --num_processes and --process_id too"
            )
    if index is not None and count is not None and not 0 <= index < count:
        raise ValueError(
            f"--process_id={index} is not allowed; must be in 0 .. {count - 1} "
            f"(--num_processes={count})"
        )


def environment_asks() -> bool:
    """Whether the environment describes a multi-process job JAX can join by itself:
    `JAX_COORDINATOR_ADDRESS`, or a SLURM job step of more than one task (srun; the batch
    script itself is a step of one task)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return os.environ.get("SLURM_STEP_NUM_TASKS", "1").strip() not in ("", "0", "1")


def initialize(
    flags: DistributedFlags,
    *,
    force: bool = False,
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> bool:
    """Joins this process to the others with `jax.distributed.initialize` when the flags give
    a coordinator, the environment asks for it (`environment_asks`), or `force` (TPU pods:
    JAX finds the workers itself); returns whether it did. Call it before anything touches a
    device. On CPU the collectives go over gloo."""
    check_flags(flags)
    explicit = flags.coordinator_address is not None
    if not (explicit or force or environment_asks()):
        return False
    if explicit and flags.num_processes == 1:
        return False
    # Before any backend exists: CPU devices then speak gloo to the other processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=flags.coordinator_address,
        num_processes=flags.num_processes,
        process_id=flags.process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    return True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes the run's files (metrics, config, plots): process 0."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every process waits here until all have come (no-op with one process)."""
    if is_multiprocess():
        multihost_utils.sync_global_devices(name)


def mesh_devices(devices=None) -> list:
    """Devices ordered by process, then id: each process's devices are one block of the
    mesh, so its client rows are one contiguous block of the cohort."""
    devices = jax.devices() if devices is None else list(devices)
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def padded_size(num_clients: int, mesh) -> int:
    """The cohort size the mesh runs: `num_clients` padded to a multiple of its devices
    (padded clients have no example and weigh nothing)."""
    size = 1 if mesh is None else mesh.shape[CLIENT_AXIS]
    return -(-num_clients // size) * size


def process_rows(num_clients: int, mesh) -> tuple[int, int]:
    """[start, stop) of the padded cohort's client rows that this process's devices hold."""
    total = padded_size(num_clients, mesh)
    sharding = NamedSharding(mesh, P(CLIENT_AXIS))
    slices = sharding.addressable_devices_indices_map((total,)).values()
    starts = sorted({s[0].indices(total)[:2] for s in slices})
    start, stop = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != stop - start:
        raise ValueError(f"process {jax.process_index()}'s devices hold no contiguous block")
    return start, stop


def global_cohort(local: Cohort, num_clients: int, mesh) -> Cohort:
    """The global cohort, client axis over the mesh, from this process's rows `local`
    (`process_rows` of the padded cohort; rows past the real clients are padding)."""
    start, stop = process_rows(num_clients, mesh)
    local = pad_clients(local, stop - start)
    total = padded_size(num_clients, mesh)
    sharding = NamedSharding(mesh, P(CLIENT_AXIS))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (total,) + np.shape(x)[1:]
        ),
        local,
    )


def process_local(tree):
    """`tree` with each replicated global array replaced by this process's copy (one local
    device), so it can enter a computation no other process takes part in. Arrays split over
    the processes (the client-local store) stay as they are: no process holds them whole."""
    if not is_multiprocess():
        return tree

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and x.is_fully_replicated:
            return x.addressable_data(0)
        return x

    return jax.tree.map(local, tree)


def is_split(x) -> bool:
    """Whether `x` is a global array that no process holds whole (split over processes)."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated


BLOCK_BYTES = 64 << 20  # the most of a split array that `host_blocks` brings to a host at once


def host_blocks(x, max_bytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
    """`x`'s values on this host, as consecutive blocks of its leading axis: all of it at once
    unless `x` is split over the processes; then every process must call this together, and
    each block of rows (at most `max_bytes`) comes to every process in turn, so no host holds
    all of it at once."""
    if not is_split(x):
        yield np.asarray(jax.device_get(x))
    elif not isinstance(x.sharding, NamedSharding):
        yield np.asarray(multihost_utils.process_allgather(x, tiled=True))
    else:
        yield from row_blocks(x, max_bytes)


def row_blocks(x: jax.Array, max_bytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
    """`host_blocks` of an array with a `NamedSharding`, split or not: blocks of its leading
    axis of at most `max_bytes` (one row at least), each brought whole to every device."""
    total = x.shape[0]
    row_bytes = max(1, x.dtype.itemsize * int(np.prod(x.shape[1:], dtype=np.int64)))
    rows = max(1, min(total, max_bytes // row_bytes))
    fetch = _row_fetcher(x.sharding.mesh, rows)
    for start in range(0, total, rows):
        first = min(start, total - rows)  # the last block, as long as the others, ends at total
        yield np.asarray(fetch(x, np.int32(first)))[start - first :]


@functools.cache
def _row_fetcher(mesh, rows: int):
    """x, start -> rows [start, start + rows) of x, replicated on every device of `mesh`."""
    return jax.jit(
        lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, rows),
        out_shardings=NamedSharding(mesh, P()),
    )


def my_share(items: Iterable[Any]) -> Iterable[tuple[int, Any]]:
    """(index, item) of the items dealt to this process, round-robin."""
    count, index = jax.process_count(), jax.process_index()
    for i, item in enumerate(items):
        if i % count == index:
            yield i, item


def gather_in_order(pairs: list[tuple[int, Any]]) -> list[Any]:
    """Every process's (index, value) pairs, on every process, as one list in index order.
    Values are any picklable host values (a batch's statistics); they travel as bytes over
    JAX's collectives."""
    if not is_multiprocess():
        return [value for _, value in sorted(pairs, key=lambda p: p[0])]
    payload = np.frombuffer(pickle.dumps(jax.device_get(pairs)), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([payload.size], np.int64))
    longest = int(np.max(sizes))
    padded = np.zeros(longest, np.uint8)
    padded[: payload.size] = payload
    everyone = multihost_utils.process_allgather(padded)
    gathered = []
    for row, size in zip(everyone, np.ravel(sizes), strict=True):
        gathered.extend(pickle.loads(row[: int(size)].tobytes()))
    return [value for _, value in sorted(gathered, key=lambda p: p[0])]


def agree(failure: str | None) -> str | None:
    """Every process says whether it could start (None) or why not; returns the first
    process's reason (named by process), the same on every process, or None."""
    if not is_multiprocess():
        return failure
    said = gather_in_order([(jax.process_index(), failure)])
    for index, reason in enumerate(said):
        if reason is not None:
            return reason if index == jax.process_index() else f"process {index}: {reason}"
    return None


def first_signal(received: int | None) -> int | None:
    """The signal some process received (the lowest process's), the same on every process:
    a SIGTERM to one process stops them all after the same round."""
    said = multihost_utils.process_allgather(np.array([received or 0], np.int64))
    return next((int(x) for x in np.ravel(said) if x), None)


def writer_only(action: Callable[[], Any]) -> Any:
    """`action()` on process 0 only (None elsewhere)."""
    return action() if is_writer() else None
