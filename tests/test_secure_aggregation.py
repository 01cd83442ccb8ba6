"""Simulated secure aggregation (Bonawitz et al. 2017) on the least-squares problem: the
unmasked aggregate is the fixed-point sum computed in numpy from hand-computed client deltas,
bit for bit, with and without masks, on every strategy and on 8 sharded devices (padded
clients and a non-finite client included); a client's upload looks unrelated to its value;
the decoded mean is within the quantisation error of the float mean; bad settings refused in
one line."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from fedjax_cv import algorithms
from fedjax_cv.algorithms import aggregation, robust
from fedjax_cv.algorithms.client import RoundShared, client_program
from fedjax_cv.algorithms.registry import build_pipeline
from fedjax_cv.algorithms.secure_aggregation import SecureAggregation, secure_cohort
from fedjax_cv.algorithms.server import aggregation_weight
from fedjax_cv.config_base import base_config
from fedjax_cv.engine.strategies import _run_one_client
from fedjax_cv.validation import ConfigError, validate_config
from tests import linear_problem as lp
from tests.xla import run_on_devices

LR = 0.1
FRAC_BITS = 10
STRATEGIES = ("vmap", "sequential", "host")
NONFINITE = 4  # the client whose loss overflows: weight 0, but it still sends its masks


def cohort():
    """Six clients of 8 examples; client 2 is a second copy of client 1 (same id, occurrence
    1), so pairs are told apart by occurrence; client 4's loss is infinite."""
    c = lp.make_cohort(num_clients=6, num_steps=2, batch=4, seed=3)
    x = c.examples["x"].copy()
    x[NONFINITE, 0, 0, 0] = np.inf
    clients = c.clients.replace(
        client_id=np.array([0, 7, 7, 21, 28, 35], np.int32),
        occurrence=np.array([0, 0, 1, 0, 0, 0], np.int32),
    )
    return c.replace(examples={**c.examples, "x": x}, clients=clients)


def params_vector(params) -> np.ndarray:
    return np.concatenate([np.ravel(params["w"]), np.ravel(params["b"])])


def hand_weighted_deltas(c) -> np.ndarray:
    """weight * delta of each client by hand (numpy SGD in float64), [w..., b] rows; 0 for the
    non-finite client, whose weight is 0."""
    initial = params_vector(lp.initial_params()).astype(np.float64)
    rows = []
    for k in range(c.num_clients):
        if k == NONFINITE:
            rows.append(np.zeros_like(initial))
            continue
        final = params_vector(lp.local_sgd(lp.initial_params(), c, k, LR))
        rows.append(float(c.clients.num_examples[k]) * (final - initial))
    return np.stack(rows)


def fixed_point(rows: np.ndarray, frac_bits: int) -> np.ndarray:
    """round(x 2^frac_bits) per client, int64; checks the rounding is unambiguous, so float32
    and float64 deltas round alike."""
    scaled = rows * 2.0**frac_bits
    distance_to_half = np.abs(np.abs(scaled - np.floor(scaled)) - 0.5)
    assert distance_to_half.min() > 1e-2, "pick another seed: a value rounds ambiguously"
    return np.round(scaled).astype(np.int64)


def expected_params(c, frac_bits: int) -> np.ndarray:
    """The server's params after one FedAvg round over the decoded fixed-point sum: the ring
    sum read as int32, over 2^frac_bits, over the sum of weights, added in float32."""
    ring_sum = fixed_point(hand_weighted_deltas(c), frac_bits).sum(0)
    assert np.all(np.abs(ring_sum) < 2**31)
    weight_sum = np.float32(c.clients.num_examples.sum() - c.clients.num_examples[NONFINITE])
    decoded = ring_sum.astype(np.int32).astype(np.float32) / np.float32(2.0**frac_bits)
    aggregate = decoded / weight_sum
    return params_vector(lp.initial_params()).astype(np.float32) + aggregate


def secure_round(c, strategy="vmap", mesh=None, masks=True, frac_bits=FRAC_BITS):
    pipeline = aggregation.Pipeline(secure=SecureAggregation(frac_bits, masks=masks))
    algorithm = algorithms.fedavg(lp.loss_fn, LR, pipeline=pipeline, strategy=strategy, mesh=mesh)
    state = algorithm.init(lp.initial_params())
    state, metrics = algorithm.apply(state, c, jax.random.key(5))
    return params_vector(jax.device_get(state.params)), jax.device_get(metrics)


