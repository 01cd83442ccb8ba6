"""SCAFFOLD and FedNova against the papers' algorithms written out in numpy on the
least-squares problem (control variates c and c_i over rounds; unequal local steps, client
momentum and a proximal term for FedNova); FedNova with equal steps is FedAvg; both equal on
every strategy and on 8 sharded devices; SCAFFOLD's control variates survive kill -9; the
config builds exactly the presets."""

from __future__ import annotations

import random
import signal
import subprocess

import jax
import numpy as np
import pytest

from fedjax_cv import algorithms
from fedjax_cv.algorithms import control
from fedjax_cv.algorithms.registry import ALGORITHMS, build_algorithm
from fedjax_cv.config_base import base_config
from fedjax_cv.validation import ConfigError, validate_config
from tests import linear_problem as lp
from tests.test_resume import CONFIG, ROOT, resume_check
from tests.xla import assert_results_agree, sharded_path_results

LR = 0.1
STRATEGIES = ("vmap", "sequential", "host")
# Each round's client ids: some clients come back, so their c_i carry over between rounds.
ROUND_IDS = ([0, 7, 14], [7, 21, 14], [21, 0, 7])
# Real steps of each client ([clients] per round, of 3): unequal local work.
ROUND_STEPS = ([3, 1, 2], [2, 3, 3], [1, 2, 3])


def make_round(r: int, nonfinite: int | None = None):
    """Round r's cohort: 3 clients of up to 3 steps of 4 examples, the last step of one client
    half padded; `nonfinite`: a client whose data is NaN (its update is refused)."""
    c = lp.make_cohort(num_clients=3, num_steps=3, batch=4, seed=10 + r)
    mask = np.array(c.mask)
    for k, steps in enumerate(ROUND_STEPS[r]):
        mask[k, steps:] = False
    mask[1, ROUND_STEPS[r][1] - 1, 2:] = False
    x = np.array(c.examples["x"])
    if nonfinite is not None:
        x[nonfinite] = np.nan
    clients = c.clients.replace(
        client_id=np.asarray(ROUND_IDS[r], np.int32),
        num_examples=mask.sum(axis=(1, 2)).astype(np.float32),
    )
    return c.replace(examples={**c.examples, "x": x}, mask=mask, clients=clients)


# ------------------------------------------------------------------------------------------
# The papers' algorithms in numpy, on theta = [w..., b] in float64.


def flat(params) -> np.ndarray:
    return np.concatenate([np.asarray(params["w"], np.float64), [float(params["b"])]])


def gradient(theta: np.ndarray, cohort, k: int, s: int) -> np.ndarray:
    """The masked mean loss's gradient of client k at step s."""
    m = np.asarray(cohort.mask[k, s], np.float64)
    x = cohort.examples["x"][k, s].astype(np.float64)
    y = cohort.examples["label"][k, s].astype(np.float64)
    residual = x @ theta[:-1] + theta[-1] - y
    return np.concatenate([(m * residual) @ x, [np.sum(m * residual)]]) / m.sum()


def local_run(theta, cohort, k, lr, *, momentum=0.0, mu=0.0, correction=None):
    """Client k's local (momentum) SGD from theta over its real steps, the gradient of its
    loss corrected by `correction` (SCAFFOLD's c - c_i) and regularised by FedProx's mu.
    Returns (final theta, [tau, dim] the loss gradients G_i, tau)."""
    y, velocity, grads = theta.copy(), np.zeros_like(theta), []
    for s in range(cohort.num_steps):
        if not cohort.mask[k, s].any():
            continue
        g = gradient(y, cohort, k, s)
        grads.append(g)
        direction = g + mu * (y - theta) + (0.0 if correction is None else correction)
        velocity = momentum * velocity + direction
        y = y - lr * velocity
    return y, np.stack(grads), len(grads)


