"""Trains a federated experiment from a config file.

    python launch/train.py --config=configs/shapes_fedavg.py[:arg] --workdir=DIR \
        [--config.<key>=<value> ...]

Running it again on the same DIR resumes from the last checkpoint; on a finished run it exits 0
and changes nothing. A bad config value fails with one line before anything is written.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from fedjax_cv.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, config and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        record = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print({k: v for k, v in record.items()})


if __name__ == "__main__":
    app.run(main)
