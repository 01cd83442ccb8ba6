"""Compression of client uploads: exactness at no compression, unbiased quantization on its
grid, top-k with error feedback and layer selection against numpy rounds on the least-squares
problem, uploaded bytes against hand counts, every stage equal on every strategy and on 8
sharded devices, error-feedback residuals surviving kill -9, bad settings refused in one line."""

from __future__ import annotations

import functools
import json
import math
import pathlib
import random
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_cv import algorithms, curves
from fedjax_cv.algorithms import aggregation, compression
from fedjax_cv.algorithms.registry import build_pipeline
from fedjax_cv.config_base import base_config
from fedjax_cv.validation import ConfigError, validate_config
from tests import linear_problem as lp
from tests.xla import assert_results_agree, sharded_path_results

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import resume_check  # noqa: E402

LR = 0.1
STRATEGIES = ("vmap", "sequential", "host")


def cohort(sizes=None):
    return lp.make_cohort(num_clients=6, num_steps=2, batch=4, seed=3, sizes=sizes)


def run_rounds(stages, rounds=2, strategy="vmap", mesh=None, make=algorithms.fedavg, c=None):
    """`rounds` rounds of the same cohort; (state, metrics of each round) on the host."""
    pipeline = None if stages is None else aggregation.Pipeline(stages=tuple(stages))
    algorithm = make(lp.loss_fn, LR, pipeline=pipeline, strategy=strategy, mesh=mesh)
    state = algorithm.init(lp.initial_params(), num_clients=lp.NUM_CLIENT_IDS)
    history = []
    for r in range(rounds):
        state, metrics = algorithm.apply(state, cohort() if c is None else c, jax.random.key(r))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


@functools.cache
def uncompressed(rounds: int, make=algorithms.fedavgm):
    """`run_rounds` without a pipeline, computed once for the tests that compare to it."""
    return run_rounds(None, rounds=rounds, make=make)


def as_row(params) -> np.ndarray:
    return np.concatenate([np.ravel(params["w"]), [float(params["b"])]]).astype(np.float64)


def as_params(row) -> dict:
    return {"w": row[: lp.DIM], "b": np.float64(row[lp.DIM])}


def hand_deltas(params: dict, c) -> np.ndarray:
    """Each client's delta by numpy SGD, as rows [w..., b]: [clients, DIM + 1]."""
    start = as_row(params)
    return np.stack([as_row(lp.local_sgd(params, c, k, LR)) - start for k in range(c.num_clients)])


def view(key=0, weight=1.0):
    return aggregation.ClientView(None, jax.random.key(key), jnp.float32(weight))


