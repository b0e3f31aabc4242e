#!/usr/bin/env bash
# One stage across every node of a Slurm allocation with DeepSpeed's own launcher: run once per node
# (srun --ntasks-per-node=1). The hostfile lists every node with GPUS_PER_NODE slots; `--no_ssh` makes
# each node start only its own processes (no pdsh or ssh between nodes), with this node's rank.
#
#   srun --ntasks-per-node=1 bash scripts/cluster/deepspeed_launch.sh sft.py ... --deepspeed sft/deepspeed_config.json
#
# HOSTFILE: written from SLURM_JOB_NODELIST when it does not exist (default ./hostfile.$SLURM_JOB_ID,
# on the shared filesystem); GPUS_PER_NODE (8); MASTER_ADDR and MASTER_PORT default to the first node
# and 29500.
set -euo pipefail
: "${SLURM_NNODES:?run inside a Slurm allocation, or set SLURM_NNODES and SLURM_NODEID}"
: "${SLURM_NODEID:?}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HOSTFILE=${HOSTFILE:-hostfile.${SLURM_JOB_ID:-local}}
if [[ ! -s $HOSTFILE ]]; then
  tmp=$(mktemp "$HOSTFILE.XXXXXX.tmp")  # a fresh name per node: no planted link is followed
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$tmp"
  mv -f "$tmp" "$HOSTFILE"  # every node writes the same content; the rename is atomic
fi
MASTER_ADDR=${MASTER_ADDR:-$(head -n 1 "$HOSTFILE" | cut -d' ' -f1)}
MASTER_PORT=${MASTER_PORT:-29500}
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"
