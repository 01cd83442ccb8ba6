"""Every model family of the zoo trains FedAvg from its config (shrunk) and its loss falls."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedjax_cv.train import train_and_evaluate
from fedjax_cv.validation import ConfigError
from tests.configs_loader import load_config
from tests.test_models_zoo import small_kwargs

FAMILIES = ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "resnet18", "vit_ti16"]
ROUNDS = 3
# At 32x32 the small MobileNetV2's stride-32 maps are 1x1 and its GroupNorm groups hold two
# values each: gradients in the hundreds at initialisation and a loss that climbs at any useful
# learning rate. At 64x64 (2x2 maps) it trains like the others.
IMAGE_SIZE = {"mobilenet_v2": 64}


def shapes_runlocal(model: str):
    """configs/cifar10_models.py's runlocal variant on the embedded shapes data, with the zoo
    tests' small variant of the model: both clients train three epochs every round on the same
    40 IID images each, so the training loss of the last round must be below the first's."""
    config = load_config(f"configs/cifar10_models.py:model={model},runlocal")
    config.num_rounds = config.eval_every_rounds = ROUNDS
    config.model.kwargs.update(small_kwargs(model))
    config.data.name = "shapes"
    config.data.augmentation = "none"
    config.data.image_size = IMAGE_SIZE.get(model, 32)
    config.data.num_clients = 2
    config.data.partition.name = "iid"
    config.data.num_train_examples = 80
    config.data.num_test_examples = 40
    config.algorithm.batch_size = 10
    config.algorithm.local_epochs = 3
    config.algorithm.client.learning_rate = 0.01
    config.eval.batch_size = 40
    return config


@pytest.mark.parametrize("model", FAMILIES)
def test_fedavg_rounds_with_each_family_lower_the_loss(tmp_path, model):
    record = train_and_evaluate(shapes_runlocal(model), str(tmp_path))
    assert record["round"] == ROUNDS
    assert record["train/num_clients"] == 2 and record["train/num_nonfinite_clients"] == 0
    assert np.isfinite(record["eval/loss"]) and record["train/delta_norm"] > 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    losses = [line["train/loss"] for line in lines if "train/loss" in line]
    assert len(losses) == ROUNDS
    assert losses[-1] < losses[0], losses


def test_an_unknown_model_field_fails_before_anything_is_written(tmp_path):
    config = shapes_runlocal("resnet18")
    config.model.kwargs.depth_multiplier = 2.0
    with pytest.raises(
        ConfigError, match="model.kwargs.depth_multiplier=2.0 is not a field of resnet18"
    ):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
