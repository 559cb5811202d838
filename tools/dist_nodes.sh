# Sourced by dist_train.sh and dist_test.sh: the node settings of a torchrun launch, checked.
#   NNODES (default 1), NODE_RANK (0 .. NNODES-1; required when NNODES > 1), MASTER_ADDR (node 0's
#   address; required when NNODES > 1, else 127.0.0.1), PORT (default 29500), PYTHON.
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ] && [ -z "${NODE_RANK:-}" ]; then
    echo "$(basename "$0"): NNODES=$NNODES needs NODE_RANK (0 on the first node, then 1 .." \
         "NNODES-1), or two launchers would both act as node 0" >&2
    exit 2
fi
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    echo "$(basename "$0"): NNODES=$NNODES needs MASTER_ADDR, the address of the node started" \
         "with NODE_RANK=0 (the same on every node)" >&2
    exit 2
fi
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PORT=${PORT:-29500}
PYTHON=${PYTHON:-python}
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
    echo "$(basename "$0"): PORT=$PORT is not a port number (1 .. 65535)" >&2
    exit 2
fi
# torchrun's own message for a taken port is a traceback ending in EADDRINUSE
if [ "$NODE_RANK" = 0 ] && ! "$PYTHON" -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torchrun: TIME_WAIT is no obstacle
s.bind(("", int(sys.argv[1])))' "$PORT" 2>/dev/null; then
    echo "$(basename "$0"): port $PORT is in use on this machine (another distributed job?):" \
         "choose a free one, e.g. PORT=$((PORT + 1)) $(basename "$0") ..." >&2
    exit 2
fi
