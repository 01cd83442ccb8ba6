"""The round's execution: cohorts, client strategies, devices and sharding."""

from fedjax_cv.engine.cohort import ClientInfo, Cohort, client_key, pad_clients
from fedjax_cv.engine.strategies import (
    STRATEGIES,
    ClientProgram,
    HostLoop,
    client_mesh,
    resolve_strategy,
    shard_cohort,
    sum_over_clients,
)

__all__ = [
    "STRATEGIES",
    "ClientInfo",
    "ClientProgram",
    "Cohort",
    "HostLoop",
    "client_key",
    "client_mesh",
    "pad_clients",
    "resolve_strategy",
    "shard_cohort",
    "sum_over_clients",
]
