"""The base of every training config: all keys, with defaults. Experiments override it.

Keys marked "by name" hold "auto" (or None, for numbers) and take the named algorithm's choice:
the defaults of its preset in fedjax_cv.algorithms.compose.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib

import ml_collections


def default_data_root() -> str:
    """$FEDJAX_CV_DATA, else ../shared/data relative to the repository."""
    env = os.environ.get("FEDJAX_CV_DATA")
    if env:
        return env
    return str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")


def by_name() -> ml_collections.FieldReference:
    """A number left to the algorithm's preset: None until set (a float from the command
    line or a config file)."""
    return ml_collections.config_dict.placeholder(float)


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_rounds = 100
    config.eval_every_rounds = 10
    config.log_every_rounds = 1

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_rounds = 10
    config.checkpoint.keep = 3
    config.checkpoint.allow_config_change = False  # resume a workdir made with another config

    config.model = ml_collections.ConfigDict()
    config.model.name = "cnn_hsu"
    config.model.norm = "auto"  # "auto": the model's own default
    config.model.kwargs = ml_collections.ConfigDict()  # more fields of the model, e.g. width
    config.model.weights = ""  # pretrained weights: .npz, .msgpack, orbax dir or a workdir
    config.model.freeze = "none"  # none | backbone (FedCV 'FZ': only the head trains)
    config.model.head_lr = 1.0  # learning-rate multiplier of the head (FedCV: new layers 10x)

    config.algorithm = ml_collections.ConfigDict()
    config.algorithm.name = "fedavg"
    config.algorithm.clients_per_round = 10
    config.algorithm.local_epochs = 1
    config.algorithm.batch_size = 10
    config.algorithm.virtual_client_size = 0  # > 0: FedVC virtual clients of this many examples
    config.algorithm.client_sampling = "auto"  # by name: uniform | size_proportional
    config.algorithm.aggregation = "auto"  # by name: weighted | mean
    config.algorithm.strategy = "auto"  # auto | vmap | sequential | host
    # FedBN-style client-local state, "auto" by name (fedbn: norm layers and batch_stats local)
    config.algorithm.local_params = "auto"  # regex over parameter names kept per client
    config.algorithm.batch_stats = "auto"  # average | local
    config.algorithm.client = ml_collections.ConfigDict()
    config.algorithm.client.learning_rate = 0.05
    config.algorithm.client.momentum = 0.0
    config.algorithm.client.weight_decay = 0.0
    config.algorithm.client.proximal_mu = by_name()  # fedprox: 0.01, others 0 (FedProx's term)
    # learning rate over rounds (algorithms/schedules.py): constant | poly | linear, times a
    # linear warm-up over the first lr_warmup_rounds rounds
    config.algorithm.client.lr_schedule = "constant"
    config.algorithm.client.lr_power = 0.9  # poly: (1 - round / num_rounds) ** lr_power
    config.algorithm.client.lr_warmup_rounds = 0
    config.algorithm.client.importance_weighting = False  # FedIR
    config.algorithm.client.class_prior = ()  # FedIR's p; () = label frequencies of all clients
    # 'regex=multiplier' on parameter names, first match wins, 0 freezes: ("classifier=10",)
    config.algorithm.client.lr_multipliers = ()
    config.algorithm.server = ml_collections.ConfigDict()
    config.algorithm.server.optimizer = "auto"  # by name: sgd | adam | yogi | adagrad
    config.algorithm.server.learning_rate = by_name()  # fedopt: 0.01, others 1.0
    config.algorithm.server.momentum = by_name()  # fedavgm: 0.9, others 0.0
    config.algorithm.server.b1 = 0.9
    config.algorithm.server.b2 = 0.99
    config.algorithm.server.eps = 1e-3  # FedOpt's adaptivity tau
    # optax: optax's adam/yogi/adagrad; paper: Reddi et al. 2021's Algorithm 2 (no bias
    # correction, tau outside the square root; algorithms/server.py)
    config.algorithm.server.variant = "optax"
    # The aggregation pipeline (algorithms/aggregation.py): an aggregator, optional norm
    # bounding and DP-FedAvg; they compose with every algorithm.
    config.algorithm.aggregator = ml_collections.ConfigDict()
    # mean | median | trimmed_mean | krum | multi_krum | geometric_median (algorithms/robust.py)
    config.algorithm.aggregator.name = "mean"
    config.algorithm.aggregator.trim_fraction = 0.1  # trimmed_mean: cut from each end
    config.algorithm.aggregator.num_byzantine = 0  # krum, multi_krum: f
    config.algorithm.aggregator.num_selected = 0  # multi_krum: m; 0: n - f
    config.algorithm.aggregator.num_iterations = 32  # geometric_median: Weiszfeld steps
    config.algorithm.aggregator.norm_bound = 0.0  # > 0: each delta clipped to this L2 norm
    config.algorithm.aggregator.adaptive_norm_bound = False  # the bound tracks norm_quantile
    config.algorithm.aggregator.norm_quantile = 0.5
    config.algorithm.dp = ml_collections.ConfigDict()  # DP-FedAvg (algorithms/privacy.py)
    config.algorithm.dp.enabled = False
    config.algorithm.dp.noise_multiplier = 1.0  # z: noise std z * clip_norm on the sum
    config.algorithm.dp.clip_norm = 1.0  # C: each client's delta clipped to this L2 norm
    config.algorithm.dp.target_delta = 1e-5  # train/dp_epsilon is reported at this delta
    config.algorithm.dp.accountant = "rdp"  # rdp | pld
    config.algorithm.dp.adaptive_clip = False  # C follows target_quantile (Andrew et al.)
    config.algorithm.dp.target_quantile = 0.5
    config.algorithm.dp.clip_learning_rate = 0.2
    config.algorithm.dp.clipped_count_stddev = 0.0  # adaptive: 0 = clients_per_round / 20
    # What clients upload (algorithms/compression.py), after clipping; train/upload_bytes
    # reports the bytes uploaded whatever the name.
    config.algorithm.compression = ml_collections.ConfigDict()
    config.algorithm.compression.name = "none"  # none | quantization | top_k | layer_selection
    config.algorithm.compression.bits = 8  # quantization: bits a coordinate, in [1, 32]
    config.algorithm.compression.fraction = 0.1  # top_k: coordinates; layer_selection: leaves
    # Simulated secure aggregation of the mean (algorithms/secure_aggregation.py): clients
    # upload masked fixed-point deltas; the server decodes only their sum.
    config.algorithm.secure_aggregation = ml_collections.ConfigDict()
    config.algorithm.secure_aggregation.enabled = False
    config.algorithm.secure_aggregation.frac_bits = 20  # fixed point: 2^-frac_bits steps

    # Attacks by a fraction of each round's clients (algorithms/attacks.py)
    config.attack = ml_collections.ConfigDict()
    # none | sign_flip | scale | gaussian | label_flip | backdoor
    config.attack.name = "none"
    config.attack.fraction = 0.0
    config.attack.scale = by_name()  # the factor on the delta: scale 10, sign_flip 1 (-1x)
    config.attack.stddev = 1.0  # gaussian: the noise's standard deviation
    config.attack.target_label = 0  # backdoor
    config.attack.patch_size = 3  # backdoor: the trigger square's side in pixels
    config.attack.poison_fraction = 0.5  # backdoor: the share of an attacker's examples

    config.data = ml_collections.ConfigDict()
    config.data.name = "shapes"
    config.data.root = default_data_root()
    config.data.num_clients = 100
    config.data.num_classes = 4
    config.data.image_size = 28
    config.data.num_train_examples = 10_000
    config.data.num_test_examples = 2_000
    config.data.augmentation = "none"  # none | cifar | flip | scale_flip (data/augment.py)
    config.data.num_workers = 0  # grain threads assembling a cohort; 0: the prefetch thread
    config.data.poisoned_clients = 0  # fault injection: clients 0..n-1 get NaN images
    config.data.partition = ml_collections.ConfigDict()
    config.data.partition.name = "dirichlet"
    config.data.partition.alpha = 1.0

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 500
    return config


def load_config(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path`: how a variant builds on its base config
    (config files are loaded by path, not imported as a package)."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def parse_arg(arg: str | None, known: tuple[str, ...] | None = None) -> dict[str, str]:
    """'runlocal,alpha=0.5' -> {'runlocal': '', 'alpha': '0.5'}; with `known`, an argument
    outside it is a ValueError naming it and the known ones."""
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    unknown = sorted(set(out) - set(known)) if known is not None else []
    if unknown:
        raise ValueError(f"config argument {unknown[0]!r} is unknown; known: {', '.join(known)}")
    return out


def join_arg(args: dict[str, str], keys: tuple[str, ...]) -> str:
    """The config argument string of those `args` in `keys`: what a variant hands its base."""
    return ",".join(f"{k}={v}" if v else k for k, v in args.items() if k in keys)


def set_rounds(config: ml_collections.ConfigDict, rounds: int, every: int) -> None:
    """`rounds` rounds, evaluated and checkpointed every `every` (and after the last)."""
    config.num_rounds = rounds
    config.eval_every_rounds = every
    config.checkpoint.every_rounds = every


def segmentation_model(config: ml_collections.ConfigDict, args: dict[str, str]) -> None:
    """`model=<name>` (default a U-Net of base width 16) and `width=<float>`, the width
    multiplier of a backbone model, shared by the segmentation configs."""
    config.model.name = args.get("model", "unet")
    if config.model.name == "unet":
        config.model.kwargs.base_width = 16
    elif "width" in args:
        config.model.kwargs.width_multiplier = float(args["width"])


def dirichlet_classification(
    data_name: str, model_name: str, arg: str | None, num_rounds: int = 500
) -> ml_collections.ConfigDict:
    """FedAvg on a real image-folder dataset split by Dirichlet(alpha) over 100 clients
    (Hsu et al. 2019): the base of configs/cifar10_dirichlet.py and mnist_dirichlet.py.

    `arg`: `alpha=<float>` (default 0.5), `runlocal` (3 rounds).
    """
    args = parse_arg(arg, ("runlocal", "alpha"))
    config = base_config()
    config.num_rounds = num_rounds
    config.eval_every_rounds = 10
    config.checkpoint.every_rounds = 25
    config.model.name = model_name
    config.algorithm.name = "fedavg"
    config.algorithm.clients_per_round = 10
    config.algorithm.batch_size = 20
    config.algorithm.local_epochs = 1
    config.algorithm.client.learning_rate = 0.02
    config.algorithm.client.momentum = 0.9
    config.data.name = data_name
    config.data.num_clients = 100
    config.data.partition.name = "dirichlet"
    config.data.partition.alpha = float(args.get("alpha", 0.5))
    config.eval.batch_size = 1000
    if "runlocal" in args:
        config.num_rounds = 3
        config.eval_every_rounds = 3
        config.checkpoint.every_rounds = 3
    return config


TRANSFER_MODES = ("scratch", "finetune", "frozen")
TRANSFER_ARGS = ("mode", "weights", "head_lr")  # the config args `transfer` reads


def transfer(config: ml_collections.ConfigDict, args: dict[str, str]) -> ml_collections.ConfigDict:
    """Applies the config args of transfer learning (FedCV's training modes):

    - `mode=scratch` (default): random initialisation;
    - `mode=finetune,weights=PATH`: start from the weights at PATH (.npz, .msgpack, an orbax
      checkpoint or a training workdir), a head of another size re-initialised;
    - `mode=frozen,weights=PATH`: as finetune, with the backbone frozen ('FZ');
    - `head_lr=<float>`: the head's learning-rate multiplier (FedCV trains new layers at 10x).
    """
    mode = args.get("mode", "scratch")
    if mode not in TRANSFER_MODES:
        allowed = ", ".join(TRANSFER_MODES)
        raise ValueError(f"mode={mode!r} is not allowed; must be one of {allowed}")
    weights = args.get("weights", "")
    if mode != "scratch" and not weights:
        raise ValueError(
            f"mode={mode} needs weights=<path to a .npz, .msgpack, checkpoint or workdir>"
        )
    if mode == "scratch" and weights:
        raise ValueError("weights=... is given with mode=scratch; use mode=finetune or frozen")
    config.model.weights = weights
    config.model.freeze = "backbone" if mode == "frozen" else "none"
    config.model.head_lr = float(args.get("head_lr", 1.0))
    return config


DETECTION_ARGS = ("lda", "fedcv", "alpha", "clients", "size")
# Arguments of the detection configs that train (see `detection_training`).
DETECTION_TRAINING_ARGS = ("runlocal", "model")
# YOLOv5's lr0 = 0.01 applies to a loss that Ultralytics multiplies by the batch size; the task's
# per-image loss is the mean over the batch, so the same steps take 0.01 x the batch size.
DETECTION_LR_PER_IMAGE = 0.01


def detection_partition(
    data_name: str,
    num_clients: int,
    clients_per_round: int,
    arg: str | None,
    partition: str = "fedcv_detection",
    image_size: int = 320,
    extra_args: tuple[str, ...] = (),
) -> ml_collections.ConfigDict:
    """A detection dataset split over clients by its images' box classes, with `partition`
    (FedCV's greedy partition, He et al. 2021, App. 7.1.2, or multi-label LDA), and the
    "detection" augmentation (YOLOv5's letterbox, mosaic, HSV, flip, scale) at `image_size`.

    `arg` (see DETECTION_ARGS, plus `extra_args` of the caller): `lda` or `fedcv` picks the
    partition, `alpha=<float>` LDA's alpha (default 0.5), `clients=<int>` the number of clients,
    `size=<int>` the letterbox size (a multiple of 32).
    """
    args = parse_arg(arg, DETECTION_ARGS + tuple(extra_args))
    if "lda" in args and "fedcv" in args:
        raise ValueError("config arguments lda and fedcv exclude each other; give one of them")
    if "lda" in args:
        partition = "lda_multilabel"
    elif "fedcv" in args:
        partition = "fedcv_detection"
    config = base_config()
    config.data.name = data_name
    config.data.num_clients = int(args.get("clients", num_clients))
    config.algorithm.clients_per_round = min(clients_per_round, config.data.num_clients)
    config.data.partition.name = partition
    config.data.partition.alpha = float(args.get("alpha", 0.5))
    size = int(args.get("size", image_size))
    del config.data.augmentation  # a preset name in the base config; here the preset with a size
    config.data.augmentation = ml_collections.ConfigDict(
        {"name": "detection", "image_size": (size, size)}
    )
    return config


def detection_training(
    config: ml_collections.ConfigDict,
    args: dict[str, str],
    *,
    num_rounds: int,
    eval_every: int,
    batch_size: int = 8,
    local_epochs: int = 1,
    warmup_rounds: int = 3,
) -> ml_collections.ConfigDict:
    """FedAvg training of a YOLO detector on a `detection_partition` config, with FedCV's and
    YOLOv5's settings: `model=<name>` (default `yolov5n`, GroupNorm), client SGD with momentum
    0.937 at 0.01 x `batch_size` (`DETECTION_LR_PER_IMAGE`: YOLOv5's lr0 for a loss summed over
    the batch), the rate warmed up linearly over the first `warmup_rounds` rounds, `num_rounds`
    rounds evaluated and checkpointed every `eval_every`."""
    config.seed = 0
    set_rounds(config, num_rounds, eval_every)
    config.model.name = args.get("model", "yolov5n")
    config.algorithm.name = "fedavg"
    config.algorithm.batch_size = batch_size
    config.algorithm.local_epochs = local_epochs
    config.algorithm.client.learning_rate = DETECTION_LR_PER_IMAGE * batch_size
    config.algorithm.client.momentum = 0.937
    config.algorithm.client.lr_warmup_rounds = warmup_rounds
    config.eval.batch_size = 24
    return config


# FedCV's training-mode names (§6.2-6.3) -> `transfer`'s.
FEDCV_MODES = {"ft": "finetune", "fz": "frozen", "sfl": "scratch"}
# `runlocal`'s shrunk YOLO: the same blocks, 8 channels each (the rounding floor), a third of the
# depth; few distinct layer shapes, so it builds and compiles quickly on a CPU.
TINY_YOLO = {"width_multiple": 1 / 128, "depth_multiple": 0.33}


def _bad_arg(arg: str, value: str, allowed: str) -> ValueError:
    return ValueError(f"{arg}={value!r} is not allowed; must be {allowed}")


def fedcv_transfer(args: dict[str, str]) -> dict[str, str]:
    """`transfer`'s args from FedCV's `mode=ft|fz|sfl` and `weights=<path>`, checked together."""
    mode = args.get("mode", "sfl")
    if mode not in FEDCV_MODES:
        allowed = f"one of {', '.join(FEDCV_MODES)} (fine-tune, frozen, scratch)"
        raise _bad_arg("mode", mode, allowed)
    weights = args.get("weights", "")
    if mode != "sfl" and not weights:
        raise ValueError(f"mode={mode} needs weights=<path to a .npz of the model's weights>")
    if mode == "sfl" and weights:
        raise ValueError("weights=... is given with mode=sfl (scratch); use mode=ft or fz")
    return {"mode": FEDCV_MODES[mode], "weights": weights}


def check_detection_args(args: dict[str, str], default_size: int, alpha_allowed: str) -> None:
    """`alpha=<float>` > 0 and `size=<int>` a positive multiple of 32, in one line each."""
    if "alpha" in args:
        try:
            alpha = float(args["alpha"])
        except ValueError:
            alpha = math.nan
        if not math.isfinite(alpha) or alpha <= 0:
            raise _bad_arg("alpha", args["alpha"], alpha_allowed)
    size = args.get("size", str(default_size))
    if not size.isdigit() or int(size) == 0 or int(size) % 32:
        raise _bad_arg("size", size, "a positive multiple of 32 (YOLO's deepest stride)")


def yolo_txt_data(config, train_split: str, test_split: str, names_file: str) -> None:
    """Data in Ultralytics' YOLO-txt layout at `data.root`; every key settable from the
    command line (`names_file` "": COCO's 80 class names)."""
    config.data.train_split = train_split
    config.data.test_split = test_split
    config.data.images_dir = "images"
    config.data.labels_dir = "labels"
    config.data.names_file = names_file
    config.data.cache_dir = ""


def yolo_runlocal(config, num_clients: int) -> None:
    """A detection config's smoke test: 2 rounds at 64x64 of the shrunk model, 2 clients a
    round, batch 2."""
    set_rounds(config, 2, 2)
    config.algorithm.clients_per_round = min(2, num_clients)
    config.algorithm.batch_size = 2
    config.algorithm.client.learning_rate = DETECTION_LR_PER_IMAGE * 2
    config.eval.batch_size = 4
    config.data.augmentation.image_size = (64, 64)
    config.model.kwargs.update(TINY_YOLO)
