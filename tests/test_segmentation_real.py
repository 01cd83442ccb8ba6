"""Segmentation on real masks, and the configs for real segmentation data.

- configs/coco128_segmentation.py:runlocal trains end to end on the real coco128 masks;
- a small U-Net trained by FedAvg overfits four real coco128 photographs to a training mIoU of
  at least 0.9, with masks checked against the PNG files read independently: the masks, their
  contiguous ids, the ignore label and the metric agree on real data;
- configs/voc_segmentation.py validates in every mode and model, refuses bad arguments in one
  line, and builds an experiment on a tiny PASCAL VOC folder.

The real-data tests skip without ../shared/data/coco128 (fail with FEDJAX_CV_REQUIRE_DATA=1).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import jax
import numpy as np
import pytest
from PIL import Image

from fedjax_cv import algorithms
from fedjax_cv.data import augment, sources
from fedjax_cv.data import cohort as cohort_lib
from fedjax_cv.data.federated import FederatedDataset
from fedjax_cv.data.pipeline import GrainCohortBuilder
from fedjax_cv.models import get_model
from fedjax_cv.models.weights import save_weights
from fedjax_cv.tasks import segmentation
from fedjax_cv.train import build_experiment, train_and_evaluate
from fedjax_cv.validation import validate_config
from tests import real_data
from tests.configs_loader import load_config
from tests.test_segmentation_data import VOC_LISTS, _make_voc

IGNORE = sources.IGNORE_LABEL
COCO = "configs/coco128_segmentation.py"
VOC = "configs/voc_segmentation.py"
VOC_MODELS = (
    "deeplabv3plus_resnet101",
    "deeplabv3plus_resnet50",
    "deeplabv3plus_mobilenet_v2",
    "unet_resnet101",
    "unet_resnet50",
    "unet_mobilenet_v2",
)


def he_init(shapes, seed: int = 0):
    """Variables of the shapes `jax.eval_shape(model.init, ...)` gives, drawn in numpy: He-normal
    kernels, unit norm scales, zero biases. A compiled `model.init` costs tens of seconds of XLA
    compilation on a 2-core CPU (one random draw a tensor); a test that only needs some
    reasonable start pays nothing for this one."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            std = np.sqrt(2.0 / np.prod(shape.shape[:-1]))
            return rng.normal(0.0, std, shape.shape).astype(shape.dtype)
        return (np.ones if "scale" in name else np.zeros)(shape.shape, shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


# --------------------------------------------------------------------------- configs


def test_coco128_config_settings():
    config = load_config(COCO)
    validate_config(config)
    assert config.data.name == "coco128_segmentation"
    assert config.data.num_clients == config.algorithm.clients_per_round == 4
    assert config.data.partition.name == "lda_multilabel"
    assert config.algorithm.name == "fedavg" and config.algorithm.client.momentum == 0.9
    assert 4 <= config.algorithm.batch_size <= 8
    assert config.model.name == "unet" and config.model.kwargs.base_width == 16
    preset = augment.make_augmentation(config.data.augmentation)
    assert preset == dataclasses.replace(
        augment.AUGMENTATIONS["segmentation"], image_size=preset.image_size
    )
    assert 96 <= min(preset.image_size) <= max(preset.image_size) <= 128


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("runlocal", {"num_rounds": 2, "data.num_clients": 4}),
        ("clients=8", {"data.num_clients": 8, "algorithm.clients_per_round": 8}),
        ("alpha=0.1", {"data.partition.alpha": 0.1}),
        (
            "model=unet_mobilenet_v2,width=0.5",
            {"model.name": "unet_mobilenet_v2", "model.kwargs": {"width_multiplier": 0.5}},
        ),
    ],
)
def test_coco128_config_variants(arg, expected):
    config = load_config(f"{COCO}:{arg}")
    validate_config(config)
    for key, value in expected.items():
        node = config
        for part in key.split("."):
            node = node[part]
        assert (node.to_dict() if hasattr(node, "to_dict") else node) == value, key


def test_coco128_config_unknown_argument_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'epochs' is unknown; known: runlocal, model, width"):
        load_config(f"{COCO}:runlocal,epochs=3")


@pytest.mark.parametrize("runlocal", [False, True], ids=["full", "runlocal"])
@pytest.mark.parametrize("model, mode", itertools.product(VOC_MODELS, ("ft", "fz", "sfl")))
def test_voc_config_every_mode_and_model_validates(model, mode, runlocal):
    weights = "" if mode == "sfl" else "/pretrained/backbone.npz"
    arg = f"model={model},mode={mode}" + (f",weights={weights}" if weights else "")
    config = load_config(f"{VOC}:{arg}" + (",runlocal" if runlocal else ""))
    validate_config(config)
    assert config.model.name == model
    assert config.model.weights == weights
    assert config.model.freeze == ("backbone" if mode == "fz" else "none")
    assert config.model.head_lr == 10.0
    assert config.data.name == "voc_segmentation" and config.data.train_split == "trainaug"
    assert config.data.partition.name == "lda_multilabel" and config.data.partition.alpha == 0.5
    assert config.data.num_clients == config.algorithm.clients_per_round == 4
    assert config.algorithm.client.momentum == 0.9
    preset = augment.make_augmentation(config.data.augmentation)
    assert preset.scale_range == (0.5, 2.0) and preset.flip
    if runlocal:
        assert config.num_rounds <= 3 and preset.image_size == (64, 64)
    else:
        assert preset.image_size == (513, 513)
        assert 4 <= config.algorithm.batch_size <= 16
        assert config.algorithm.client.learning_rate == 0.001


