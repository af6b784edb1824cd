# Sourced by the launchers (tools/dist_*.sh, tools/slurm_*.sh): sets
# $python, the interpreter that runs the tools.
#
# PYTHON         use this interpreter
# MMACMIX_VENV   otherwise, the environment tools/install.sh made (default:
#                .venv in the repository), if it exists; else python on PATH
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MMACMIX_VENV:-.venv}
[[ $venv == /* ]] || venv=$repo/$venv
if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON
elif [ -x "$venv/bin/python" ]; then
    python=$venv/bin/python
else
    python=python
fi
