"""Every model family of the zoo trains two FedAvg rounds from its config (shrunk)."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_cv.train import train_and_evaluate
from fedjax_cv.validation import ConfigError
from tests.configs_loader import load_config

FAMILIES = ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "resnet18", "vit_ti16"]


def shapes_runlocal(model: str):
    """configs/cifar10_models.py's runlocal variant on the embedded shapes data."""
    config = load_config(f"configs/cifar10_models.py:model={model},runlocal")
    config.data.name = "shapes"
    config.data.augmentation = "none"
    config.data.image_size = 32
    config.data.num_clients = 8
    config.data.num_train_examples = 160
    config.data.num_test_examples = 40
    config.algorithm.batch_size = 10
    config.eval.batch_size = 40
    return config


@pytest.mark.parametrize("model", FAMILIES)
def test_fedavg_two_rounds_with_each_family(tmp_path, model):
    record = train_and_evaluate(shapes_runlocal(model), str(tmp_path))
    assert record["round"] == 2
    assert record["train/num_clients"] == 2 and record["train/num_nonfinite_clients"] == 0
    assert np.isfinite(record["train/loss"]) and np.isfinite(record["eval/loss"])
    assert record["train/delta_norm"] > 0


def test_an_unknown_model_field_fails_before_anything_is_written(tmp_path):
    config = shapes_runlocal("resnet18")
    config.model.kwargs.depth_multiplier = 2.0
    with pytest.raises(
        ConfigError, match="model.kwargs.depth_multiplier=2.0 is not a field of resnet18"
    ):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
