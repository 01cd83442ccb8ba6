"""Execution paths that must agree: strategies and devices with a loss that draws from its key,
cohorts in another client order, and a client drawn twice into a round with client-local state.
"""

from __future__ import annotations

import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_cv import algorithms
from fedjax_cv.algorithms.schedules import round_schedule
from fedjax_cv.engine import pad_clients
from tests import linear_problem as lp
from tests.xla import run_on_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
STRATEGIES = ("vmap", "sequential", "host")
KEEP = 0.7  # dropout keep probability


def dropout_loss(params, model_state, batch, rng, class_weights=None):
    """The least-squares loss on inputs under dropout drawn from the step's key."""
    keep = jax.random.bernoulli(rng, KEEP, batch["x"].shape)
    x = jnp.where(keep, batch["x"] / KEEP, 0.0)
    batch = {**batch, "x": x}
    return lp.loss_fn(params, model_state, batch, rng, class_weights=class_weights)


def dropout_cohort():
    """Five slots: client 7 drawn twice (occurrence 0 and 1, FedVC), a client with a padded
    step and padded examples, unequal n_k; the mesh pads it further."""
    cohort = lp.make_cohort(num_clients=5, num_steps=3, seed=2, sizes=[12, 30, 30, 9, 20])
    cohort.mask[3, 2, :] = False
    cohort.mask[4, 1, 1:] = False
    ids = np.array([0, 7, 7, 21, 35], np.int32)
    occurrence = np.array([0, 0, 1, 0, 0], np.int32)
    return cohort.replace(clients=cohort.clients.replace(client_id=ids, occurrence=occurrence))


def dropout_rounds(strategy: str, mesh=None, round_keys=(0, 1)) -> dict[str, np.ndarray]:
    """Two FedAvgM rounds with client momentum and a linear learning-rate decay on
    `dropout_cohort`: params and optimizer state."""
    algorithm = algorithms.fedavgm(
        dropout_loss,
        0.1,
        client_momentum=0.5,
        lr_schedule=round_schedule("linear", 2),
        strategy=strategy,
        mesh=mesh,
    )
    state = algorithm.init(lp.initial_params())
    for r in round_keys:
        state, metrics = algorithm.apply(state, dropout_cohort(), jax.random.key(r))
    state = jax.device_get(state)
    assert float(metrics["num_clients"]) == 5
    trace = jax.tree.leaves(state.opt_state)
    return {
        "w": state.params["w"],
        "b": state.params["b"],
        **{f"t{i}": t for i, t in enumerate(trace)},
    }


