"""Segmentation datasets by name: a tiny PASCAL VOC folder, the real coco128 masks, shapes
masks; partitions of masks; the "segmentation" augmentation preset."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fedjax_cv.algorithms import sampling
from fedjax_cv.config_base import base_config
from fedjax_cv.data import augment, partition, shapes, sources
from fedjax_cv.data.pipeline import GrainCohortBuilder
from fedjax_cv.data.registry import DATASETS, build_dataset, partition_params
from tests import real_data
from tests.configs_loader import override

DATA = real_data.DATA
IGNORE = sources.IGNORE_LABEL


def _real(relative: str) -> Path:
    """A folder of the shared real data (skipped when absent, failed with
    FEDJAX_CV_REQUIRE_DATA=1; see tests/real_data.py)."""
    return real_data.require(relative)


def _one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value), str(error.value)


def _data_config(name: str, **overrides) -> ml_collections.ConfigDict:
    config = base_config().data
    config.name = name
    return override(config, overrides)


# --------------------------------------------------------------------------- a tiny VOC folder


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map: index i -> the colour VOC's palette PNGs show for class i."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [r, g, b]
    return palette


def _save_palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
    image.putpalette(_voc_palette())
    image.save(path)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# id -> (height, width); mixed sizes, as VOC's photos are.
VOC_IMAGES = {
    "2007_000001": (6, 8),
    "2007_000002": (7, 5),
    "2008_000003": (6, 8),
    "2008_000004": (9, 6),
    "2009_000005": (5, 7),
    "2009_000006": (8, 8),
}
VOC_LISTS = {
    "train": ["2007_000001", "2007_000002", "2008_000003", "2008_000004"],
    "val": ["2009_000005", "2009_000006"],
    # VOC train plus an SBD-only image, listed as DeepLab's list files do (paths).
    "trainaug": ["2007_000001", "2007_000002", "2008_000003", "2008_000004", "2009_000006"],
}


def _voc_mask(index: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Background, two object classes in blocks, and a 255 border around one of them."""
    mask = np.zeros((height, width), np.uint8)
    first, second = 1 + (3 * index) % 20, 1 + (7 * index + 5) % 20
    mask[1 : height - 1, 1:3] = first
    mask[height // 2 :, width - 2 :] = second
    mask[0, :] = IGNORE
    mask[:, 0] = IGNORE
    mask[rng.random((height, width)) < 0.1] = IGNORE
    return mask


def _make_voc(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """A VOC2012 folder under `root`; returns the masks written, per mask folder and id."""
    rng = np.random.default_rng(0)
    written = {"SegmentationClass": {}, "SegmentationClassAug": {}}
    for index, (image_id, (height, width)) in enumerate(VOC_IMAGES.items()):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        _save(root / "JPEGImages" / f"{image_id}.jpg", pixels)
        if image_id in VOC_LISTS["train"] + VOC_LISTS["val"]:
            mask = _voc_mask(index, height, width, rng)
            _save_palette_png(root / "SegmentationClass" / f"{image_id}.png", mask)
            written["SegmentationClass"][image_id] = mask
        # SBD masks: single-channel class ids, no 255 border.
        aug = _voc_mask(index + 11, height, width, rng)
        aug[aug == IGNORE] = 0
        _save(root / "SegmentationClassAug" / f"{image_id}.png", aug)
        written["SegmentationClassAug"][image_id] = aug
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, ids in VOC_LISTS.items():
        lines = (
            [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in ids]
            if split == "trainaug"
            else ids
        )
        (lists / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return written


@pytest.fixture
def voc(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    return root, _make_voc(root)


def test_voc_fixture_masks_are_palette_pngs(voc):
    root, written = voc
    with Image.open(root / "SegmentationClass" / "2007_000001.png") as image:
        assert image.mode == "P"
        indices = np.asarray(image)
        colours = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(indices, written["SegmentationClass"]["2007_000001"])
    assert not np.array_equal(colours[..., 0], indices)  # palette colours are not the ids


@pytest.mark.parametrize("split", ["train", "val", "trainaug"])
def test_voc_masks_are_the_indices_written(voc, split, tmp_path):
    root, written = voc
    source = sources.voc_segmentation(root, split, cache_dir=tmp_path / "cache")
    folder = "SegmentationClassAug" if split == "trainaug" else "SegmentationClass"
    assert source.image_ids == tuple(VOC_LISTS[split])
    assert source.class_names == sources.VOC_SEGMENTATION_CLASSES and source.num_classes == 21
    for index, image_id in enumerate(VOC_LISTS[split]):
        expected = written[folder][image_id]
        np.testing.assert_array_equal(source.masks[index], expected)
        assert source.masks[index].dtype == np.uint8
        assert source[index]["image"].shape == VOC_IMAGES[image_id] + (3,)
        np.testing.assert_array_equal(
            source.label_counts[index], np.bincount(expected[expected != IGNORE], minlength=21)
        )
        np.testing.assert_array_equal(
            source.classes_present[index], np.setdiff1d(np.unique(expected), [IGNORE])
        )
    if split != "trainaug":
        assert any(np.any(source.masks[i] == IGNORE) for i in range(len(source)))


@pytest.mark.parametrize("where", ["VOC2012", "parent"])
def test_voc_segmentation_dataset(voc, where, tmp_path):
    root, written = voc
    data_root = root if where == "VOC2012" else root.parents[1]
    config = _data_config(
        "voc_segmentation",
        root=str(data_root),
        num_clients=2,
        cache_dir=str(tmp_path / "cache"),
        **{"partition.name": "iid"},
    )
    dataset = build_dataset(config, seed=0)
    assert dataset.task == "segmentation" and dataset.label_key == "mask"
    assert dataset.num_classes == 21 and dataset.class_names[:2] == ("background", "aeroplane")
    assert len(dataset.train["mask"]) == 4 and len(dataset.test["image"]) == 2
    for index, image_id in enumerate(VOC_LISTS["train"]):
        np.testing.assert_array_equal(
            dataset.train["mask"][index], written["SegmentationClass"][image_id]
        )
    assert dataset.label_counts.shape == (4, 21)
    assert sorted(np.concatenate(dataset.clients).tolist()) == [0, 1, 2, 3]
    config.train_split = "trainaug"
    assert len(build_dataset(config, seed=0).train["mask"]) == 5


def _load(root: Path, tmp_path: Path, split: str = "train"):
    return sources.voc_segmentation(root, split, cache_dir=tmp_path / "cache")


def test_voc_value_out_of_range_fails_before_caching(voc, tmp_path):
    root, written = voc
    mask = written["SegmentationClass"]["2008_000003"].copy()
    mask[2, 2] = 21  # one past tvmonitor
    _save_palette_png(root / "SegmentationClass" / "2008_000003.png", mask)
    with pytest.raises(
        ValueError, match=r"2008_000003\.png: pixel value 21 is not a class id; allowed: 0\.\.20"
    ) as error:
        _load(root, tmp_path)
    _one_line(error)
    assert "255 (ignore)" in str(error.value)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing written


def test_voc_size_mismatch(voc, tmp_path):
    root, _ = voc
    _save_palette_png(root / "SegmentationClass" / "2007_000002.png", np.zeros((6, 5), np.uint8))
    with pytest.raises(
        ValueError, match=r"2007_000002\.png: mask is 5x6 but its image .*2007_000002\.jpg is 5x7"
    ) as error:
        _load(root, tmp_path)
    _one_line(error)
    assert list((tmp_path / "cache").iterdir()) == []


def test_voc_missing_mask_and_image(voc, tmp_path):
    root, _ = voc
    (root / "SegmentationClassAug" / "2009_000006.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"SegmentationClassAug/2009_000006\.png: mask .* is missing"
    ) as error:
        _load(root, tmp_path, "trainaug")
    _one_line(error)
    (root / "JPEGImages" / "2008_000004.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"JPEGImages/2008_000004\.jpg: image is missing"
    ) as error:
        _load(root, tmp_path)
    _one_line(error)


def test_voc_missing_or_unknown_split(voc, tmp_path):
    root, _ = voc
    with pytest.raises(
        FileNotFoundError,
        match=r"Segmentation/trainval\.txt: .* missing; allowed splits: train, val, trainval, "
        r"trainaug",
    ) as error:
        _load(root, tmp_path, "trainval")
    _one_line(error)
    with pytest.raises(ValueError, match=r"split='test' is not a VOC segmentation split"):
        _load(root, tmp_path, "test")
    config = _data_config("voc_segmentation", root=str(root), train_split="val")
    with pytest.raises(ValueError, match=r"data\.train_split='val' .* train, trainaug") as error:
        build_dataset(config, seed=0)
    _one_line(error)
    config = _data_config("voc_segmentation", root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"holds no PASCAL VOC 2012 segmentation data"):
        build_dataset(config, seed=0)


SEGMENTATION_DATASETS = ["voc_segmentation", "coco128_segmentation", "shapes_segmentation"]


@pytest.mark.parametrize("name", SEGMENTATION_DATASETS)
@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_alpha_must_be_positive(name, alpha, voc, tmp_path):
    root, _ = voc
    config = _data_config(
        name,
        root=str(root if name == "voc_segmentation" else tmp_path / "nowhere"),
        cache_dir=str(tmp_path / "cache"),
        **{"partition.name": "lda_multilabel", "partition.alpha": alpha},
    )
    # Checked before any data is read (coco128's root does not even exist here).
    match = rf"data\.partition\.alpha={alpha} is not allowed"
    with pytest.raises(ValueError, match=match) as error:
        build_dataset(config, seed=0)
    _one_line(error)
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- real coco128 masks


@pytest.fixture(scope="module")
def coco128(tmp_path_factory):
    root = _real("coco128")
    config = _data_config(
        "coco128_segmentation",
        root=str(DATA),
        num_clients=10,
        cache_dir=str(tmp_path_factory.mktemp("coco_cache")),
        **{"partition.name": "dirichlet", "partition.alpha": 0.5},
    )
    return root, config, build_dataset(config, seed=0)


def test_coco128_segmentation_masks_and_counts(coco128):
    root, _, dataset = coco128
    assert dataset.task == "segmentation" and dataset.label_key == "mask"
    assert len(dataset.train["image"]) == len(dataset.train["mask"]) == 100
    assert len(dataset.test["mask"]) == 100
    assert len(dataset.class_names) == dataset.num_classes
    assert dataset.label_counts.shape == (100, dataset.num_classes)
    # Independently from the files: sparse id -> rank among the labelled ids, 0 -> ignore.
    sparse = sources.read_yaml_class_names(root / "semantic_segmentation/config.yaml", "classes")
    labelled = sorted(k for k in sparse if k != 0)
    assert dataset.num_classes == len(labelled)
    assert dataset.class_names == tuple(sparse[k] for k in labelled)
    mask_files = sorted((root / "semantic_segmentation/masks/train2017").glob("*.png"))
    assert len(mask_files) == 100
    labelled_pixels = 0
    for index, mask_file in enumerate(mask_files):
        raw = np.asarray(Image.open(mask_file))
        labelled_pixels += int(np.count_nonzero(raw))
        mask = dataset.train["mask"][index]
        assert mask.shape == raw.shape == dataset.train["image"][index].shape[:2]
        assert dataset.train["image"][index].shape[2] == 3
        assert np.all((mask < dataset.num_classes) | (mask == IGNORE))
        np.testing.assert_array_equal(mask == IGNORE, raw == 0)
        if index % 10 == 0:
            values, counts = np.unique(raw[raw != 0], return_counts=True)
            expected = np.zeros(dataset.num_classes, np.int64)
            expected[[labelled.index(v) for v in values]] = counts
            np.testing.assert_array_equal(dataset.label_counts[index], expected)
    assert int(dataset.label_counts.sum()) == labelled_pixels
    for index in range(0, 100, 7):
        test_mask = dataset.test["mask"][index]
        assert np.all((test_mask < dataset.num_classes) | (test_mask == IGNORE))


def test_coco128_partitions_cover_the_train_split(coco128):
    _, config, dataset = coco128
    assert sorted(np.concatenate(dataset.clients).tolist()) == list(range(100))
    config = config.copy_and_resolve_references()
    config.partition.name = "lda_multilabel"
    config.partition.min_client_size = 2
    other = build_dataset(config, seed=0)
    assert sorted(np.concatenate(other.clients).tolist()) == list(range(100))
    stats = other.partition("lda_multilabel", 0).stats
    assert stats.num_examples == 100 and 0 < stats.mean_emd <= 2


def test_coco128_segmentation_cohort_with_the_preset(coco128):
    _, _, dataset = coco128
    builder = GrainCohortBuilder(
        dataset=dataset,
        client_sampler=sampling.uniform_clients(),
        example_sampler=sampling.local_epochs(1),
        clients_per_round=2,
        batch_size=5,
        seed=0,
        augmentation={"name": "segmentation", "image_size": (64, 80)},
    )
    examples = builder(0).examples
    assert examples["image"].shape[-3:] == (64, 80, 3)
    assert examples["mask"].shape[-2:] == (64, 80) and examples["mask"].dtype == np.uint8
    values = np.unique(examples["mask"])
    assert np.all((values < dataset.num_classes) | (values == IGNORE))


# --------------------------------------------------------------------------- shapes masks


def _shapes_config(**overrides) -> ml_collections.ConfigDict:
    defaults = dict(
        num_clients=8,
        num_train_examples=400,
        num_test_examples=40,
        image_size=16,
        max_shapes=3,
        **{"partition.name": "dirichlet", "partition.alpha": 1.0},
    )
    return _data_config("shapes_segmentation", **{**defaults, **overrides})


def test_shapes_segmentation_masks_and_counts():
    dataset = build_dataset(_shapes_config(), seed=0)
    assert dataset.num_classes == 4 + 1  # background + data.num_classes shapes
    assert dataset.class_names == ("background",) + shapes.SHAPE_NAMES[:4]
    assert dataset.task == "segmentation" and dataset.label_key == "mask"
    masks = dataset.train["mask"]
    assert masks.shape == (400, 16, 16) and masks.dtype == np.uint8
    assert dataset.train["image"].shape == (400, 16, 16, 3)
    assert dataset.test["mask"].shape == (40, 16, 16)
    assert masks.max() <= 4 and dataset.test["mask"].max() <= 4
    expected = np.stack([np.bincount(m.ravel(), minlength=5) for m in masks])
    np.testing.assert_array_equal(dataset.label_counts, expected)
    foreground = [len(np.setdiff1d(np.unique(m), [0])) for m in masks]
    assert max(foreground) >= 2  # several shapes an image
    # Test images draw from the same stream as train images, after them: no repeats.
    assert not any(np.array_equal(dataset.test["mask"][0], m) for m in masks)


def test_shapes_segmentation_max_shapes_one_line():
    with pytest.raises(ValueError, match=r"data\.max_shapes=0 is not allowed") as error:
        build_dataset(_shapes_config(max_shapes=0), seed=0)
    _one_line(error)


def test_classification_shapes_unchanged():
    """`shapes` as its builder made it before segmentation existed, rendered here directly."""
    config = _data_config("shapes", num_clients=5, num_train_examples=60, num_test_examples=20)
    config.image_size = 12
    dataset = build_dataset(config, seed=3)
    rng = np.random.default_rng([3, 0x54A9E5])
    train_labels = rng.integers(0, 4, 60).astype(np.int32)
    test_labels = rng.integers(0, 4, 20).astype(np.int32)
    clients = partition.make_partition(
        "dirichlet", train_labels, 5, 3, **partition_params(config.partition)
    )
    styles = np.zeros(60, np.int64)
    for k, members in enumerate(clients):
        styles[members] = k
    test_styles = rng.integers(0, 5, 20)
    train = shapes.render(train_labels, styles, seed=3, image_size=12, num_classes=4)
    test = shapes.render(test_labels, test_styles, seed=3, image_size=12, num_classes=4)
    np.testing.assert_array_equal(dataset.train["image"], train.images)
    np.testing.assert_array_equal(dataset.train["label"], train.labels)
    np.testing.assert_array_equal(dataset.test["image"], test.images)
    np.testing.assert_array_equal(dataset.test["label"], test.labels)
    assert dataset.task == "classification" and set(dataset.train) == {"image", "label"}


def test_registry_names():
    assert {"shapes_segmentation", "coco128_segmentation", "voc_segmentation"} <= set(DATASETS)


# --------------------------------------------------------------------------- partitions of masks


def test_mask_labels_by_hand():
    counts = np.array([[100, 0, 5], [100, 0, 0], [0, 0, 0], [3, 4, 4]])
    # Background 0 counts only where nothing else shows; ties go to the lowest id; no labelled
    # pixel: the extra group num_classes.
    np.testing.assert_array_equal(partition.mask_labels(counts, "dirichlet", 0), [2, 0, 3, 1])
    np.testing.assert_array_equal(partition.mask_labels(counts, "dirichlet"), [0, 0, 3, 1])
    present = partition.mask_labels(counts, "lda_multilabel", 0)
    assert [p.tolist() for p in present] == [[2], [0], [], [1, 2]]
    present = partition.mask_labels(counts, "lda_multilabel")
    assert [p.tolist() for p in present] == [[0, 2], [0], [], [0, 1, 2]]
    assert partition.is_multilabel(present)


@pytest.mark.parametrize("name", ["dirichlet", "lda_multilabel", "lda", "iid"])
def test_mask_partitions_cover_every_example_once(name):
    dataset = build_dataset(_shapes_config(**{"partition.name": name}), seed=1)
    assert len(dataset.clients) == 8
    np.testing.assert_array_equal(np.sort(np.concatenate(dataset.clients)), np.arange(400))
    stats = dataset.partition(name, 1).stats
    assert stats.num_examples == 400 and stats.num_classes == 5
    # partition.json counts pixels: the histograms sum to the labelled pixels of the split.
    assert np.sum(stats.class_histograms) == dataset.label_counts.sum() == 400 * 16 * 16


@pytest.mark.parametrize("name", ["dirichlet", "lda_multilabel"])
def test_mask_partition_skew_falls_as_alpha_grows(name):
    emd = {
        alpha: build_dataset(
            _shapes_config(**{"partition.name": name, "partition.alpha": alpha}), seed=2
        )
        .partition(name, 2)
        .stats.mean_emd
        for alpha in (0.1, 100.0)
    }
    assert emd[0.1] > 2 * emd[100.0], emd


def test_dominant_class_partition_skews_dominant_classes():
    """Dirichlet on the dominant class: at alpha 0.1 most clients hold mostly one class."""
    dataset = build_dataset(_shapes_config(**{"partition.alpha": 0.1}), seed=0)
    dominant = partition.mask_labels(dataset.label_counts, "dirichlet", background=0)
    shares = [np.bincount(dominant[c]).max() / len(c) for c in dataset.clients]
    assert np.median(shares) > 0.6


# --------------------------------------------------------------------------- augmentation preset

# Class colours: every channel >= 1 (so 0 marks padding), no three on a line (so a bilinear
# blend of two never equals a third).
PALETTE = np.array([[20, 20, 200], [200, 40, 30], [90, 220, 60], [230, 210, 180]], np.uint8)


def _blocks(height: int, width: int, block: int) -> dict[str, np.ndarray]:
    """A mask of square blocks of classes 0..3 and an image that paints class c in PALETTE[c]."""
    rng = np.random.default_rng(5)
    cells = rng.integers(0, 4, (height // block + 1, width // block + 1))
    mask = np.kron(cells, np.ones((block, block), np.int64))[:height, :width].astype(np.uint8)
    return {"image": PALETTE[mask], "mask": mask}


def test_segmentation_preset_fields():
    preset = augment.make_augmentation("segmentation")
    assert preset.scale_range == (0.5, 2.0) and preset.flip and preset.image_size is None
    sized = augment.make_augmentation({"name": "segmentation", "image_size": [24, 32]})
    assert sized.image_size == (24, 32) and sized.scale_range == (0.5, 2.0)


@pytest.mark.parametrize("source_size", [(30, 40), (24, 32), (13, 50)])
def test_segmentation_preset_keeps_mask_on_image(source_size):
    example = _blocks(*source_size, block=6)
    augmentation = augment.make_augmentation({"name": "segmentation", "image_size": (24, 32)})
    padded_seen = cropped_seen = 0
    for seed in range(40):
        out = augmentation(example, np.random.default_rng(seed))
        image, mask = out["image"], out["mask"]
        assert image.shape == (24, 32, 3) and mask.shape == (24, 32)
        padding = np.all(image == 0, axis=-1)
        # Padded pixels, and only they, carry the ignore label.
        np.testing.assert_array_equal(mask == IGNORE, padding)
        padded_seen += padding.any()
        cropped_seen += not padding.any()
        # Wherever the image shows a class colour exactly, the mask shows that class.
        exact = np.all(image[:, :, None, :] == PALETTE[None, None], axis=-1)  # [H, W, 4]
        where = exact.any(axis=-1)
        assert where.sum() >= 0.5 * (~padding).sum()
        np.testing.assert_array_equal(mask[where], np.argmax(exact, axis=-1)[where])
    assert padded_seen and cropped_seen  # factors below and above 1 both drawn


def test_scale_above_one_crops_below_one_pads_with_ignore():
    example = _blocks(20, 20, block=5)
    bigger = augment.scale_example(example, (30, 30), top=-4, left=-7, size=(16, 16))
    assert not np.any(bigger["mask"] == IGNORE)
    resized = augment.resize_masks(example["mask"], (30, 30))
    np.testing.assert_array_equal(bigger["mask"], resized[4:20, 7:23])
    smaller = augment.scale_example(example, (8, 8), top=3, left=5, size=(16, 16))
    inside = np.zeros((16, 16), bool)
    inside[3:11, 5:13] = True
    assert np.all(smaller["mask"][~inside] == IGNORE) and np.all(smaller["image"][~inside] == 0)
    np.testing.assert_array_equal(
        smaller["mask"][inside].reshape(8, 8), augment.resize_masks(example["mask"], (8, 8))
    )
