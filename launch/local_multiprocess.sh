#!/usr/bin/env bash
# One run as NUM_PROCESSES processes on this machine, each with DEVICES_PER_PROCESS CPU
# devices, joined by jax.distributed over a coordinator on 127.0.0.1 (the way the tests run
# a multi-process job without a cluster):
#
#   bash launch/local_multiprocess.sh 2 4 --config=configs/shapes_fedavg.py --workdir=DIR
#
# Every process runs launch/train.py with the flags given and one global mesh of
# NUM_PROCESSES x DEVICES_PER_PROCESS devices; process 0 writes metrics, config and plots, and
# its output comes through as is, the others' prefixed with "[process i]" on stderr. When one
# process fails, the others are stopped (SIGTERM, then SIGKILL after
# FEDJAX_CV_STOP_GRACE_S=10 seconds) and the script exits with the failed process's status
# after one last line "error: process i of N exited with status s ...". The same command on
# the same DIR resumes from the last finished checkpoint. XLA_FLAGS from the environment are
# passed on after the device count.
set -u

usage() {
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [launch/train.py flags]" >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
num_processes=$1
devices=$2
shift 2
if ! [[ $num_processes =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_PROCESSES=$num_processes is not allowed; must be an integer >= 1" >&2
  exit 2
fi
if ! [[ $devices =~ ^[1-9][0-9]*$ ]]; then
  echo "error: DEVICES_PER_PROCESS=$devices is not allowed; must be an integer >= 1" >&2
  exit 2
fi
for arg in "$@"; do
  case $arg in
    --coordinator_address* | --num_processes* | --process_id*)
      echo "error: $arg is not allowed here; $0 sets the coordinator and process ids" >&2
      exit 2
      ;;
  esac
done

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
grace=${FEDJAX_CV_STOP_GRACE_S:-10}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pids=()
relays=()  # the sed that prefixes each other process's lines
for ((i = 0; i < num_processes; i++)); do
  command=(
    env JAX_PLATFORMS=cpu
    "XLA_FLAGS=--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}"
    "$python" "$here/train.py" "$@"
    "--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes" "--process_id=$i"
  )
  if ((i == 0)); then
    "${command[@]}" &
  else
    exec {relay}> >(sed -u "s/^/[process $i] /" >&2)
    relays+=($!)
    "${command[@]}" >&"$relay" 2>&1 &
    exec {relay}>&-
  fi
  pids+=($!)
done

flush_relays() {  # the prefixed output of processes 1.. has all come through (at most 5 s)
  local pid t
  for pid in "${relays[@]}"; do
    for ((t = 0; t < 50; t++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

wait_all() {  # until every process has ended, at most $grace s; fails when some are left
  local pid t alive
  for ((t = 0; t < grace * 10; t++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  return 1
}

stop_all() {  # SIGTERM to every process still running, SIGKILL to those left after $grace s
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  wait_all && return
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

status=0
declare -A running  # pid -> process index
for ((i = 0; i < num_processes; i++)); do running[${pids[i]}]=$i; done
while ((${#running[@]} > 0)); do
  finished=""
  wait -n -p finished "${!running[@]}"
  code=$?
  [[ -n ${finished:-} ]] || break
  index=${running[$finished]}
  unset "running[$finished]"
  if ((code != 0)); then
    # Bad input (status 2) stops every process by itself: let each say why first.
    ((code == 2)) && wait_all
    stop_all
    wait
    flush_relays  # the others' last words come before this line
    why="the same command resumes from the last finished checkpoint"
    ((code == 2)) && why="bad input, said above; nothing was written"
    echo "error: process $index of $num_processes exited with status $code; stopped the" \
      "others ($why)" >&2
    exit "$code"
  fi
done
wait
flush_relays
exit "$status"
