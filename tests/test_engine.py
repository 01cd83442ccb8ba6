"""Strategies agree, padding changes nothing, samplers draw what they promise."""

from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest
from scipy import stats

from fedjax_cv import algorithms
from fedjax_cv.engine import pad_clients, resolve_strategy
from fedjax_cv.engine.strategies import has_empty_steps
from tests import linear_problem as lp
from tests.xla import run_on_devices

ALGORITHMS = {
    "fedavg": lambda **kw: algorithms.fedavg(lp.loss_fn, 0.1, client_momentum=0.5, **kw),
    "fedavgm": lambda **kw: algorithms.fedavgm(lp.loss_fn, 0.1, **kw),
    "fedopt": lambda **kw: algorithms.fedopt(lp.loss_fn, 0.1, **kw),
    "fedprox": lambda **kw: algorithms.fedprox(lp.loss_fn, 0.1, proximal_mu=0.2, **kw),
    "fedir": lambda **kw: algorithms.fedir(lp.loss_fn, 0.1, class_prior=[0.4, 0.3, 0.2, 0.1], **kw),
    "fedvc": lambda **kw: algorithms.fedvc(lp.loss_fn, 0.1, virtual_client_size=8, **kw),
    "fedbn": lambda **kw: algorithms.fedbn(
        lp.loss_fn, 0.1, local=algorithms.ClientLocal(params="^b$"), **kw
    ),
}


def two_rounds(algorithm, cohort):
    state = algorithm.init(lp.initial_params(), num_clients=lp.NUM_CLIENT_IDS)
    for r in range(2):
        state, metrics = algorithm.apply(state, cohort, jax.random.key(r))
    kept = {f"local_{k}": v for k, v in state.client_local.get("params", {}).items()}
    return jax.device_get({**state.params, **kept}), jax.device_get(metrics)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_vmap_sequential_and_host_loop_agree(name):
    cohort = lp.make_cohort(num_clients=4, num_steps=3, sizes=[12, 30, 5, 12])
    cohort.mask[1, 2, :] = False
    cohort.mask[3, 1, 2:] = False
    results = {s: two_rounds(ALGORITHMS[name](strategy=s), cohort) for s in lp_strategies()}
    reference, _ = results["vmap"]
    for strategy, (params, metrics) in results.items():
        for key in reference:
            np.testing.assert_allclose(params[key], reference[key], atol=1e-5, err_msg=strategy)
        assert metrics["num_examples"] == cohort.mask.sum()


def lp_strategies():
    return ("vmap", "sequential", "host")


@pytest.mark.parametrize("strategy", ["vmap", "sequential", "host"])
def test_padded_examples_steps_and_clients_change_nothing(strategy):
    cohort = lp.make_cohort(num_clients=3, num_steps=2, batch=4)
    # The same data with two extra padded examples per batch, one padded step, two padded
    # clients; padded slots hold garbage that must not leak in.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 3, 6, lp.DIM)).astype(np.float32) * 100
    labels = rng.integers(0, lp.NUM_CLASSES, (3, 3, 6)).astype(np.int32)
    mask = np.zeros((3, 3, 6), bool)
    x[:, :2, :4], labels[:, :2, :4], mask[:, :2, :4] = (
        cohort.examples["x"],
        cohort.examples["label"],
        True,
    )
    padded = pad_clients(cohort.replace(examples={"x": x, "label": labels}, mask=mask), 5)
    algorithm = lambda: algorithms.fedavgm(
        lp.loss_fn, 0.1, client_momentum=0.9, client_weight_decay=0.1, strategy=strategy
    )
    expected, _ = two_rounds(algorithm(), cohort)
    actual, metrics = two_rounds(algorithm(), padded)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], atol=1e-6)
    assert metrics["num_clients"] == 3


def test_steps_are_gated_exactly_when_some_step_has_no_real_example():
    cohort = lp.make_cohort(num_clients=3, num_steps=2, batch=4)
    assert not has_empty_steps(cohort)
    cohort.mask[1, 0, 1:] = False  # a partial batch still steps
    assert not has_empty_steps(cohort)
    cohort.mask[2, 1, :] = False
    assert has_empty_steps(cohort)
    assert has_empty_steps(pad_clients(lp.make_cohort(), 4))


