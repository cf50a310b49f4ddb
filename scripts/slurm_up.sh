#!/usr/bin/env bash
# Starts a one-node Slurm cluster on this machine, for the launcher tests: munged, slurmctld and
# slurmd as root on loopback, with config, state and logs in $LOCALSGD_SLURM_DIR (default
# /tmp/localsgd-slurm). Installs Debian's slurm-wlm and munge first if they are missing (root, apt).
# Returns once `sinfo` shows the node idle. Client commands find the cluster through
#   export SLURM_CONF=$LOCALSGD_SLURM_DIR/slurm.conf
# (the tests default to that path). scripts/slurm_down.sh stops everything. Re-running restarts it.
set -euo pipefail
DIR=${LOCALSGD_SLURM_DIR:-/tmp/localsgd-slurm}
CPUS=${LOCALSGD_SLURM_CPUS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm_up: installing slurm-wlm and munge" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >&2
fi

bash "$HERE/slurm_down.sh" >/dev/null 2>&1 || true
rm -rf "$DIR"
mkdir -p "$DIR/state" "$DIR/spool"
chmod 755 "$DIR"  # munged wants its socket directory searchable by all

# munge: our own key and socket, so nothing outside $DIR is touched
dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge.key"
munged --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed"

NODE=$(hostname -s)
cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/slurm_up.sh: one node, $CPUS CPUs, everything as root on 127.0.0.1.
ClusterName=localsgd
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# no cgroups in a container: track processes by parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
# no accounting database: sacct is unavailable (submitit falls back to squeue/result files)
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# a requeued or cancelled job's processes get SIGKILL 5 s after SIGTERM
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"

for _ in $(seq 60); do
    if [ "$(sinfo -h -n "$NODE" -o %t 2>/dev/null)" = "idle" ]; then
        echo "slurm_up: node $NODE idle; export SLURM_CONF=$SLURM_CONF" >&2
        exit 0
    fi
    sleep 1
done
echo "slurm_up: node $NODE not idle after 60 s; logs in $DIR" >&2
sinfo >&2 || true
tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
exit 1
