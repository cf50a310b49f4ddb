#!/usr/bin/env bash
# Launch `localsgd fit --config CONFIG [OVERRIDES...]` with torchrun (python -m torch.distributed.run).
# torchrun starts the worker processes; Lightning sees them through TorchElasticEnvironment.
#
# One node, NPROC_PER_NODE workers (default: one per GPU, 1 without GPUs):
#   NPROC_PER_NODE=2 launch/torchrun.sh configs/quickstart.yaml --trainer.max_steps=200
#
# Several nodes: run the same command on every node.
#   c10d rendezvous (node ranks are assigned as nodes arrive; the endpoint host keeps the store):
#     NNODES=4 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 RDZV_ID=run42 launch/torchrun.sh configs/X.yaml
#   static rendezvous (you give each node its rank; node 0 is MASTER_ADDR):
#     NNODES=4 NPROC_PER_NODE=8 NODE_RANK=<0..3> MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh ...
#
# MAX_RESTARTS (default 0): after a worker fails, torchrun restarts every worker on every node, up
# to this many times. A restart runs the same command again, so it trains from step 0 unless the
# run resumes: add `--ckpt_path=last` and a ModelCheckpoint with `save_last: true` and a fixed
# `dirpath` (Lightning then resumes from dirpath/last.ckpt when it exists).
#
# Workers = NNODES x NPROC_PER_NODE; --trainer.num_nodes and --trainer.devices are set to match.
# PYTHON: the interpreter with localsgd installed (default: python3).
set -euo pipefail

if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: $0 CONFIG.yaml [localsgd fit overrides...]  (CONFIG '${1:-}' is not a file)" >&2
    exit 2
fi
CONFIG=$1
shift

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "$NPROC_PER_NODE" -ge 1 ] || NPROC_PER_NODE=1
fi
for name in NNODES NPROC_PER_NODE; do
    if ! [[ ${!name} =~ ^[1-9][0-9]*$ ]]; then
        echo "$0: $name (${!name}) must be an integer >= 1" >&2
        exit 2
    fi
done

RUN=(--nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --max-restarts="${MAX_RESTARTS:-0}")
if [ "$NNODES" -eq 1 ] && [ -z "${RDZV_ENDPOINT:-}${NODE_RANK:-}" ]; then
    RUN+=(--standalone)  # a local rendezvous on a free port
elif [ -n "${NODE_RANK:-}" ]; then
    : "${MASTER_ADDR:?static rendezvous: set MASTER_ADDR to the address of node 0}"
    RUN+=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}")
else
    : "${RDZV_ENDPOINT:?several nodes: set RDZV_ENDPOINT=host:port (or NODE_RANK and MASTER_ADDR)}"
    RUN+=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-localsgd}")
fi

# our device flags come last: the launch decides the world size
exec "$PYTHON" -m torch.distributed.run "${RUN[@]}" -m localsgd.cli fit --config "$CONFIG" "$@" \
    --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC_PER_NODE"
