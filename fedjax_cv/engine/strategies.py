"""How a cohort's client updates execute: vmap, sequential, host loop, sharded over devices.

An algorithm writes its client update for ONE client as a `ClientProgram`; a strategy maps it
over the cohort and returns the sum over clients of what each client's `final` contributes,
and, stacked over the cohort, what each client keeps for itself (client-local state such as
FedBN's normalisation layers). Every strategy computes the same results (up to float
reassociation), which the tests check.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_cv.engine import hosts
from fedjax_cv.engine.cohort import ClientInfo, Cohort, client_key, pad_clients

STRATEGIES = ("auto", "vmap", "sequential", "host")
CLIENT_AXIS = hosts.CLIENT_AXIS


class ClientProgram(NamedTuple):
    """A client update split as init / step / final (the FedJAX pattern), all pure.

    - `init(shared, info, key, local) -> state`: start from the server's `shared` values and
      this client's `local` values (a pytree, `{}` when the algorithm keeps none).
    - `step(shared, state, batch, mask) -> state`: one local step on a batch `[batch, ...]`
      whose padded examples have mask False. The engine never lets a batch with no real
      example change the state: no step, no momentum, no weight decay.
    - `final(shared, state, info) -> (contribution, local)`: the contribution is summed over
      the cohort's clients; `local` is returned per client, stacked over the cohort.
    """

    init: Callable[[Any, ClientInfo, jax.Array, Any], Any]
    step: Callable[[Any, Any, Any, jax.Array], Any]
    final: Callable[[Any, Any, ClientInfo], Any]


def _run_one_client(
    program: ClientProgram, shared, info, local, examples, mask, round_key, unroll, gate_steps
):
    state = program.init(shared, info, client_key(round_key, info), local)

    def body(state, batch_and_mask):
        batch, batch_mask = batch_and_mask
        if not gate_steps:  # the cohort has no empty step: nothing to skip
            return program.step(shared, state, batch, batch_mask), None
        # Under vmap this cond becomes a select; unbatched it skips padded steps' work.
        state = lax.cond(
            jnp.any(batch_mask),
            lambda s: program.step(shared, s, batch, batch_mask),
            lambda s: s,
            state,
        )
        return state, None

    if unroll is None:
        unroll = default_unroll(mask.shape[0])
    state, _ = lax.scan(body, state, (examples, mask), unroll=unroll)
    return program.final(shared, state, info)


def sum_leading_axis(x: jax.Array) -> jax.Array:
    """Sum over axis 0. For floats as a dot with ones: XLA:CPU reduces over a major axis up to
    70x slower than it contracts one (13 ms vs 0.18 ms for [10, 784, 62] here)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.sum(x, axis=0)
    return jnp.tensordot(jnp.ones(x.shape[0], x.dtype), x, axes=1)


def default_unroll(num_steps: int, backend: str | None = None) -> int | bool:
    """Local steps unrolled inside the compiled round: all of them on CPU up to 16 (a rolled
    loop costs 10-15% on a logistic round there, and far more with convs), none elsewhere,
    where compile time matters more."""
    backend = backend or jax.default_backend()
    return True if backend == "cpu" and num_steps <= 16 else 1


def has_empty_steps(cohort: Cohort) -> bool:
    """Whether some client has a step without a real example (then steps are gated, which
    costs 15-20% of a small model's step on CPU; a cohort of equal clients has none)."""
    mask = cohort.mask
    if isinstance(mask, jax.Array) and not mask.is_fully_addressable:  # a global cohort
        return not bool(_every_step_has_examples(mask))
    return not bool(np.asarray(mask).any(axis=-1).all())


@jax.jit
def _every_step_has_examples(mask: jax.Array) -> jax.Array:
    return mask.any(axis=-1).all()


def _sum_vmap(program, shared, cohort: Cohort, local, round_key, unroll=None, gate_steps=True):
    run = functools.partial(_run_one_client, program, unroll=unroll, gate_steps=gate_steps)
    per_client, kept = jax.vmap(run, in_axes=(None, 0, 0, 0, 0, None))(
        shared, cohort.clients, local, cohort.examples, cohort.mask, round_key
    )
    return jax.tree.map(sum_leading_axis, per_client), kept


def _sum_sequential(
    program, shared, cohort: Cohort, local, round_key, unroll=None, gate_steps=True
):
    """One client at a time inside the compiled round: memory independent of cohort size."""
    run = functools.partial(_run_one_client, program, unroll=unroll, gate_steps=gate_steps)
    clients = (cohort.clients, local, cohort.examples, cohort.mask)
    first = jax.tree.map(lambda x: x[0], clients)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(run, shared, *first, round_key)[0],
    )

    def body(total, client):
        contribution, kept = run(shared, *client, round_key)
        return jax.tree.map(jnp.add, total, contribution), kept

    return lax.scan(body, zeros, clients)


