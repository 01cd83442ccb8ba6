"""Pretrained weights: every format round-trips, heads re-initialise, misfits refuse, errors.

Expected values come from the arrays the tests save (or a checkpoint restored with orbax
directly), never from the module under test. Models are small (one block a stage, 32x32 or
smaller) and compile at XLA's lowest optimisation level, so the file runs in well under a minute
on a 2-core CPU.
"""

from __future__ import annotations

import json
import pathlib
import re

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from fedjax_cv.config_base import base_config
from fedjax_cv.models import get_model
from fedjax_cv.models.mobilenet_v2 import STAGES
from fedjax_cv.models.weights import (
    LoadReport,
    WeightsError,
    head_modules,
    load_pretrained,
    read_weights,
    save_weights,
)
from fedjax_cv.train import params_sha256, train_and_evaluate
from tests.configs_loader import shrink

FAST_COMPILE = (
    {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    if jax.default_backend() == "cpu"
    else {}
)
SHORT_STAGES = tuple((t, c, 1, s) for t, c, _, s in STAGES)  # one block a stage


def jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def images(size: int, batch: int = 2, channels: int = 3) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(7), (batch, size, size, channels))


def init(model, size: int, *seeds: int) -> list[dict]:
    """The model's real initialisation, once per seed (one compilation)."""
    fn = jit(lambda key: model.init(key, images(size), train=False))
    return [fn(jax.random.key(seed)) for seed in seeds]


