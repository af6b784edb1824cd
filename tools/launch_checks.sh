# Sourced by the launchers (tools/dist_*.sh, tools/slurm_*.sh): argument
# checks that print one line, `error: ...`, and exit before anything
# starts, and run_workers, which runs torchrun so that a failing worker's
# own error line is the last thing printed.
#
# Exit status: 2 for a malformed value (as the Python tools' argparse), 1
# for a file that is not there (as the tools' own checks).

fail() {  # fail STATUS MESSAGE...
    local status=$1
    shift
    echo "error: $*" >&2
    exit "$status"
}

# need_int NAME VALUE LEAST [MOST]: VALUE is a whole number in the range.
need_int() {
    local name=$1 value=$2 least=$3 most=${4:-}
    local range="an integer of at least $least"
    [ "$least" = 1 ] && [ -z "$most" ] && range='a positive integer'
    [ -n "$most" ] && range="an integer from $least to $most"
    # 10# reads 08 as eight, not as a bad octal number.
    if ! [[ $value =~ ^[0-9]{1,9}$ ]] || ((10#$value < least)) ||
        { [ -n "$most" ] && ((10#$value > most)); }; then
        fail 2 "$name must be $range, got '$value'"
    fi
}

# need_config PATH: the config file exists (the tools read it on start).
need_config() {
    if [ -d "$1" ]; then
        fail 1 "config '$1' is a folder; expected a config file (.py)"
    elif [ ! -f "$1" ]; then
        fail 1 "config '$1' does not exist"
    fi
}

# need_checkpoint PATH: a local checkpoint exists (URLs are not checked).
need_checkpoint() {
    if [[ $1 == *://* ]]; then
        return 0
    elif [ -d "$1" ]; then
        fail 1 "checkpoint '$1' is a folder; expected a checkpoint file"
    elif [ ! -f "$1" ]; then
        fail 1 "checkpoint '$1' does not exist"
    fi
}

# check_torchrun_settings NPROC: the per-machine process count and the
# NNODES, NODE_RANK and PORT settings of tools/dist_*.sh.
check_torchrun_settings() {
    need_int 'NPROC (processes per machine)' "$1" 1
    need_int NNODES "${NNODES:-1}" 1
    local nnodes=$((10#${NNODES:-1}))
    need_int "NODE_RANK (with NNODES=$nnodes)" "${NODE_RANK:-0}" 0 \
        $((nnodes - 1))
    need_int PORT "${PORT:-29500}" 1 65535
}

# run_workers COMMAND...: runs COMMAND (torchrun) and returns its status.
# Each worker that fails writes its own error line into a private folder
# (MMACMIX_WORKER_ERRORS, see mmacmix/cli.py); after torchrun's report of
# the failure, the line of the worker that failed first is printed last.
run_workers() {
    local errors pid status=0 first
    errors=$(mktemp -d "${TMPDIR:-/tmp}/mmacmix-launch.XXXXXX")
    MMACMIX_WORKER_ERRORS=$errors "$@" <&0 &
    pid=$!
    # Stopping the launcher stops torchrun, which stops its workers.
    trap 'kill -TERM "$pid" 2>/dev/null' INT TERM HUP
    wait "$pid" || status=$?
    while kill -0 "$pid" 2>/dev/null; do  # a forwarded signal woke wait
        status=0
        wait "$pid" || status=$?
    done
    trap - INT TERM HUP
    if [ "$status" -ne 0 ]; then
        first=$(ls -1tr "$errors")
        first=${first%%$'\n'*}
        [ -z "$first" ] || cat "$errors/$first" >&2
    fi
    rm -rf "$errors"
    return "$status"
}