def numpy_scaffold(rounds, *, num_clients, server_lr, schedule=lambda r: 1.0, nonfinite=None):
    """Karimireddy et al. 2020, Algorithm 1 with option II, |S| the clients that vote."""
    x = flat(lp.initial_params())
    c = np.zeros_like(x)
    c_local = {}
    for r in range(rounds):
        cohort = make_round(r, nonfinite if r == 1 else None)
        lr = LR * schedule(r)
        deltas, control_deltas = [], []
        for k, cid in enumerate(ROUND_IDS[r]):
            if r == 1 and k == nonfinite:
                continue  # no vote, c_i unchanged
            ci = c_local.get(cid, np.zeros_like(x))
            y, _, steps = local_run(x, cohort, k, lr, correction=c - ci)
            ci_new = ci - c + (x - y) / (steps * lr)
            deltas.append(y - x)
            control_deltas.append(ci_new - ci)
            c_local[cid] = ci_new
        x = x + server_lr * np.mean(deltas, axis=0)
        c = c + len(control_deltas) / num_clients * np.mean(control_deltas, axis=0)
    return x, c, c_local


def momentum_weights(steps: int, rho: float, eta_mu: float) -> np.ndarray:
    """a_i, the weights of the gradients G_i in the delta -eta G_i a_i, by their definition:
    gradient k (0-based) reaches the model through every later step's momentum, or shrinks
    by (1 - eta mu) at every later step."""
    if eta_mu:
        return np.array([(1 - eta_mu) ** (steps - 1 - k) for k in range(steps)])
    return np.array([sum(rho**j for j in range(steps - k)) for k in range(steps)])


def numpy_fednova(rounds, *, momentum=0.0, mu=0.0, server_lr=1.0):
    """Wang et al. 2020: x <- x - tau_eff sum_i p_i eta G_i a_i / ||a_i||_1, p_i = n_i / n."""
    x = flat(lp.initial_params())
    tau_effs = []
    for r in range(rounds):
        cohort = make_round(r)
        sizes = np.asarray(cohort.clients.num_examples, np.float64)
        p = sizes / sizes.sum()
        normalised, norms = [], []
        for k in range(cohort.num_clients):
            y, grads, steps = local_run(x, cohort, k, LR, momentum=momentum, mu=mu)
            a = momentum_weights(steps, momentum, LR * mu)
            # The paper's decomposition of the delta holds for this solver.
            np.testing.assert_allclose(y - x, -LR * grads.T @ a, rtol=1e-10, atol=1e-12)
            normalised.append(LR * grads.T @ a / np.abs(a).sum())
            norms.append(np.abs(a).sum())
        tau_eff = float(p @ np.asarray(norms))
        x = x - server_lr * tau_eff * (p @ np.stack(normalised))
        tau_effs.append(tau_eff)
    return x, tau_effs


# ------------------------------------------------------------------------------------------
# Rounds against numpy.


def run_rounds(algorithm, rounds, nonfinite=None, num_clients=lp.NUM_CLIENT_IDS):
    state = algorithm.init(lp.initial_params(), num_clients=num_clients)
    history = []
    for r in range(rounds):
        cohort = make_round(r, nonfinite if r == 1 else None)
        state, metrics = algorithm.apply(state, cohort, jax.random.key(r))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


@pytest.mark.parametrize("scheduled", [False, True])
def test_scaffold_rounds_are_the_papers_algorithm_in_numpy(scheduled):
    schedule = (lambda r: 0.5**r) if scheduled else (lambda r: 1.0)
    algorithm = algorithms.scaffold(
        lp.loss_fn,
        LR,
        num_clients=lp.NUM_CLIENT_IDS,
        server_learning_rate=0.7,
        aggregation="mean",
        lr_schedule=(lambda r: 0.5**r) if scheduled else None,
        strategy="vmap",
    )
    state, history = run_rounds(algorithm, 3, nonfinite=2)
    x, c, c_local = numpy_scaffold(
        3, num_clients=lp.NUM_CLIENT_IDS, server_lr=0.7, schedule=schedule, nonfinite=2
    )
    np.testing.assert_allclose(flat(state.params), x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(state.aggregation["scaffold"]), c, rtol=1e-5, atol=1e-6)
    stored = state.client_local["stages"]["scaffold"]
    for cid in range(lp.NUM_CLIENT_IDS):
        expected = c_local.get(cid, np.zeros_like(x))
        actual = np.concatenate([stored["w"][cid], [stored["b"][cid]]])
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=str(cid))
    # Round 2's NaN client 14 wrote nothing: its c_i is round 1's, and c moved by 2 votes.
    assert history[1]["num_nonfinite_clients"] == 1
    assert np.abs(c).sum() > 0 and len(c_local) == 4
    np.testing.assert_allclose(history[-1]["scaffold_control_norm"], np.linalg.norm(c), 1e-5)


