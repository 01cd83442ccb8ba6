"""Algorithms by name, built from `config.algorithm`.

The name picks defaults along the axes of Hsu, Qi and Brown (2020); the config's other
fields switch further axes on, so names compose: `fedavgm` with `client.importance_weighting`
and `virtual_client_size` is FedAvgM + FedIR + FedVC.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from fedjax_cv.algorithms import aggregation, compose, compression, privacy, robust, sampling
from fedjax_cv.algorithms.attacks import Attack, attack_stage
from fedjax_cv.algorithms.base import FederatedAlgorithm, PerExampleLoss
from fedjax_cv.algorithms.client import ClientObjective
from fedjax_cv.algorithms.local_state import FEDBN, ClientLocal
from fedjax_cv.algorithms.param_groups import Rule, parse_multipliers
from fedjax_cv.algorithms.schedules import RoundSchedule, round_schedule
from fedjax_cv.algorithms.secure_aggregation import SecureAggregation, check_frac_bits
from fedjax_cv.algorithms.server import SERVER_VARIANTS

# The named presets; `build_algorithm` calls them, as a notebook does.
PRESETS = {
    "fedavg": compose.fedavg,
    "fedavgm": compose.fedavgm,
    "fedopt": compose.fedopt,
    "fedprox": compose.fedprox,
    "fedir": compose.fedir,
    "fedvc": compose.fedvc,
    "fedbn": compose.fedbn,
    "fednova": compose.fednova,
    "scaffold": compose.scaffold,
}
ALGORITHMS = tuple(PRESETS)
BATCH_STATS = ("average", "local")


def check_algorithm_config(config) -> None:
    """Rules that tie a name to its fields; raises ValueError naming the field."""
    name = config.name
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm.name={name!r} is unknown; known: {', '.join(ALGORITHMS)}")
    if (
        name == "fedavgm"
        and config.server.momentum is not None
        and not 0 < config.server.momentum < 1
    ):
        raise ValueError(
            f"algorithm.server.momentum={config.server.momentum!r} is not allowed with fedavgm; "
            "must be in (0, 1)"
        )
    if (
        name == "fedprox"
        and config.client.proximal_mu is not None
        and not config.client.proximal_mu > 0
    ):
        raise ValueError(
            f"algorithm.client.proximal_mu={config.client.proximal_mu!r} is not allowed with "
            "fedprox; must be > 0"
        )
    if name == "fedvc" and not config.virtual_client_size > 0:
        raise ValueError(
            f"algorithm.virtual_client_size={config.virtual_client_size!r} is not allowed with "
            "fedvc; must be a positive integer"
        )
    batch_stats = config.batch_stats
    if batch_stats not in ("auto",) + BATCH_STATS:
        raise ValueError(
            f"algorithm.batch_stats={batch_stats!r} is unknown; allowed: auto, "
            f"{', '.join(BATCH_STATS)}"
        )
    try:
        re.compile(config.local_params)
    except (re.error, TypeError):
        raise ValueError(
            f"algorithm.local_params={config.local_params!r} is not allowed; must be 'auto' or "
            "a regex over parameter names ('' for none)"
        ) from None
    if name == "fedopt" and config.server.optimizer not in ("auto", "adam", "yogi", "adagrad"):
        raise ValueError(
            f"algorithm.server.optimizer={config.server.optimizer!r} is not allowed with fedopt; "
            "allowed: adam, yogi, adagrad"
        )
    check_control_config(config)
    if config.server.variant not in SERVER_VARIANTS:
        raise ValueError(
            f"algorithm.server.variant={config.server.variant!r} is unknown; allowed: "
            f"{', '.join(SERVER_VARIANTS)}"
        )
    check_aggregation_config(config)


def check_control_config(config) -> None:
    """SCAFFOLD's and FedNova's rules (`fedjax_cv.algorithms.control`), before anything runs."""
    name, client = config.name, config.client
    if name == "scaffold":
        if not client.learning_rate > 0:
            raise ValueError(
                f"algorithm.client.learning_rate={client.learning_rate!r} is not allowed with "
                "scaffold; must be > 0 (option II divides by it)"
            )
        secure = getattr(config, "secure_aggregation", None)
        if secure is not None and secure.enabled:
            raise ValueError(
                "algorithm.secure_aggregation.enabled is not allowed with scaffold: its "
                "control-variate updates, which reveal each client's delta, are summed in the clear"
            )
    if name == "fednova" and client.momentum and client.proximal_mu:
        raise ValueError(
            f"algorithm.client.proximal_mu={client.proximal_mu!r} is not allowed with fednova and "
            f"algorithm.client.momentum={client.momentum!r}: the paper's normaliser covers one of "
            "momentum or a proximal term, not both"
        )


def aggregator_options(config) -> robust.AggregatorOptions:
    aggregator = config.aggregator
    return robust.AggregatorOptions(
        trim_fraction=aggregator.trim_fraction,
        num_byzantine=aggregator.num_byzantine,
        num_selected=aggregator.num_selected or None,
        num_iterations=aggregator.num_iterations,
    )


def check_aggregation_config(config) -> None:
    """The `algorithm.aggregator`, `algorithm.dp` and `algorithm.compression` sections; one
    line naming the field."""
    aggregator = config.aggregator
    _compression_stage(config)  # name, bits and fraction
    secure = getattr(config, "secure_aggregation", None)
    if _compression_name(config) != "none" and secure is not None and secure.enabled:
        raise ValueError(
            f"algorithm.compression.name={_compression_name(config)!r} is not allowed with "
            "algorithm.secure_aggregation.enabled: pairwise masks make every upload a dense "
            "ring vector, so compression would save nothing; use 'none'"
        )
    robust.get_aggregator(aggregator.name, aggregator_options(config), config.clients_per_round)
    if aggregator.norm_bound < 0:
        raise ValueError(
            f"algorithm.aggregator.norm_bound={aggregator.norm_bound!r} is not allowed; must be "
            ">= 0 (0: no bound)"
        )
    if aggregator.adaptive_norm_bound and not aggregator.norm_bound > 0:
        raise ValueError(
            "algorithm.aggregator.adaptive_norm_bound needs algorithm.aggregator.norm_bound > 0 "
            "(its initial value)"
        )
    check_secure_aggregation_config(config)
    dp = config.dp
    if not dp.enabled:
        return
    name = _compression_name(config)
    if name in ("quantization", "top_k"):
        raise ValueError(
            f"algorithm.compression.name={name!r} is not allowed with algorithm.dp.enabled: "
            "what it sends can exceed algorithm.dp.clip_norm in norm, which the accountant "
            "assumes bounds each client's upload; use 'none' or 'layer_selection'"
        )
    privacy.check_dp(dp.noise_multiplier, dp.clip_norm, dp.target_delta)
    privacy._check_choices(dp.accountant, "fixed")
    if dp.accountant == "pld":
        raise ValueError(
            "algorithm.dp.accountant='pld' is not allowed: rounds draw a fixed number of clients "
            "without replacement, which dp-accounting's PLD does not cover; use 'rdp'"
        )
    if _by_name(config.aggregation, "mean") != "mean":
        raise ValueError(
            f"algorithm.aggregation={config.aggregation!r} is not allowed with "
            "algorithm.dp.enabled; DP-FedAvg weighs every client alike: use 'mean' or 'auto'"
        )
    if _client_sampling(config) != "uniform":
        raise ValueError(
            f"algorithm.client_sampling={_client_sampling(config)!r} is not allowed with "
            "algorithm.dp.enabled; the accountant assumes clients drawn uniformly without "
            "replacement: use 'uniform'"
        )
    _dp_stage(config)  # the adaptive-clipping checks


def check_secure_aggregation_config(config) -> None:
    """`algorithm.secure_aggregation`: a fixed-point precision, and only over the mean."""
    secure = getattr(config, "secure_aggregation", None)  # absent from older saved configs
    if secure is None or not secure.enabled:
        return
    check_frac_bits(secure.frac_bits)
    if config.aggregator.name != "mean":
        raise ValueError(
            f"algorithm.aggregator.name={config.aggregator.name!r} is not allowed with "
            "algorithm.secure_aggregation.enabled; secure aggregation reveals only the sum, "
            "which a robust aggregator cannot use: use 'mean'"
        )


def _client_sampling(config) -> str:
    return _by_name(
        config.client_sampling, "size_proportional" if config.virtual_client_size > 0 else "uniform"
    )


def _dp_stage(config) -> aggregation.Stage:
    dp = config.dp
    count_stddev = dp.clipped_count_stddev or config.clients_per_round / 20
    return aggregation.dp_gaussian(
        dp.noise_multiplier,
        dp.clip_norm,
        adaptive=dp.adaptive_clip,
        target_quantile=dp.target_quantile,
        clip_learning_rate=dp.clip_learning_rate,
        clipped_count_stddev=count_stddev,
        expected_clients=config.clients_per_round,
    )


def _compression_name(config) -> str:
    section = config.get("compression")
    return "none" if section is None else section.name


def _compression_stage(config) -> aggregation.Stage:
    """`algorithm.compression`'s stage; a config without the section only counts bytes."""
    section = config.get("compression")
    if section is None:
        return compression.upload_accounting()
    return compression.get_compression(section.name, bits=section.bits, fraction=section.fraction)


