#!/bin/bash
# Template for submitting `localsgd fit` with sbatch + srun directly (launch/slurm.py does the
# same through submitit). Copy it, edit the #SBATCH lines for your cluster, then:
#
#   sbatch launch/sbatch.sh configs/quickstart.yaml --trainer.max_steps=1000
#
# One task per GPU (per worker process on CPU): workers = nodes x ntasks-per-node, and
# --trainer.num_nodes / --trainer.devices are set from SLURM. Lightning's SLURMEnvironment reads
# the ranks; MASTER_ADDR/MASTER_PORT come from the node list and the job id.
#
# Time limit and preemption: SLURM sends USR2 120 s before the time limit (scancel --signal=USR2
# JOBID does it by hand). localsgd.lightning.preemption.PreemptionCheckpoint then saves
# $RUN_DIR/checkpoints/last.ckpt on all ranks after the same step and rank 0 runs
# `scontrol requeue` (at most 3 times); the requeued job runs this script again, which resumes
# from that checkpoint. The callback owns the signal: Lightning's own SLURM auto-requeue (SIGUSR1,
# saving inside the signal handler) is switched off.
#
#SBATCH --job-name=localsgd
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
##SBATCH --gpus-per-node=2            # GPU nodes: uncomment, equal to --ntasks-per-node
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
##SBATCH --partition=gpu
##SBATCH --account=myproject
##SBATCH --qos=normal
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append             # a requeued run appends to the same log
#SBATCH --output=localsgd-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch launch/sbatch.sh CONFIG.yaml [localsgd fit overrides...]}
shift
# the interpreter with localsgd installed: by default the .venv of the folder sbatch ran in (the
# repository, where scripts/setup.sh made it), else python3
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x "${SLURM_SUBMIT_DIR:-.}/.venv/bin/python" ] && PYTHON=${SLURM_SUBMIT_DIR:-.}/.venv/bin/python
fi
RUN_DIR=${RUN_DIR:-runs/slurm/$SLURM_JOB_ID}   # a requeued job keeps its id, so finds its checkpoint
CHECKPOINT=$RUN_DIR/checkpoints/last.ckpt

RESUME=()
if [ -f "$CHECKPOINT" ]; then
    RESUME=(--ckpt_path="$CHECKPOINT")
fi
echo "job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}: ${RESUME[*]:-starting from scratch}"

# rendezvous variables left in the submitting shell would override SLURMEnvironment's
unset MASTER_ADDR MASTER_PORT WORLD_SIZE RANK LOCAL_RANK NODE_RANK LOCAL_WORLD_SIZE GROUP_RANK
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

srun "$PYTHON" -m localsgd.cli fit --config "$CONFIG" "$@" \
    --trainer.num_nodes="$SLURM_JOB_NUM_NODES" \
    --trainer.devices="$SLURM_NTASKS_PER_NODE" \
    --trainer.plugins+=lightning.pytorch.plugins.environments.SLURMEnvironment \
    --trainer.plugins.auto_requeue=false \
    --trainer.callbacks+=localsgd.lightning.preemption.PreemptionCheckpoint \
    --trainer.callbacks.dirpath="$RUN_DIR/checkpoints" \
    --trainer.callbacks.requeue=true \
    --trainer.callbacks.max_requeues=3 \
    "${RESUME[@]}"
