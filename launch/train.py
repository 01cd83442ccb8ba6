"""Trains a federated experiment from a config file.

    python launch/train.py --config=configs/shapes_fedavg.py[:arg] --workdir=DIR \
        [--config.<key>=<value> ...]

Running it again on the same DIR resumes from the newest intact checkpoint (a damaged one is
moved to DIR/checkpoints_set_aside with one line saying why); on a finished run it exits 0 and
changes nothing. `--resume_step=N` resumes from the kept checkpoint of round N instead, setting
the newer ones aside (0 starts over). One run at a time writes a DIR; another is refused.

Every bad input or fault ends with one line `error: ...` on stderr: exit status 2 for a bad
config or workdir (before anything is written), 1 for a run that stopped (non-finite training,
a checkpoint that could not be saved).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_cv.workdir import WorkdirError, check_workdir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, config and checkpoints.")
_RESUME_STEP = flags.DEFINE_integer(
    "resume_step",
    None,
    "Resume from the kept checkpoint of this round instead of the newest; the newer ones are "
    "moved to <workdir>/checkpoints_set_aside (0: start over).",
    lower_bound=0,
)
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str) -> None:
    text = str(message)
    if "Traceback (most recent call last)" in text:  # an error raised inside a config file
        lines = [line for line in text.splitlines() if line.strip()]
        text = f"{lines[0].split(': Error')[0]}: {lines[-1]}"
    print(f"error: {' '.join(text.split())}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a misspelled or mistyped `--config.<key>` as one error line."""
    try:
        return flags.FLAGS(argv)
    except KeyError as error:  # ml_collections: unknown key, with a did-you-mean hint
        _fail(f"unknown config key {error.args[0] if error.args else error}")
    except (flags.Error, ValueError, TypeError, AttributeError) as error:
        _fail(error)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # keep orbax's per-save INFO lines off the console
    try:
        check_workdir(_WORKDIR.value)  # within a second, before JAX and the dataset load
    except WorkdirError as error:
        _fail(error)
    from fedjax_cv.train import CheckpointError, TrainingError, train_and_evaluate

    try:
        record = train_and_evaluate(_CONFIG.value, _WORKDIR.value, resume_step=_RESUME_STEP.value)
    except (ValueError, FileNotFoundError, WorkdirError) as error:
        _fail(error)
    except (TrainingError, CheckpointError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(1)
    print({k: v for k, v in record.items()})


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
