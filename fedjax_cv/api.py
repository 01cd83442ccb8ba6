"""The notebook API: a federated dataset, a model, cohorts and an evaluation in one call each.

    import fedjax_cv as fcv

    data = fcv.dataset("shapes", num_clients=20, partition__alpha=0.1)
    model = fcv.model("cnn_emnist", data)
    algorithm = fcv.algorithms.fedavg(model.loss_fn, 0.05, client_momentum=0.9)
    cohorts = fcv.cohorts(data, algorithm, clients_per_round=5, batch_size=10)
    state, history = fcv.train_rounds(algorithm, algorithm.init(model.params), cohorts, 10)
    fcv.evaluate(model, state, data)  # {'accuracy': ..., 'loss': ...}

These are the functions `train.build_experiment` builds a configured run with (one way, not
two): the same checks, the same dataset, the same initial variables for the same seed, the same
cohorts and the same evaluation, so a run by hand reaches the command line's params.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from fedjax_cv import cli, config_base
from fedjax_cv.algorithms.attacks import Attack
from fedjax_cv.algorithms.base import FederatedAlgorithm, PerExampleLoss, ServerState
from fedjax_cv.data.augment import Augmentation, make_augmentation
from fedjax_cv.data.cohort import test_batches
from fedjax_cv.data.federated import FederatedDataset
from fedjax_cv.data.partition import PARTITIONERS
from fedjax_cv.data.pipeline import GrainCohortBuilder
from fedjax_cv.data.registry import EXTRA_FIELDS, build_dataset, partition_params
from fedjax_cv.engine import hosts
from fedjax_cv.models import get_model
from fedjax_cv.tasks import Task, get_task, task_names
from fedjax_cv.validation import ConfigError, validate_config


def params_sha256(params) -> str:
    """SHA-256 of the params' raw bytes, leaves in tree order: equal digests, equal models."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return digest.hexdigest()


# Random streams of a run's root key, `jax.random.key(seed)`.
INIT_STREAM, TRAIN_STREAM = 0, 1


# --------------------------------------------------------------------------- configs


