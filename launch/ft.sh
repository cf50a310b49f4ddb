#!/usr/bin/env bash
# Fault-tolerant Local SGD (torchft, `pip install -e ".[ft]"`): a Lighthouse, and replica groups that
# each restart themselves. See README, "Training through a lost worker".
#
#   launch/ft.sh lighthouse
#       The Lighthouse (one per run, on a machine every group reaches): forms the quorum of live groups
#       at every sync. LIGHTHOUSE_PORT (29510), MIN_REPLICAS (1: a single live group goes on),
#       JOIN_TIMEOUT_MS (how long a quorum waits for a heartbeating group that has not asked yet; more
#       than one round's duration: 600000), HEARTBEAT_TIMEOUT_MS (after this long without a heartbeat a
#       group counts as lost: 5000).
#
#   REPLICA_GROUP_ID=<0..K-1> NUM_REPLICA_GROUPS=K TORCHFT_LIGHTHOUSE=http://HOST:29510 \
#       launch/ft.sh group NPROC SCRIPT [ARGS...]
#       One replica group: torchrun starts NPROC processes of SCRIPT on this machine (a Lightning job
#       whose LocalSGDStrategy gets fault_tolerance=FaultTolerance.from_env(), as
#       examples/fault_tolerant.py does) and restarts the group, up to MAX_RESTARTS (100) times, when
#       one of its processes dies. The restarted group heals from a live group at their next sync.
#
#   launch/ft.sh demo K SCRIPT [ARGS...]
#       All of it on this machine: a Lighthouse on a free port and K one-process groups of SCRIPT,
#       each under its own torchrun; logs in DEMO_DIR (runs/ft_demo); the Lighthouse stops at the end.
#
# On SLURM: one job (or one array task) per group, each running `launch/ft.sh group ...` with
# REPLICA_GROUP_ID=$SLURM_ARRAY_TASK_ID, and the Lighthouse in a job of its own (or on a login node);
# `scontrol requeue` or `--requeue` brings back a group whose node was lost, and it heals the same way.
# PYTHON: the interpreter with localsgd and torchft installed (default: the project's .venv/bin/python
# if it imports localsgd, else python3 if it does; otherwise the script stops and says so).
set -euo pipefail

# sets PYTHON (once the arguments are checked: a usage mistake is said first)
need_python() {
    [ -n "${PYTHON:-}" ] && return
    local root candidate
    root=$(cd "$(dirname "$0")/.." && pwd)
    for candidate in "$root/.venv/bin/python" python3; do
        # find_spec locates torch and localsgd without importing them (seconds)
        if "$candidate" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('localsgd')))" 2>/dev/null; then
            PYTHON=$candidate
            return
        fi
    done
    echo "$0: no interpreter with localsgd installed ($root/.venv/bin/python, python3)." \
        "HINT: set PYTHON=/path/to/env/bin/python, or run bash scripts/setup.sh" >&2
    exit 2
}
usage() {
    echo "usage: $0 lighthouse | $0 group NPROC SCRIPT [ARGS...] | $0 demo K SCRIPT [ARGS...]  (see $0's header)" >&2
    exit 2
}
need_int() {
    if ! [[ ${!1} =~ ^[0-9]+$ ]] || { [ "$2" = 1 ] && [ "${!1}" -lt 1 ]; }; then
        echo "$0: $1 (${!1}) must be an integer >= $2" >&2
        exit 2
    fi
}

case "${1:-}" in
lighthouse)
    LIGHTHOUSE_PORT=${LIGHTHOUSE_PORT:-29510} MIN_REPLICAS=${MIN_REPLICAS:-1}
    JOIN_TIMEOUT_MS=${JOIN_TIMEOUT_MS:-600000} HEARTBEAT_TIMEOUT_MS=${HEARTBEAT_TIMEOUT_MS:-5000}
    for name in LIGHTHOUSE_PORT MIN_REPLICAS JOIN_TIMEOUT_MS HEARTBEAT_TIMEOUT_MS; do need_int $name 1; done
    need_python
    LIGHTHOUSE=$(dirname "$PYTHON")/torchft_lighthouse
    [ -x "$LIGHTHOUSE" ] || LIGHTHOUSE=$(command -v torchft_lighthouse || true)
    if [ -z "$LIGHTHOUSE" ]; then
        echo "$0: torchft_lighthouse is not installed. HINT: pip install -e '.[ft]'" >&2
        exit 2
    fi
    exec "$LIGHTHOUSE" --bind "[::]:$LIGHTHOUSE_PORT" --min_replicas "$MIN_REPLICAS" \
        --join_timeout_ms "$JOIN_TIMEOUT_MS" --heartbeat_timeout_ms "$HEARTBEAT_TIMEOUT_MS" --quorum_tick_ms 100
    ;;
