"""Describes the federated split a config makes, without training.

    python -m fedjax_cv.data.inspect --config=configs/cifar10_dirichlet.py:alpha=0.1 --out=DIR

Prints a per-client table and writes DIR/partition.json (seed, client index lists, stats of
the train split), DIR/class_heatmap.png (clients x classes, FedCV Fig. 3) and
DIR/client_sizes.png (sorted client sizes, Hsu et al. 2020 Fig. 10).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from fedjax_cv.data import plots
from fedjax_cv.data.registry import build_dataset, partition_params
from fedjax_cv.validation import validate_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_OUT = flags.DEFINE_string("out", None, "Folder for partition.json and the plots.")
flags.mark_flags_as_required(["config", "out"])


def inspect_partition(config, out: str | pathlib.Path):
    """Builds the config's dataset and writes partition.json and the plots into `out`."""
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
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