@pytest.mark.parametrize("alpha, clients", itertools.product((0.1, 0.5, 100.0), (4, 8)))
def test_voc_config_alpha_and_clients(alpha, clients):
    config = load_config(f"{VOC}:alpha={alpha},clients={clients}")
    validate_config(config)
    assert config.data.partition.alpha == alpha
    assert config.data.num_clients == config.algorithm.clients_per_round == clients


@pytest.mark.parametrize("schedule", ["constant", "poly", "linear"])
def test_voc_config_learning_rate_schedules(schedule):
    default = load_config(VOC)
    assert default.algorithm.client.lr_schedule == "constant"  # FedCV: decay did not help
    config = load_config(f"{VOC}:lr_schedule={schedule}")
    validate_config(config)
    assert config.algorithm.client.lr_schedule == schedule


@pytest.mark.parametrize(
    "arg, message",
    [
        ("mode=finetune,weights=w.npz", r"^mode='finetune' is not allowed; must be one of ft, fz"),
        ("mode=ft", r"^mode=ft needs weights="),
        ("mode=sfl,weights=w.npz", r"^weights=\.\.\. is given with mode=sfl"),
        ("clients=5", r"^clients='5' is not allowed; must be 4 or 8"),
        ("clients=16", r"^clients='16' is not allowed"),
        ("alpha=0", r"^alpha='0' is not allowed; must be a number > 0"),
        ("alpha=-0.5", r"^alpha='-0.5' is not allowed"),
        ("alpha=nan", r"^alpha='nan' is not allowed"),
        ("model=unet", r"^model='unet' is not allowed; must be one of deeplabv3plus_resnet101"),
        ("lr_schedule=cosine", r"^lr_schedule='cosine' is not allowed; must be one of constant"),
        ("epochs=2", r"'epochs' is unknown; known: runlocal, model, mode"),
    ],
)
def test_voc_config_refuses_bad_arguments_in_one_line(arg, message):
    """Each argument refused in one line (issue 9's bad inputs)."""
    with pytest.raises(ValueError, match=message) as error:
        load_config(f"{VOC}:{arg}")
    assert "\n" not in str(error.value)


def test_voc_config_builds_on_a_tiny_voc_folder_with_a_frozen_pretrained_backbone(tmp_path):
    _make_voc(tmp_path / "VOCdevkit" / "VOC2012")
    # A classifier's weights (MobileNetV2 at runlocal's width): fz places them in the backbone.
    classifier = get_model("mobilenet_v2", 10, width_multiplier=0.25)
    shapes = jax.eval_shape(
        lambda x: classifier.init(jax.random.key(0), x, train=False), np.zeros((1, 32, 32, 3))
    )
    weights = tmp_path / "mobilenet_v2.npz"
    save_weights(weights, he_init(shapes, seed=1))
    config = load_config(
        f"{VOC}:model=deeplabv3plus_mobilenet_v2,mode=fz,weights={weights},runlocal"
    )
    config.data.root = str(tmp_path)
    config.data.augmentation.image_size = (32, 32)
    # 5 trainaug images over 4 clients: LDA's groups of one image cannot give every client one.
    config.data.partition.name = "iid"
    experiment = build_experiment(config)

    dataset = experiment.dataset
    assert dataset.num_classes == 21 and dataset.task == "segmentation"
    assert len(dataset.train["mask"]) == len(VOC_LISTS["trainaug"])
    assert len(dataset.test["mask"]) == len(VOC_LISTS["val"])
    assert len(dataset.clients) == 4
    assert sorted(np.concatenate(dataset.clients).tolist()) == list(range(5))
    loaded = experiment.weights_report.loaded
    assert loaded and all(name.startswith("params/backbone/") for name in loaded)
    assert any("model.freeze='backbone'" in note for note in experiment.notes)
    stored = np.load(weights)
    name = next(n for n in loaded if n.endswith("kernel"))
    file_name = name.replace("params/backbone/", "params/", 1)
    node = experiment.initial_state.params
    for part in name.split("/")[1:]:
        node = node[part]
    np.testing.assert_array_equal(np.asarray(node), stored[file_name])

    examples = experiment.cohorts(0).examples
    assert examples["image"].shape[-3:] == (32, 32, 3)
    assert examples["mask"].shape[-2:] == (32, 32)
    values = np.unique(examples["mask"])
    assert np.all((values < 21) | (values == IGNORE))