def bits_of(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------------------
# No compression at the limits, bit for bit.


@pytest.mark.default_xla  # two programs, one result: as XLA compiles them by default
@pytest.mark.parametrize(
    "stage, per_coordinate",
    [(compression.stochastic_quantization(32), 4), (compression.top_k(1.0), 4 + 4)],
    ids=["32_bits", "top_k_everything"],
)
def test_limits_are_no_compression_bit_for_bit(stage, per_coordinate):
    plain, _ = uncompressed(3)
    compressed, history = run_rounds([stage], rounds=3, make=algorithms.fedavgm)
    assert bits_of((compressed.params, compressed.opt_state)) == bits_of(
        (plain.params, plain.opt_state)
    )
    for leaf in jax.tree.leaves(compressed.client_local):
        assert not np.any(leaf)  # top-k's residuals stay exactly zero
    # 32 bits: the float32 deltas; top-k: a float32 value and an int32 index a coordinate
    assert history[-1]["upload_bytes"] == 6 * (lp.DIM + 1) * per_coordinate


def test_accounting_stage_alone_changes_nothing_and_counts_dense_bytes():
    plain, _ = uncompressed(3)
    counted, _ = run_rounds([compression.upload_accounting()], 3, make=algorithms.fedavgm)
    assert bits_of((counted.params, counted.opt_state)) == bits_of((plain.params, plain.opt_state))
    # 5 voting clients (one holds no example) of 4 float32 coordinates each.
    _, history = run_rounds(
        [compression.upload_accounting()], rounds=1, c=cohort(sizes=[8, 8, 0, 8, 8, 8])
    )
    assert history[0]["upload_bytes"] == 5 * 4 * 4


# ------------------------------------------------------------------------------------------
# Quantization: unbiased, on its grid.


def test_quantization_is_unbiased_and_on_the_two_to_the_bits_grid():
    bits, draws = 2, 4000
    rng = np.random.default_rng(0)
    delta = {"a": rng.normal(size=(5, 6)).astype(np.float32), "b": rng.normal(size=9)}
    delta["b"] = delta["b"].astype(np.float32)
    stage = compression.stochastic_quantization(bits)
    sent = jax.jit(jax.vmap(lambda k: stage.client(None, delta, None, view(0)._replace(key=k))[0]))(
        jax.random.split(jax.random.key(1), draws)
    )
    for name, x in delta.items():
        q = np.asarray(sent[name], np.float64)  # [draws, ...]
        low, high = float(x.min()), float(x.max())
        step = (high - low) / (2**bits - 1)
        level = (q - low) / step
        np.testing.assert_allclose(level, np.round(level), atol=1e-4)  # on the grid
        assert level.min() > -1e-4 and level.max() < 2**bits - 1 + 1e-4
        position = (x.astype(np.float64) - low) / step  # only its two neighbours
        assert np.all(np.abs(level - position) < 1 + 1e-4)
        assert len(np.unique(np.round(level))) <= 2**bits
        # Rounding up with probability p = position - floor: std of the mean step sqrt(p(1-p)/n).
        p = position - np.floor(position)
        bound = 6 * step * np.sqrt(p * (1 - p) / draws) + 1e-5
        assert np.all(np.abs(q.mean(0) - x) <= bound), np.max(np.abs(q.mean(0) - x) / bound)
        assert np.abs(q.mean(0) - x).max() > 0  # it does quantize


def test_a_constant_leaf_is_sent_as_it_is():
    delta = {"w": jnp.full((4,), 0.25, jnp.float32)}
    sent, _, _ = compression.stochastic_quantization(1).client(None, delta, None, view())
    assert bits_of(sent) == bits_of(delta)


# ------------------------------------------------------------------------------------------
# Top-k with error feedback.


def test_top_k_sends_exactly_the_k_largest_and_keeps_the_rest_exactly():
    rng = np.random.default_rng(4)
    delta = {"a": rng.normal(size=(2, 3)), "b": rng.normal(size=4)}
    residual = {"a": rng.normal(size=(2, 3)), "b": np.zeros(4)}
    delta, residual = jax.tree.map(lambda x: x.astype(np.float32), (delta, residual))
    stage = compression.top_k(0.3)  # 0.3 x 10 = 3.0000000000000004: k = 3
    sent, new_residual, sums = jax.jit(stage.client)(None, delta, residual, view())
    flatten = lambda t: np.concatenate([np.ravel(np.asarray(t[k])) for k in ("a", "b")])
    corrected = flatten(delta) + flatten(residual)  # float32, as numpy adds
    sent, new_residual = flatten(sent), flatten(new_residual)
    kept = np.flatnonzero(sent)
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-np.abs(corrected))[:3]))
    np.testing.assert_array_equal(sent[kept], corrected[kept])
    np.testing.assert_array_equal(sent + new_residual, corrected)  # exactly
    assert not np.any(new_residual[kept])
    assert float(sums["upload_clients"]) == 1.0


