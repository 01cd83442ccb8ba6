"""fedjax_cv: federated learning for computer vision in JAX.

The notebook API (`fedjax_cv.api`), each in one call:

    import fedjax_cv as fcv

    data = fcv.dataset("shapes", num_clients=20, partition__alpha=0.1)
    model = fcv.model("cnn_emnist", data)
    algorithm = fcv.algorithms.fedavg(model.loss_fn, 0.05, client_momentum=0.9)
    cohorts = fcv.cohorts(data, algorithm, clients_per_round=5, batch_size=10)
    state, history = fcv.train_rounds(algorithm, algorithm.init(model.params), cohorts, 10)
    fcv.evaluate(model, state, data)

Names are imported on first use, so `launch/train.py` can check its flags before JAX loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedjax_cv import algorithms, curves, models, tasks
    from fedjax_cv.api import (
        Model,
        cohorts,
        config,
        dataset,
        evaluate,
        model,
        params_sha256,
        plot_predictions,
        task,
        train_rounds,
    )
    from fedjax_cv.data import plots

__all__ = [
    "Model",
    "algorithms",
    "cohorts",
    "config",
    "curves",
    "dataset",
    "evaluate",
    "model",
    "models",
    "params_sha256",
    "plot_predictions",
    "plots",
    "task",
    "tasks",
    "train_rounds",
]
_MODULES = {
    "algorithms": "fedjax_cv.algorithms",
    "curves": "fedjax_cv.curves",
    "models": "fedjax_cv.models",
    "plots": "fedjax_cv.data.plots",
    "tasks": "fedjax_cv.tasks",
}


def __getattr__(name: str) -> Any:
    if name in __all__ and name not in _MODULES:
        return getattr(importlib.import_module("fedjax_cv.api"), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'fedjax_cv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