def _dotted(overrides: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys from a dict and from keyword arguments ("__" for "."); a dict value under a
    key becomes one dotted key per entry (`partition={"alpha": 0.1}`)."""
    flat: dict[str, Any] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, Mapping) and not isinstance(value, ml_collections.ConfigDict):
            for inner, inner_value in value.items():
                add(f"{key}.{inner}", inner_value)
        else:
            flat[key] = value

    for key, value in dict(overrides or {}).items():
        add(key, value)
    for key, value in kwargs.items():
        add(key.replace("__", "."), value)
    return flat


def _override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets one dotted key with ml_collections' type check (as `--config.<key>=<value>`)."""
    *path, last = key.split(".")
    parent = config
    for part in path:
        parent = parent[part]
    if isinstance(value, list):
        value = tuple(value)
    try:
        parent[last] = value
    except (TypeError, ValueError):
        wanted = parent.get_ref(last).get_type().__name__
        raise ConfigError(f"{key}={value!r} is not allowed; must be of type {wanted}") from None


def apply_overrides(
    config: ml_collections.ConfigDict,
    overrides: Mapping[str, Any],
    open_keys: tuple[str, ...] = cli.OPEN_KEYS,
) -> ml_collections.ConfigDict:
    """`config` with `overrides` (dotted key -> value) set, keys checked as on the command line
    (`cli.check_override_keys`; new keys only directly under `open_keys`)."""
    try:
        cli.check_override_keys(config, [k for k in overrides if not _opens(k, open_keys)])
    except cli.CommandLineError as error:
        raise ConfigError(str(error).removeprefix("--config.")) from None
    for key, value in overrides.items():
        _override(config, key, value)
    return config


def _opens(key: str, open_keys: tuple[str, ...]) -> bool:
    parent, _, _ = key.rpartition(".")
    return parent in open_keys


def config(
    source: str | None = None, overrides: Mapping[str, Any] | None = None, **kwargs: Any
) -> ml_collections.ConfigDict:
    """A training config: the file `source` ("configs/shapes_fedavg.py:runlocal") loaded as
    launch/train.py loads it, or the base config when None; `overrides` (dotted keys) and
    `kwargs` ("__" for ".") set as `--config.<key>=<value>` does, type-checked; then
    validated. Raises ValueError (one line naming the file or key)."""
    loaded = config_base.base_config() if source is None else cli.load_config_file(source)
    apply_overrides(loaded, _dotted(overrides, kwargs))
    validate_config(loaded)
    loaded.lock()
    return loaded


# --------------------------------------------------------------------------- datasets


def dataset(name: str = "shapes", *, seed: int = 0, **fields: Any) -> FederatedDataset:
    """The federated dataset `name`: the base config's `data` section with `fields` set
    (`num_clients=20`, `partition__alpha=0.1` or `partition={"name": "iid"}`; the keys of
    `fedjax_cv.data.registry.EXTRA_FIELDS` and a partitioner's own parameters are accepted
    too), checked as a config and built by `build_dataset`, as a configured run builds it."""
    checked = config_base.base_config()
    overrides = {f"data.{key}": value for key, value in _dotted(None, fields).items()}
    # Fields that only some datasets or partitioners read are new keys, checked below.
    apply_overrides(
        checked,
        {"seed": seed, "data.name": name, **overrides},
        open_keys=cli.OPEN_KEYS + ("data", "data.partition"),
    )
    _check_data_keys(checked.data)
    # A dataset alone: cohort sizes are `cohorts`' to check, not this config's default's.
    checked.algorithm.clients_per_round = 1
    validate_config(checked)
    return build_dataset(checked.data, checked.seed)


def _check_data_keys(data: ml_collections.ConfigDict) -> None:
    """New keys under `data` must be EXTRA_FIELDS, under `data.partition` the partitioner's."""
    known = sorted(set(config_base.base_config().data.keys()) | set(EXTRA_FIELDS))
    for key in data.keys():
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            also = f"did you mean {hint[0]!r}?" if hint else f"known: {', '.join(known)}"
            raise ConfigError(f"data.{key} is not a field of a dataset; {also}")
    partition_params(data.partition)  # an unknown partitioner, named with the known ones
    signature = inspect.signature(PARTITIONERS[data.partition.name]).parameters
    accepted = list(signature)[3:]  # after (labels, num_clients, seed)
    for key in data.partition.keys():
        if key not in ("name", "alpha") and key not in accepted:
            raise ConfigError(
                f"data.partition.{key} is not a parameter of the {data.partition.name!r} "
                f"partitioner; its parameters: {', '.join(sorted(accepted)) or 'none'}"
            )


def task(data: FederatedDataset) -> Task:
    """The task plug-in that trains on `data` (classification, segmentation, detection)."""
    try:
        return get_task(data.task)
    except ValueError:
        raise ConfigError(
            f"data.name={data.name!r} is {data.task} data; training is implemented for "
            f"{', '.join(task_names())} so far (inspect it with python -m fedjax_cv.data.inspect)"
        ) from None


# --------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A Flax module with its variables and the task it is trained on."""

    module: Any  # flax.linen.Module
    variables: dict
    task: Task

    @property
    def params(self) -> Any:
        return self.variables["params"]

    @property
    def model_state(self) -> dict:
        """The variables other than params (BatchNorm statistics); {} for most models."""
        return {k: v for k, v in self.variables.items() if k != "params"}

    @functools.cached_property
    def loss_fn(self) -> PerExampleLoss:
        """The task's per-example training loss of the module: what an algorithm trains."""
        return self.task.make_loss_fn(self.module)

    @functools.cached_property
    def eval_fn(self) -> Callable:
        """The task's jit-compiled evaluation step (kept: one compilation per model)."""
        return self.task.make_eval_fn(self.module)

    @functools.cached_property
    def predict_fn(self) -> Callable:
        """`(params, model_state, images) -> the task's predictions`."""
        return self.task.predict(self.module)


# XLA's algebraic simplifier folds a chain of constant factors into one ((x * sqrt 2) * std ->
# x * (sqrt 2 * std) in `jax.random.normal` under an initialiser's scale), which moves a kernel
# by an ulp; without it the compiled init gives the params of an op-by-op init bit for bit.
_INIT_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "algsimp"}


@functools.lru_cache(maxsize=16)
def _compiled_init(module):
    """`module.init` as one compiled computation instead of a dispatch (and a small compile)
    per initialiser, the same random bits and arithmetic; kept for an equal module built
    again."""
    return jax.jit(
        functools.partial(module.init, train=False), compiler_options=_INIT_COMPILER_OPTIONS
    )


def init_variables(module, key: jax.Array, sample: jax.Array) -> dict:
    """The module's variables initialised from `key` on `sample` (a batch of inputs)."""
    try:
        init = _compiled_init(module)
    except TypeError:  # a module with an unhashable field cannot be kept
        init = _compiled_init.__wrapped__(module)
    return init(key, sample)


