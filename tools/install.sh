#!/usr/bin/env bash
# One-command, idempotent setup: a virtual environment with torch (the
# standard build, which runs on CPU-only machines and brings triton),
# torchvision, mmengine, mmcv with compiled CPU ops, mmdet, mmsegmentation,
# mmpretrain, the test tools and mmacmix itself (editable).
#
#   bash tools/install.sh
#
# MMACMIX_VENV   where the environment goes (default: .venv)
# MMACMIX_CACHE  where the built mmcv wheel is kept between setups
#                (default: ~/.cache/mmacmix); a second setup reuses it.
# PYTHON         the interpreter to build the environment from (python3.11)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${MMACMIX_VENV:-.venv}
constraints=$PWD/requirements/constraints.txt
torch_version=$(sed -n 's/^torch=\{2,3\}//p' "$constraints")
mmcv_version=$(sed -n 's/^mmcv==//p' "$constraints")
# The compiled ops are tied to the torch they were built against.
cache=${MMACMIX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmacmix}/torch-$torch_version

[ -x "$venv/bin/python" ] || "${PYTHON:-python3.11}" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
export PIP_CONSTRAINT=$constraints

pip install -q torch torchvision triton setuptools wheel ninja

wheel=$(ls "$cache"/mmcv-"$mmcv_version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "Building mmcv $mmcv_version with CPU ops (this takes minutes)"
    mkdir -p "$cache"
    build=$(mktemp -d "$cache/build.XXXXXX")
    trap 'rm -rf "$build"' EXIT
    # No build isolation: it would fetch a newer setuptools and a CUDA torch.
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
        CFLAGS='-DNDEBUG -fwrapv -O2 -g0' \
        pip wheel -q --no-build-isolation --no-deps -w "$build" \
        "mmcv==$mmcv_version"
    built=$(ls "$build"/mmcv-*.whl)
    mv "$built" "$cache/"  # same file system: the wheel appears whole or not
    wheel=$cache/$(basename "$built")
fi

pip install -q "$wheel"
pip install -q --no-build-isolation -e '.[all,tests,docs]'
"$venv/bin/python" -c 'import mmacmix, mmcv.ops, mmdet, mmseg; print("mmacmix", mmacmix.__version__, "ready in", "'"$venv"'")'
