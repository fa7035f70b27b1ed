#!/bin/bash
# Multi-node GPU training under SLURM, one process per GPU.
#
#   sbatch --nodes=2 launch/slurm.sh --config=configs/imagenet.py --workdir=/shared/runs/r50
#
# Each task runs `python -m alignmix_jax.main` with the arguments given to sbatch after the
# script. JAX reads the coordinator (the first node), the process count and each process's
# index from SLURM's environment, so no --coordinator_address is needed. The workdir must be on
# a filesystem every node sees: every process takes part in saving and restoring checkpoints.
#
# One process per node instead (each driving all of its node's GPUs): set
# --ntasks-per-node=1 and drop --gpus-per-task.
#
# Time limit and preemption: SLURM sends every task SIGTERM 5 minutes before the time limit
# (--signal) and on preemption. The run then finishes its step, saves it and exits with status
# 75 (alignmix_jax/runtime/preemption.py); this script then puts the job back in the queue, and the
# requeued job resumes from the workdir. The 5 minutes must cover a step, an evaluation (the
# step may end an epoch) and a save.

#SBATCH --job-name=alignmix
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=12
#SBATCH --time=72:00:00
#SBATCH --output=alignmix-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=TERM@300
#SBATCH --requeue

set -euo pipefail
cd "${SLURM_SUBMIT_DIR}"
. .venv/bin/activate

# Let XLA overlap the gradient all-reduce with the backward pass; see launch/README.md.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# JAX preallocates 75% of each GPU; TensorFlow (data only) is kept off the GPUs by main.py.

status=0
srun --kill-on-bad-exit=1 python -m alignmix_jax.main "$@" || status=$?
if [ "${status}" -eq 75 ]; then  # stopped on SIGTERM after saving: resume in a new job
    scontrol requeue "${SLURM_JOB_ID}"
fi
exit "${status}"