def strategy_results(mesh=None, strategies=STRATEGIES) -> dict[str, np.ndarray]:
    return {
        f"{strategy}/{masks}": secure_round(cohort(), strategy, mesh, masks)[0]
        for strategy in strategies
        for masks in (True, False)
    }


# ------------------------------------------------------------------------------------------
# (a) The masks cancel: the aggregate is the plain fixed-point sum, exactly.


def test_masked_sum_is_the_numpy_fixed_point_sum_bit_for_bit_on_every_strategy():
    expected = expected_params(cohort(), FRAC_BITS)
    for key, params in strategy_results().items():
        np.testing.assert_array_equal(params, expected, err_msg=key)


def test_masked_sum_is_exact_on_eight_sharded_devices_with_padded_clients(tmp_path):
    """Six clients padded to 8 on the mesh: the padded clients (id 0, like client 0) neither
    send nor receive masks; the uint32 psum across devices wraps like the single-device sum."""
    out = tmp_path / "results.npz"
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from fedjax_cv.engine import client_mesh
        from tests.test_secure_aggregation import strategy_results
        assert jax.device_count() == 8
        results = strategy_results(client_mesh(), ("vmap", "sequential"))
        np.savez({str(out)!r}, **results)
        """
    )
    run_on_devices(script)
    expected = expected_params(cohort(), FRAC_BITS)
    results = dict(np.load(out))
    assert len(results) == 4
    for key, params in results.items():
        np.testing.assert_array_equal(params, expected, err_msg=key)


def test_saturated_values_are_reported_and_the_sum_cannot_overflow():
    """At 30 fractional bits some weighted deltas pass (2^31 - 1) / 6 (six senders, the
    non-finite client's zeros included): they are clipped there, the sum stays inside int32,
    and the fraction of the senders' coordinates is reported."""
    c = cohort()
    rows = hand_weighted_deltas(c)
    bound = (2**31 - 1) // 6
    scaled = np.round(rows * 2.0**30)
    expected_fraction = np.mean(np.abs(scaled) > bound)
    assert 0 < expected_fraction < 1
    masked, metrics = secure_round(c, frac_bits=30)
    plain, _ = secure_round(c, masks=False, frac_bits=30)
    np.testing.assert_array_equal(masked, plain)
    np.testing.assert_allclose(metrics["secure_saturated_fraction"], expected_fraction)
    ring_sum = np.clip(scaled, -bound, bound).sum(0)
    decoded = ring_sum.astype(np.float32) / np.float32(2.0**30) / np.float32(40)
    initial = params_vector(lp.initial_params())
    np.testing.assert_allclose(masked - initial, decoded, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# (b) What the server receives from one client.


def per_client_uploads(c, masks: bool):
    """Each client's upload as the engine sums it: the `final` contribution of every client."""
    pipeline = aggregation.Pipeline(secure=SecureAggregation(FRAC_BITS, masks=masks))
    program = client_program(
        lp.loss_fn,
        algorithms.client_sgd(LR),
        algorithms.ClientObjective(),
        aggregation_weight("weighted"),
        pipeline=pipeline,
    )
    params = jax.tree.map(jnp.asarray, lp.initial_params())
    round_key = jax.random.key(5)
    shared = RoundShared(params, {}, secure_cohort=secure_cohort(round_key, c.clients))
    run = lambda info, examples, mask: _run_one_client(
        program, shared, info, {}, examples, mask, round_key, None, False
    )[0]
    contributions = jax.jit(jax.vmap(run))(c.clients, c.examples, c.mask)
    return jax.device_get(contributions.weighted_delta)


def test_each_upload_is_masked_and_only_the_sum_reveals_the_values():
    c = cohort()
    masked = per_client_uploads(c, masks=True)
    plain = per_client_uploads(c, masks=False)
    masked_rows = np.stack([params_vector(r) for r in zip_clients(masked.ring)])
    plain_rows = np.stack([params_vector(r) for r in zip_clients(plain.ring)])
    assert masked_rows.dtype == np.uint32
    # The bare values are the fixed-point encoding of the hand-computed deltas...
    expected = fixed_point(hand_weighted_deltas(c), FRAC_BITS).astype(np.int32).view(np.uint32)
    np.testing.assert_array_equal(plain_rows, expected)
    # ...which the server never sees: every coordinate of every upload is masked, including
    # the non-finite client's zeros.
    assert np.all(masked_rows != plain_rows)
    # The sums agree mod 2^32.
    np.testing.assert_array_equal(
        masked_rows.sum(0, dtype=np.uint32), plain_rows.sum(0, dtype=np.uint32)
    )


def zip_clients(tree) -> list:
    count = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x, k=k: x[k], tree) for k in range(count)]


