#!/usr/bin/env bash
# Train with several processes on one or more machines (torchrun).
#
#   tools/dist_train.sh CONFIG NPROC [tools/train.py options...]
#
# NPROC processes per machine (GPUs, or CPU processes on a CPU-only torch,
# which then use gloo). For several machines run the same command on each,
# with the same MASTER_ADDR and PORT and NNODES, and NODE_RANK = 0..NNODES-1.
# The arguments are checked before torchrun starts; if a worker fails, its
# own error line is printed last, after torchrun's report.
# PYTHON: the interpreter (default: the environment tools/install.sh made,
# see tools/find_python.sh).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NPROC [tools/train.py options...]" >&2
    exit 2
fi
config=$1
nproc=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch_checks.sh
. "$here/launch_checks.sh"
need_config "$config"
check_torchrun_settings "$nproc"
# shellcheck source=find_python.sh
. "$here/find_python.sh"
run_workers "$python" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$nproc" \
    "$here/train.py" "$config" --launcher pytorch "$@"
