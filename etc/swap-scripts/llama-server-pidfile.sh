#!/bin/sh
# llama-server-pidfile.sh: swap models by restarting one llama-server process.
#
# Usage (Jano's [swap] command):
#     command = ["etc/swap-scripts/llama-server-pidfile.sh", "{model}", "{previous}"]
#
# Contract: see etc/swap-model.example.sh.  $1 is the model to load (JANO_MODEL
# when missing); the previous model does not matter here, since the pid file
# says what runs.  Exit 0 once the new llama-server is running; Jano then
# waits for its /health to answer 200 (503 while the model loads).
#
# Unload ($1 empty, or JANO_ACTION=unload; the same [swap] command serves):
# step 1 only: stop the llama-server named by the pid file, whatever model it
# serves, wait until it has exited (its GPU memory is then free), start
# nothing.  A missing or stale pid file means nothing runs: exit 0.  With no
# previous model either (nothing known to be loaded) it does the same, and
# exits 0 even if the server cannot be stopped (a warning).
#
# What it does:
#   1. If the pid file names a running llama-server, send it SIGTERM, wait
#      for it to exit (SIGKILL after LLAMA_STOP_TIMEOUT seconds).
#   2. Start "$LLAMA_SERVER --model $LLAMA_MODELS_DIR/<model>.gguf <args>"
#      where <args> are read from $LLAMA_ARGS_DIR/<model>.args, detached in
#      its own session with its output appended to $LLAMA_LOG_DIR/<model>.log.
#   3. Write the new pid to the pid file, and check that the process is still
#      alive LLAMA_START_CHECK seconds later (a bad argument or a missing
#      library makes llama-server exit at once; its last log line is then
#      printed as this script's error).
#
# The args file holds llama-server arguments separated by spaces or newlines;
# "#" starts a comment; no quoting (an argument cannot contain spaces), no
# globbing.  It must include the port that matches the model's upstream in
# Jano's config.  Example, qwen2.5-7b.args:
#
#     --host 127.0.0.1 --port 8080
#     --ctx-size 8192 --n-gpu-layers 99   # all layers on the GPU
#
# A model with no args file gets no extra arguments.
#
# Settings (environment):
#     LLAMA_SERVER         llama-server binary           (default: llama-server)
#     LLAMA_MODELS_DIR     where <model>.gguf files are  (default: /var/lib/llama/models)
#     LLAMA_ARGS_DIR       where <model>.args files are  (default: $LLAMA_MODELS_DIR)
#     LLAMA_PID_FILE       the pid file                  (default: ${XDG_RUNTIME_DIR:-/tmp}/jano-llama-server-$JANO_GROUP.pid)
#     LLAMA_LOG_DIR        llama-server logs             (default: ${XDG_STATE_HOME:-$HOME/.local/state}/jano)
#     LLAMA_STOP_TIMEOUT   seconds before SIGKILL        (default: 30)
#     LLAMA_START_CHECK    seconds to watch the start    (default: 1)

set -eu

model=${1:-${JANO_MODEL:-}}
previous=${2-${JANO_PREVIOUS_MODEL:-}}
LLAMA_SERVER=${LLAMA_SERVER:-llama-server}
LLAMA_MODELS_DIR=${LLAMA_MODELS_DIR:-/var/lib/llama/models}
LLAMA_ARGS_DIR=${LLAMA_ARGS_DIR:-$LLAMA_MODELS_DIR}
LLAMA_PID_FILE=${LLAMA_PID_FILE:-${XDG_RUNTIME_DIR:-/tmp}/jano-llama-server-${JANO_GROUP:-default}.pid}
LLAMA_LOG_DIR=${LLAMA_LOG_DIR:-${XDG_STATE_HOME:-${HOME:-/tmp}/.local/state}/jano}
LLAMA_STOP_TIMEOUT=${LLAMA_STOP_TIMEOUT:-30}
LLAMA_START_CHECK=${LLAMA_START_CHECK:-1}