def eval_transform(augmentation: str | Mapping[str, Any] | Augmentation) -> Augmentation | None:
    """What test examples go through: the deterministic part of the training augmentation
    (resize, channels, box padding); None when that is nothing."""
    transform = make_augmentation(augmentation).deterministic()
    return None if transform.is_identity else transform


def build_model(
    model_config: ml_collections.ConfigDict,
    data: FederatedDataset,
    *,
    seed: int,
    augmentation: str | Mapping[str, Any] | Augmentation = "none",
) -> Model:
    """`model_config` (name, norm, kwargs) on `data` with variables initialised from
    `fold_in(jax.random.key(seed), INIT_STREAM)` on the first train image (after the
    deterministic part of `augmentation`); ConfigError when the model does not fit the data."""
    data_task = task(data)
    kwargs = dict(model_config.kwargs.to_dict())
    if model_config.norm != "auto":
        kwargs["norm"] = model_config.norm
    try:
        module = get_model(model_config.name, data.num_classes, **kwargs)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    batch, _ = next(test_batches({"image": data.train["image"]}, 1, eval_transform(augmentation)))
    sample = jnp.asarray(batch["image"])
    init_key = jax.random.fold_in(jax.random.key(seed), INIT_STREAM)
    try:  # the model's own checks of its fields (output_stride, ...) run at trace time
        output = jax.eval_shape(
            lambda x: module.init_with_output(init_key, x, train=False)[0], sample
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        data_task.check_output(
            jax.tree.map(lambda leaf: leaf.shape, output),
            sample.shape,
            f"model.name={model_config.name!r}",
        )
    except ValueError as error:
        raise ConfigError(f"{error} (data.name={data.name!r} is {data_task.name} data)") from None
    return Model(module, init_variables(module, init_key, sample), data_task)


def model(
    name: str,
    data: FederatedDataset,
    *,
    seed: int = 0,
    norm: str = "auto",
    augmentation: str | Mapping[str, Any] = "none",
    **kwargs: Any,
) -> Model:
    """The model `name` for `data` (its number of classes and task), `kwargs` its fields
    (`base_width=8`), variables initialised as a run of that `seed` initialises them."""
    checked = config_base.base_config()
    checked.model.name = name
    checked.model.norm = norm
    checked.model.kwargs = ml_collections.ConfigDict(kwargs)
    validate_config(checked)
    return build_model(checked.model, data, seed=seed, augmentation=augmentation)


# --------------------------------------------------------------------------- cohorts


def cohorts(
    data: FederatedDataset,
    algorithm: FederatedAlgorithm,
    *,
    clients_per_round: int,
    batch_size: int,
    seed: int = 0,
    augmentation: str | Mapping[str, Any] | Augmentation = "none",
    num_workers: int = 0,
    poisoned_clients: int = 0,
    attack: Attack | None = None,
    builder: type[GrainCohortBuilder] = GrainCohortBuilder,
) -> GrainCohortBuilder:
    """Round index -> that round's `Cohort`: the clients and examples `algorithm`'s samplers
    pick, seeded by (seed, round), in batches of `batch_size`, augmented per example.
    `builder`: the class that assembles them (a subclass of GrainCohortBuilder)."""
    for field, value in (("clients_per_round", clients_per_round), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{field}={value!r} is not allowed; must be a positive integer")
    if clients_per_round > len(data.clients):
        raise ConfigError(
            f"clients_per_round={clients_per_round} is not allowed; must be at most the "
            f"dataset's {len(data.clients)} clients"
        )
    return builder(
        dataset=data,
        client_sampler=algorithm.client_sampler,
        example_sampler=algorithm.example_sampler,
        clients_per_round=clients_per_round,
        batch_size=batch_size,
        seed=seed,
        poisoned_clients=poisoned_clients,
        attack=attack if attack is not None and attack.active else None,
        augmentation=augmentation,
        num_workers=num_workers,
    )


# --------------------------------------------------------------------------- evaluation


def evaluation_stats(
    model: Model,
    state: ServerState,
    data: FederatedDataset,
    *,
    batch_size: int = 500,
    augmentation: str | Mapping[str, Any] | Augmentation = "none",
) -> dict:
    """The task's evaluation statistics of `state` on the whole test split, summed.

    With several processes each evaluates every process_count-th batch with its own copy of
    the state, and the batches' statistics are merged in batch order on every process: the
    same sums as one process evaluating them all."""
    stats = None
    batches = test_batches(data.test, batch_size, eval_transform(augmentation))
    if hosts.is_multiprocess():
        local = hosts.process_local(state)
        mine = [
            (i, jax.device_get(model.eval_fn(local.params, local.model_state, *batch)))
            for i, batch in hosts.my_share(batches)
        ]
        for batch_stats in hosts.gather_in_order(mine):
            stats = model.task.merge(stats, batch_stats)
        return stats
    for batch, mask in batches:
        stats = model.task.merge(stats, model.eval_fn(state.params, state.model_state, batch, mask))
    return stats


def evaluate(
    model: Model,
    state: ServerState,
    data: FederatedDataset,
    *,
    batch_size: int = 500,
    augmentation: str | Mapping[str, Any] | Augmentation = "none",
) -> dict[str, float]:
    """The task's metrics of `state` on the test split of `data` (`accuracy`, `miou`,
    `map50`, ... and `loss`), test images through `augmentation`'s deterministic part."""
    stats = evaluation_stats(model, state, data, batch_size=batch_size, augmentation=augmentation)
    return {key: float(value) for key, value in model.task.finalize(stats).items()}


def plot_predictions(
    model: Model,
    state: ServerState,
    data: FederatedDataset,
    *,
    num_images: int = 8,
    augmentation: str | Mapping[str, Any] | Augmentation = "none",
    title: str = "predicted / true",
):
    """A matplotlib Figure of `state`'s predictions beside the truth on the first
    `num_images` test images (the task's picture: labels, masks or boxes)."""
    batch, _ = next(test_batches(data.test, num_images, eval_transform(augmentation)))
    predicted = model.predict_fn(state.params, state.model_state, batch["image"])
    return model.task.plot_predictions(
        batch, jax.device_get(predicted), data.class_names, title=title
    )


# --------------------------------------------------------------------------- training


def round_key(root_key: jax.Array, round_index: int) -> jax.Array:
    """The key of round `round_index` of a run whose root key is `root_key`."""
    return jax.random.fold_in(jax.random.fold_in(root_key, TRAIN_STREAM), round_index)


def train_rounds(
    algorithm: FederatedAlgorithm,
    state: ServerState,
    cohorts: Callable[[int], Any],
    num_rounds: int,
    *,
    seed: int = 0,
    start_round: int = 0,
    evaluate_every: int = 0,
    model: Model | None = None,
    eval_batch_size: int = 500,
    progress: bool = True,
) -> tuple[ServerState, list[dict[str, float]]]:
    """Rounds `start_round` .. `num_rounds` - 1 of `algorithm` on `cohorts(round)` with the
    round keys of a run of that `seed`, as launch/train.py runs them. Returns the last state
    and one record a round: `round`, `train/<metric>`, and every `evaluate_every` rounds and
    after the last, `eval/<metric>` of `model` on the test split of the cohorts' dataset (made
    by `cohorts(...)`). The presets donate the state passed in: use the one returned."""
    if evaluate_every and (model is None or not isinstance(cohorts, GrainCohortBuilder)):
        raise ConfigError(
            "evaluate_every > 0 needs model=<the Model being trained> and cohorts made by "
            "fedjax_cv.cohorts"
        )
    root_key = jax.random.key(seed)
    history = []
    bar = tqdm(range(start_round, num_rounds), desc="rounds", disable=not progress)
    for round_index in bar:
        key = round_key(root_key, round_index)
        state, metrics = algorithm.apply(state, cohorts(round_index), key)
        done = round_index + 1
        record = {"round": done}
        record |= {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        if evaluate_every and (done % evaluate_every == 0 or done == num_rounds):
            scores = evaluate(
                model,
                state,
                cohorts.dataset,
                batch_size=eval_batch_size,
                augmentation=cohorts.augmentation,
            )
            record |= {f"eval/{k}": v for k, v in scores.items()}
        bar.set_postfix(loss=f"{record['train/loss']:.3f}")
        history.append(record)
    return state, history


__all__ = [
    "INIT_STREAM",
    "TRAIN_STREAM",
    "Model",
    "apply_overrides",
    "build_model",
    "cohorts",
    "config",
    "dataset",
    "eval_transform",
    "evaluate",
    "evaluation_stats",
    "init_variables",
    "model",
    "params_sha256",
    "plot_predictions",
    "round_key",
    "task",
    "train_rounds",
]