def test_a_masked_vector_is_uniform_and_unrelated_to_its_value():
    """Client 0 of four real ones and a padded one, value a ramp over 20000 coordinates: its
    upload is uniform on [0, 2^32) and uncorrelated with the value; the padded client uploads
    zeros; the four uploads sum to the four values."""
    size = 20_000
    c = lp.make_cohort(num_clients=5, sizes=[8, 8, 8, 8, 0])
    cohort_ids = secure_cohort(jax.random.key(1), c.clients)
    value = jnp.linspace(-1.0, 1.0, size)
    secure = SecureAggregation(16)
    uploads = [
        secure.encode({"v": value * (k + 1) if k < 4 else 0 * value}, cohort_ids, info)
        for k, info in enumerate(zip_clients(c.clients))
    ]
    rings = [np.asarray(u.ring["v"]) for u in uploads]
    uniform = rings[0] / 2.0**32
    assert scipy.stats.kstest(uniform, "uniform").pvalue > 1e-4
    correlation = np.corrcoef(uniform, np.asarray(value))[0, 1]
    assert abs(correlation) < 5 / np.sqrt(size)
    np.testing.assert_array_equal(rings[4], 0)
    assert float(uploads[4].senders) == 0.0
    total = sum(r.astype(np.uint64) for r in rings) % 2**32
    bare = [
        np.asarray(SecureAggregation(16, masks=False).encode({"v": v}, cohort_ids, info).ring["v"])
        for v, info in zip(
            [value * (k + 1) for k in range(4)], zip_clients(c.clients)[:4], strict=True
        )
    ]
    np.testing.assert_array_equal(total, sum(b.astype(np.uint64) for b in bare) % 2**32)


# ------------------------------------------------------------------------------------------
# (c) The decoded mean is the float mean up to the quantisation step.


def test_decoded_mean_is_within_the_quantisation_step_of_the_float_mean():
    c = cohort()
    frac_bits = 8
    secure, _ = secure_round(c, frac_bits=frac_bits)
    algorithm = algorithms.fedavg(lp.loss_fn, LR, strategy="vmap")
    state = algorithm.init(lp.initial_params())
    state, _ = algorithm.apply(state, c, jax.random.key(5))
    plain = params_vector(jax.device_get(state.params))
    error = np.abs(secure - plain)
    assert np.all(error <= 2.0**-frac_bits * 6)
    # Each client rounds by at most half a step of its weighted delta: at most
    # 5 * 0.5 * 2^-8 / 40 on the mean, plus float32 rounding of the params.
    assert np.all(error <= 5 * 0.5 * 2.0**-frac_bits / 40 + 1e-6)
    assert np.any(error > 0)  # the quantisation is there


# ------------------------------------------------------------------------------------------
# (d) Config.


def test_config_wires_secure_aggregation_and_composes_with_dp():
    config = base_config()
    assert not config.algorithm.secure_aggregation.enabled
    assert build_pipeline(config.algorithm).secure is None
    config.algorithm.secure_aggregation.enabled = True
    config.algorithm.secure_aggregation.frac_bits = 16
    config.algorithm.dp.enabled = True
    validate_config(config)
    pipeline = build_pipeline(config.algorithm)
    assert pipeline.secure == SecureAggregation(16)
    assert "dp" in [s.name for s in pipeline.stages] and pipeline.linear


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"frac_bits": 0}, "algorithm.secure_aggregation.frac_bits=0 is not allowed"),
        ({"frac_bits": 31}, "algorithm.secure_aggregation.frac_bits=31 is not allowed"),
        (
            {"aggregator": "median"},
            "algorithm.aggregator.name='median' is not allowed with "
            "algorithm.secure_aggregation.enabled",
        ),
    ],
)
def test_bad_secure_aggregation_settings_are_one_line_naming_the_field(overrides, message):
    config = base_config()
    config.algorithm.secure_aggregation.enabled = True
    if "frac_bits" in overrides:
        config.algorithm.secure_aggregation.frac_bits = overrides["frac_bits"]
    if "aggregator" in overrides:
        config.algorithm.aggregator.name = overrides["aggregator"]
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_robust_aggregator_with_secure_aggregation_is_refused_in_one_line():
    pipeline = aggregation.Pipeline(
        aggregator=robust.get_aggregator("median", robust.AggregatorOptions()),
        secure=SecureAggregation(),
    )
    with pytest.raises(ValueError, match="secure aggregation needs the linear aggregator"):
        algorithms.fedavg(lp.loss_fn, LR, pipeline=pipeline)