def host_variables(model, size: int, seed: int) -> dict:
    """Random variables of the model's shapes, drawn on the host: no `init` to compile."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images(size), train=False))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape).astype(s.dtype) * 0.1), shapes
    )


def flat(variables) -> dict[str, np.ndarray]:
    """{'params/a/kernel': array}: the naming the module documents, built by flax here."""
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}


def mobilenet(num_classes: int, width: float = 0.25):
    return get_model(
        "mobilenet_v2", num_classes, width_multiplier=width, stages=SHORT_STAGES, norm="group"
    )


def cnn(num_classes: int = 4):
    return get_model("cnn_emnist", num_classes)  # norm 'none': params only; head Dense_1


def cnn_variables(seed: int, num_classes: int = 4) -> dict:
    return host_variables(cnn(num_classes), 12, seed)


@pytest.fixture(scope="module")
def resnet_case():
    """A BatchNorm ResNet whose statistics differ from a fresh init, and another-seed model."""
    model = get_model("resnet18", 10, width=8, norm="batch", stage_sizes=(1, 1, 1, 1))
    saved, fresh = init(model, 32, 0, 1)
    rng = np.random.default_rng(0)
    saved["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(
            rng.uniform(0.5, 1.5, x.shape)
            if path[-1].key == "var"
            else rng.normal(0, 0.2, x.shape),
            x.dtype,
        ),
        saved["batch_stats"],
    )
    apply = jit(lambda v, x: model.apply(v, x, train=False))
    x = images(32)
    return model, saved, fresh, apply, x


# ----------------------------------------------------------------------------------------------
# Round trips.


def write(tmp_path: pathlib.Path, fmt: str, tree) -> pathlib.Path:
    """Writes `tree` in `fmt` with the libraries themselves, not with save_weights."""
    if fmt == "npz":
        path = tmp_path / "w.npz"
        np.savez(path, **flat(tree))
    elif fmt == "msgpack":
        path = tmp_path / "w.msgpack"
        path.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(tree)))
    else:
        path = tmp_path / "ckpt"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, tree)
    return path


@pytest.mark.parametrize("fmt", ["npz", "msgpack", "orbax"])
def test_round_trip_gives_bit_identical_outputs(tmp_path, resnet_case, fmt):
    model, saved, fresh, apply, x = resnet_case
    path = write(tmp_path, fmt, saved)
    weights = read_weights(path)
    expected = flat(saved)
    assert sorted(weights) == sorted(expected)
    assert any(name.startswith("batch_stats/") for name in weights)
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)

    before = flat(fresh)
    saved_out = np.asarray(apply(saved, x))
    assert not np.array_equal(np.asarray(apply(fresh, x)), saved_out)  # the test can fail
    loaded, report = load_pretrained(fresh, weights, model=model)
    np.testing.assert_array_equal(np.asarray(apply(loaded, x)), saved_out)
    assert set(report.loaded) == set(expected)
    assert report.reinitialised == () and report.unused == ()
    # Same tree, shapes and dtypes as the model's variables; the input is untouched.
    assert jax.tree.structure(loaded) == jax.tree.structure(fresh)
    for new, old in zip(jax.tree.leaves(loaded), jax.tree.leaves(fresh), strict=True):
        assert new.shape == old.shape and new.dtype == old.dtype
    for name, array in flat(fresh).items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)


def test_save_weights_round_trips_both_suffixes(tmp_path, resnet_case):
    _, saved, _, _, _ = resnet_case
    for suffix in (".npz", ".msgpack"):
        path = tmp_path / f"export{suffix}"
        save_weights(path, saved)
        expected = flat(saved)
        if suffix == ".npz":  # readable by numpy alone, under the documented names
            with np.load(path) as archive:
                stored = {key: archive[key] for key in archive.files}
        else:
            stored = flat(flax.serialization.msgpack_restore(path.read_bytes()))
        assert sorted(stored) == sorted(expected)
        for name, array in expected.items():
            np.testing.assert_array_equal(stored[name], array, err_msg=name)


def tiny_config(workdir_rounds: int = 2):
    config = base_config()
    config.num_rounds = workdir_rounds
    config.eval_every_rounds = workdir_rounds
    config.checkpoint.every_rounds = 1
    # Logistic regression: the training loop compiles in seconds, unlike any CNN's. Server
    # momentum puts params-shaped arrays into opt_state, which must not be read as weights.
    config.model.name = "logistic"
    config.algorithm.name = "fedavgm"
    config.algorithm.server.momentum = 0.9
    config.algorithm.batch_size = 8
    config.data.image_size = 8
    return shrink(config, num_clients=4, clients_per_round=2, num_train=48, num_test=8)


def test_workdir_loads_the_final_server_params(tmp_path):
    workdir = tmp_path / "run"
    record = train_and_evaluate(tiny_config(), str(workdir))
    # The last checkpoint restored by orbax directly: the server state's params.
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(workdir / "checkpoints" / "2" / "default")
    final = flat({"params": state["params"]})
    round_one = read_weights(workdir / "checkpoints" / "1")

    steps = workdir / "checkpoints"
    for path in (workdir, steps, steps / "2", steps / "2" / "default"):
        weights = read_weights(path)
        assert sorted(weights) == sorted(final)  # no opt_state, no round
        for name, array in final.items():
            np.testing.assert_array_equal(weights[name], array, err_msg=name)
    assert any(not np.array_equal(round_one[n], final[n]) for n in final)  # newest step chosen

    model = get_model(
        "logistic", json.loads((workdir / "config.json").read_text())["data"]["num_classes"]
    )
    (fresh,) = init(model, 8, 3)
    loaded, report = load_pretrained(fresh, workdir, model=model)
    assert params_sha256(loaded["params"]) == record["params_sha256"]
    assert report.reinitialised == () and report.unused == ()
    apply = jit(lambda v, x: model.apply(v, x, train=False))
    x = images(8)
    final_tree = traverse_util.unflatten_dict(final, sep="/")
    final_out = np.asarray(apply(final_tree, x))
    assert not np.array_equal(np.asarray(apply(fresh, x)), final_out)
    np.testing.assert_array_equal(np.asarray(apply(loaded, x)), final_out)


# ----------------------------------------------------------------------------------------------
# Heads, misfits, strictness.


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mobilenet") / "m10.npz"
    saved = host_variables(mobilenet(10), 32, seed=0)
    np.savez(path, **flat(saved))
    return path, flat(saved)


def test_other_num_classes_keeps_the_new_classifier(mobilenet_file):
    path, saved = mobilenet_file
    model = mobilenet(7)
    fresh = host_variables(model, 32, seed=1)
    loaded, report = load_pretrained(fresh, path, model=model)
    new, fresh_flat = flat(loaded), flat(fresh)
    head = {"params/classifier/kernel", "params/classifier/bias"}
    assert set(new) == set(fresh_flat) and head < set(new)
    for name in set(new) - head:
        np.testing.assert_array_equal(new[name], saved[name], err_msg=name)
    for name in head:
        np.testing.assert_array_equal(new[name], fresh_flat[name], err_msg=name)
        assert not np.array_equal(new[name][..., :7], saved[name][..., :7])
    # Head channels stay 1280 below width 1 (mobilenet_v2.py), so by hand:
    assert dict(report.reinitialised) == {
        "params/classifier/kernel": "shape (1280, 10) in the file, (1280, 7) in the model",
        "params/classifier/bias": "shape (10,) in the file, (7,) in the model",
    }
    assert len(report.reinitialised) == 2
    assert set(report.loaded) == set(new) - head and report.unused == ()


def test_misfit_outside_the_head_refuses_in_one_line_and_changes_nothing(mobilenet_file):
    path, saved = mobilenet_file
    model = mobilenet(10, width=0.5)
    variables = host_variables(model, 32, seed=1)
    before = {name: array.copy() for name, array in flat(variables).items()}
    ids = {name: id(leaf) for name, leaf in traverse_util.flatten_dict(variables, sep="/").items()}
    with pytest.raises(WeightsError) as caught:
        load_pretrained(variables, path, model=model)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("model.weights: ")
    assert "nothing was loaded" in message

    count, named = (
        re.search(r"(\d+) tensors do not fit", message),
        re.search(r"(params/\S+) is (\(.*?\)) in the file but (\(.*?\)) in the model", message),
    )
    assert count and int(count.group(1)) > 1
    name, file_shape, model_shape = named.groups()
    assert file_shape == str(saved[name].shape) and model_shape == str(before[name].shape)
    assert file_shape != model_shape
    after = traverse_util.flatten_dict(variables, sep="/")
    assert {n: id(leaf) for n, leaf in after.items()} == ids
    for name, array in before.items():
        np.testing.assert_array_equal(np.asarray(after[name]), array)


def test_missing_tensor_strict_and_not_strict():
    saved = flat(cnn_variables(seed=0))
    weights = {k: v for k, v in saved.items() if k != "params/Dense_0/kernel"}
    fresh = cnn_variables(seed=1)
    with pytest.raises(
        WeightsError, match=r"params/Dense_0/kernel \(1024, 128\) is not in the file"
    ):
        load_pretrained(fresh, weights, model=cnn())
    loaded, report = load_pretrained(fresh, weights, model=cnn(), strict=False)
    assert report.reinitialised == (("params/Dense_0/kernel", "not in the file"),)
    new = flat(loaded)
    np.testing.assert_array_equal(
        new["params/Dense_0/kernel"], flat(fresh)["params/Dense_0/kernel"]
    )
    for name in weights:
        np.testing.assert_array_equal(new[name], saved[name])


def test_missing_head_is_reinitialised_even_when_strict():
    saved = flat(cnn_variables(seed=0))
    weights = {k: v for k, v in saved.items() if not k.startswith("params/Dense_1/")}
    _, report = load_pretrained(cnn_variables(seed=1), weights, model=cnn())
    assert dict(report.reinitialised) == {
        "params/Dense_1/bias": "not in the file",
        "params/Dense_1/kernel": "not in the file",
    }


def test_unused_tensors_and_summary():
    saved = flat(cnn_variables(seed=0))
    extra = {"params/aux/kernel": np.ones((3, 2), np.float32), "batch_stats/aux/mean": np.ones(2)}
    weights = {**saved, **extra}
    del weights["params/Dense_1/bias"]
    weights["params/Dense_1/kernel"] = np.zeros((128, 9), np.float32)
    _, report = load_pretrained(cnn_variables(seed=1), weights, model=cnn())
    assert report.unused == ("batch_stats/aux/mean", "params/aux/kernel")
    lines = report.summary().splitlines()
    assert lines[0] == "loaded 6 tensors, re-initialised 2, 2 in the file unused"
    assert sorted(lines[1:3]) == [
        "re-initialised params/Dense_1/bias: not in the file",
        "re-initialised params/Dense_1/kernel: shape (128, 9) in the file, (128, 4) in the model",
    ]
    assert lines[3:] == ["unused batch_stats/aux/mean", "unused params/aux/kernel"]


def test_dtype_is_the_models():
    saved = {k: v.astype(np.float64) for k, v in flat(cnn_variables(seed=0)).items()}
    host = jax.device_get(cnn_variables(seed=1))  # numpy leaves: nothing casts on the way
    bfloat16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), cnn_variables(seed=1))
    for variables, dtype in ((host, np.float32), (bfloat16, jnp.bfloat16)):
        loaded, _ = load_pretrained(variables, saved)
        for name, array in flat(loaded).items():
            assert array.dtype == dtype, name
            np.testing.assert_array_equal(array, saved[name].astype(dtype))


def test_bfloat16_is_saved_exactly_as_float32(tmp_path):
    variables = jax.tree.map(lambda x: x.astype(jnp.bfloat16), cnn_variables(seed=0))
    save_weights(tmp_path / "w.npz", variables)
    with np.load(tmp_path / "w.npz") as archive:
        kernel = archive["params/Conv_0/kernel"]
    assert kernel.dtype == np.float32
    expected = np.asarray(variables["params"]["Conv_0"]["kernel"]).astype(np.float32)
    np.testing.assert_array_equal(kernel, expected)


# ----------------------------------------------------------------------------------------------
# Names: rename, bare params, no match.


def test_rename_maps_another_libraries_names(tmp_path):
    saved = flat(cnn_variables(seed=0))
    foreign = {
        name.replace("params/Conv_", "params/features/conv").replace("/Dense_1/", "/fc/"): a
        for name, a in saved.items()
    }
    np.savez(tmp_path / "foreign.npz", **foreign)
    fresh = cnn_variables(seed=1)
    with pytest.raises(WeightsError, match="rename"):  # no name in common
        load_pretrained(fresh, {k: v for k, v in foreign.items() if "Dense" not in k})
    rename = [
        (r"^params/features/conv(\d+)/", r"params/Conv_\1/"),
        (r"^params/fc/", "params/Dense_1/"),
    ]
    weights = read_weights(tmp_path / "foreign.npz", rename=rename)
    assert sorted(weights) == sorted(saved)
    loaded, report = load_pretrained(fresh, weights)
    assert report.reinitialised == () and report.unused == ()
    for name, array in flat(loaded).items():
        np.testing.assert_array_equal(array, saved[name])


def test_rename_collision_and_bad_pattern(tmp_path):
    np.savez(tmp_path / "w.npz", **flat(cnn_variables(seed=0)))
    with pytest.raises(WeightsError, match="both become"):
        read_weights(tmp_path / "w.npz", rename=[(r"Conv_\d", "Conv")])
    with pytest.raises(WeightsError, match="not a regular expression"):
        read_weights(tmp_path / "w.npz", rename=[("(", "x")])


@pytest.mark.parametrize("fmt", ["npz", "msgpack", "orbax"])
def test_bare_params_files_read_as_params(tmp_path, fmt):
    params = cnn_variables(seed=0)["params"]  # no collection level
    path = write(tmp_path, fmt, params)
    if fmt == "npz":
        with np.load(path) as archive:
            assert "Conv_0/kernel" in archive.files
    weights = read_weights(path)
    expected = flat({"params": params})
    assert sorted(weights) == sorted(expected)
    loaded, _ = load_pretrained(cnn_variables(seed=1), weights)
    for name, array in flat(loaded).items():
        np.testing.assert_array_equal(array, expected[name])


def test_no_matching_name_suggests_rename():
    weights = {f"params/backbone/{k}": v for k, v in flat(cnn_variables(seed=0)).items()}
    variables = cnn_variables(seed=1)
    with pytest.raises(WeightsError) as caught:
        load_pretrained(variables, weights)
    message = str(caught.value)
    assert "\n" not in message and "rename" in message and "nothing was loaded" in message


# ----------------------------------------------------------------------------------------------
# Paths and files.


def test_bad_paths_name_the_path_and_the_formats(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x02")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    (tmp_path / "broken.msgpack").write_bytes(b"\xc1\xc1\xc1")
    (tmp_path / "plain").mkdir()
    (tmp_path / "workdir" / "checkpoints").mkdir(parents=True)
    for name in ("missing.npz", "model.pt", "broken.npz", "broken.msgpack", "plain", "workdir"):
        path = tmp_path / name
        with pytest.raises(WeightsError) as caught:
            read_weights(path)
        message = str(caught.value)
        assert message.startswith(f"model.weights={str(path)!r} "), message
        assert "\n" not in message and ".npz" in message and "orbax" in message, message
    assert "does not exist" in _message(tmp_path / "missing.npz")
    assert "'.pt'" in _message(tmp_path / "model.pt")
    with pytest.raises(WeightsError, match="does not exist"):
        load_pretrained(cnn_variables(seed=1), tmp_path / "missing.npz")


def _message(path) -> str:
    with pytest.raises(WeightsError) as caught:
        read_weights(path)
    return str(caught.value)


def test_save_refuses_to_overwrite(tmp_path):
    first, second = cnn_variables(seed=0), cnn_variables(seed=1)
    for suffix in (".npz", ".msgpack"):
        path = tmp_path / f"w{suffix}"
        save_weights(path, first)
        content = path.read_bytes()
        with pytest.raises(WeightsError, match="exists"):
            save_weights(path, second)
        assert path.read_bytes() == content
        save_weights(path, second, overwrite=True)
        np.testing.assert_array_equal(
            read_weights(path)["params/Conv_0/kernel"],
            np.asarray(second["params"]["Conv_0"]["kernel"]),
        )
    with pytest.raises(WeightsError, match="suffix"):
        save_weights(tmp_path / "w.pt", first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.msgpack", "w.npz"]


def test_head_modules_default_and_declared():
    class WithHead:
        head_modules = ("pre_classifier", "classifier")

    assert head_modules(cnn()) == ("Dense_1",)
    assert head_modules(object()) == ("classifier",)
    assert head_modules(WithHead()) == ("pre_classifier", "classifier")
    mobilenet_v3 = get_model("mobilenet_v3_small", 10)
    assert head_modules(mobilenet_v3) == ("pre_classifier", "classifier")
    # A declared head re-initialises its own misfits; elsewhere the same misfit is an error.
    saved = flat(cnn_variables(seed=0, num_classes=4))
    saved["params/Dense_0/kernel"] = np.zeros((1024, 5), np.float32)
    saved["params/Dense_0/bias"] = np.zeros((5,), np.float32)
    saved["params/Dense_1/kernel"] = np.zeros((5, 4), np.float32)
    with pytest.raises(WeightsError, match="params/Dense_0/bias is \\(5,\\) in the file"):
        load_pretrained(cnn_variables(seed=1), saved, head=("classifier",))
    _, report = load_pretrained(cnn_variables(seed=1), saved, head=("Dense_0", "Dense_1"))
    assert [name for name, _ in report.reinitialised] == [
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/kernel",
    ]


def test_load_report_is_frozen():
    report = LoadReport(loaded=("a",), reinitialised=(), unused=())
    with pytest.raises(AttributeError):
        report.loaded = ()