@pytest.mark.parametrize("momentum, mu", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.5)])
def test_fednova_rounds_are_the_papers_algorithm_in_numpy(momentum, mu):
    algorithm = algorithms.fednova(
        lp.loss_fn,
        LR,
        client_momentum=momentum,
        objective=algorithms.ClientObjective(proximal_mu=mu),
        strategy="vmap",
    )
    state, history = run_rounds(algorithm, 3)
    x, tau_effs = numpy_fednova(3, momentum=momentum, mu=mu)
    np.testing.assert_allclose(flat(state.params), x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([h["fednova_tau_eff"] for h in history], tau_effs, rtol=1e-5)
    # Unequal steps: FedNova is not FedAvg here.
    fedavg, _ = run_rounds(
        algorithms.fedavg(
            lp.loss_fn,
            LR,
            client_momentum=momentum,
            objective=algorithms.ClientObjective(proximal_mu=mu),
            strategy="vmap",
        ),
        3,
    )
    assert not np.allclose(flat(fedavg.params), x, rtol=1e-3)


def test_fednova_normaliser_is_the_sum_of_the_weights():
    for steps in (1, 2, 5, 13):
        for rho in (0.0, 0.5, 0.9):
            expected = momentum_weights(steps, rho, 0.0).sum()
            actual = control.fednova_normaliser(np.int32(steps), rho)
            np.testing.assert_allclose(actual, expected, rtol=1e-5)
        expected = momentum_weights(steps, 0.0, 0.05).sum()
        actual = control.fednova_normaliser(np.int32(steps), 0.0, 0.05)
        np.testing.assert_allclose(actual, expected, rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_with_equal_local_steps_is_fedavg(momentum):
    cohorts = [
        lp.make_cohort(num_clients=4, num_steps=3, seed=s, sizes=[12, 3, 7, 9]) for s in range(3)
    ]

    def final(preset):
        algorithm = preset(lp.loss_fn, LR, client_momentum=momentum, strategy="vmap")
        state = algorithm.init(lp.initial_params())
        for r, cohort in enumerate(cohorts):
            state, _ = algorithm.apply(state, cohort, jax.random.key(r))
        return jax.device_get(state.params)

    nova, avg = final(algorithms.fednova), final(algorithms.fedavg)
    np.testing.assert_allclose(flat(nova), flat(avg), rtol=1e-6, atol=1e-7)
    assert not np.allclose(flat(avg), flat(lp.initial_params()))


# ------------------------------------------------------------------------------------------
# Every strategy and 8 sharded devices.


def path_results(strategy: str, mesh=None) -> dict[str, np.ndarray]:
    presets = {
        "scaffold": lambda: algorithms.scaffold(
            lp.loss_fn,
            LR,
            num_clients=lp.NUM_CLIENT_IDS,
            client_momentum=0.5,
            strategy=strategy,
            mesh=mesh,
        ),
        "fednova": lambda: algorithms.fednova(
            lp.loss_fn, LR, client_momentum=0.9, strategy=strategy, mesh=mesh
        ),
    }
    out = {}
    for name, preset in presets.items():
        state, _ = run_rounds(preset(), 3, nonfinite=0)
        leaves = jax.tree.leaves(
            (state.params, state.opt_state, state.aggregation, state.client_local)
        )
        for i, leaf in enumerate(leaves):
            out[f"{name}/{i}"] = np.asarray(leaf)
    return out


def test_scaffold_and_fednova_agree_on_every_strategy():
    results = {s: path_results(s) for s in STRATEGIES}
    assert_results_agree(results, results["vmap"])


def test_scaffold_and_fednova_agree_on_eight_sharded_devices(tmp_path):
    """Three clients padded to 8 on the mesh: padded clients neither vote nor write c_i."""
    sharded = sharded_path_results("tests.test_scaffold_fednova", tmp_path / "results.npz")
    assert_results_agree(sharded, path_results("vmap"))


# ------------------------------------------------------------------------------------------
# The config path.


def algorithm_config(**overrides):
    config = base_config().algorithm
    config.client.learning_rate = LR
    config.strategy = "vmap"
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        target = config
        for part in filter(None, section.split(".")):
            target = getattr(target, part)
        setattr(target, field, value)
    return config


@pytest.mark.parametrize(
    "overrides, preset",
    [
        (
            {"name": "scaffold", "client.momentum": 0.5, "server.learning_rate": 0.7},
            lambda: algorithms.scaffold(
                lp.loss_fn,
                LR,
                num_clients=lp.NUM_CLIENT_IDS,
                client_momentum=0.5,
                server_learning_rate=0.7,
                strategy="vmap",
            ),
        ),
        (
            {"name": "fednova", "client.momentum": 0.9},
            lambda: algorithms.fednova(lp.loss_fn, LR, client_momentum=0.9, strategy="vmap"),
        ),
        (
            {"name": "fednova", "client.proximal_mu": 0.5},
            lambda: algorithms.fednova(
                lp.loss_fn,
                LR,
                objective=algorithms.ClientObjective(proximal_mu=0.5),
                strategy="vmap",
            ),
        ),
    ],
)
def test_config_builds_the_preset_bit_for_bit(overrides, preset):
    config = algorithm_config(**overrides)
    assert config.name in ALGORITHMS
    from_config, _ = run_rounds(
        build_algorithm(config, lp.loss_fn, num_clients=lp.NUM_CLIENT_IDS), 3
    )
    from_preset, _ = run_rounds(preset(), 3)
    assert jax.tree.structure(from_config) == jax.tree.structure(from_preset)
    jax.tree.map(np.testing.assert_array_equal, from_config, from_preset)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"algorithm.name": "scaffold", "algorithm.client.learning_rate": 0.0},
            "algorithm.client.learning_rate=0.0 is not allowed with scaffold",
        ),
        (
            {
                "algorithm.name": "fednova",
                "algorithm.client.momentum": 0.9,
                "algorithm.client.proximal_mu": 0.1,
            },
            "algorithm.client.proximal_mu=0.1 is not allowed with fednova",
        ),
    ],
)
def test_bad_settings_are_one_line_naming_the_field(overrides, message):
    config = base_config()
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        target = config
        for part in section.split("."):
            target = getattr(target, part)
        setattr(target, field, value)
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_scaffold_needs_the_population():
    with pytest.raises(ValueError, match=r"algorithm.name='scaffold' needs build_algorithm"):
        build_algorithm(algorithm_config(name="scaffold"), lp.loss_fn)


