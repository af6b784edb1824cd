#!/usr/bin/env bash
# Evaluate a checkpoint on a Slurm cluster, one task per GPU.
#
#   tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT
#       [tools/test.py options...]
#
# Environment: GPUS (default 8), GPUS_PER_NODE (default 8), CPUS_PER_TASK
# (default 5), SRUN_ARGS, as for tools/slurm_train.sh.
# PYTHON: the interpreter (default: the environment tools/install.sh made,
# see tools/find_python.sh).
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 PARTITION JOB_NAME CONFIG CHECKPOINT [options...]" >&2
    exit 2
fi
partition=$1
job_name=$2
config=$3
checkpoint=$4
shift 4
gpus=${GPUS:-8}
gpus_per_node=${GPUS_PER_NODE:-8}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch_checks.sh
. "$here/launch_checks.sh"
need_config "$config"
need_checkpoint "$checkpoint"
need_int GPUS "$gpus" 1
need_int GPUS_PER_NODE "$gpus_per_node" 1
need_int CPUS_PER_TASK "${CPUS_PER_TASK:-5}" 1
if ! command -v srun >/dev/null; then
    echo "error: srun not found; $0 submits to a Slurm cluster." \
        "Elsewhere use tools/dist_*.sh or the Python tools." >&2
    exit 1
fi
# shellcheck source=find_python.sh
. "$here/find_python.sh"
# shellcheck disable=SC2086  # SRUN_ARGS holds several words on purpose
exec srun -p "$partition" \
    --job-name="$job_name" \
    --gres=gpu:"$gpus_per_node" \
    --ntasks="$gpus" \
    --ntasks-per-node="$gpus_per_node" \
    --cpus-per-task="${CPUS_PER_TASK:-5}" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS:-} \
    "$python" -u "$here/test.py" "$config" "$checkpoint" \
    --launcher slurm "$@"
