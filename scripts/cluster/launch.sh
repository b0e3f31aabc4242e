#!/usr/bin/env bash
# One stage across every node of a Slurm allocation: run once per node (srun --ntasks-per-node=1), it
# starts accelerate's launcher there with this node's rank and the job's rendezvous.
#
#   LAUNCH="srun --ntasks-per-node=1 bash scripts/cluster/launch.sh" bash scripts/ser_loop.sh
#
# ACCELERATE_CONFIG: an accelerate config file (scripts/cluster/ddp.yaml, zero3.yaml); ACCELERATE_FLAGS:
# more launcher flags; GPUS_PER_NODE (8); MASTER_ADDR and MASTER_PORT default to the allocation's first
# node and 29500.
set -euo pipefail
: "${SLURM_NNODES:?run inside a Slurm allocation, or set SLURM_NNODES and SLURM_NODEID}"
: "${SLURM_NODEID:?}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-29500}
config=(); if [[ -n ${ACCELERATE_CONFIG:-} ]]; then config=(--config_file "$ACCELERATE_CONFIG"); fi
read -r -a extra <<< "${ACCELERATE_FLAGS:-}"
exec accelerate launch "${config[@]}" "${extra[@]}" --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "$@"
