"""Describes the federated split a config makes, without training.

    python -m fedjax_cv.data.inspect --config=configs/cifar10_dirichlet.py:alpha=0.1 --out=DIR

Prints a per-client table and writes DIR/partition.json (seed, client index lists, stats of
the train split), DIR/class_heatmap.png (clients x classes, FedCV Fig. 3) and
DIR/client_sizes.png (sorted client sizes, Hsu et al. 2020 Fig. 10).
"""

from __future__ import annotations

import os
import pathlib

from absl import app, flags

from fedjax_cv import cli
from fedjax_cv.data import plots
from fedjax_cv.data.registry import build_dataset, partition_params
from fedjax_cv.validation import validate_config

_CONFIG = cli.define_config_flag("Experiment config file.")
_OUT = flags.DEFINE_string("out", None, "Folder for partition.json and the plots.")
flags.mark_flags_as_required(["config", "out"])
OUTPUTS = ("partition.json", "class_heatmap.png", "client_sizes.png")


def check_out(out: str | os.PathLike) -> None:
    """Raises ValueError, one line naming the path, when `out` cannot take the outputs;
    writes nothing."""
    path = pathlib.Path(out)
    if not str(out).strip():
        raise ValueError("--out is empty; give a folder for partition.json and the plots")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out={path} is a file; must be a folder (or a path to make one)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out={path} lies under {existing}, which is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out={path}: {existing} is not writable")
    for name in OUTPUTS:
        if (path / name).is_dir():
            raise ValueError(f"--out={path}: {path / name} is a folder, but a file goes there")


def inspect_partition(config, out: str | pathlib.Path):
    """Builds the config's dataset and writes partition.json and the plots into `out`."""
    check_out(out)
    validate_config(config)
    dataset = build_dataset(config.data, config.seed)
    partition = dataset.partition(
        config.data.partition.name, config.seed, partition_params(config.data.partition)
    )
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    partition.save(out / "partition.json")
    title = f"{dataset.name}, {config.data.partition.name}, mean EMD {partition.stats.mean_emd:.3f}"
    plots.plot_class_heatmap(
        partition.stats.class_histograms, out / "class_heatmap.png", dataset.class_names, title
    )
    plots.plot_client_sizes(partition.stats.client_sizes, out / "client_sizes.png", title)
    print(plots.client_table(partition.stats, dataset.class_names))
    return partition


def main(argv):
    del argv
    try:
        inspect_partition(_CONFIG.value, _OUT.value)
    except (ValueError, OSError) as error:
        cli.fail(error)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
