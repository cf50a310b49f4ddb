#!/usr/bin/env bash
# Stops what scripts/slurm_up.sh started (slurmd, slurmctld, munged), by the pid files in
# $LOCALSGD_SLURM_DIR (default /tmp/localsgd-slurm). Jobs still running are killed with slurmd.
set -uo pipefail
DIR=${LOCALSGD_SLURM_DIR:-/tmp/localsgd-slurm}

stop() {  # stop NAME PIDFILE: SIGTERM, then SIGKILL after 10 s
    local name=$1 pidfile=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "slurm_down: stopped $name ($pid)" >&2
    fi
    rm -f "$pidfile"
}

if [ -f "$DIR/slurm.conf" ] && command -v scancel >/dev/null; then
    SLURM_CONF="$DIR/slurm.conf" scancel --user=root >/dev/null 2>&1 || true
fi
stop slurmd "$DIR/slurmd.pid"
stop slurmctld "$DIR/slurmctld.pid"
stop munged "$DIR/munged.pid"
exit 0