def test_eight_device_sharded_round_matches_single_device():
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from fedjax_cv import algorithms
        from fedjax_cv.engine import client_mesh
        from tests import linear_problem as lp
        assert jax.device_count() == 8, jax.devices()
        mesh = client_mesh()
        cohort = lp.make_cohort(num_clients=5, num_steps=3, sizes=[12, 30, 5, 12, 7])
        out = {}
        local = algorithms.ClientLocal(params="^b$")
        for strategy in ("vmap", "sequential"):
            for m in (None, mesh):
                alg = algorithms.fedavgm(lp.loss_fn, 0.1, strategy=strategy, mesh=m, local=local)
                state = alg.init(lp.initial_params(), num_clients=lp.NUM_CLIENT_IDS)
                for r in range(2):
                    state, metrics = alg.apply(state, cohort, jax.random.key(r))
                local_b = state.client_local["params"]["b"]
                out[(strategy, m is None)] = jax.device_get({**state.params, "local_b": local_b})
                assert float(metrics["num_clients"]) == 5
        ref = out[("vmap", True)]
        for k, params in out.items():
            for key in ref:
                np.testing.assert_allclose(params[key], ref[key], atol=1e-5, err_msg=str(k))
        print("sharded ok")
        """
    )
    result = run_on_devices(script)
    assert "sharded ok" in result.stdout


def test_same_key_same_round_and_other_key_other_round_with_dropout_like_noise():
    def noisy_loss(params, model_state, batch, rng):
        losses, out = lp.loss_fn(params, model_state, batch, rng)
        return losses * (1 + jax.random.uniform(rng, losses.shape)), out

    algorithm = algorithms.fedavg(noisy_loss, 0.1, strategy="vmap")
    cohort = lp.make_cohort()

    def run(key):
        state = algorithm.init(lp.initial_params())
        return jax.device_get(algorithm.apply(state, cohort, key)[0].params["w"])

    np.testing.assert_array_equal(run(jax.random.key(3)), run(jax.random.key(3)))
    assert not np.allclose(run(jax.random.key(3)), run(jax.random.key(4)))


def test_auto_picks_host_loop_for_convs_sequential_for_dense_on_cpu_vmap_elsewhere():
    conv = {"kernel": np.zeros((3, 3, 1, 8))}
    dense = {"kernel": np.zeros((8, 4))}
    assert resolve_strategy("auto", conv, "cpu") == "host"
    assert resolve_strategy("auto", dense, "cpu") == "sequential"
    assert resolve_strategy("auto", conv, "gpu") == "vmap"
    assert resolve_strategy("auto", dense, "tpu") == "vmap"


def test_size_proportional_sampling_matches_client_sizes_chi_square():
    sizes = np.array([10, 20, 30, 40, 100])
    sampler = algorithms.size_proportional_clients()
    rng = np.random.default_rng(0)
    draws = np.concatenate([sampler.sample(rng, sizes, 4) for _ in range(5000)])
    observed = np.bincount(draws, minlength=len(sizes))
    expected = sizes / sizes.sum() * len(draws)
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    # The uniform sampler on the same sizes is clearly rejected by the same test.
    uniform = algorithms.uniform_clients()
    draws = np.concatenate([uniform.sample(rng, sizes, 4) for _ in range(5000)])
    observed = np.bincount(draws, minlength=len(sizes))
    assert stats.chisquare(observed, expected).pvalue < 1e-6


def test_uniform_sampling_is_without_replacement():
    sampler = algorithms.uniform_clients()
    rng = np.random.default_rng(1)
    for _ in range(100):
        ids = sampler.sample(rng, np.ones(20), 10)
        assert len(set(ids.tolist())) == 10


@pytest.mark.parametrize("num_examples, size", [(50, 20), (20, 20), (7, 20)])
def test_virtual_client_draws_exactly_n_vc_examples(num_examples, size):
    sampler = algorithms.virtual_client(size)
    rng = np.random.default_rng(2)
    picks = [sampler.indices(rng, num_examples) for _ in range(200)]
    assert all(len(p) == size for p in picks)
    assert all(p.min() >= 0 and p.max() < num_examples for p in picks)
    if num_examples >= size:
        assert all(len(set(p.tolist())) == size for p in picks)  # without replacement
    else:
        assert set(np.concatenate(picks).tolist()) == set(range(num_examples))
        assert any(len(set(p.tolist())) < size for p in picks)  # with replacement


def test_local_epochs_visit_every_example_once_per_epoch():
    sampler = algorithms.local_epochs(3)
    picks = sampler.indices(np.random.default_rng(0), 11)
    assert len(picks) == 33
    assert np.all(np.bincount(picks) == 3)
