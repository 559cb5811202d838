#!/usr/bin/env bash
# Distributed testing with torchrun (PyTorch DDP through mmengine), on GPUs or CPU-only nodes.
#   tools/dist_train.sh CONFIG CHECKPOINT PROCESSES_PER_NODE [test.py args...]
# Multi-node: run it on every node with NNODES, NODE_RANK and MASTER_ADDR set (PORT optional).
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PORT=${PORT:-29500}
PYTHON=${PYTHON:-python}

PYTHONPATH="$(dirname "$0")/..${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" --nproc_per_node="$NPROC" \
    "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