def sum_over_clients(
    program: ClientProgram,
    shared,
    cohort: Cohort,
    round_key: jax.Array,
    *,
    strategy: str,
    mesh: Mesh | None = None,
    unroll: int | bool | None = None,
    local=None,
    gate_steps: bool = True,
):
    """Sum over the cohort of each client's contribution, and each client's kept local values
    stacked over the cohort, traced inside a jit-compiled round.

    `local` holds each client's own values, leaves `[clients, ...]` (None: none).
    `gate_steps=False` promises that every step has a real example (`has_empty_steps`) and
    drops the guard that skips empty ones. With a
    `mesh`, the client axis is split over its `clients` axis by `jax.shard_map`; each device
    runs its clients with `strategy` ('vmap' or 'sequential') and the partial sums meet in one
    `psum`.
    """
    run = {"vmap": _sum_vmap, "sequential": _sum_sequential}[strategy]
    run = functools.partial(run, program, unroll=unroll, gate_steps=gate_steps)
    local = {} if local is None else local
    if mesh is None or mesh.shape[CLIENT_AXIS] == 1:
        return run(shared, cohort, local, round_key)

    def shard_body(shared, cohort, local, round_key):
        total, kept = run(shared, cohort, local, round_key)
        return jax.tree.map(lambda x: lax.psum(x, CLIENT_AXIS), total), kept

    sharded = jax.shard_map(
        shard_body,
        mesh=mesh,
        in_specs=(P(), P(CLIENT_AXIS), P(CLIENT_AXIS), P()),
        out_specs=(P(), P(CLIENT_AXIS)),
        # Client state starts from replicated server values and diverges per device; the
        # varying-axis type check would demand casts at every carry for no safety gain here.
        check_vma=False,
    )
    return sharded(shared, cohort, local, round_key)


class HostLoop:
    """Clients and steps dispatched from Python, each piece jit-compiled.

    On CPU a conv step inside a rolled `lax.scan` runs 15-20x slower than the same step
    dispatched from Python, and `vmap` over per-client conv weights becomes a slow grouped
    convolution; this strategy avoids both. Steps whose mask is all False are not run, the
    same rule the compiled strategies apply with `lax.cond`.
    """

    def __init__(self, program: ClientProgram):
        self._init = jax.jit(
            lambda shared, info, key, local: program.init(
                shared, info, client_key(key, info), local
            )
        )
        self._step = jax.jit(program.step, donate_argnums=1)

        def accumulate(total, shared, state, info):
            contribution, kept = program.final(shared, state, info)
            return jax.tree.map(jnp.add, total, contribution), kept

        self._accumulate = jax.jit(accumulate, donate_argnums=0)
        self._final_shape = program.final
        # Input signature -> a compiled maker of the round's zero total. Tracing the client's
        # init and final for their shapes costs a YOLOv5n round on CPU 2.5%: once per signature.
        self._zero_total = {}

    def _zeros(self, shared, info, round_key, own):
        leaves, treedef = jax.tree.flatten((shared, info, own))
        signature = (treedef, tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves))
        make = self._zero_total.get(signature)
        if make is None:
            state_shape = jax.eval_shape(self._init, shared, info, round_key, own)
            shapes = jax.eval_shape(self._final_shape, shared, state_shape, info)[0]
            make = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
            self._zero_total[signature] = make
        return make()

    def __call__(self, shared, cohort: Cohort, round_key: jax.Array, local=None):
        cohort = jax.device_get(cohort)
        local = {} if local is None else local
        step_has_examples = np.asarray(cohort.mask).any(axis=-1)
        total, kept = None, []
        for c in range(cohort.num_clients):
            info, own = jax.tree.map(lambda x, c=c: x[c], (cohort.clients, local))
            if total is None:
                total = self._zeros(shared, info, round_key, own)
            state = self._init(shared, info, round_key, own)
            for s in np.flatnonzero(step_has_examples[c]):
                batch = jax.tree.map(lambda x, c=c, s=s: x[c, s], cohort.examples)
                state = self._step(shared, state, batch, cohort.mask[c, s])
            total, client_kept = self._accumulate(total, shared, state, info)
            kept.append(client_kept)
        return total, jax.tree.map(lambda *xs: jnp.stack(xs), *kept)


def client_mesh(devices=None) -> Mesh | None:
    """A one-axis mesh `clients` over all devices (all processes' devices after
    `jax.distributed.initialize`, each process's devices one block), or None on a single
    device."""
    devices = hosts.mesh_devices(devices)
    if len(devices) == 1:
        return None
    return Mesh(np.array(devices), (CLIENT_AXIS,))


def shard_cohort(cohort: Cohort, mesh: Mesh | None) -> Cohort:
    """Pads the cohort to a multiple of the mesh size and places its client axis over it.
    A global cohort (`hosts.global_cohort`, built by many processes) is already both."""
    if mesh is None:
        return cohort
    if any(
        isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(cohort)
    ):
        return cohort
    size = mesh.shape[CLIENT_AXIS]
    cohort = pad_clients(cohort, -(-cohort.num_clients // size) * size)
    return jax.device_put(cohort, NamedSharding(mesh, P(CLIENT_AXIS)))


def has_conv_kernels(params) -> bool:
    return any(getattr(leaf, "ndim", 0) == 4 for leaf in jax.tree.leaves(params))


def resolve_strategy(strategy: str, params, backend: str | None = None) -> str:
    """'auto' on CPU: `host` for conv models (see `HostLoop`), `sequential` for the rest (a
    single client's matmuls beat vmap's batched ones there: 82k vs 65k client-examples/s on a
    logistic round); `vmap` on accelerators. With several processes (one global mesh) never
    `host`: it runs every client from one Python loop, so 'auto' picks `sequential` on CPU
    and 'host' is refused."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"algorithm.strategy={strategy!r} is unknown; allowed: {', '.join(STRATEGIES)}"
        )
    many = jax.process_count() > 1
    if strategy == "host" and many:
        raise ValueError(
            f"algorithm.strategy='host' is not allowed with {jax.process_count()} processes; "
            "it runs in one process only; use auto, vmap or sequential"
        )
    if strategy != "auto":
        return strategy
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "host" if has_conv_kernels(params) and not many else "sequential"
    return "vmap"
