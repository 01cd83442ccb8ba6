"""Detection on real annotations: BCCD (PASCAL VOC XML) and coco128 (YOLO txt).

- a small YOLOv5n overfits 8 real BCCD train images to a training mAP@0.5 of at least 0.8,
  measured by the task's own evaluation (fixed-size NMS on the device, `merge`, COCO mAP in
  `finalize`), whose true boxes are checked against the XML files read here independently:
  boxes, the letterbox, the targets, NMS and mAP agree on real annotations;
- configs/bccd_detection.py:runlocal and configs/coco128_detection.py:runlocal train end to end
  through launch/train.py (`train_and_evaluate`) and report mAP, per-class AP and a picture;
- both configs train with YOLOv5's settings (momentum 0.937, 0.01 x batch, warm-up) and take
  their arguments.

The tests skip without ../shared/data/bccd or coco128 (fail with FEDJAX_CV_REQUIRE_DATA=1).
Compilation dominates on CPU, so everything compiles with tests/xla.py's FAST_COMPILE options
(the end-to-end runs get them through XLA_FLAGS in their own process).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from fedjax_cv.data import augment, sources
from fedjax_cv.data import cohort as cohort_lib
from fedjax_cv.models import get_model
from fedjax_cv.tasks import detection, get_task, make_centralized_step
from fedjax_cv.validation import validate_config
from tests import real_data
from tests.configs_loader import load_config
from tests.xla import FAST_COMPILE, ROOT

BCCD_CLASSES = ("Platelets", "RBC", "WBC")


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "spec, clients, per_round, size, rounds",
    [
        ("configs/bccd_detection.py", 4, 4, 256, 40),
        ("configs/bccd_detection.py:fedcv,clients=2,size=320", 2, 2, 320, 40),
        ("configs/bccd_detection.py:runlocal", 4, 2, 64, 2),
        ("configs/coco128_detection.py", 8, 4, 320, 100),
        ("configs/coco128_detection.py:lda,alpha=1.0,runlocal", 8, 2, 64, 2),
    ],
)
def test_detection_configs_train_with_yolov5_settings(spec, clients, per_round, size, rounds):
    config = load_config(spec)
    validate_config(config)
    assert config.model.name == "yolov5n" and config.algorithm.name == "fedavg"
    assert config.num_rounds == rounds
    assert config.data.num_clients == clients and config.algorithm.clients_per_round == per_round
    client = config.algorithm.client
    assert client.momentum == 0.937 and client.lr_warmup_rounds == 3
    assert client.learning_rate == pytest.approx(0.01 * config.algorithm.batch_size)
    preset = augment.make_augmentation(config.data.augmentation)
    assert preset == dataclasses.replace(
        augment.AUGMENTATIONS["detection"], image_size=(size, size)
    )
    if "runlocal" in spec:
        assert config.model.kwargs.to_dict() == {"width_multiple": 0.125, "depth_multiple": 0.1}


def test_detection_config_model_and_unknown_arguments():
    assert load_config("configs/bccd_detection.py:model=yolov5s").model.name == "yolov5s"
    with pytest.raises(ValueError, match=r"'epochs' is unknown; known: .*runlocal, model$"):
        load_config("configs/coco128_detection.py:epochs=3")


# --------------------------------------------------------------------------- overfit 8 images


def _xml_boxes(path, size: int, class_ids: dict[str, int]):
    """(xyxy pixel boxes on the size x size letterboxed image, class ids) of a VOC XML file,
    computed here without the library: VOC pixel coordinates are 1-based (pixel v spans
    [v - 1, v)), the image is scaled by min(size / height, size / width) and centred, the odd
    pixel of padding at the bottom / right."""
    root = ET.parse(path).getroot()
    width = int(root.findtext("size/width"))
    height = int(root.findtext("size/height"))
    scale = min(size / height, size / width)
    top = (size - round(height * scale)) // 2
    left = (size - round(width * scale)) // 2
    boxes, classes = [], []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        x0, x1 = (np.clip(v - 1, 0, width) * scale + left for v in (xmin, xmax))
        y0, y1 = (np.clip(v - 1, 0, height) * scale + top for v in (ymin, ymax))
        boxes.append((x0, y0, x1, y1))
        classes.append(class_ids[obj.findtext("name")])
    return np.asarray(boxes), np.asarray(classes), (height, width)


def test_a_small_yolo_overfits_eight_real_bccd_images():
    """The first 8 BCCD train images, letterboxed to 128x128 without random augmentation, are
    both the training batch and the evaluation set: 250 Adam steps of a YOLOv5n of width 1/8
    (GroupNorm) must reach training mAP@0.5 >= 0.8 (about 0.84 after 175 steps, 1.0 after 250
    when written; the 9 platelets, 6-8 pixels wide here, are learnt last)."""
    root = real_data.require("bccd/BCCD")
    size, num_images, steps = 128, 8, 250
    source = sources.voc_detection(root, "train")
    assert source.class_names == BCCD_CLASSES
    split = {
        "image": [source.images[i] for i in range(num_images)],
        "boxes": list(source.boxes[:num_images]),
        "box_labels": list(source.box_labels[:num_images]),
    }
    letterbox = augment.make_augmentation({"name": "detection", "image_size": (size, size)})
    letterbox = letterbox.deterministic()
    assert letterbox.letterbox and not letterbox.is_random
    batch, mask = next(cohort_lib.test_batches(split, num_images, letterbox))
    assert batch["image"].shape == (num_images, size, size, 3) and mask.all()

    model = get_model("yolov5n", 3, width_multiple=0.125, depth_multiple=0.33, norm="group")
    task = get_task("detection")
    init = jax.jit(lambda key, x: model.init(key, x, train=False)["params"])
    init_args = (jax.random.key(0), batch["image"][:1])
    params = init.lower(*init_args).compile(FAST_COMPILE)(*init_args)
    optimizer = optax.adam(0.01)
    opt_state = optimizer.init(params)
    key = jax.random.key(1)
    step = make_centralized_step(task, model, optimizer)
    step = step.lower(params, opt_state, batch, key).compile(FAST_COMPILE)
    eval_fn = detection.make_eval_fn(model).lower(params, {}, batch, mask).compile(FAST_COMPILE)

    def evaluate(params):
        return detection.merge(None, eval_fn(params, {}, batch, mask))

    before = detection.finalize(evaluate(params))
    for index in range(steps):
        params, opt_state = step(params, opt_state, batch, jax.random.fold_in(key, index))
    stats = evaluate(params)

    # The true boxes the evaluation scores against are the XML's, letterboxed by hand.
    class_ids = {name: i for i, name in enumerate(BCCD_CLASSES)}
    assert len(stats["ground_truths"]) == num_images
    ground_truths = stats["ground_truths"]
    for image_id, truth in zip(source.image_ids[:num_images], ground_truths, strict=True):
        path = root / "Annotations" / f"{image_id}.xml"
        boxes, classes, shape = _xml_boxes(path, size, class_ids)
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as image:
            assert image.size[::-1] == shape
        np.testing.assert_allclose(truth["boxes"], boxes, atol=1e-3)
        np.testing.assert_array_equal(truth["classes"], classes)
    counts = np.bincount(np.concatenate([t["classes"] for t in ground_truths]))
    assert counts.tolist() == [9, 127, 9]  # platelets, red and white cells of the 8 images

    result = detection.finalize(stats)
    details = detection.details(stats, BCCD_CLASSES)
    assert details["num_ground_truths"] == counts.sum()
    assert before["map50"] < 0.1
    assert result["loss"] < 0.5 * before["loss"]
    assert result["map50"] >= 0.8, (result, details["per_class_ap50"])
    assert result["map50_95"] <= result["map50"]


# --------------------------------------------------------------------------- runlocal end to end


def _train_runlocal(config: str, workdir) -> list[dict]:
    """launch/train.py on `config`:runlocal with the real data, in a process compiled with
    FAST_COMPILE's options; its metrics.jsonl records."""
    flags = " ".join(f"--{name}={str(value).lower()}" for name, value in FAST_COMPILE.items())
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    command = [
        sys.executable,
        "launch/train.py",
        f"--config=configs/{config}:runlocal",
        f"--workdir={workdir}",
        f"--config.data.root={real_data.DATA}",
    ]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "metrics.jsonl").open()]