def top_k_rows(rows: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(rows)
    for i, row in enumerate(rows):
        keep = np.argsort(-np.abs(row), kind="stable")[:k]
        out[i, keep] = row[keep]
    return out


def test_error_feedback_rounds_equal_numpy():
    """Three rounds of the same six clients: each sends the top 2 of its 4 coordinates of
    delta + residual, and keeps the rest for the next round."""
    state, history = run_rounds([compression.top_k(0.5)], rounds=3)
    params = as_row(lp.initial_params())
    residual = np.zeros((6, lp.DIM + 1))
    c = cohort()
    for _ in range(3):
        corrected = hand_deltas(as_params(params), c) + residual
        sent = top_k_rows(corrected, 2)
        residual = corrected - sent
        params = params + sent.mean(0)
    np.testing.assert_allclose(as_row(state.params), params, rtol=1e-5, atol=1e-6)
    stored = state.client_local["stages"]["compression"]
    ids = np.asarray(c.clients.client_id)
    np.testing.assert_allclose(stored["w"][ids], residual[:, : lp.DIM], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored["b"][ids], residual[:, lp.DIM], rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(lp.NUM_CLIENT_IDS), ids)
    assert not np.any(stored["w"][untouched]) and not np.any(stored["b"][untouched])
    assert history[-1]["upload_bytes"] == 6 * 2 * (4 + 4)  # k values and int32 indices


# ------------------------------------------------------------------------------------------
# Layer selection.


def test_layer_selection_round_equals_numpy_and_counts_the_sent_leaves():
    """Leaves w (3 coordinates) and b (1): fraction 0.5 sends the one of larger norm."""
    c = cohort()
    state, history = run_rounds([compression.layer_selection(0.5)], rounds=1)
    rows = hand_deltas(lp.initial_params(), c)
    w_norm, b_norm = np.linalg.norm(rows[:, : lp.DIM], axis=1), np.abs(rows[:, lp.DIM])
    send_w = w_norm > b_norm  # leaves in tree order: b, w; a tie sends b, the lower index
    sent = rows.copy()
    sent[~send_w, : lp.DIM] = 0.0
    sent[send_w, lp.DIM] = 0.0
    assert 0 < send_w.sum() < 6  # both kinds of choice happen
    np.testing.assert_allclose(
        as_row(state.params), as_row(lp.initial_params()) + sent.mean(0), rtol=1e-5, atol=1e-6
    )
    # w: 12 bytes, b: 4 bytes, plus a 1-byte bitmask of the 2 leaves, per client.
    expected = 12 * send_w.sum() + 4 * (~send_w).sum() + 6 * 1
    assert history[0]["upload_bytes"] == expected


# ------------------------------------------------------------------------------------------
# Uploaded bytes against hand counts.


@pytest.mark.parametrize(
    "stage, per_client",
    [
        (compression.upload_accounting(), 42 * 4),
        # kernel: ceil(35 x 3 / 8) = 14 + 8; bias: ceil(7 x 3 / 8) = 3 + 8
        (compression.stochastic_quantization(3), 14 + 8 + 3 + 8),
        (compression.stochastic_quantization(1), 5 + 8 + 1 + 8),
        (compression.stochastic_quantization(32), 42 * 4),
        # k = ceil(0.1 x 42) = 5 values and 5 indices
        (compression.top_k(0.1), 5 * (4 + 4)),
        (compression.top_k(1.0), 42 * (4 + 4)),
    ],
)
def test_uploaded_bytes_match_hand_counts(stage, per_client):
    """Three clients, the third without a vote (weight 0): two uploads counted."""
    rng = np.random.default_rng(0)
    pipeline = aggregation.Pipeline(stages=(stage,))
    params = {"kernel": np.zeros((5, 7), np.float32), "bias": np.zeros(7, np.float32)}
    own = pipeline.local_init(params)
    total = None
    for index, weight in enumerate((1.0, 2.0, 0.0)):
        delta = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        _, _, sums = pipeline.client({}, delta, own, view(index, weight))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    server_view = aggregation.ServerView(jax.random.key(0), jnp.float32(2), jnp.float32(3))
    _, _, metrics = pipeline.server({}, params, total, server_view)
    assert float(metrics["upload_bytes"]) == 2 * per_client


def test_layer_selection_bytes_match_hand_counts():
    """Leaves in tree order: bias (7 floats), kernel (35), scale (1); fraction 0.5 sends the
    two of larger norm; a 3-bit mask rounds up to one byte."""
    pipeline = aggregation.Pipeline(stages=(compression.layer_selection(0.5),))
    small = {"bias": np.full(7, 0.1), "kernel": np.full((5, 7), 0.1), "scale": np.full(1, 9.0)}
    big_bias = {"bias": np.full(7, 5.0), "kernel": np.full((5, 7), 0.1), "scale": np.full(1, 0.0)}
    small, big_bias = jax.tree.map(lambda x: x.astype(np.float32), (small, big_bias))
    total, sent = None, []
    for delta in (small, big_bias):
        client_sent, _, sums = pipeline.client({}, delta, {}, view())
        sent.append(client_sent)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    assert not np.any(sent[0]["bias"]) and np.all(sent[0]["scale"] == 9.0)
    assert not np.any(sent[1]["scale"]) and np.all(sent[1]["bias"] == 5.0)
    server_view = aggregation.ServerView(jax.random.key(0), jnp.float32(2), jnp.float32(2))
    _, _, metrics = pipeline.server({}, small, total, server_view)
    # client 1: kernel (norm 0.59) and scale (9): 140 + 4 + 1; client 2: bias, kernel: 28 + 140 + 1
    assert float(metrics["upload_bytes"]) == (140 + 4 + 1) + (28 + 140 + 1)


def test_cumulative_upload_sums_the_rounds_and_fills_unlogged_ones():
    records = [{"round": 2, "train/upload_bytes": 10.0}, {"round": 4, "train/upload_bytes": 30.0}]
    records.append({"round": 5, "eval/accuracy": 0.5})
    # rounds 1-2 at 10 (round 1 unlogged), 3-4 at 30, 5 at the last logged 30
    assert curves.cumulative_upload(records, [0, 1, 2, 3, 4, 5]) == [0, 10, 20, 50, 80, 110]


def test_learning_curves_add_the_accuracy_against_bytes_panel(tmp_path):
    lines = [
        {"round": 1, "train/loss": 1.0, "train/upload_bytes": 100.0},
        {"round": 2, "train/loss": 0.5, "train/upload_bytes": 100.0, "eval/accuracy": 0.7},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    import matplotlib.image

    with_bytes = curves.plot_learning_curves(metrics, tmp_path / "with.png")
    metrics.write_text(
        "".join(
            json.dumps({k: v for k, v in line.items() if "upload" not in k}) + "\n"
            for line in lines
        )
    )
    without = curves.plot_learning_curves(metrics, tmp_path / "without.png")
    assert matplotlib.image.imread(with_bytes).shape[1] == 1500  # three panels of 5 inches
    assert matplotlib.image.imread(without).shape[1] == 1000


# ------------------------------------------------------------------------------------------
# Every stage on every strategy and on 8 sharded devices.


def path_stages() -> dict:
    return {
        "quantization": [compression.stochastic_quantization(4)],
        "top_k": [compression.top_k(0.3)],
        "layer_selection": [compression.layer_selection(0.5)],
    }


def path_results(strategy: str, mesh=None) -> dict[str, np.ndarray]:
    out = {}
    for name, stages in path_stages().items():
        state, history = run_rounds(
            stages, rounds=2, strategy=strategy, mesh=mesh, make=algorithms.fedavgm
        )
        leaves = jax.tree.leaves((state.params, state.opt_state, state.client_local))
        for i, leaf in enumerate(leaves):
            out[f"{name}/{i}"] = np.asarray(leaf)
        out[f"{name}/upload_bytes"] = np.asarray([m["upload_bytes"] for m in history])
    return out


def test_every_compression_stage_agrees_on_every_strategy():
    results = {s: path_results(s) for s in STRATEGIES}
    assert_results_agree(results, results["vmap"])


def test_every_compression_stage_agrees_on_eight_sharded_devices(tmp_path):
    """Six clients padded to 8 on the mesh: the padded clients upload nothing and keep no
    residual."""
    sharded = sharded_path_results("tests.test_compression", tmp_path / "results.npz")
    assert_results_agree(sharded, path_results("vmap"))


# ------------------------------------------------------------------------------------------
# Config: the stage's place, bad settings, exact resume.


def test_config_compresses_after_clipping_and_always_counts_bytes():
    config = base_config()
    config.algorithm.aggregator.norm_bound = 3.0
    config.algorithm.compression.name = "top_k"
    config.algorithm.compression.fraction = 0.25
    pipeline = build_pipeline(config.algorithm)
    assert [s.name for s in pipeline.stages] == ["norm_bound", "compression"]
    assert pipeline.stages[-1].local_init is not None  # top-k's residual
    plain = build_pipeline(base_config().algorithm)
    assert [s.name for s in plain.stages] == ["compression"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"name": "quantization", "bits": 0},
            "algorithm.compression.bits=0 is not allowed; must be an integer in [1, 32]",
        ),
        ({"name": "quantization", "bits": 33}, "algorithm.compression.bits=33 is not allowed"),
        ({"name": "top_k", "fraction": 0.0}, "algorithm.compression.fraction=0.0 is not allowed"),
        ({"name": "top_k", "fraction": 1.5}, "algorithm.compression.fraction=1.5 is not allowed"),
        (
            {"name": "layer_selection", "fraction": -0.1},
            "algorithm.compression.fraction=-0.1 is not allowed; must be in (0, 1]",
        ),
        ({"name": "zip"}, "algorithm.compression.name='zip' is unknown; known: none, quantiz"),
        (
            {"name": "top_k", "dp": True},
            "algorithm.compression.name='top_k' is not allowed with algorithm.dp.enabled",
        ),
        (
            {"name": "quantization", "dp": True},
            "algorithm.compression.name='quantization' is not allowed with algorithm.dp.enabled",
        ),
        (
            {"name": "layer_selection", "secure": True},
            "algorithm.compression.name='layer_selection' is not allowed with "
            "algorithm.secure_aggregation.enabled",
        ),
    ],
)
def test_bad_compression_settings_are_one_line_naming_the_field(overrides, message):
    config = base_config()
    overrides = dict(overrides)
    config.algorithm.dp.enabled = overrides.pop("dp", False)
    config.algorithm.secure_aggregation.enabled = overrides.pop("secure", False)
    for key, value in overrides.items():
        setattr(config.algorithm.compression, key, value)
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_layer_selection_is_allowed_with_dp():
    config = base_config()
    config.algorithm.dp.enabled = True
    config.algorithm.compression.name = "layer_selection"
    validate_config(config)
    assert [s.name for s in build_pipeline(config.algorithm).stages] == ["dp", "compression"]


