"""Federated algorithms as composable pure functions.

Presets: `fedavg`, `fedavgm`, `fedopt`, `fedprox`, `fedir`, `fedvc`, `fedbn`, `fednova`,
`scaffold`; each returns a `FederatedAlgorithm` with `init(params)` and `apply(state, cohort,
rng)`. Compose axes with `federated_algorithm`, `ClientObjective` and `virtual_clients`.
"""

from fedjax_cv.algorithms.base import (
    FederatedAlgorithm,
    LossOutput,
    PerExampleLoss,
    ServerState,
)
from fedjax_cv.algorithms.client import ClientObjective, importance_table
from fedjax_cv.algorithms.compose import (
    client_sgd,
    fedavg,
    fedavgm,
    fedbn,
    federated_algorithm,
    fedir,
    fednova,
    fedopt,
    fedprox,
    fedvc,
    scaffold,
    virtual_clients,
)
from fedjax_cv.algorithms.local_state import FEDBN, ClientLocal
from fedjax_cv.algorithms.param_groups import freeze_except, parse_multipliers
from fedjax_cv.algorithms.sampling import (
    ClientSampler,
    ExampleSampler,
    local_epochs,
    size_proportional_clients,
    uniform_clients,
    virtual_client,
)
from fedjax_cv.algorithms.server import server_optimizer

__all__ = [
    "FEDBN",
    "ClientLocal",
    "ClientObjective",
    "ClientSampler",
    "ExampleSampler",
    "FederatedAlgorithm",
    "LossOutput",
    "PerExampleLoss",
    "ServerState",
    "client_sgd",
    "fedavg",
    "fedavgm",
    "fedbn",
    "federated_algorithm",
    "freeze_except",
    "fedir",
    "fednova",
    "fedopt",
    "fedprox",
    "fedvc",
    "importance_table",
    "local_epochs",
    "parse_multipliers",
    "scaffold",
    "server_optimizer",
    "size_proportional_clients",
    "uniform_clients",
    "virtual_client",
    "virtual_clients",
]
