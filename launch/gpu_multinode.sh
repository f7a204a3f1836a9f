#!/usr/bin/env bash
# Start latro_jax on this node of a multi-node GPU job (run it once per node, e.g. from SLURM:
# `srun --ntasks-per-node=1 launch/gpu_multinode.sh --config=... --workdir=...`).
#
# Environment: COORDINATOR (host:port of node 0), NUM_NODES, NODE_RANK. Under SLURM they default
# from SLURM_* variables (node 0 of SLURM_JOB_NODELIST, port 12355). One process per node drives
# all of its GPUs; jax.distributed.initialize() joins the nodes.
set -euo pipefail
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  : "${COORDINATOR:=$first:12355}" "${NUM_NODES:=$SLURM_JOB_NUM_NODES}" "${NODE_RANK:=$SLURM_NODEID}"
fi
: "${COORDINATOR:?set COORDINATOR=host:port of node 0}" "${NUM_NODES:?set NUM_NODES}" "${NODE_RANK:?set NODE_RANK}"
export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_NODES JAX_PROCESS_ID=$NODE_RANK  # read by main --multi_process
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m latro_jax.main --multi_process "$@"
