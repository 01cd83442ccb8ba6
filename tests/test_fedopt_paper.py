"""FedOpt exactly as Reddi et al. 2021, Algorithm 2, against an independent numpy version.

The server feeds optax the pseudo-gradient g = -Delta (server minus client mean); the paper
writes everything in Delta (client minus server): x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from fedjax_cv.algorithms.server import scale_by_fedopt, server_optimizer

NAMES = ("adagrad", "adam", "yogi")


def initial_params():
    return {
        "w": np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]], np.float32),
        "b": np.array([1.0, -2.0, 0.125], np.float32),
    }


def known_deltas():
    """Four rounds of aggregated client deltas (client minus server), float32-exact values.

    Mixed magnitudes (so FedYogi's sign(v - Delta^2) takes both signs), sign changes, and a
    coordinate that stays 0 (the update there must stay 0: m = 0, v > 0).
    """
    rng = np.random.default_rng(12)
    rounds = []
    for t in range(4):
        w = (rng.normal(size=(2, 3)) * np.array([[1.0, 0.1, 0.01]])).astype(np.float32)
        b = (rng.normal(size=(3,)) * (0.5 if t % 2 else 2.0)).astype(np.float32)
        w[1, 0] = 0.0
        rounds.append({"w": w, "b": b})
    return rounds


def second_moment(name, v, d, b2):
    """Algorithm 2, lines 12-14: v_t from v_{t-1} and Delta_t."""
    if name == "adagrad":
        return v + d**2
    if name == "adam":
        return b2 * v + (1 - b2) * d**2
    return v - (1 - b2) * d**2 * np.sign(v - d**2)


def algorithm2(name, params, deltas, eta, b1, b2, tau):
    """Reddi et al. 2021, Algorithm 2, lines 11-15, in float64 numpy, in the paper's terms."""
    x = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}  # m_{-1} = 0
    v = {k: np.full_like(x[k], tau**2) for k in x}  # v_{-1} = tau^2 (>= tau^2 in the paper)
    for delta in deltas:
        for k in x:
            d = np.asarray(delta[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * d
            v[k] = second_moment(name, v[k], d, b2)
            x[k] = x[k] + eta * m[k] / (np.sqrt(v[k]) + tau)
    return x


def run_server(optimizer, params, deltas):
    """What server_update does with the optimizer: g = -Delta, updates, apply_updates."""
    params = jax.tree.map(np.asarray, params)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for delta in deltas:
        gradient = jax.tree.map(lambda d: -np.asarray(d, np.float32), delta)
        updates, state = update(gradient, state, params)
        params = jax.device_get(optax.apply_updates(params, updates))
    return params, jax.device_get(state)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "eta,b1,b2,tau", [(0.1, 0.9, 0.99, 1e-3), (0.3, 0.5, 0.9, 1e-2), (0.05, 0.0, 0.999, 1e-3)]
)
def test_paper_variant_matches_algorithm2_in_numpy(name, eta, b1, b2, tau):
    params, deltas = initial_params(), known_deltas()
    optimizer = server_optimizer(name, eta, b1=b1, b2=b2, eps=tau, variant="paper")
    got, state = run_server(optimizer, params, deltas)
    want = algorithm2(name, params, deltas, eta, b1, b2, tau)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)
    # The coordinate whose delta is always 0 never moves.
    assert got["w"][1, 0] == params["w"][1, 0]
    # State: count of rounds, mu = -m_t (the pseudo-gradient's moment), nu = v_t.
    (fedopt_state, *_) = state
    assert int(fedopt_state.count) == len(deltas)
    m, v = np.zeros(3), np.full(3, tau**2)
    for delta in deltas:
        d = delta["b"].astype(np.float64)
        m = b1 * m + (1 - b1) * d
        v = second_moment(name, v, d, b2)
    np.testing.assert_allclose(fedopt_state.mu["b"], -m, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fedopt_state.nu["b"], v, rtol=1e-6, atol=1e-9)


def test_yogi_deltas_exercise_both_signs():
    """The golden test above is only meaningful for Yogi if v - Delta^2 changes sign."""
    tau, b2 = 1e-3, 0.99
    v = np.full(3, tau**2)
    signs = set()
    for delta in known_deltas():
        d2 = delta["b"].astype(np.float64) ** 2
        signs |= set(np.sign(v - d2).tolist())
        v = v - (1 - b2) * d2 * np.sign(v - d2)
    assert {-1.0, 1.0} <= signs


