#!/usr/bin/env bash
# The GPU checks in one run: the CUDA tests, then the CUDA benchmark tables
# (the ACmix op in float32 and under float16 autocast, X-volution, whole
# backbones) and the scaled_dot_product_attention backends that ACmix-Swin's
# window attention can use. Each part's output goes to its own file in OUT_DIR.
#
#   bash tools/analysis/cuda_check.sh [OUT_DIR]    (default: $OUT, else
#                                                   work_dirs/cuda_check)
#
# For a machine with torch, triton and torchvision but without mmengine and
# mmcv (the compiled ops are not needed: no detector head runs), put their
# pure-Python wheels in .whl/ first, on a machine with the setup's
# environment:
#
#   .venv/bin/python -m pip download --no-deps -d .whl mmengine==0.10.7 \
#       addict yapf termcolor rich markdown-it-py mdurl pygments
#   MMCV_WITH_OPS=0 .venv/bin/python -m pip wheel --no-deps \
#       --no-build-isolation -w .whl mmcv==2.1.0
#
# They are installed into a temporary folder on PYTHONPATH, with the
# checkout itself, so nothing is installed into the machine's Python.
# PYTHON selects the interpreter (default: .venv/bin/python if present,
# else python3).
set -uo pipefail
cd "$(dirname "$0")/../.."

out=${1:-${OUT:-work_dirs/cuda_check}}
mkdir -p "$out"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    deps=$(mktemp -d)
    trap 'rm -rf "$deps"' EXIT
    "$PYTHON" -m pip install -q --no-deps --target "$deps" .whl/*.whl
    export PYTHONPATH="$deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
run() {  # run NAME COMMAND...: output to OUT_DIR/NAME.txt, status kept
    local name=$1
    shift
    echo "== $name: $*"
    if ! "$@" >"$out/$name.txt" 2>&1; then
        echo "   failed, see $out/$name.txt"
        status=1
    fi
    tail -n 25 "$out/$name.txt"
}

run environment "$PYTHON" -c '
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
'
run tests "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_ops/test_local_attention_triton.py tests/test_ops/test_local_attention.py \
    tests/test_ops/test_autocast.py -k "cuda or half_precision"
run sdpa_backends "$PYTHON" - <<'EOF'
# Which fused backends accept ACmix-Swin-T's window attention (4-d inputs
# and an additive bias), forward + backward under float16 autocast.
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmacmix.models import ACmixSwinTransformer

model = ACmixSwinTransformer(arch='tiny').cuda()
x = torch.randn(2, 3, 800, 1216, device='cuda')
for backend in (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
):
    try:
        with sdpa_kernel([backend]), torch.autocast('cuda', torch.float16):
            outs = model(x)
        sum(o.float().sum() for o in outs).backward()
        print(f'{backend.name}: runs')
    except RuntimeError as error:
        print(f'{backend.name}: refused ({str(error).splitlines()[0]})')
EOF
bench=tools/analysis/benchmark_ops.py
run ops_float32 "$PYTHON" "$bench" --device cuda --tables acmix attention
run ops_float16 "$PYTHON" "$bench" --device cuda --tables acmix attention \
    --autocast float16
run xvolution_float32 "$PYTHON" "$bench" --device cuda --tables xvolution
run backbones_float32 "$PYTHON" "$bench" --device cuda --tables --backbone
run backbones_float16 "$PYTHON" "$bench" --device cuda --tables --backbone \
    --autocast float16
exit $status