# --------------------------------------------------------------------------- real coco128 masks


def test_coco128_runlocal_trains_end_to_end(tmp_path):
    real_data.require("coco128")
    config = load_config(f"{COCO}:runlocal")
    config.data.root = str(real_data.DATA)
    workdir = tmp_path / "run"
    record = train_and_evaluate(config, str(workdir))

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert [r["round"] for r in records] == [1, 2]
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert {"eval/miou", "eval/pixel_accuracy", "eval/loss"} <= set(record)
    details = json.loads((workdir / "eval_details.json").read_text())
    assert len(details["per_class_iou"]) == 129 and "person" in details["per_class_iou"]
    miou, _ = segmentation.mean_iou(details["confusion"])
    assert record["eval/miou"] == pytest.approx(miou, abs=1e-12)
    assert 0 < record["eval/miou"] < 1


def _raw_masks(root, split: str, ids, size: int) -> np.ndarray:
    """The masks of `ids` from the PNG files, with numpy only: COCO's sparse ids ranked among
    the labelled ids of config.yaml, 0 (unlabeled) -> 255, nearest-neighbour resized to
    size x size at half-pixel centres."""
    text = (root / "semantic_segmentation" / "config.yaml").read_text()
    classes = text.split("classes:")[1]
    labelled = sorted(int(i) for i in re.findall(r"^\s+(\d+):", classes, re.M) if int(i) != 0)
    lookup = np.full(256, IGNORE, np.uint8)
    lookup[labelled] = np.arange(len(labelled))
    masks = []
    for image_id in ids:
        raw = np.asarray(
            Image.open(root / "semantic_segmentation/masks" / split / f"{image_id}.png")
        )
        height, width = raw.shape
        rows = np.minimum(((np.arange(size) + 0.5) * height / size).astype(int), height - 1)
        cols = np.minimum(((np.arange(size) + 0.5) * width / size).astype(int), width - 1)
        masks.append(lookup[raw[rows][:, cols]])
    return np.stack(masks)


def test_a_small_unet_overfits_four_real_coco128_images():
    """Four real photographs (the first of train2017) are both one client's data and the test
    split; FedAvg on that client must fit them to training mIoU >= 0.9."""
    root = real_data.require("coco128")
    size, num_images = 48, 4
    source = sources.mask_segmentation(root, "train2017")
    four = [source[i] for i in range(num_images)]
    split = {"image": [e["image"] for e in four], "mask": [e["mask"] for e in four]}
    dataset = FederatedDataset(
        name="coco128_four",
        train=split,
        test=split,
        clients=(np.arange(num_images),),
        num_classes=source.num_classes,
        class_names=source.class_names,
        label_key="mask",
        task="segmentation",
        label_counts=source.label_counts[:num_images],
    )
    resize = augment.make_augmentation({"name": "segmentation", "image_size": (size, size)})
    resize = resize.deterministic()
    batch, _ = next(cohort_lib.test_batches(dataset.test, num_images, resize))
    truth = _raw_masks(root, "train2017", source.image_ids[:num_images], size)
    np.testing.assert_array_equal(batch["mask"], truth)
    classes = np.unique(truth[truth != IGNORE])
    assert (truth == IGNORE).any() and len(classes) >= 10  # real masks: many classes, ignore

    model = get_model("unet", source.num_classes, base_width=8)
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), batch["image"][:1]
    )
    params = he_init(shapes)["params"]
    # 10 rounds of 25 local epochs of one batch of the four: 250 momentum-SGD steps.
    algorithm = algorithms.fedavg(
        segmentation.make_loss_fn(model),
        0.1,
        client_momentum=0.9,
        local_epochs=25,
        metric_names=segmentation.METRIC_NAMES,
    )
    cohorts = GrainCohortBuilder(
        dataset=dataset,
        client_sampler=algorithm.client_sampler,
        example_sampler=algorithm.example_sampler,
        clients_per_round=1,
        batch_size=num_images,
        seed=0,
        augmentation=resize,
    )
    state = algorithm.init(params, {}, num_clients=1)
    losses = []
    for round_index in range(10):
        state, metrics = algorithm.apply(
            state, cohorts(round_index), jax.random.fold_in(jax.random.key(1), round_index)
        )
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.1 * losses[0]

    logits = model.apply({"params": state.params}, batch["image"], train=False)
    predictions = np.asarray(np.argmax(logits, -1))
    confusion = segmentation.confusion_matrix(truth, predictions, source.num_classes)
    assert confusion.sum() == np.count_nonzero(truth != IGNORE)
    miou, per_class = segmentation.mean_iou(confusion)
    assert miou >= 0.9, (miou, per_class[~np.isnan(per_class)])
    # The task's jitted evaluation sums the same confusion matrix.
    stats = segmentation.make_eval_fn(model)(state.params, {}, batch, np.ones(num_images, bool))
    np.testing.assert_array_equal(np.asarray(stats["confusion"]), confusion)
    assert segmentation.finalize(stats)["miou"] == pytest.approx(miou, abs=1e-12)
