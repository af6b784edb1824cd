#!/usr/bin/env bash
# The GPU check in at most two calls of the device tool, each one process
# (tools/analysis/cuda_check.py) that stops itself within its time budget:
#
#   bash tools/analysis/cuda_check.sh --phase ops OUT_DIR
#       preflight (stops within seconds if anything is missing), the CUDA
#       tests, the SDPA backends of ACmix-Swin, the op tables (float32 and
#       float16 tensors) and X-volution
#   bash tools/analysis/cuda_check.sh --phase backbones OUT_DIR
#       preflight, then whole backbones in float32 and float16 autocast
#   bash tools/analysis/cuda_check.sh [--phase all] OUT_DIR
#       both, one after the other
#   bash tools/analysis/cuda_check.sh --dry-run OUT_DIR
#       both phases on the CPU: the same code, the smallest shapes, one
#       pass (CI runs this)
#
# Each phase writes OUT_DIR/cuda_check.json (every part's result, added as
# it finishes), OUT_DIR/cuda_check.md (markdown tables), and the tests'
# OUT_DIR/tests.xml. OUT_DIR defaults to $OUT, else work_dirs/cuda_check.
#
# The GPU machine has no mmengine or mmcv: make their wheels first, here,
# with `bash tools/analysis/cuda_wheels.sh` (into .whl/, ignored by git,
# carried along by the device tool). They are unpacked into a temporary
# folder; the checkout and that folder are the only entries of
# PYTHONPATH, so nothing is installed into the machine's Python. mmdet,
# mmseg and mmpretrain are blocked from import in every mode.
#
# PYTHON selects the interpreter (default: .venv/bin/python if present,
# else python3). CUDA_CHECK_BUDGET_S is each phase's budget in seconds
# (default 200; the phase skips, and records as skipped, what would start
# later); a hard timeout stops it 60 s after that.
set -uo pipefail
cd "$(dirname "$0")/../.."

phases=(ops backbones)
dry=()
out=
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry=(--dry-run) ;;
        --phase)
            case ${2:-} in
                ops | backbones) phases=("$2") ;;
                all) phases=(ops backbones) ;;
                *)
                    echo "cuda_check.sh: --phase must be ops, backbones or all, got '${2:-}'" >&2
                    exit 2
                    ;;
            esac
            shift
            ;;
        -*)
            echo "cuda_check.sh: unknown option '$1' (accepted: --dry-run, --phase ops|backbones|all)" >&2
            exit 2
            ;;
        *) out=$1 ;;
    esac
    shift
done
out=${out:-${OUT:-work_dirs/cuda_check}}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
budget=${CUDA_CHECK_BUDGET_S:-200}
mkdir -p "$out" || exit 2

# A clean Python path: the checkout (not an installed mmacmix) and the
# carried wheels, nothing inherited.
path=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    deps=$(mktemp -d)
    trap 'rm -rf "$deps"' EXIT
    for wheel in .whl/*.whl; do
        "$PYTHON" -m zipfile -e "$wheel" "$deps" || exit 2
    done
    path=$PWD:$deps
fi

status=0
for phase in "${phases[@]}"; do
    echo "== phase $phase (budget ${budget} s)"
    PYTHONPATH=$path timeout --kill-after=10 $((budget + 60)) \
        "$PYTHON" tools/analysis/cuda_check.py --phase "$phase" \
        --budget-s "$budget" "${dry[@]}" "$out"
    code=$?
    echo "== phase $phase: exit $code"
    [ $code -eq 2 ] && exit 2  # the preflight failed: nothing else can run
    [ $code -ne 0 ] && status=1
done
[ -f "$out/cuda_check.md" ] && cat "$out/cuda_check.md"
exit $status
