"""Federated rounds of a task's loss on a hand-made cohort, shared by the task tests: two
FedAvgM rounds, optionally with FedIR's weights, on any strategy or mesh."""

from __future__ import annotations

import functools

import jax
import numpy as np

from fedjax_cv import algorithms
from fedjax_cv.tasks import get_task


@functools.cache
def _algorithm(task_name, model, strategy, num_classes, importance, mesh):
    """One algorithm per setting, so that a second cohort of the same shapes (the padding
    tests' reference and changed runs) reuses its compiled round instead of compiling it again.
    Its functions are pure: nothing of one run carries over to the next."""
    task = get_task(task_name)
    prior = np.full(num_classes, 1.0 / num_classes, np.float32)
    return algorithms.fedavgm(
        task.make_loss_fn(model),
        0.1,
        server_momentum=0.5,
        objective=algorithms.ClientObjective(class_prior=prior if importance else None),
        metric_names=task.metric_names,
        strategy=strategy,
        mesh=mesh,
    )


def run_rounds(task_name, model, cohort, strategy, num_classes, importance=False, mesh=None):
    """(server params, metrics) after two rounds; FedIR with a uniform prior when `importance`."""
    params = model.init(jax.random.key(0), cohort.examples["image"][0, 0], train=False)["params"]
    algorithm = _algorithm(task_name, model, strategy, num_classes, importance, mesh)
    state = algorithm.init(params)
    for r in range(2):
        state, metrics = algorithm.apply(state, cohort, jax.random.key(r))
    return jax.device_get(state.params), jax.device_get(metrics)


def grow(x: np.ndarray, fill) -> np.ndarray:
    """Cohort leaves [clients, steps, batch, ...] with one more batch column and then one more
    step, all `fill`: room for a padded example."""
    x = np.concatenate([x, np.full_like(x[:, :, :1], fill)], axis=2)
    return np.concatenate([x, np.full_like(x[:, :1], fill)], axis=1)
