"""Segmentation end to end: configs/shapes_segmentation.py trains, reports mIoU and writes its
per-class IoU and pictures; a model of the wrong task is refused before anything is written."""

from __future__ import annotations

import json

import ml_collections
import pytest

from fedjax_cv.tasks.segmentation import mean_iou
from fedjax_cv.train import train_and_evaluate
from fedjax_cv.validation import ConfigError
from tests.configs_loader import load_config, override


def small_segmentation(**overrides):
    config = load_config("configs/shapes_segmentation.py:runlocal")
    config.data.image_size = 24
    if "model.name" in overrides:  # the U-Net's base_width is no field of other models
        config.model.kwargs = ml_collections.ConfigDict()
    else:
        config.model.kwargs.base_width = 8
    return override(config, overrides)


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("segmentation") / "run"
    record = train_and_evaluate(small_segmentation(), str(workdir))
    return workdir, record


def test_segmentation_runlocal_trains_and_reports_miou(segmentation_run):
    workdir, record = segmentation_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert {"eval/miou", "eval/pixel_accuracy", "eval/loss"} <= set(records[-1])
    assert "eval/accuracy" not in records[-1]
    # The loss falls from the first round, where the model starts at chance over 5 classes
    # (ln 5 = 1.61), to the last.
    assert records[-1]["train/loss"] < 0.8 * records[0]["train/loss"]
    assert 0 < records[-1]["eval/miou"] <= records[-1]["eval/pixel_accuracy"] <= 1


def test_per_class_iou_and_confusion_are_written_and_agree_with_the_reported_miou(
    segmentation_run,
):
    workdir, record = segmentation_run
    details = json.loads((workdir / "eval_details.json").read_text())
    assert details["round"] == 3
    assert list(details["per_class_iou"]) == ["background", "circle", "square", "triangle", "cross"]
    miou, per_class = mean_iou(details["confusion"])
    assert record["eval/miou"] == pytest.approx(miou, abs=1e-12)
    for iou, reported in zip(per_class, details["per_class_iou"].values(), strict=True):
        assert reported is None if iou != iou else reported == pytest.approx(iou, abs=1e-12)
    total = sum(map(sum, details["confusion"]))
    trace = sum(details["confusion"][c][c] for c in range(5))
    assert record["eval/pixel_accuracy"] == pytest.approx(trace / total, abs=1e-12)


def test_pictures_of_predictions_and_learning_curves_are_written(segmentation_run):
    workdir, _ = segmentation_run
    assert (workdir / "predictions" / "round_00003.png").stat().st_size > 1000
    assert (workdir / "learning_curves.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "config, message",
    [
        (lambda: small_segmentation(**{"model.name": "cnn_emnist"}), "segmentation needs"),
        (
            lambda: override(
                load_config("configs/shapes_fedavg.py:runlocal"), {"model.name": "unet"}
            ),
            "classification needs",
        ),
        (
            lambda: small_segmentation(
                **{"model.name": "deeplabv3plus_mobilenet_v2", "model.kwargs.output_stride": 32}
            ),
            "model.output_stride=32 is not allowed",
        ),
        (lambda: small_segmentation(**{"data.partition.alpha": 0.0}), "data.partition.alpha"),
    ],
)
def test_a_model_of_another_task_or_bad_fields_fail_before_anything_is_written(
    tmp_path, config, message
):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message) as error:
        train_and_evaluate(config(), str(workdir))
    assert "\n" not in str(error.value)
    assert not workdir.exists()
