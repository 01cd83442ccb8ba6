"""The detection configs of full data sets and fine-tuning YOLO from a local .npz.

- configs/coco_detection.py (FedCV §6.3) and configs/fedvision_yolov3.py (FedVision) validate in
  every model, client count and mode, refuse bad arguments in one line, and build an experiment
  with `runlocal` on a tiny YOLO-txt folder written here;
- docs/yolo_weights.md is checked as written: Ultralytics' state_dict names and shapes of
  yolov5s and yolov3, built by hand from their yaml layer lists (no torch), map onto this
  project's models tensor for tensor; its export script runs on a fake torch, its `convert`
  gives a file both configs fine-tune from (mode=fz freezing the backbone), and its folding of
  the input scale gives the stem Ultralytics' output.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from fedjax_cv.algorithms.param_groups import freeze_except, frozen_fraction
from fedjax_cv.data import augment
from fedjax_cv.models import get_model
from fedjax_cv.models.yolo import Conv
from fedjax_cv.train import build_experiment
from fedjax_cv.tree_names import key_name
from fedjax_cv.validation import validate_config
from tests.configs_loader import ROOT, load_config

COCO = "configs/coco_detection.py"
FEDVISION = "configs/fedvision_yolov3.py"
DOC = ROOT / "docs" / "yolo_weights.md"
COCO_MODELS = ("yolov5s", "yolov5m", "yolov5l", "yolov5x")
MODES = {"ft": "none", "fz": "backbone", "sfl": "none"}

# --------------------------------------------------------------------------- Ultralytics by hand

# (from, number, module, args) of Ultralytics' models/yolov5s.yaml (v6.0 and later; n, m, l, x
# share the list) and models/hub/yolov3.yaml, copied from the yaml files.
YOLOV5_YAML = (
    (-1, 1, "Conv", (64, 6, 2, 2)),  # 0-P1/2
    (-1, 1, "Conv", (128, 3, 2)),  # 1-P2/4
    (-1, 3, "C3", (128,)),
    (-1, 1, "Conv", (256, 3, 2)),  # 3-P3/8
    (-1, 6, "C3", (256,)),
    (-1, 1, "Conv", (512, 3, 2)),  # 5-P4/16
    (-1, 9, "C3", (512,)),
    (-1, 1, "Conv", (1024, 3, 2)),  # 7-P5/32
    (-1, 3, "C3", (1024,)),
    (-1, 1, "SPPF", (1024, 5)),  # 9
    (-1, 1, "Conv", (512, 1, 1)),
    (-1, 1, "Upsample", ()),
    ((-1, 6), 1, "Concat", ()),
    (-1, 3, "C3", (512, False)),  # 13
    (-1, 1, "Conv", (256, 1, 1)),
    (-1, 1, "Upsample", ()),
    ((-1, 4), 1, "Concat", ()),
    (-1, 3, "C3", (256, False)),  # 17 (P3/8-small)
    (-1, 1, "Conv", (256, 3, 2)),
    ((-1, 14), 1, "Concat", ()),
    (-1, 3, "C3", (512, False)),  # 20 (P4/16-medium)
    (-1, 1, "Conv", (512, 3, 2)),
    ((-1, 10), 1, "Concat", ()),
    (-1, 3, "C3", (1024, False)),  # 23 (P5/32-large)
    ((17, 20, 23), 1, "Detect", ()),  # 24
)
YOLOV3_YAML = (
    (-1, 1, "Conv", (32, 3, 1)),  # 0
    (-1, 1, "Conv", (64, 3, 2)),  # 1-P1/2
    (-1, 1, "Bottleneck", (64,)),
    (-1, 1, "Conv", (128, 3, 2)),  # 3-P2/4
    (-1, 2, "Bottleneck", (128,)),
    (-1, 1, "Conv", (256, 3, 2)),  # 5-P3/8
    (-1, 8, "Bottleneck", (256,)),
    (-1, 1, "Conv", (512, 3, 2)),  # 7-P4/16
    (-1, 8, "Bottleneck", (512,)),
    (-1, 1, "Conv", (1024, 3, 2)),  # 9-P5/32
    (-1, 4, "Bottleneck", (1024,)),  # 10
    (-1, 1, "Bottleneck", (1024, False)),
    (-1, 1, "Conv", (512, 1, 1)),
    (-1, 1, "Conv", (1024, 3, 1)),
    (-1, 1, "Conv", (512, 1, 1)),
    (-1, 1, "Conv", (1024, 3, 1)),  # 15 (P5/32-large)
    (-2, 1, "Conv", (256, 1, 1)),
    (-1, 1, "Upsample", ()),
    ((-1, 8), 1, "Concat", ()),  # cat backbone P4
    (-1, 1, "Bottleneck", (512, False)),
    (-1, 1, "Bottleneck", (512, False)),
    (-1, 1, "Conv", (256, 1, 1)),
    (-1, 1, "Conv", (512, 3, 1)),  # 22 (P4/16-medium)
    (-2, 1, "Conv", (128, 1, 1)),
    (-1, 1, "Upsample", ()),
    ((-1, 6), 1, "Concat", ()),  # cat backbone P3
    (-1, 1, "Bottleneck", (256, False)),
    (-1, 2, "Bottleneck", (256, False)),  # 27 (P3/8-small)
    ((27, 22, 15), 1, "Detect", ()),
)
MULTIPLES = {  # (depth_multiple, width_multiple) of the yaml files
    "yolov5n": (0.33, 0.25),
    "yolov5s": (0.33, 0.50),
    "yolov5m": (0.67, 0.75),
    "yolov5l": (1.0, 1.0),
    "yolov5x": (1.33, 1.25),
    "yolov3": (1.0, 1.0),
}


def ultralytics_state(layers, num_classes: int, depth: float, width: float) -> dict:
    """{state_dict name: shape} of the model Ultralytics' `parse_model` builds from `layers`:
    Conv = conv (OIHW, no bias) + bn; C3 = cv1, cv2, cv3 and m.<k> bottlenecks (e=1.0);
    SPPF = cv1, cv2; Bottleneck = cv1 (1x1 to c2 / 2), cv2 (3x3), an nn.Sequential of
    n > 1; Detect = one biased 1x1 conv a level and its anchors buffer."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix, c_in, c_out, k):
        shapes[f"{prefix}.conv.weight"] = (c_out, c_in, k, k)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{leaf}"] = (c_out,)
        shapes[f"{prefix}.bn.num_batches_tracked"] = ()

    def bottleneck(prefix, c_in, c_out, expansion):
        hidden = int(c_out * expansion)
        conv(f"{prefix}.cv1", c_in, hidden, 1)
        conv(f"{prefix}.cv2", hidden, c_out, 3)

    def scaled(channels):  # make_divisible(c * width_multiple, 8)
        return math.ceil(channels * width / 8) * 8

    outputs: list[int] = []
    for index, (source, number, module, args) in enumerate(layers):
        number = max(round(number * depth), 1) if number > 1 else number
        prefix = f"model.{index}"
        c_in = (outputs[source] if outputs else 3) if isinstance(source, int) else None
        if module == "Conv":
            c_out = scaled(args[0])
            conv(prefix, c_in, c_out, args[1])
        elif module == "C3":
            c_out = scaled(args[0])
            hidden = int(c_out * 0.5)
            conv(f"{prefix}.cv1", c_in, hidden, 1)
            conv(f"{prefix}.cv2", c_in, hidden, 1)
            conv(f"{prefix}.cv3", 2 * hidden, c_out, 1)
            for k in range(number):
                bottleneck(f"{prefix}.m.{k}", hidden, hidden, 1.0)
        elif module == "SPPF":
            c_out = scaled(args[0])
            conv(f"{prefix}.cv1", c_in, c_in // 2, 1)
            conv(f"{prefix}.cv2", c_in // 2 * 4, c_out, 1)
        elif module == "Bottleneck":
            c_out = scaled(args[0])
            for k in range(number):
                bottleneck(f"{prefix}.{k}" if number > 1 else prefix, c_in, c_out, 0.5)
        elif module == "Upsample":
            c_out = c_in
        elif module == "Concat":
            c_out = sum(outputs[s] for s in source)
        elif module == "Detect":
            for level, s in enumerate(source):
                shapes[f"{prefix}.m.{level}.weight"] = (3 * (5 + num_classes), outputs[s], 1, 1)
                shapes[f"{prefix}.m.{level}.bias"] = (3 * (5 + num_classes),)
            shapes[f"{prefix}.anchors"] = (3, 3, 2)
            c_out = 0
        else:
            raise AssertionError(module)
        outputs.append(c_out)
    return shapes


def is_weight(name: str) -> bool:
    """What the doc's export script keeps of a state_dict."""
    return not name.endswith(".num_batches_tracked") and name.split(".")[-1] != "anchors"


def ultralytics_arrays(layers, num_classes, depth, width, seed=0) -> dict[str, np.ndarray]:
    """A random 'state_dict' (PyTorch layout), counters and anchors included."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in ultralytics_state(layers, num_classes, depth, width).items():
        if name.endswith("num_batches_tracked"):
            out[name] = np.asarray(7, np.int64)
        elif name.endswith("running_var"):
            out[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            out[name] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    return out


# --------------------------------------------------------------------------- the doc's code


def doc_block(first_line: str) -> str:
    """The ```python block of docs/yolo_weights.md whose first line starts with `first_line`."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"{DOC} has {len(found)} python blocks starting {first_line!r}"
    return found[0]


def doc_rename() -> dict:
    namespace: dict = {}
    exec(compile(doc_block("# yolo_rename.py"), str(DOC), "exec"), namespace)
    return namespace


def rename(name: str, rules) -> str:
    """`read_weights`' mapping of a stored name: `params/` first, then each rule in order."""
    name = f"params/{name}"
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


class FakeTensor:
    def __init__(self, array):
        self.array = array

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array


class FakeModel:
    def __init__(self, state):
        self.state = state

    def float(self):
        return self

    def state_dict(self):
        return {name: FakeTensor(array) for name, array in self.state.items()}


def export_with_fake_torch(monkeypatch, state: dict, checkpoint, out) -> None:
    """Runs the doc's export script with a `torch` whose `load` gives `state`."""
    fake = types.ModuleType("torch")

    def load(path, map_location=None, weights_only=True):
        assert str(path) == str(checkpoint) and map_location == "cpu" and weights_only is False
        return {"model": FakeModel(state), "ema": None}

    fake.load = load
    monkeypatch.setitem(sys.modules, "torch", fake)
    monkeypatch.setattr(sys, "argv", ["export_ultralytics.py", str(checkpoint), str(out)])
    exec(compile(doc_block("# export_ultralytics.py"), str(DOC), "exec"), {"__name__": "x"})


# --------------------------------------------------------------------------- our models


@functools.cache
def our_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every variable of `name` at 80 classes with BatchNorm."""
    model = get_model(name, 80, norm="batch")
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), np.zeros((1, 64, 64, 3))
    )
    return {
        key_name(p): tuple(leaf.shape)
        for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }


def _module(name: str) -> str:
    """backbone/c3_1, neck/down8, detect: the module of ours a tensor is in."""
    parts = name.split("/")
    return "detect" if parts[1] == "detect" else "/".join(parts[1:3])


def _hwio(shape):
    return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape


@pytest.mark.parametrize(
    "model, layers, rules",
    [
        ("yolov5s", YOLOV5_YAML, "ULTRALYTICS_YOLOV5"),
        ("yolov5n", YOLOV5_YAML, "ULTRALYTICS_YOLOV5"),
        ("yolov5x", YOLOV5_YAML, "ULTRALYTICS_YOLOV5"),
        ("yolov3", YOLOV3_YAML, "ULTRALYTICS_YOLOV3"),
    ],
)
def test_the_documented_rules_map_every_ultralytics_tensor_onto_one_of_ours(model, layers, rules):
    depth, width = MULTIPLES[model]
    theirs = {n: s for n, s in ultralytics_state(layers, 80, depth, width).items() if is_weight(n)}
    mapped = {rename(n, doc_rename()[rules]): n for n in theirs}
    assert len(mapped) == len(theirs)  # no two of theirs become one name
    ours = our_shapes(model)
    assert set(mapped) == set(ours), (
        sorted(set(mapped) - set(ours))[:5],
        sorted(set(ours) - set(mapped))[:5],
    )
    for name, source in mapped.items():
        assert _hwio(theirs[source]) == ours[name], (source, name)

    modules_of_layer: dict[int, set[str]] = {}
    layers_of_module: dict[str, set[int]] = {}
    for name, source in mapped.items():
        layer = int(source.split(".")[1])
        modules_of_layer.setdefault(layer, set()).add(_module(name))
        layers_of_module.setdefault(_module(name), set()).add(layer)
    weighted = {
        i for i, (_, _, module, _) in enumerate(layers) if module not in ("Upsample", "Concat")
    }
    assert set(modules_of_layer) == weighted
    assert all(len(layer) == 1 for layer in layers_of_module.values())
    if model.startswith("yolov5"):  # every yaml layer is one module of ours
        assert all(len(modules) == 1 for modules in modules_of_layer.values())
        assert len(layers_of_module) == len(weighted) == 19
    if model == "yolov5s":
        assert sum(math.prod(s) for n, s in ours.items() if n.startswith("params/")) == 7_235_389


def test_the_doc_lists_the_names_of_yolov5s():
    listed = re.search(r"```text\n(.*?)```", DOC.read_text(), re.S).group(1).splitlines()
    expected = [
        f"{name} {shape}"
        for name, shape in our_shapes("yolov5s").items()
        if name.startswith("params/") and "BatchNorm" not in name
    ]
    assert listed == expected
    assert len(our_shapes("yolov5s")) == 291


def test_folding_the_input_scale_gives_the_stem_ultralytics_output():
    """Ultralytics' stem on x in [0, 1] == ours, folded, on 2x - 1, but in the padded frame."""
    rng = np.random.default_rng(0)
    stem = "backbone/stem"
    weights = {
        f"params/{stem}/conv/kernel": rng.normal(0, 0.2, (6, 6, 3, 8)).astype(np.float32),
        f"params/{stem}/norm/BatchNorm_0/scale": rng.uniform(0.5, 2, 8).astype(np.float32),
        f"params/{stem}/norm/BatchNorm_0/bias": rng.normal(0, 1, 8).astype(np.float32),
        f"batch_stats/{stem}/norm/BatchNorm_0/mean": rng.normal(0, 1, 8).astype(np.float32),
        f"batch_stats/{stem}/norm/BatchNorm_0/var": rng.uniform(0.5, 2, 8).astype(np.float32),
    }
    folded = doc_rename()["fold_input_scale"](weights)

    def variables(flat):
        norm = f"{stem}/norm/BatchNorm_0"
        return {
            "params": {
                "conv": {"kernel": flat[f"params/{stem}/conv/kernel"]},
                "norm": {"BatchNorm_0": {k: flat[f"params/{norm}/{k}"] for k in ("scale", "bias")}},
            },
            "batch_stats": {
                "norm": {
                    "BatchNorm_0": {k: flat[f"batch_stats/{norm}/{k}"] for k in ("mean", "var")}
                }
            },
        }

    layer = Conv(8, 6, strides=2, padding=2, norm="batch")
    image = rng.uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
    theirs = np.asarray(layer.apply(variables(weights), image, train=False))
    ours = np.asarray(layer.apply(variables(folded), 2 * image - 1, train=False))
    np.testing.assert_allclose(ours[:, 1:-1, 1:-1], theirs[:, 1:-1, 1:-1], atol=1e-5)
    assert not np.allclose(ours[:, 0], theirs[:, 0], atol=1e-3)  # the padded frame differs


# --------------------------------------------------------------------------- the configs


@pytest.mark.parametrize("runlocal", [False, True], ids=["full", "runlocal"])
@pytest.mark.parametrize(
    "model, clients, mode", itertools.product(COCO_MODELS, (4, 8), tuple(MODES))
)
def test_coco_config_every_model_clients_and_mode_validates(model, clients, mode, runlocal):
    weights = "" if mode == "sfl" else "/pretrained/yolo.npz"
    arg = f"model={model},clients={clients},mode={mode}" + (
        f",weights={weights}" if weights else ""
    )
    config = load_config(f"{COCO}:{arg}" + (",runlocal" if runlocal else ""))
    validate_config(config)
    assert config.model.name == model and config.model.norm == "auto"
    assert config.model.weights == weights and config.model.freeze == MODES[mode]
    assert config.data.name == "coco_detection" and config.data.names_file == ""
    assert (config.data.train_split, config.data.test_split) == ("train2017", "val2017")
    assert (config.data.images_dir, config.data.labels_dir) == ("images", "labels")
    assert config.data.partition.name == "fedcv_detection"
    assert config.data.num_clients == clients
    client = config.algorithm.client
    assert config.algorithm.name == "fedavg" and client.momentum == 0.937
    assert client.weight_decay == pytest.approx(5e-4 / 64)
    # YOLOv5's lr0 0.01 per image of the batch (its loss is summed over the batch, ours a mean)
    assert client.learning_rate == pytest.approx(0.01 * config.algorithm.batch_size)
    preset = augment.make_augmentation(config.data.augmentation)
    assert preset.letterbox and preset.mosaic == 1.0 and preset.flip
    if runlocal:
        assert config.num_rounds == 2 and preset.image_size == (64, 64)
        assert config.algorithm.clients_per_round == 2
        assert config.model.kwargs.to_dict() == {"width_multiple": 1 / 128, "depth_multiple": 0.33}
    else:
        assert preset.image_size == (640, 640) and config.num_rounds == 300
        assert config.algorithm.clients_per_round == clients  # all clients every round
        assert config.algorithm.batch_size == 4 and config.algorithm.local_epochs == 1
        assert client.lr_warmup_rounds == 3 and config.eval_every_rounds == 10
        assert config.model.kwargs.to_dict() == {}


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("lda", {"data.partition.name": "lda_multilabel", "data.partition.alpha": 0.5}),
        ("lda,alpha=0.1", {"data.partition.name": "lda_multilabel", "data.partition.alpha": 0.1}),
        ("fedcv,clients=8", {"data.partition.name": "fedcv_detection", "data.num_clients": 8}),
        ("size=320", {"data.augmentation.image_size": (320, 320)}),
    ],
)
def test_coco_config_partition_and_size(arg, expected):
    config = load_config(f"{COCO}:{arg}")
    validate_config(config)
    for key, value in expected.items():
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == value, key


@pytest.mark.parametrize("runlocal", [False, True], ids=["full", "runlocal"])
@pytest.mark.parametrize("clients, mode", itertools.product((1, 5, 20), tuple(MODES)))
def test_fedvision_config_every_clients_and_mode_validates(clients, mode, runlocal):
    weights = "" if mode == "sfl" else "/pretrained/yolov3.npz"
    arg = f"clients={clients},mode={mode}" + (f",weights={weights}" if weights else "")
    config = load_config(f"{FEDVISION}:{arg}" + (",runlocal" if runlocal else ""))
    validate_config(config)
    assert config.model.name == "yolov3" and config.model.freeze == MODES[mode]
    assert config.model.weights == weights
    assert config.data.name == "coco_detection" and config.data.names_file == "data.yaml"
    assert (config.data.train_split, config.data.test_split) == ("train", "val")
    assert config.data.partition.name == "lda_multilabel" and config.data.num_clients == clients
    assert config.algorithm.client.momentum == 0.937
    assert config.algorithm.client.learning_rate == pytest.approx(
        0.01 * config.algorithm.batch_size
    )
    preset = augment.make_augmentation(config.data.augmentation)
    if runlocal:
        assert config.num_rounds == 2 and preset.image_size == (64, 64)
        assert config.algorithm.clients_per_round == min(2, clients)
        assert config.model.kwargs.to_dict() == {"width_multiple": 1 / 128, "depth_multiple": 0.33}
    else:
        assert preset.image_size == (416, 416) and config.num_rounds == 100
        assert config.algorithm.clients_per_round == clients
        assert config.algorithm.batch_size == 8


@pytest.mark.parametrize(
    "spec, message",
    [
        (f"{COCO}:model=yolov5n", r"^model='yolov5n' is not allowed; must be one of yolov5s, "),
        (f"{COCO}:model=yolov3", r"^model='yolov3' is not allowed"),
        (f"{COCO}:clients=5", r"^clients='5' is not allowed; must be 4 or 8$"),
        (f"{COCO}:clients=", r"^clients='' is not allowed"),
        (f"{COCO}:mode=finetune,weights=w.npz", r"^mode='finetune' is not allowed; must be one"),
        (f"{COCO}:mode=fz", r"^mode=fz needs weights="),
        (f"{COCO}:weights=w.npz", r"^weights=\.\.\. is given with mode=sfl"),
        (f"{COCO}:lda,alpha=0", r"^alpha='0' is not allowed; must be a number > 0"),
        (f"{COCO}:lda,alpha=nan", r"^alpha='nan' is not allowed"),
        (f"{COCO}:size=100", r"^size='100' is not allowed; must be a positive multiple of 32"),
        (f"{COCO}:size=big", r"^size='big' is not allowed"),
        (f"{COCO}:lda,fedcv", r"lda and fedcv exclude each other"),
        (f"{COCO}:epochs=3", r"'epochs' is unknown; known: runlocal, model, clients, mode, "),
        (f"{FEDVISION}:clients=0", r"^clients='0' is not allowed; must be a positive integer$"),
        (f"{FEDVISION}:clients=-2", r"^clients='-2' is not allowed"),
        (f"{FEDVISION}:mode=ft", r"^mode=ft needs weights="),
        (f"{FEDVISION}:mode=sfl,weights=w.npz", r"^weights=\.\.\. is given with mode=sfl"),
        (f"{FEDVISION}:size=400", r"^size='400' is not allowed"),
        (f"{FEDVISION}:alpha=-1", r"^alpha='-1' is not allowed"),
        (f"{FEDVISION}:model=yolov5s", r"'model' is unknown; known: runlocal, clients, mode"),
    ],
)
def test_detection_configs_refuse_bad_arguments_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        load_config(spec)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- fine-tuning


def _yolo_folder(root, names_file: str = "") -> None:
    """A YOLO-txt folder: 8 train images (classes 0-3, two of each) and 2 val images, 64x64."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{split}{index}.jpg")
            line = f"{index % 4} 0.5 0.5 {0.2 + 0.1 * (index % 3):.1f} 0.4\n"
            (root / "labels" / split / f"{split}{index}.txt").write_text(line)
    if names_file:
        (root / names_file).write_text("names: [car, person, bike, bus]\n")


def _converted(tmp_path, monkeypatch, layers, rules, depth, width, seed):
    """Ultralytics-style weights (80 classes) through the doc's export and convert."""
    state = ultralytics_arrays(layers, 80, depth, width, seed=seed)
    exported, converted = tmp_path / "ultralytics.npz", tmp_path / "converted.npz"
    export_with_fake_torch(monkeypatch, state, tmp_path / "yolo.pt", exported)
    with np.load(exported) as stored:
        assert set(stored.files) == {n for n in state if is_weight(n)}
    doc = doc_rename()
    doc["convert"](exported, converted, doc[rules])
    return state, converted


def _leaf(tree, name: str):
    for part in name.split("/")[1:]:
        tree = tree[part]
    return np.asarray(tree)


def test_coco_runlocal_fine_tunes_a_converted_ultralytics_checkpoint_with_a_frozen_backbone(
    tmp_path, monkeypatch
):
    state, weights = _converted(
        tmp_path, monkeypatch, YOLOV5_YAML, "ULTRALYTICS_YOLOV5", 0.33, 1 / 128, seed=1
    )
    root = tmp_path / "coco"
    _yolo_folder(root)
    config = load_config(f"{COCO}:runlocal,mode=fz,weights={weights}")
    config.model.norm = "batch"
    config.data.root = str(root)
    config.data.train_split, config.data.test_split = "train", "val"
    config.data.cache_dir = str(tmp_path / "cache")
    experiment = build_experiment(config)

    dataset = experiment.dataset
    assert dataset.task == "detection" and dataset.num_classes == 80  # COCO's names
    assert len(dataset.train["image"]) == 8 and len(dataset.test["image"]) == 2
    assert sorted(np.concatenate(dataset.clients).tolist()) == list(range(8))
    assert len(dataset.clients) == 4
    report = experiment.weights_report
    variables = {"params": experiment.initial_state.params, **experiment.initial_state.model_state}
    names = {key_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}
    assert set(report.loaded) == names and not report.reinitialised and not report.unused

    def ours(name):
        return _leaf(variables[name.split("/")[0]], name)

    kernel = state["model.2.m.0.cv2.conv.weight"]
    np.testing.assert_array_equal(
        ours("params/backbone/c3_1/m0/cv2/conv/kernel"), kernel.transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        ours("batch_stats/neck/bottom_up32/cv3/norm/BatchNorm_0/var"),
        state["model.23.cv3.bn.running_var"],
    )
    np.testing.assert_array_equal(
        ours("params/detect/level2/kernel"), state["model.24.m.2.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(ours("params/detect/level1/bias"), state["model.24.m.1.bias"])
    stem = state["model.0.conv.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_allclose(ours("params/backbone/stem/conv/kernel"), stem / 2)
    np.testing.assert_allclose(
        ours("batch_stats/backbone/stem/norm/BatchNorm_0/mean"),
        state["model.0.bn.running_mean"] - stem.sum(axis=(0, 1, 2)) / 2,
        rtol=1e-6,
    )

    params = experiment.initial_state.params
    backbone = sum(x.size for x in jax.tree.leaves(params["backbone"]))
    share = backbone / sum(x.size for x in jax.tree.leaves(params))
    assert frozen_fraction(params, freeze_except(("neck", "detect"))) == pytest.approx(share)
    assert any(f"model.freeze='backbone': {share:.1%}" in note for note in experiment.notes)
    assert any("loaded" in note and str(weights) in note for note in experiment.notes)
    examples = experiment.cohorts(0).examples
    assert examples["image"].shape[0] == 2 and examples["image"].shape[-3:] == (64, 64, 3)


def test_fedvision_runlocal_fine_tunes_yolov3_and_reinitialises_detect_for_its_classes(
    tmp_path, monkeypatch
):
    state, weights = _converted(
        tmp_path, monkeypatch, YOLOV3_YAML, "ULTRALYTICS_YOLOV3", 0.33, 1 / 128, seed=2
    )
    root = tmp_path / "street"
    _yolo_folder(root, names_file="data.yaml")
    config = load_config(f"{FEDVISION}:runlocal,fedcv,clients=4,mode=ft,weights={weights}")
    config.model.norm = "batch"
    config.data.root = str(root)
    config.data.cache_dir = str(tmp_path / "cache")
    experiment = build_experiment(config)

    assert experiment.dataset.class_names == ("car", "person", "bike", "bus")
    assert len(experiment.dataset.clients) == 4
    report = experiment.weights_report
    detect = {name for name, _ in report.reinitialised}
    assert detect == {
        f"params/detect/level{i}/{leaf}" for i in range(3) for leaf in ("kernel", "bias")
    }
    assert all("in the file" in why for _, why in report.reinitialised)  # shaped for 80 classes
    assert len(report.loaded) == len([n for n in state if is_weight(n)]) - 6
    params = experiment.initial_state.params
    np.testing.assert_array_equal(  # layer 6 holds 3 bottlenecks at depth 0.33: model.6.1.cv2
        _leaf(params, "params/backbone/stage3_1/cv2/conv/kernel"),
        state["model.6.1.cv2.conv.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(  # layer 27 holds one bottleneck at depth 0.33
        _leaf(params, "params/neck/block8_1/cv1/norm/BatchNorm_0/scale"),
        state["model.27.cv1.bn.weight"],
    )
    assert not any("model.freeze" in note for note in experiment.notes)