# ------------------------------------------------------------------------------------------
# Exact resume.


def test_scaffold_control_variates_survive_kill_9(tmp_path):
    """Killed twice mid-run, resumed from the last checkpoint: the uninterrupted digest, which
    depends on every c_i and on c (restored from the checkpoint's client-local store)."""
    overrides = [
        "--config.model.name=logistic",
        "--config.algorithm.name=scaffold",
        "--config.num_rounds=8",
        "--config.checkpoint.every_rounds=2",
        "--config.eval_every_rounds=8",
        "--config.data.num_train_examples=1000",
    ]
    reference = tmp_path / "reference"
    subprocess.run(resume_check._command(CONFIG, reference, overrides), check=True, cwd=ROOT)
    interrupted = tmp_path / "interrupted"
    log = resume_check.run_with_interruptions(
        CONFIG,
        interrupted,
        overrides,
        num_rounds=8,
        sig=signal.SIGKILL,
        kills=2,
        kill_during_save=0,
        rng=random.Random(3),
    )
    assert any("rc=-9" in line for line in log), log
    assert resume_check._final_digest(interrupted) == resume_check._final_digest(reference)
    lines = (reference / "metrics.jsonl").read_text().splitlines()
    assert '"train/scaffold_control_norm"' in lines[-1] or any(
        '"train/scaffold_control_norm"' in line for line in lines
    )
