#!/usr/bin/env bash
# One fedjax_cv run on every worker of a Cloud TPU VM pod slice (v4-32, v5p-64, ...): the same
# command on all workers, joined by jax.distributed, which finds the workers itself.
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE --config=configs/shapes_fedavg.py --workdir=/mnt/shared/x
#
# The repository must be checked out and installed at ~/fedjax_cv on every worker
# (FEDJAX_CV_DIR to change it), e.g. with
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#     --command="git clone REPO ~/fedjax_cv && pip install -e ~/fedjax_cv 'jax[tpu]'"
# and the workdir must be on a file system all workers see (Filestore or another NFS mount):
# each worker writes its checkpoint shards, worker 0 the metrics and plots. Running the same
# command again resumes from the last finished checkpoint.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [launch/train.py flags]" >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2
dir=${FEDJAX_CV_DIR:-"~/fedjax_cv"}  # "~" expands on the workers
flags=$(printf '%q ' "$@")
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd $dir && python launch/train.py --distributed=on $flags"
