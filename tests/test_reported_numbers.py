"""The numbers a round reports and leaves behind, against numpy re-implementations of the round:
train metrics, averaged BatchNorm statistics, and rounds in which no client carries weight."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_cv import algorithms
from fedjax_cv.algorithms import LossOutput
from fedjax_cv.engine import ClientInfo, Cohort, pad_clients
from fedjax_cv.models.norm import Norm
from fedjax_cv.tasks import get_task
from tests import linear_problem as lp
from tests import norm_problem as bn

STRATEGIES = ("vmap", "sequential", "host")
LR = 0.1


def loss_with_accuracy(params, model_state, batch, rng):
    """The least-squares loss, and 'accuracy': the prediction is within 0.5 of the label."""
    del rng
    prediction = batch["x"] @ params["w"] + params["b"]
    error = prediction - batch["label"].astype(jnp.float32)
    correct = (jnp.abs(error) < 0.5).astype(jnp.float32)
    return 0.5 * jnp.square(error), LossOutput(
        model_state=model_state, metrics={"accuracy": correct}
    )


def padded_cohort():
    """Three clients with padded examples, a padded step and garbage in every padded slot,
    then two padded clients. n_k (10, 30, 6) differs from the examples trained on (11, 7, 9)."""
    cohort = lp.make_cohort(num_clients=3, num_steps=3, batch=4, seed=3, sizes=[10, 30, 6])
    mask = cohort.mask.copy()
    mask[0, 2, 3] = False  # client 0: 8 + 3 = 11 real examples
    mask[1, 1, 3] = False
    mask[1, 2, :] = False  # client 1: a step with no real example; 4 + 3 = 7
    mask[2, 0, 2:] = False
    mask[2, 1, 3] = False  # client 2: 2 + 3 + 4 = 9
    # Padded slots hold garbage that must not leak in: huge inputs, or inputs 0 with label 0,
    # which the initial model (b = 0.3) predicts 'correctly'.
    x, labels = cohort.examples["x"].copy(), cohort.examples["label"].copy()
    padded = np.flatnonzero(~mask.ravel())
    x.reshape(-1, lp.DIM)[padded[0::2]] = 100.0
    x.reshape(-1, lp.DIM)[padded[1::2]] = 0.0
    labels.reshape(-1)[padded[1::2]] = 0
    cohort = cohort.replace(examples={"x": x, "label": labels}, mask=mask)
    return pad_clients(cohort, 5)


def numpy_round(params, cohort, lr):
    """One FedAvg round in float64: local SGD on each real client's masked mean loss; the
    n_k-weighted mean of the client models; loss and accuracy summed over the examples
    trained on (each evaluated at the params of the step that used it)."""
    w0, b0 = params["w"].astype(np.float64), float(params["b"])
    deltas, weights = [], []
    loss_sum = correct_sum = trained = 0.0
    margins = []
    for c in range(cohort.num_clients):
        if cohort.clients.num_examples[c] == 0:
            continue
        w, b = w0.copy(), b0
        for s in range(cohort.num_steps):
            m = cohort.mask[c, s]
            if not m.any():
                continue
            x = cohort.examples["x"][c, s][m].astype(np.float64)
            y = cohort.examples["label"][c, s][m].astype(np.float64)
            error = x @ w + b - y
            loss_sum += np.sum(0.5 * error**2)
            correct_sum += np.sum(np.abs(error) < 0.5)
            margins.extend(np.abs(np.abs(error) - 0.5))
            trained += m.sum()
            w, b = w - lr * error @ x / len(y), b - lr * error.mean()
        deltas.append(np.concatenate([w - w0, [b - b0]]))
        weights.append(float(cohort.clients.num_examples[c]))
    mean_delta = np.average(deltas, axis=0, weights=weights)
    return {
        "w": w0 + mean_delta[:-1],
        "b": b0 + mean_delta[-1],
        "loss": loss_sum / trained,
        "accuracy": correct_sum / trained,
        "delta_norm": np.linalg.norm(mean_delta),
        "num_examples": trained,
        "num_clients": len(deltas),
        "smallest_margin": min(margins),
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_round_metrics_match_numpy_with_padding(strategy):
    cohort = padded_cohort()
    params = lp.initial_params()
    expected = numpy_round(params, cohort, LR)
    # float32 and float64 agree on every 'correct' decision only away from the threshold.
    assert expected["smallest_margin"] > 1e-4
    assert expected["num_examples"] == 11 + 7 + 9 and expected["num_clients"] == 3
    algorithm = algorithms.fedavg(
        loss_with_accuracy, LR, metric_names=("accuracy",), strategy=strategy
    )
    state, metrics = algorithm.apply(algorithm.init(params), cohort, jax.random.key(0))
    state, metrics = jax.device_get((state, metrics))
    np.testing.assert_allclose(state.params["w"], expected["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["b"], expected["b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], expected["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(metrics["delta_norm"], expected["delta_norm"], rtol=1e-5)
    assert metrics["num_examples"] == expected["num_examples"]
    assert metrics["num_clients"] == expected["num_clients"]
    assert metrics["num_nonfinite_clients"] == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fedavg_averages_batch_norm_statistics_by_n_k(strategy):
    cohort = bn.make_cohort(num_clients=3, num_steps=3, batch=4, sizes=[10, 30, 6])
    cohort.mask[2, 2, :] = False  # a padded step: BatchNorm must not move on it
    cohort = pad_clients(cohort, 4)
    params, model_state = bn.initial_variables()
    # Server learning rate 0.5: the statistics must be the clients' mean, not a server step.
    algorithm = algorithms.fedavg(bn.loss_fn, LR, server_learning_rate=0.5, strategy=strategy)
    state, _ = algorithm.apply(algorithm.init(params, model_state), cohort, jax.random.key(0))
    mean, var = bn.batch_stats(jax.device_get(state.model_state))

    sizes = np.array([10.0, 30.0, 6.0])
    per_client = [bn.running_statistics(cohort, c) for c in range(3)]
    expected_mean = sum(n * m for n, (m, _) in zip(sizes, per_client, strict=True)) / sizes.sum()
    expected_var = sum(n * v for n, (_, v) in zip(sizes, per_client, strict=True)) / sizes.sum()
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected_var, rtol=1e-5, atol=1e-6)
    # The clients' statistics differ, so a plain mean or a server step would not pass.
    assert not np.allclose(expected_mean, np.mean([m for m, _ in per_client], axis=0), atol=1e-3)


def all_padded_cohort():
    cohort = lp.make_cohort(seed=4)
    cohort.mask[:] = False
    return cohort.replace(
        clients=cohort.clients.replace(num_examples=np.zeros(3, np.float32)),
    )


EMPTY_ROUND_ALGORITHMS = {
    "fedavg": lambda s: algorithms.fedavg(lp.loss_fn, LR, strategy=s),
    "fedavgm": lambda s: algorithms.fedavgm(lp.loss_fn, LR, server_momentum=0.9, strategy=s),
    "fedopt_adam": lambda s: algorithms.fedopt(
        lp.loss_fn, LR, server_optimizer_name="adam", strategy=s
    ),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", sorted(EMPTY_ROUND_ALGORITHMS))
def test_round_in_which_every_client_has_weight_0_changes_no_state(name, strategy):
    algorithm = EMPTY_ROUND_ALGORITHMS[name](strategy)
    state = algorithm.init(lp.initial_params())
    # A real round first, so that momentum and Adam's moments are not zero.
    state, _ = algorithm.apply(state, lp.make_cohort(seed=0), jax.random.key(0))
    before = jax.device_get(state)
    state, metrics = algorithm.apply(state, all_padded_cohort(), jax.random.key(1))
    after, metrics = jax.device_get((state, metrics))
    jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
    jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
    jax.tree.map(np.testing.assert_array_equal, after.model_state, before.model_state)
    assert int(after.round) == int(before.round) + 1
    assert metrics["num_examples"] == 0 and metrics["num_clients"] == 0
    assert metrics["loss"] == 0 and metrics["delta_norm"] == 0
    if name != "fedavg":  # the state that must not move is not trivially empty
        assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(before.opt_state))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_round_in_which_every_client_has_weight_0_keeps_batch_norm_statistics(strategy):
    params, model_state = bn.initial_variables()
    algorithm = algorithms.fedavgm(bn.loss_fn, LR, server_momentum=0.9, strategy=strategy)
    state = algorithm.init(params, model_state)
    state, _ = algorithm.apply(state, bn.make_cohort(seed=0), jax.random.key(0))
    before = jax.device_get(state)
    empty = bn.make_cohort(seed=1)
    empty.mask[:] = False
    empty = empty.replace(clients=empty.clients.replace(num_examples=np.zeros(3, np.float32)))
    after = jax.device_get(algorithm.apply(state, empty, jax.random.key(1))[0])
    for field in ("params", "opt_state", "model_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, field), getattr(before, field))
    mean, var = bn.batch_stats(before.model_state)
    assert np.all(mean != 0) and np.all(var != 1)  # statistics that a reset would change


def image_cohort(images, labels, mask):
    num_clients = images.shape[0]
    info = ClientInfo(
        client_id=np.arange(num_clients, dtype=np.int32),
        occurrence=np.zeros(num_clients, np.int32),
        num_examples=mask.sum(axis=(1, 2)).astype(np.float32),
        label_counts=np.ones((num_clients, 4), np.float32),
    )
    return Cohort({"image": images, "label": labels}, mask, info)


class FlatBatchNorm(nn.Module):
    """The smallest image classifier with BatchNorm: flatten, normalise, classify."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = Norm("batch")(x.reshape((x.shape[0], -1)), train=train)
        return nn.Dense(4)(x)


def test_padded_examples_stay_out_of_batch_norm_statistics():
    """The classification task's loss on a BatchNorm model: a round on batches of 4 real
    examples, and on the same batches with 2 padded examples appended."""
    model = FlatBatchNorm()
    loss_fn = get_task("classification").make_loss_fn(model)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 2, 6, 3, 3, 1)).astype(np.float32)
    images[:, :, 4:] = 5.0  # what padded slots hold must not matter
    labels = rng.integers(0, 4, (2, 2, 6)).astype(np.int32)
    mask = np.zeros((2, 2, 6), bool)
    mask[:, :, :4] = True
    real = image_cohort(images[:, :, :4], labels[:, :, :4], mask[:, :, :4])
    padded = image_cohort(images, labels, mask)
    variables = model.init(jax.random.key(0), images[0, 0], train=False)
    model_state = {"batch_stats": variables["batch_stats"]}
    states = []
    for cohort in (real, padded):
        algorithm = algorithms.fedavg(loss_fn, 0.05, strategy="sequential")
        state = algorithm.init(variables["params"], model_state)
        states.append(jax.device_get(algorithm.apply(state, cohort, jax.random.key(0))[0]))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        states[1].model_state,
        states[0].model_state,
    )
