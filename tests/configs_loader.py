"""Loads a config file the way launch/train.py does (path[:arg])."""

from __future__ import annotations

import pathlib

from fedjax_cv import config_base

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    return config_base.load_config(ROOT / path, arg or None)


def override(config, overrides: dict):
    """Sets dotted keys: {'algorithm.client.learning_rate': 0.1}."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def shrink(config, num_clients=8, clients_per_round=3, num_train=160, num_test=40):
    """A config's data and cohort cut down for a test that runs in seconds."""
    config.data.num_clients = num_clients
    config.data.num_train_examples = num_train
    config.data.num_test_examples = num_test
    config.algorithm.clients_per_round = clients_per_round
    return config