RESUME_CONFIG = "configs/shapes_fedavg.py:runlocal"
RESUME_ROUNDS = 10
RESUME_OVERRIDES = [
    "--config.model.name=logistic",
    f"--config.num_rounds={RESUME_ROUNDS}",
    "--config.checkpoint.every_rounds=2",
    "--config.eval_every_rounds=5",
    "--config.algorithm.compression.name=top_k",
    "--config.algorithm.compression.fraction=0.1",
]


def test_error_feedback_residuals_survive_kill_and_resume_exactly(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(
        resume_check._command(RESUME_CONFIG, reference, RESUME_OVERRIDES),
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    interrupted = tmp_path / "interrupted"
    log = resume_check.run_with_interruptions(
        RESUME_CONFIG,
        interrupted,
        RESUME_OVERRIDES,
        num_rounds=RESUME_ROUNDS,
        sig=signal.SIGKILL,
        kills=2,
        kill_during_save=4,
        rng=random.Random(2),
    )
    assert sum("rc=-9" in line for line in log) >= 1, log
    assert resume_check._final_digest(interrupted) == resume_check._final_digest(reference)
    records = [json.loads(line) for line in (interrupted / "metrics.jsonl").open()]
    assert [r["round"] for r in records] == list(range(1, RESUME_ROUNDS + 1))
    # logistic on 20x20x3 images of 4 classes: 4804 params, k = ceil(480.4) = 481; 4 clients
    assert all(r["train/upload_bytes"] == 4 * 481 * 8 for r in records)
    assert math.isfinite(records[-1]["eval/accuracy"])
