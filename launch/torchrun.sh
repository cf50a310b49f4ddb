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
# MAX_RESTARTS (default 0): after a worker fails (an exception, or killed: SIGKILL, OOM), torchrun
# stops the others and restarts every worker on every node, up to this many times. For a restart to
# go on where the run stopped rather than at step 0:
#   - pass `--ckpt_path=last` and give the config a ModelCheckpoint with `save_last: true`, a fixed
#     `dirpath` (the default one lies under the logger's version_N, which each attempt increments)
#     and `every_n_train_steps: N`: a restart redoes at most N steps. Resuming is exact (bitwise) also
#     mid-round: each rank's own model, optimizer state and RNG lie in `<checkpoint>.ranks/`.
#   - on several nodes, put `dirpath` on storage every node sees: each rank writes its own file there.
#   - use one node or c10d rendezvous (RDZV_ENDPOINT): static rendezvous (NODE_RANK) cannot restart,
#     and this script refuses MAX_RESTARTS > 0 with it (see TORCH_DISABLE_SHARE_RDZV_TCP_STORE below).
# When a worker dies, the others fail at their next sync ("LocalSGD sync at optimizer step S
# failed ..."), or when it hangs instead, after the strategy's `timeout` (30 min by default; set
# --trainer.strategy.init_args.timeout=0:05:00), and torchrun then restarts them all.
#
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is set here (set it yourself if you call torchrun directly):
# c10d rendezvous hands the workers the agent's own key-value store (torch >= 2.4), and the agent
# keeps that one store across restarts (seen on torch 2.13), so the restarted workers read the dead
# ones' gloo/NCCL addresses from it and fail with "Connection refused" (gloo connectFullMesh) instead
# of starting. With it set, rank 0 of each attempt hosts a fresh store on a new port. Static
# rendezvous always shares its store.
#
# Workers = NNODES x NPROC_PER_NODE; --trainer.num_nodes and --trainer.devices are set to match.
# PYTHON: the interpreter with localsgd installed (default: the project's .venv/bin/python, made by
# scripts/setup.sh, else python3).
set -euo pipefail

if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: $0 CONFIG.yaml [localsgd fit overrides...]  (CONFIG '${1:-}' is not a file)" >&2
    exit 2
fi
CONFIG=$1
shift

if [ -z "${PYTHON:-}" ]; then
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    PYTHON=python3
    [ -x "$ROOT/.venv/bin/python" ] && PYTHON=$ROOT/.venv/bin/python
fi
NNODES=${NNODES:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "$NPROC_PER_NODE" -ge 1 ] || NPROC_PER_NODE=1
fi
MAX_RESTARTS=${MAX_RESTARTS:-0}
for name in NNODES NPROC_PER_NODE; do
    if ! [[ ${!name} =~ ^[1-9][0-9]*$ ]]; then
        echo "$0: $name (${!name}) must be an integer >= 1" >&2
        exit 2
    fi
done
if ! [[ $MAX_RESTARTS =~ ^[0-9]+$ ]]; then
    echo "$0: MAX_RESTARTS ($MAX_RESTARTS) must be an integer >= 0" >&2
    exit 2
fi

# a fresh store for each attempt (see the header); overridable, but restarts need it
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

RUN=(--nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --max-restarts="$MAX_RESTARTS")
if [ "$NNODES" -eq 1 ] && [ -z "${RDZV_ENDPOINT:-}${NODE_RANK:-}" ]; then
    RUN+=(--standalone)  # a local rendezvous on a free port
elif [ -n "${NODE_RANK:-}" ]; then
    : "${MASTER_ADDR:?static rendezvous: set MASTER_ADDR to the address of node 0}"
    if [ "$MAX_RESTARTS" -gt 0 ]; then
        echo "$0: MAX_RESTARTS ($MAX_RESTARTS) needs c10d rendezvous: static rendezvous (NODE_RANK) keeps one" \
            "store for all attempts, so restarted workers would find the dead ones' addresses in it." \
            "HINT: unset NODE_RANK and set RDZV_ENDPOINT=$MASTER_ADDR:${MASTER_PORT:-29500}" >&2
        exit 2
    fi
    RUN+=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}")
else
    : "${RDZV_ENDPOINT:?several nodes: set RDZV_ENDPOINT=host:port (or NODE_RANK and MASTER_ADDR)}"
    RUN+=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-localsgd}")
fi

# The workers' stderr passes through a filter that holds back their one-line errors
# ("localsgd fit: error: ..."; rank 0 prints the mistakes every rank makes, once): a failed launch
# ends with the first of them as its last line (exit code 2), after torchrun's report of the failed
# processes.
# LOCALSGD_DEBUG=1 shows every rank's traceback instead.
ERROR_LINE='^localsgd( [a-z]+)?: error: '
LOG=$(mktemp "${TMPDIR:-/tmp}/localsgd-torchrun.XXXXXX")
trap 'rm -f "$LOG"' EXIT
exec 3> >(tee "$LOG" | grep -Ev --line-buffered "$ERROR_LINE" >&2)
FILTER=$!
# our device flags come last: the launch decides the world size
"$PYTHON" -m torch.distributed.run "${RUN[@]}" -m localsgd.cli fit --config "$CONFIG" "$@" \
    --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC_PER_NODE" 2>&3 &
TORCHRUN=$!
exec 3>&-
# torchrun runs in the background so that a signal to this script reaches it (it stops the workers)
trap 'kill -TERM "$TORCHRUN" 2>/dev/null || true' TERM INT HUP
status=0
wait "$TORCHRUN" || status=$?
while kill -0 "$TORCHRUN" 2>/dev/null; do  # a signal interrupted the wait
    status=0
    wait "$TORCHRUN" || status=$?
done
wait "$FILTER" 2>/dev/null || true  # its last lines come before the summary
if [ "$status" -ne 0 ]; then
    line=$(grep -Em1 "$ERROR_LINE" "$LOG" || true)
    if [ -n "$line" ]; then
        echo "$line" >&2
        exit 2  # a mistake in the config or flags, as `localsgd fit` says it
    fi
    echo "$0: torchrun failed (exit $status); the lines above name the failed workers," \
        "and LOCALSGD_DEBUG=1 shows their tracebacks" >&2
else
    grep -E "$ERROR_LINE" "$LOG" >&2 || true  # from an attempt that torchrun restarted
fi
exit "$status"