def _check_run(workdir, records: list[dict], class_names, num_ground_truths: int) -> dict:
    assert [r["round"] for r in records] == [1, 2]
    last = records[-1]
    for key in ("eval/map50", "eval/map50_95", "eval/loss", "train/loss"):
        assert math.isfinite(last[key]), key
    assert 0 <= last["eval/map50_95"] <= last["eval/map50"] <= 1
    assert last["eval/loss"] > 0
    details = json.loads((workdir / "eval_details.json").read_text())
    assert details["round"] == 2
    for key in ("per_class_ap50", "per_class_ap50_95"):
        assert list(details[key]) == list(class_names)
        assert all(v is None or 0 <= v <= 1 for v in details[key].values())
    assert details["num_ground_truths"] == num_ground_truths
    with Image.open(workdir / "predictions" / "round_00002.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 100
    assert (workdir / "learning_curves.png").is_file()
    return details


def test_bccd_runlocal_trains_end_to_end(tmp_path):
    root = real_data.require("bccd/BCCD")
    ids = (root / "ImageSets/Main/test.txt").read_text().split()
    boxes = sum(len(ET.parse(root / f"Annotations/{i}.xml").findall("object")) for i in ids)
    workdir = tmp_path / "bccd"
    records = _train_runlocal("bccd_detection.py", workdir)
    details = _check_run(workdir, records, BCCD_CLASSES, boxes)
    assert all(details["per_class_ap50"][name] is not None for name in BCCD_CLASSES)
    assert details["num_images"] == len(ids) == 72


def test_coco128_runlocal_trains_end_to_end(tmp_path):
    root = real_data.require("coco128")
    labels = root / "object_detection/labels/val2017"
    images = [p.stem for p in (root / "images/val2017").glob("*.jpg")]
    boxes = sum(
        len((labels / f"{i}.txt").read_text().split()) // 5
        for i in images
        if (labels / f"{i}.txt").exists()
    )
    workdir = tmp_path / "coco128"
    records = _train_runlocal("coco128_detection.py", workdir)
    details = _check_run(workdir, records, sources.COCO_CLASSES, boxes)
    assert details["per_class_ap50"]["person"] is not None
    assert details["num_images"] == len(images)