def test_strategies_agree_with_a_loss_that_uses_its_key():
    results = {s: dropout_rounds(s) for s in STRATEGIES}
    for strategy, result in results.items():
        for key, value in results["vmap"].items():
            np.testing.assert_allclose(result[key], value, atol=1e-5, err_msg=strategy)
    # The key matters: other round keys give another model.
    other = dropout_rounds("vmap", round_keys=(5, 6))
    assert not np.allclose(other["w"], results["vmap"]["w"], atol=1e-3)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """Results over an 8-device mesh, from one process with 8 CPU devices (XLA_FLAGS is read
    when the backend starts): the dropout rounds and the store after duplicate clients."""
    out = tmp_path_factory.mktemp("eight_devices") / "results.npz"
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from fedjax_cv.engine import client_mesh
        from tests.test_engine_paths import dropout_rounds, duplicate_round
        assert jax.device_count() == 8, jax.devices()
        results = {{}}
        for strategy in ("vmap", "sequential"):
            for key, value in dropout_rounds(strategy, client_mesh()).items():
                results[f"dropout/{{strategy}}/{{key}}"] = value
            state = duplicate_round(strategy, client_mesh())
            results[f"store/{{strategy}}"] = state.client_local["params"]["b"]
        np.savez({str(out)!r}, **results)
        """
    )
    run_on_devices(script)
    return dict(np.load(out))


def test_eight_sharded_devices_agree_with_one_with_a_loss_that_uses_its_key(eight_devices):
    """vmap and sequential over an 8-device mesh (5 clients padded to 8) against one device."""
    single = dropout_rounds("vmap")
    for strategy in ("vmap", "sequential"):
        for key, value in single.items():
            np.testing.assert_allclose(
                eight_devices[f"dropout/{strategy}/{key}"],
                value,
                atol=1e-5,
                err_msg=f"{strategy} {key}",
            )


def permute_clients(cohort, order):
    return jax.tree.map(lambda x: x[np.asarray(order)], cohort)


ORDER_ALGORITHMS = {
    "fedavgm": lambda s: algorithms.fedavgm(dropout_loss, 0.1, client_momentum=0.5, strategy=s),
    "fedbn": lambda s: algorithms.fedbn(
        dropout_loss, 0.1, local=algorithms.ClientLocal(params="^b$"), strategy=s
    ),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", sorted(ORDER_ALGORITHMS))
def test_clients_in_another_order_give_the_same_rounds(name, strategy):
    """Keys derive from client ids, never from slots, so only the order of the float sums over
    clients changes: a few ulp of values near 1, hence 1e-6."""
    cohort = pad_clients(lp.make_cohort(num_clients=4, num_steps=2, seed=6, sizes=[5, 9, 30, 2]), 5)
    cohort.mask[2, 1, :] = False
    order = [3, 4, 0, 2, 1]  # the padded client in the middle
    results = []
    for cohorts in ([cohort] * 3, [permute_clients(cohort, order)] * 3):
        algorithm = ORDER_ALGORITHMS[name](strategy)
        state = algorithm.init(lp.initial_params(), num_clients=lp.NUM_CLIENT_IDS)
        for r, c in enumerate(cohorts):
            state, _ = algorithm.apply(state, c, jax.random.key(r))
        results.append(jax.device_get(state))
    original, permuted = results
    for key in ("w", "b"):
        np.testing.assert_allclose(permuted.params[key], original.params[key], atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        permuted.client_local,
        original.client_local,
    )


# --------------------------------------------------------------------------- duplicate clients


def duplicate_cohort():
    """Client 7 drawn three times (FedVC draws with replacement). The copies sit out of
    occurrence order in the cohort (2, 0, then 1 after client 14), so a rule that picks a copy
    by its slot (the last one) and one that picks it by occurrence disagree."""
    cohort = lp.make_cohort(num_clients=5, num_steps=2, seed=1, sizes=[8, 8, 8, 8, 8])
    ids = np.array([7, 7, 14, 7, 21], np.int32)
    occurrence = np.array([2, 0, 0, 1, 0], np.int32)
    cohort.mask[4] = False  # client 21 ...
    cohort = cohort.replace(clients=cohort.clients.replace(client_id=ids, occurrence=occurrence))
    # ... is a padded slot: it must not write to the store.
    return cohort.replace(
        clients=cohort.clients.replace(
            num_examples=np.array([8, 8, 8, 8, 0], np.float32),
        )
    )


def fedbn_b_local(strategy, mesh=None):
    return algorithms.fedbn(
        lp.loss_fn, 0.1, local=algorithms.ClientLocal(params="^b$"), strategy=strategy, mesh=mesh
    )


def duplicate_round(strategy, mesh=None, cohort=None):
    algorithm = fedbn_b_local(strategy, mesh)
    state = algorithm.init(lp.initial_params(), num_clients=lp.NUM_CLIENT_IDS)
    state, _ = algorithm.apply(
        state, duplicate_cohort() if cohort is None else cohort, jax.random.key(0)
    )
    return jax.device_get(state)


def expected_store_after_duplicates(cohort):
    """By hand: each copy trains from the client's stored b (the initial one: never sampled)
    and the server's w; the store keeps, for each client, the copy with the highest
    occurrence (`local_state.scatter`'s rule); other rows keep the initial b."""
    params = lp.initial_params()
    b = np.full(lp.NUM_CLIENT_IDS, params["b"], np.float64)
    winners = {}
    for slot in range(cohort.num_clients):
        if cohort.clients.num_examples[slot] == 0:
            continue
        client, occurrence = (
            int(cohort.clients.client_id[slot]),
            int(cohort.clients.occurrence[slot]),
        )
        if client not in winners or occurrence > winners[client][0]:
            winners[client] = (occurrence, slot)
    for client, (_, slot) in winners.items():
        b[client] = lp.local_sgd(params, cohort, slot, 0.1)["b"]
    real = np.flatnonzero(cohort.clients.num_examples > 0)
    finals = [lp.local_sgd(params, cohort, slot, 0.1) for slot in real]
    delta = lp.mean_delta(params, cohort, finals, cohort.clients.num_examples[real])
    return b, {k: params[k] + delta[k] for k in params}, winners


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_client_drawn_twice_keeps_its_highest_occurrence(strategy):
    cohort = duplicate_cohort()
    b, server, winners = expected_store_after_duplicates(cohort)
    assert winners[7] == (2, 0)  # occurrence 2, in slot 0
    state = duplicate_round(strategy)
    np.testing.assert_allclose(state.client_local["params"]["b"], b, atol=1e-6)
    # Every copy counts in the server's mean, with its client's n_k.
    for key in ("w", "b"):
        np.testing.assert_allclose(state.params[key], server[key], atol=1e-6)
    # The copies ended apart, so the test tells them apart.
    copies = [lp.local_sgd(lp.initial_params(), cohort, slot, 0.1)["b"] for slot in (0, 1, 3)]
    assert (
        min(abs(copies[0] - copies[1]), abs(copies[1] - copies[2]), abs(copies[0] - copies[2]))
        > 1e-3
    )


def test_a_client_drawn_twice_keeps_its_highest_occurrence_sharded(eight_devices):
    b, _, _ = expected_store_after_duplicates(duplicate_cohort())
    for strategy in ("vmap", "sequential"):
        np.testing.assert_allclose(
            eight_devices[f"store/{strategy}"], b, atol=1e-6, err_msg=strategy
        )


def test_when_the_last_copy_is_nonfinite_the_finite_copy_is_kept():
    cohort = duplicate_cohort()
    cohort.examples["x"][0, 0, 0, 0] = np.inf  # occurrence 2 of client 7 turns non-finite
    expected = cohort.replace(
        clients=cohort.clients.replace(num_examples=np.array([0, 8, 8, 8, 0], np.float32))
    )
    b, _, winners = expected_store_after_duplicates(expected)
    assert winners[7] == (1, 3)
    for strategy in STRATEGIES:
        state = duplicate_round(strategy, cohort=cohort)
        np.testing.assert_allclose(
            state.client_local["params"]["b"], b, atol=1e-6, err_msg=strategy
        )
