#!/usr/bin/env bash
# Distributed testing with torchrun (PyTorch DDP through mmengine), on GPUs or CPU-only nodes.
#   tools/dist_test.sh CONFIG CHECKPOINT PROCESSES_PER_NODE [test.py args...]
# Multi-node: run it on every node with NNODES, NODE_RANK (0 .. NNODES-1) and MASTER_ADDR (the
# address of node 0, reachable from all nodes) set; PORT (default 29500) must be free on node 0.
# CPU-only nodes: each process uses OMP_NUM_THREADS threads (torchrun sets 1 when a node runs
# several processes; with one process per node, all cores unless you set it).
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
source "$(dirname "$0")/dist_nodes.sh"

PYTHONPATH="$(dirname "$0")/..${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" --nproc_per_node="$NPROC" \
    "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