def build_pipeline(config, attack: Attack | None = None) -> aggregation.Pipeline:
    """The aggregation pipeline `config.algorithm` describes, after the `attack`'s stage: an
    attacker corrupts its own delta before any server-side defence sees it. Compression comes
    last on the client, after norm bounding and DP clipping (clients clip, then encode what
    they send), and is always there: with 'none' it only reports `upload_bytes`."""
    stages = []
    if attack is not None and attack.active:
        stages.append(attack_stage(attack))
    bound = config.aggregator
    if bound.norm_bound > 0:
        if bound.adaptive_norm_bound:
            stages.append(aggregation.adaptive_norm_bound(bound.norm_bound, bound.norm_quantile))
        else:
            stages.append(aggregation.norm_bound(bound.norm_bound))
    if config.dp.enabled:
        stages.append(_dp_stage(config))
    stages.append(_compression_stage(config))
    return aggregation.Pipeline(
        stages=tuple(stages),
        aggregator=robust.get_aggregator(
            config.aggregator.name, aggregator_options(config), config.clients_per_round
        ),
        denominator=float(config.clients_per_round) if config.dp.enabled else None,
        secure=_secure(config),
    )


def _secure(config) -> SecureAggregation | None:
    secure = getattr(config, "secure_aggregation", None)
    return SecureAggregation(secure.frac_bits) if secure is not None and secure.enabled else None