def test_scale_by_fedopt_is_the_documented_transformation():
    """scale_by_fedopt alone returns m / (sqrt(v) + tau) in the pseudo-gradient's terms."""
    tau = 1e-3
    g = {"a": np.array([2.0, -0.5, 0.0], np.float32)}
    transformation = scale_by_fedopt("adagrad", b1=0.0, tau=tau)
    updates, _ = transformation.update(g, transformation.init(g))
    want = g["a"] / (np.sqrt(tau**2 + g["a"].astype(np.float64) ** 2) + tau)
    np.testing.assert_allclose(updates["a"], want, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_optax_variant_is_still_optax_bit_for_bit(name):
    eta, b1, b2, eps = 0.1, 0.9, 0.99, 1e-3
    reference = {
        "adam": optax.adam(eta, b1=b1, b2=b2, eps=eps),
        "yogi": optax.yogi(eta, b1=b1, b2=b2, eps=eps),
        "adagrad": optax.adagrad(eta, initial_accumulator_value=0.0, eps=eps),
    }[name]
    want_params, want_state = run_server(reference, initial_params(), known_deltas())
    for optimizer in (
        server_optimizer(name, eta, b1=b1, b2=b2, eps=eps),
        server_optimizer(name, eta, b1=b1, b2=b2, eps=eps, variant="optax"),
    ):
        got_params, got_state = run_server(optimizer, initial_params(), known_deltas())
        assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
        jax.tree.map(np.testing.assert_array_equal, got_params, want_params)
        jax.tree.map(np.testing.assert_array_equal, got_state, want_state)
    paper, _ = run_server(
        server_optimizer(name, eta, b1=b1, b2=b2, eps=eps, variant="paper"),
        initial_params(),
        known_deltas(),
    )
    assert np.abs(paper["b"] - want_params["b"]).max() > 1e-3  # the variants differ


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_is_the_same_in_both_variants(momentum):
    want, _ = run_server(server_optimizer("sgd", 0.7, momentum), initial_params(), known_deltas())
    got, _ = run_server(
        server_optimizer("sgd", 0.7, momentum, variant="paper"), initial_params(), known_deltas()
    )
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_round_one_paper_adam_differs_from_optax_adam_by_the_bias_correction():
    """Round 1 by hand, g the pseudo-gradient, with eta = 1:

    optax.adam: m^ = (1-b1) g / (1-b1^1) = g, v^ = (1-b2) g^2 / (1-b2^1) = g^2, so
        update = -g / (|g| + eps).
    paper:      m = (1-b1) g, v = b2 tau^2 + (1-b2) g^2, so
        update = -(1-b1) g / (sqrt(b2 tau^2 + (1-b2) g^2) + tau).
    With tau = eps -> 0 the ratio paper / optax is (1-b1) / sqrt(1-b2): the bias correction
    1 / (1 - b1^1) of m over the root of the one 1 / (1 - b2^1) of v (here 0.5 / 0.2 = 2.5;
    with the defaults b1 = 0.9, b2 = 0.99 it is 0.1 / 0.1 = 1).
    """
    b1, b2 = 0.5, 0.96
    g = np.array([1.0, -0.5, 2.0, -4.0], np.float32)
    g64 = g.astype(np.float64)
    for tau in (1e-3, 1e-7):
        paper = server_optimizer("adam", 1.0, b1=b1, b2=b2, eps=tau, variant="paper")
        reference = optax.adam(1.0, b1=b1, b2=b2, eps=tau)
        got_paper, _ = paper.update(g, paper.init(g))
        got_optax, _ = reference.update(g, reference.init(g))
        want_paper = -(1 - b1) * g64 / (np.sqrt(b2 * tau**2 + (1 - b2) * g64**2) + tau)
        want_optax = -g64 / (np.abs(g64) + tau)
        np.testing.assert_allclose(got_paper, want_paper, rtol=1e-6)
        np.testing.assert_allclose(got_optax, want_optax, rtol=1e-6)
        ratio = np.asarray(got_paper, np.float64) / np.asarray(got_optax, np.float64)
        exact = (1 - b1) * (np.abs(g64) + tau) / (np.sqrt(b2 * tau**2 + (1 - b2) * g64**2) + tau)
        np.testing.assert_allclose(ratio, exact, rtol=1e-6)
    bias_correction = (1 - b1) / np.sqrt(1 - b2)
    assert bias_correction == pytest.approx(2.5)
    np.testing.assert_allclose(ratio, bias_correction, rtol=1e-5)  # tau = 1e-7 -> 0


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_unknown_variant_is_one_clear_line(name):
    with pytest.raises(ValueError) as error:
        server_optimizer(name, 0.1, variant="adamw")
    assert str(error.value) == (
        "algorithm.server.variant='adamw' is unknown; allowed: optax, paper"
    )


def test_unknown_optimizer_with_the_paper_variant_lists_the_optimizers():
    with pytest.raises(ValueError, match=r"^algorithm.server.optimizer='lamb' is unknown; "):
        server_optimizer("lamb", 0.1, variant="paper")
    with pytest.raises(ValueError, match=r"allowed: adagrad, adam, yogi$"):
        scale_by_fedopt("sgd")


def test_paper_variant_needs_a_positive_tau():
    with pytest.raises(ValueError, match=r"^algorithm.server.eps=0.0 must be > 0"):
        server_optimizer("adam", 0.1, eps=0.0, variant="paper")
