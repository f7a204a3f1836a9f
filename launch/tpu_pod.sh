#!/usr/bin/env bash
# Run the same latro_jax command on every worker of an EXISTING Cloud TPU VM slice.
# It creates nothing: the slice, its disk and the code/venv on it must already exist.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- --config=configs/latro_gsm8k_phi35.py \
#       --workdir=gs://bucket/runs/phi35 --config.model.path=/data/Phi-3.5-mini-instruct
#
# REMOTE_DIR (default ~/latro_jax) is the checkout on the workers; PYTHON (default python3).
# Each worker runs `python -m latro_jax.main --multi_process ...`; jax.distributed.initialize()
# finds the other workers through the TPU metadata. Logs of worker 0 stream here.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- <latro_jax.main flags>" >&2; exit 2
fi
name=$1; zone=$2; shift 2
project_flag=()
if [[ $1 != "--" ]]; then project_flag=(--project="$1"); shift; fi
[[ $1 == "--" ]] || { echo "expected -- before the latro_jax.main flags" >&2; exit 2; }
shift
remote_dir=${REMOTE_DIR:-'~/latro_jax'}
python=${PYTHON:-python3}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" "${project_flag[@]}" --worker=all \
  --command="cd $remote_dir && $python -m latro_jax.main --multi_process$args"