def dp_accountant(config, num_clients: int):
    """`host_metrics` reporting `dp_epsilon` after r rounds (dp-accounting, fixed-size
    sampling of `clients_per_round` of `num_clients`), or None without DP."""
    dp = config.dp
    if not dp.enabled:
        return None

    def report(rounds: int) -> dict[str, float]:
        return {
            "dp_epsilon": privacy.epsilon(
                dp.noise_multiplier,
                rounds=int(rounds),
                target_delta=dp.target_delta,
                clients_per_round=config.clients_per_round,
                num_clients=num_clients,
                accountant=dp.accountant,
                sampling="fixed",
            )
        }

    return report


def _by_name(value: str, default: str) -> str:
    return default if value == "auto" else value


def client_local(config) -> ClientLocal:
    """The values clients keep across rounds: FedBN's norm layers by name, else the config's."""
    fedbn = config.name == "fedbn"
    return ClientLocal(
        params=_by_name(config.local_params, FEDBN.params if fedbn else ""),
        model_state=_by_name(config.batch_stats, "local" if fedbn else "average") == "local",
    )


def lr_schedule(config, num_rounds: int) -> RoundSchedule | None:
    """The client learning-rate schedule over rounds that `config.client` names."""
    client = config.client
    return round_schedule(
        client.lr_schedule,
        max(num_rounds, 1),
        power=client.lr_power,
        warmup_rounds=client.lr_warmup_rounds,
    )