group)
    [ $# -ge 3 ] || usage
    NPROC=$2 SCRIPT=$3
    shift 3
    need_int NPROC 1
    [ -f "$SCRIPT" ] || { echo "$0: SCRIPT ($SCRIPT) is not a file" >&2; exit 2; }
    for name in REPLICA_GROUP_ID NUM_REPLICA_GROUPS TORCHFT_LIGHTHOUSE; do
        if [ -z "${!name:-}" ]; then
            echo "$0: group: set $name (see the header of $0)" >&2
            exit 2
        fi
    done
    need_int REPLICA_GROUP_ID 0
    need_int NUM_REPLICA_GROUPS 1
    MAX_RESTARTS=${MAX_RESTARTS:-100}
    need_int MAX_RESTARTS 0
    export REPLICA_GROUP_ID NUM_REPLICA_GROUPS TORCHFT_LIGHTHOUSE
    need_python
    # a fresh store for each attempt of this group (see launch/torchrun.sh)
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
        --max-restarts="$MAX_RESTARTS" --monitor-interval=0.5 "$SCRIPT" "$@"
    ;;
demo)
    [ $# -ge 3 ] || usage
    K=$2 SCRIPT=$3
    shift 3
    need_int K 1
    need_python
    export PYTHON  # for the Lighthouse and the groups this starts
    DEMO_DIR=${DEMO_DIR:-runs/ft_demo}
    mkdir -p "$DEMO_DIR"
    PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
    LIGHTHOUSE_PORT=$PORT JOIN_TIMEOUT_MS=60000 HEARTBEAT_TIMEOUT_MS=1000 "$0" lighthouse >"$DEMO_DIR/lighthouse.log" 2>&1 &
    LIGHTHOUSE_PID=$!
    GROUP_PIDS=()
    trap 'kill "${GROUP_PIDS[@]}" "$LIGHTHOUSE_PID" 2>/dev/null || true' EXIT
    # the groups start only once the Lighthouse answers; if it dies, say why (its own output)
    for ((i = 0; ; i++)); do
        if ! kill -0 "$LIGHTHOUSE_PID" 2>/dev/null; then
            echo "$0: the Lighthouse did not start; its output ($DEMO_DIR/lighthouse.log):" >&2
            cat "$DEMO_DIR/lighthouse.log" >&2
            exit 2
        fi
        "$PYTHON" -c "import socket, sys; socket.create_connection(('localhost', int(sys.argv[1])), 1)" "$PORT" \
            2>/dev/null && break
        if [ "$i" -ge 100 ]; then
            echo "$0: the Lighthouse did not answer on port $PORT within 30 s; its output:" >&2
            cat "$DEMO_DIR/lighthouse.log" >&2
            exit 2
        fi
        sleep 0.3
    done
    export TORCHFT_LIGHTHOUSE=http://localhost:$PORT NUM_REPLICA_GROUPS=$K
    for ((g = 0; g < K; g++)); do
        REPLICA_GROUP_ID=$g "$0" group 1 "$SCRIPT" "$@" >"$DEMO_DIR/group$g.log" 2>&1 &
        GROUP_PIDS+=($!)
    done
    status=0
    for ((g = 0; g < K; g++)); do
        if wait "${GROUP_PIDS[$g]}"; then
            echo "replica group $g: finished; log $DEMO_DIR/group$g.log"
            grep -h "ended at optimizer step" "$DEMO_DIR/group$g.log" || true
        else
            echo "replica group $g: FAILED; log $DEMO_DIR/group$g.log" >&2
            status=1
        fi
    done
    exit $status
    ;;
*)
    usage
    ;;
esac
