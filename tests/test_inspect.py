"""The partition inspector and the real-data configs."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fedjax_cv.data.inspect import inspect_partition
from fedjax_cv.train import train_and_evaluate
from tests.configs_loader import load_config
from tests.real_data import DATA, require
from tests.test_train import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_inspect_writes_partition_json_and_plots(tmp_path):
    config = tiny_config(**{"data.partition.alpha": 0.1})
    partition = inspect_partition(config, tmp_path)
    saved = json.loads((tmp_path / "partition.json").read_text())
    assert saved["seed"] == 0 and len(saved["clients"]) == 6
    every = sorted(i for client in saved["clients"] for i in client)
    assert every == list(range(120))  # each train example on exactly one client
    stats = saved["stats"]
    assert stats["num_examples"] == 120 and sum(stats["client_sizes"]) == 120
    assert 0.0 < stats["mean_emd"] <= 2.0
    assert stats["mean_emd"] == pytest.approx(partition.stats.mean_emd)
    for png in ("class_heatmap.png", "client_sizes.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_inspect_cli_prints_the_client_table(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedjax_cv.data.inspect",
            "--config=configs/shapes_fedavg.py:runlocal",
            f"--out={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "20 clients, 1000 examples, mean EMD" in result.stdout
    assert (tmp_path / "partition.json").exists()


def test_train_writes_the_partition_it_trained_on(tmp_path):
    train_and_evaluate(tiny_config(), str(tmp_path))
    saved = json.loads((tmp_path / "partition.json").read_text())
    assert saved["name"] == "dirichlet" and saved["params"] == {"alpha": 1.0}
    assert sum(saved["stats"]["client_sizes"]) == 120


def test_cifar10_dirichlet_config_trains_on_real_images(tmp_path):
    require("cifar10-images.tar.gz")
    env = dict(os.environ, FEDJAX_CV_CACHE=str(pathlib.Path.home() / ".cache" / "fedjax_cv"))
    result = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config=configs/cifar10_dirichlet.py:runlocal,alpha=0.5",
            f"--workdir={tmp_path}",
            "--config.num_rounds=2",
            "--config.algorithm.clients_per_round=2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["round"] == 2 and last["train/num_examples"] == 1000
    saved = json.loads((tmp_path / "partition.json").read_text())
    assert saved["stats"]["num_examples"] == 50_000
    assert np.all(np.asarray(saved["stats"]["client_sizes"]) == 500)


def test_coco128_detection_partition_covers_every_image_and_counts_boxes(tmp_path):
    require("coco128")
    partition = inspect_partition(load_config("configs/coco128_detection.py"), tmp_path)
    every = sorted(int(i) for client in partition.clients for i in client)
    assert every == list(range(128))
    labels = DATA / "coco128/object_detection/labels/train2017"
    images = [p.stem for p in (DATA / "coco128/images/train2017").glob("*.jpg")]
    label_lines = sum(
        len((labels / f"{stem}.txt").read_text().split()) // 5
        for stem in images
        if (labels / f"{stem}.txt").exists()
    )
    assert partition.stats.num_boxes == label_lines
