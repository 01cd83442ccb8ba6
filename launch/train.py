"""Trains a federated experiment from a config file.

    python launch/train.py --config=configs/shapes_fedavg.py[:arg] --workdir=DIR \
        [--config.<key>=<value> ...]

Running it again on the same DIR resumes from the newest intact checkpoint (a damaged one is
moved to DIR/checkpoints_set_aside with one line saying why); on a finished run it exits 0 and
changes nothing. `--resume_step=N` resumes from the kept checkpoint of round N instead, setting
the newer ones aside (0 starts over). One run at a time writes a DIR; another is refused.

Many processes (one run on one global device mesh; README "Many processes"): every process
runs this same command, joined by jax.distributed when `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` are given, under srun, with JAX_COORDINATOR_ADDRESS set, or
with `--distributed=on` (TPU pods); launch/local_multiprocess.sh, launch/slurm.sbatch and
launch/tpu_pod.sh do it.

Every bad input or fault ends with one line `error: ...` on stderr: exit status 2 for a bad
config or workdir (before anything is written), 1 for a run that stopped (non-finite training,
a checkpoint that could not be saved).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from fedjax_cv import cli
from fedjax_cv.workdir import WorkdirError, check_workdir

_CONFIG = cli.define_config_flag("Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, config and checkpoints.")
_RESUME_STEP = flags.DEFINE_integer(
    "resume_step",
    None,
    "Resume from the kept checkpoint of this round instead of the newest; the newer ones are "
    "moved to <workdir>/checkpoints_set_aside (0: start over).",
    lower_bound=0,
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Many processes: HOST:PORT where process 0 listens (with --num_processes and --process_id). "
    "Not needed under srun (SLURM) or with JAX_COORDINATOR_ADDRESS set.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Many processes: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Many processes: this one's index.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Join other processes with jax.distributed: auto (when the flags above, srun or "
    "JAX_COORDINATOR_ADDRESS say so), on (always; JAX finds the TPU pod's workers), off.",
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    30,
    "Many processes: seconds after which a silent process counts as dead and the others end.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str) -> None:
    text = str(message)
    if "Traceback (most recent call last)" in text:  # an error raised inside a config file
        lines = [line for line in text.splitlines() if line.strip()]
        text = f"{lines[0].split(': Error')[0]}: {lines[-1]}"
    cli.print_error(text)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # keep orbax's per-save INFO lines off the console
    try:
        check_workdir(_WORKDIR.value)  # within a second, before JAX and the dataset load
    except WorkdirError as error:
        _fail(error)
    from fedjax_cv.engine import hosts

    distributed = hosts.DistributedFlags(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    try:
        hosts.check_flags(distributed)
        if _HEARTBEAT.value < 1:
            raise ValueError(
                f"--heartbeat_timeout_s={_HEARTBEAT.value} is not allowed; must be >= 1"
            )
        if _DISTRIBUTED.value == "off" and distributed.coordinator_address is not None:
            raise ValueError(
                f"--coordinator_address={distributed.coordinator_address} is not allowed with "
                "--distributed=off; drop one of them"
            )
        if _DISTRIBUTED.value != "off":
            hosts.initialize(
                distributed,
                force=_DISTRIBUTED.value == "on",
                heartbeat_timeout_s=_HEARTBEAT.value,
            )
    except ValueError as error:
        _fail(error)
    from fedjax_cv.train import CheckpointError, TrainingError, train_and_evaluate

    try:
        record = train_and_evaluate(_CONFIG.value, _WORKDIR.value, resume_step=_RESUME_STEP.value)
    except (ValueError, FileNotFoundError, WorkdirError) as error:
        _fail(error)
    except (TrainingError, CheckpointError) as error:
        cli.print_error(error)
        sys.exit(1)
    if hosts.is_writer():
        print({k: v for k, v in record.items()})


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