# An unload: JANO_ACTION=unload, or an empty model argument.  The model to
# unload is $2, else JANO_PREVIOUS_MODEL (else $1, for a "[swap] unload"
# command that passes only "{model}"); only the messages use it.
unload=
if [ "${JANO_ACTION:-}" = unload ] || { [ -z "$model" ] && [ $# -gt 0 ]; }; then
    unload=yes
    previous=${previous:-${JANO_PREVIOUS_MODEL:-$model}}
    model=
elif [ -z "$model" ]; then
    echo "usage: $0 MODEL [PREVIOUS]  (to unload: $0 '' PREVIOUS)" >&2
    exit 2
fi

# Is process $1 alive?  A zombie (exited, not yet reaped: common in
# containers without an init that reaps) counts as gone.
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [ -r "/proc/$1/stat" ] || return 0
    state=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    [ "$state" != Z ]
}

# Is $1 a live process that is (probably) ours?  Guards against a stale pid
# file whose pid now belongs to something else.
is_llama_server() {
    alive "$1" || return 1
    [ -r "/proc/$1/cmdline" ] || return 0   # no /proc: trust the pid file
    tr '\000' ' ' <"/proc/$1/cmdline" | grep -q -- "$(basename "$LLAMA_SERVER")"
}

# Stop the server named by the pid file, if it runs, and remove the pid file.
# Sets stopped=yes when it stopped one; returns 1 (the pid file kept) when
# the server would not die.
stop_server() {
    [ -f "$LLAMA_PID_FILE" ] || return 0
    old=$(cat "$LLAMA_PID_FILE" 2>/dev/null || true)
    case $old in
        ''|*[!0-9]*) old= ;;
    esac
    if [ -n "$old" ] && is_llama_server "$old"; then
        echo "stopping llama-server pid $old"
        kill -TERM "$old" 2>/dev/null || true
        waited=0
        # Poll in 0.1 s steps (sleep with a fraction works with GNU, busybox
        # and BSD sleep).
        while alive "$old"; do
            if [ "$waited" -ge $((LLAMA_STOP_TIMEOUT * 10)) ]; then
                echo "llama-server pid $old ignored SIGTERM for ${LLAMA_STOP_TIMEOUT}s, killing it"
                kill -KILL "$old" 2>/dev/null || true
                sleep 0.2
                break
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
        if is_llama_server "$old"; then
            echo "cannot stop llama-server pid $old" >&2
            return 1
        fi
        stopped=yes
    fi
    rm -f "$LLAMA_PID_FILE"
}

# Unload: stop the server, start nothing.
if [ -n "$unload" ]; then
    stopped=
    if [ -z "$previous" ]; then
        echo "unload: nothing known to be loaded; stopping the server in $LLAMA_PID_FILE, if any"
        stop_server || echo "warning: the llama-server in $LLAMA_PID_FILE is still running" >&2
        exit 0
    fi
    echo "unloading $previous"
    stop_server || {
        echo "cannot unload $previous: could not stop the llama-server in $LLAMA_PID_FILE" >&2
        exit 1
    }
    if [ -n "$stopped" ]; then
        echo "$previous unloaded (llama-server pid $old stopped)"
    else
        echo "no llama-server running (pid file: $LLAMA_PID_FILE): $previous is not loaded"
    fi
    exit 0
fi

case $model in
    */*|.*) echo "refusing model name '$model' (it would leave $LLAMA_MODELS_DIR)" >&2; exit 2 ;;
esac

gguf=$LLAMA_MODELS_DIR/$model.gguf
args_file=$LLAMA_ARGS_DIR/$model.args
log=$LLAMA_LOG_DIR/$model.log

# Check the new model before stopping the old one: a typo should not leave
# the GPU empty.
if [ ! -r "$gguf" ]; then
    echo "cannot find $gguf" >&2
    exit 1
fi
if ! command -v "$LLAMA_SERVER" >/dev/null 2>&1; then
    echo "cannot find the llama-server binary '$LLAMA_SERVER' (set LLAMA_SERVER)" >&2
    exit 1
fi

# 1. Stop the running server, if any.
stop_server || exit 1

# 2. Start the new one.
extra=
if [ -f "$args_file" ]; then
    extra=$(sed -e 's/#.*//' "$args_file")
fi
mkdir -p "$LLAMA_LOG_DIR"
set -f          # no globbing while splitting the args file into words
# shellcheck disable=SC2086
echo "starting $LLAMA_SERVER --model $gguf" $extra
echo "--- $(date) jano swap to $model" >>"$log"
# setsid: the server gets its own session, so killing this script's process
# group (Jano's timeout) never reaches it.  In a non-interactive shell a
# background job is not a group leader, so setsid execs in place and $! is
# the server's own pid.  Its output goes to the log, never to Jano's pipes.
# shellcheck disable=SC2086
if command -v setsid >/dev/null 2>&1; then
    setsid "$LLAMA_SERVER" --model "$gguf" $extra </dev/null >>"$log" 2>&1 &
else
    nohup "$LLAMA_SERVER" --model "$gguf" $extra </dev/null >>"$log" 2>&1 &
fi
pid=$!
set +f

# 3. Record it (write then rename, so a reader never sees half a pid).
printf '%s\n' "$pid" >"$LLAMA_PID_FILE.tmp"
mv -f "$LLAMA_PID_FILE.tmp" "$LLAMA_PID_FILE"

sleep "$LLAMA_START_CHECK"
if ! alive "$pid"; then
    rm -f "$LLAMA_PID_FILE"
    echo "llama-server for $model exited at once; last log line:" >&2
    tail -n 1 "$log" >&2
    exit 1
fi

echo "llama-server for $model running as pid $pid (log: $log)"
exit 0
