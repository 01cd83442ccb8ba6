"""Tasks as plug-ins: what a model is trained and evaluated on, chosen by the dataset.

`get_task(name)` returns a `Task`: the per-example training loss of a model, an evaluation
step whose statistics merge by addition over batches, clients and hosts, `finalize` from
those statistics to metrics, and the picture of predictions a person wants to look at.
`train.py`, the engine and the benchmarks only ever go through this interface, so a new task
is a new module registered here, not an edit of the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_cv.algorithms.base import PerExampleLoss

# (params, model_state, batch, mask) -> statistics whose leaves add up over batches.
EvalFn = Callable[[Any, Any, dict, jax.Array], dict[str, jax.Array]]


def merge_stats(total: dict | None, stats: dict) -> dict:
    """Adds a batch's statistics to a running total on the host (float64 / int64 sums)."""

    def widen(x):
        x = np.asarray(x)
        return x.astype(np.int64 if np.issubdtype(x.dtype, np.integer) else np.float64)

    stats = jax.tree.map(widen, jax.device_get(stats))
    if total is None:
        return stats
    return jax.tree.map(np.add, total, stats)


class Task(NamedTuple):
    """One task's plug-in (see the module docstring).

    - `make_loss_fn(model) -> PerExampleLoss` (train mode; accepts FedIR's `class_weights`);
    - `metric_names`: the per-example training metrics that loss reports (`train/<name>`);
    - `make_eval_fn(model) -> EvalFn`, jit-compiled, eval mode, padded examples excluded by
      `mask`;
    - `finalize(stats) -> {name: float}` from the summed statistics (`eval/<name>`);
    - `headline`: the eval metric a progress bar and a summary show first;
    - `check_output(output_shapes, input_shape, field)`: raises ValueError naming `field` when
      a model's output (the shape of each output array, as a pytree of shape tuples) does not
      fit the task (a classifier on masks, or the reverse);
    - `details(stats, class_names) -> dict`: per-class numbers written beside metrics.jsonl;
    - `plot_predictions(batch, predicted, class_names, title) -> Figure` of a test batch
      (images and their labels) and `predict(model) -> fn(params, model_state, images)`'s
      predictions for it;
    - `merge(total, stats) -> total`: adds a batch's statistics to the running total on the
      host (`merge_stats`: sums; detection keeps each image's detections for mAP).
    """

    name: str
    make_loss_fn: Callable[[Any], PerExampleLoss]
    metric_names: tuple[str, ...]
    make_eval_fn: Callable[[Any], EvalFn]
    finalize: Callable[[dict], dict[str, float]]
    headline: str
    check_output: Callable[[Any, Sequence[int], str], None]
    details: Callable[[dict, Sequence[str]], dict]
    predict: Callable[[Any], Callable]
    plot_predictions: Callable[..., Any]
    merge: Callable[[Any, dict], Any] = merge_stats


def argmax_predictions(model):
    """`(params, model_state, images) -> argmax of the logits` (classes, or per-pixel classes)."""

    @jax.jit
    def predict(params, model_state, images):
        logits = model.apply({"params": params, **model_state}, images, train=False)
        return jnp.argmax(logits, -1)

    return predict


def make_centralized_step(task: Task, model, optimizer: optax.GradientTransformation):
    """A jit-compiled centralized SGD step `(params, opt_state, batch, rng) -> (params,
    opt_state)` on the mean loss: the baseline federated throughput is measured against."""
    loss_fn = task.make_loss_fn(model)

    @jax.jit
    def step(params, opt_state, batch, rng):
        grads = jax.grad(lambda p: jnp.mean(loss_fn(p, {}, batch, rng)[0]))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def _registry() -> dict[str, Task]:
    from fedjax_cv.tasks import classification, detection, segmentation

    return {
        "classification": classification.TASK,
        "detection": detection.TASK,
        "segmentation": segmentation.TASK,
    }


def task_names() -> list[str]:
    return sorted(_registry())


def get_task(name: str) -> Task:
    """The registered task `name`; an unknown name lists the known ones."""
    tasks = _registry()
    if name not in tasks:
        raise ValueError(f"task {name!r} is unknown; known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]


__all__ = [
    "argmax_predictions",
    "EvalFn",
    "Task",
    "get_task",
    "make_centralized_step",
    "merge_stats",
    "task_names",
]
