#!/usr/bin/env bash
#SBATCH --job-name=gptj
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# Train on a GPU cluster with SLURM: one process per node, each driving all of its GPUs,
# joined by jax.distributed with the first node as coordinator.
#
#   cd gptj && . .venv/bin/activate        # the environment srun passes on to every node
#   sbatch --nodes=4 launch/slurm_gpu.sh --config=gptj/configs/gptj_6b.py --workdir=/shared/runs/gptj6b
#
# Inside an allocation (salloc) it runs the same way: bash launch/slurm_gpu.sh [main.py flags...]
# Submit from the repository root (or set REPO). The workdir and the data must be on a
# filesystem every node sees at the same path.
#
# Environment:
#   REPO              repository root on the nodes (default: the submit directory)
#   PYTHON            interpreter (default: python, from the activated environment)
#   GPUS_PER_NODE     default: SLURM's count for the node, else 8
#   COORDINATOR_PORT  default: derived from the job id, so concurrent jobs do not collide
#
# Each process is given --coordinator_address/--num_processes/--process_id explicitly and
# JAX_LOCAL_DEVICE_IDS lists all of the node's GPUs (jax's own SLURM detection would give
# each process only the GPU numbered by its local rank, i.e. one GPU per node here).
set -euo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "slurm_gpu.sh: not inside a SLURM job; submit it with sbatch (see the header)" >&2
  exit 2
fi
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # not head: it would SIGPIPE scontrol under pipefail
COORDINATOR_PORT=${COORDINATOR_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
export JAX_LOCAL_DEVICE_IDS

cd "$REPO"
echo "gptj: $NODES node(s) x $GPUS_PER_NODE GPU(s), coordinator $COORDINATOR:$COORDINATOR_PORT"
# SLURM_PROCID must be read on each node, hence the inner single-quoted script.
srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'exec "$0" main.py --coordinator_address="$1" --num_processes="$2" --process_id="$SLURM_PROCID" "${@:3}"' \
  "$PYTHON" "$COORDINATOR:$COORDINATOR_PORT" "$NODES" "$@"
