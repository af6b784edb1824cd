#!/usr/bin/env bash
# Evaluate a checkpoint with several processes (torchrun).
#
#   tools/dist_test.sh CONFIG CHECKPOINT NPROC [tools/test.py options...]
#
# Several machines: NNODES, NODE_RANK, MASTER_ADDR and PORT as for
# tools/dist_train.sh.
# The arguments are checked before torchrun starts; if a worker fails, its
# own error line is printed last, after torchrun's report.
# PYTHON: the interpreter (default: the environment tools/install.sh made,
# see tools/find_python.sh).
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NPROC [tools/test.py options...]" >&2
    exit 2
fi
config=$1
checkpoint=$2
nproc=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch_checks.sh
. "$here/launch_checks.sh"
need_config "$config"
need_checkpoint "$checkpoint"
check_torchrun_settings "$nproc"
# shellcheck source=find_python.sh
. "$here/find_python.sh"
run_workers "$python" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$nproc" \
    "$here/test.py" "$config" "$checkpoint" --launcher pytorch "$@"