def build_algorithm(
    config,
    loss_fn: PerExampleLoss,
    *,
    num_rounds: int = 1,
    class_prior: np.ndarray | None = None,
    metric_names: tuple[str, ...] = (),
    param_rules: tuple[Rule, ...] = (),
    num_clients: int | None = None,
    attack: Attack | None = None,
    mesh: Any = None,
    donate: bool = True,
) -> FederatedAlgorithm:
    """The algorithm `config.algorithm` describes (see the module docstring).

    `param_rules` come before the rules of `config.client.lr_multipliers` (a frozen backbone
    is such a rule, made where the model is known); `num_rounds` is the length of the run a
    learning-rate schedule decays over (`config.client.lr_schedule`); `num_clients` is the
    population DP's accountant samples from and SCAFFOLD's control variate averages over
    (needed with `config.dp.enabled` and by `scaffold`); `attack` adds
    its stage to the aggregation pipeline.
    """
    check_algorithm_config(config)
    rules = tuple(param_rules) + parse_multipliers(config.client.lr_multipliers)
    virtual = config.virtual_client_size > 0
    if virtual:
        example_sampler = sampling.virtual_client(config.virtual_client_size)
    else:
        example_sampler = sampling.local_epochs(config.local_epochs)
    client_sampling = _client_sampling(config)
    samplers = {
        "uniform": sampling.uniform_clients,
        "size_proportional": sampling.size_proportional_clients,
    }
    if client_sampling not in samplers:
        raise ValueError(
            f"algorithm.client_sampling={client_sampling!r} is unknown; "
            f"allowed: {', '.join(samplers)}"
        )
    importance = config.client.importance_weighting or config.name == "fedir"
    if importance and class_prior is None:
        raise ValueError("algorithm.client.importance_weighting needs the data's class prior")
    prior = np.asarray(class_prior, np.float32) if importance else None
    mu = config.client.proximal_mu
    server = config.server
    # The preset of the name builds it: the name's defaults live in its signature only, and a
    # config field left None ("by name") takes them.
    by_name = {
        "server_optimizer_name": None if server.optimizer == "auto" else server.optimizer,
        "server_learning_rate": server.learning_rate,
        "server_momentum": server.momentum,
        "proximal_mu": mu if config.name == "fedprox" else None,
        "class_prior": prior if config.name == "fedir" else None,
        "virtual_client_size": config.virtual_client_size if config.name == "fedvc" else None,
        "num_clients": _population(config, num_clients) if config.name == "scaffold" else None,
    }
    return PRESETS[config.name](
        loss_fn,
        config.client.learning_rate,
        **{key: value for key, value in by_name.items() if value is not None},
        client_momentum=config.client.momentum,
        client_weight_decay=config.client.weight_decay,
        b1=server.b1,
        b2=server.b2,
        eps=server.eps,
        server_variant=server.variant,
        objective=ClientObjective(
            class_prior=None if config.name == "fedir" else prior,
            proximal_mu=0.0 if mu is None or config.name == "fedprox" else mu,
        ),
        aggregation=_by_name(
            config.aggregation, "mean" if virtual or config.dp.enabled else "weighted"
        ),
        client_sampler=samplers[client_sampling](),
        example_sampler=example_sampler,
        metric_names=metric_names,
        lr_multipliers=rules,
        lr_schedule=lr_schedule(config, num_rounds),
        local=client_local(config),
        pipeline=build_pipeline(config, attack),
        host_metrics=_accountant_for(config, num_clients),
        strategy=config.strategy,
        mesh=mesh,
        donate=donate,
    )


def _population(config, num_clients: int | None) -> int:
    """SCAFFOLD's N, the number of clients whose control variates the server's averages."""
    if num_clients is None:
        raise ValueError(
            f"algorithm.name={config.name!r} needs build_algorithm(..., num_clients=N)"
        )
    return num_clients


def _accountant_for(config, num_clients: int | None):
    if config.dp.enabled and num_clients is None:
        raise ValueError("algorithm.dp.enabled needs build_algorithm(..., num_clients=N)")
    return dp_accountant(config, num_clients)
