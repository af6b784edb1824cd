#!/usr/bin/env bash
# Assembles the wheels that the GPU check needs on the GPU machine, which
# has Python 3.12, torch, triton, torchvision, numpy, pytest, hypothesis,
# matplotlib and opencv-python-headless, but neither mmengine nor mmcv,
# and no network. Run here (with network), before borrowing the GPU:
#
#   bash tools/analysis/cuda_wheels.sh [DIR]       (default: .whl)
#
# Pure-Python and compiled wheels for CPython 3.12 on x86-64 Linux come
# from PyPI through `pip download --python-version 3.12
# --only-binary=:all:`: mmengine and its small dependencies (PyYAML among
# them), and mmcv as mmcv-lite, OpenMMLab's pure-Python wheel of the same
# mmcv without its compiled ops (which no part of the check needs; the
# models need mmcv.cnn). Versions are
# those of this checkout's environment (requirements/constraints.txt and
# `pip freeze`). The set is then checked (cuda_check.py --check-wheels:
# tags, every requirement met, imports in a clean interpreter) before it
# replaces DIR, so DIR is either the old folder or a complete new one.
# DIR is ignored by git; the device tool's `carry` takes it along.
#
# PYTHON selects the interpreter (default: .venv/bin/python if present,
# else python3).
set -euo pipefail
cd "$(dirname "$0")/../.."

dir=${1:-.whl}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
constraints=requirements/constraints.txt
mmengine=$(sed -n 's/^mmengine==//p' "$constraints")
mmcv=$(sed -n 's/^mmcv==//p' "$constraints")
# mmengine's and mmcv's small dependencies, at this environment's versions
# where it has them.
small="addict yapf termcolor rich markdown-it-py mdurl pygments pyyaml
platformdirs"
frozen=$("$PYTHON" -m pip freeze 2>/dev/null || true)
pins=()
for name in $small; do
    pin=$(printf '%s\n' "$frozen" | grep -i -m 1 "^${name}==" || true)
    pins+=("${pin:-$name}")
done

parent=$(dirname "$dir")
mkdir -p "$parent"
tmp=$(mktemp -d "$parent/.$(basename "$dir").partial.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "downloading for Python 3.12: mmengine==$mmengine mmcv-lite==$mmcv ${pins[*]}"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$tmp" \
    "mmengine==$mmengine" "mmcv-lite==$mmcv" "${pins[@]}"

"$PYTHON" tools/analysis/cuda_check.py --check-wheels "$tmp"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
du -sh "$dir"
