#!/bin/sh
# swap-model.example.sh: the skeleton of a Jano swap script, and its contract.
#
# Jano holds one model per swap group (one GPU).  When a request needs another
# model of the same group, Jano runs the swap script configured in its TOML:
#
#     [swap]
#     command = ["etc/swap-model.sh", "{model}", "{previous}"]
#     # unload = ["etc/unload-model.sh", "{model}"]   # optional, see "unload"
#
# and, to unload an idle model without loading another, the same script with
# an empty "{model}" (or the [swap] unload command, when there is one).
#
# THE CONTRACT
#
#   argv         The [swap] command list, with "{model}" (the model to load)
#                and "{previous}" (the model to unload) replaced in every
#                element.  "{previous}" becomes the empty string when Jano does
#                not know what is loaded (at start-up, or after a failed swap):
#                then unload whatever of yours may be running.  A relative
#                program path is relative to Jano's working directory.
#
#   environment  Jano's own environment, plus:
#                  JANO_ACTION          "swap" (for an unload: "unload", below)
#                  JANO_MODEL           the model to load (same as {model})
#                  JANO_PREVIOUS_MODEL  the model to unload, empty if unknown
#                  JANO_UPSTREAM        the target model's upstream base URL,
#                                       e.g. http://127.0.0.1:8080
#                  JANO_GROUP           the swap group's name
#                stdin is closed (reads see end of file).
#
#   exit status  0 means "the switch was made": the previous model is stopped
#                and the new one is starting.  Jano then polls the target's
#                health URL (upstream + health, /health for llama-server) until
#                it answers 200 (llama-server answers 503 while it loads) or
#                [scheduler] ready_timeout passes.  The script does not have to
#                wait for the model to finish loading.
#                Any other status means the swap failed: Jano shows the LAST
#                LINE THE SCRIPT WROTE TO STDERR to the waiting clients in its
#                503 answer, so make that line say what went wrong.
#
#   output       Every stdout and stderr line is logged by Jano with the model
#                name (lines longer than 4096 bytes are cut).
#
#   unload       Jano also unloads a model without loading another (after its
#                idle TTL, or on POST /models/{name}/unload).  It runs
#                  [swap] unload    if set: argv, with "{model}" replaced by
#                                   the model to unload;
#                  [swap] command   otherwise, with "{model}" EMPTY and
#                                   "{previous}" the model to unload.
#                The environment is then JANO_ACTION=unload, JANO_MODEL=""
#                (empty), JANO_PREVIOUS_MODEL=<the model to unload>,
#                JANO_UPSTREAM=<ITS upstream>, JANO_GROUP as usual.  So a
#                script sees an unload as an empty model (or JANO_ACTION):
#                stop the previous model and start nothing.
#                Exit 0 means "the model is unloaded": its GPU memory is free
#                when the script exits (wait for that if stopping is
#                asynchronous).  Jano polls no health afterwards.  Any other
#                status means the unload failed (the last stderr line says
#                why); Jano then no longer knows what the group holds, and its
#                next swap gets an empty "{previous}".
#                Called with an empty model AND an empty previous (nothing is
#                known to be loaded), a script must exit 0: do nothing, or
#                stop whatever of yours may be running, as a best effort that
#                reports problems as warnings, never as a failure.
#                (This script and those in etc/swap-scripts/ take an empty
#                first argument, or JANO_ACTION=unload, as an unload, so they
#                need no [swap] unload; run with no argument at all and no
#                JANO_MODEL or JANO_ACTION, they print their usage, exit 2.)
#
#   time limit   Jano runs the script as the leader of a new session and
#                process group.  After [scheduler] swap_timeout seconds, the
#                WHOLE GROUP (the script and everything it started that is
#                still in the group) gets SIGTERM, then SIGKILL 5 s later; the
#                swap fails as a timeout.
#
#   daemons      A server the script starts and leaves running must not keep
#                the script's stdout/stderr: redirect its output to a file or
#                /dev/null.  (Jano stops reading 1 s after the script exits if
#                something still holds them, and logs a warning.)  Start it in
#                its own session (setsid, or a service manager) so a later
#                timeout kill of another swap cannot reach it.
#
#   concurrency  Jano runs at most one swap per group at a time, but scripts
#                of different groups may run at the same time.
#
# Ready-made scripts for common set-ups are in etc/swap-scripts/:
#   llama-server-systemd.sh   one systemd unit per model (llama-server@.service)
#   llama-server-pidfile.sh   one llama-server process tracked by a pid file
#   ollama.sh                 Ollama's keep_alive load/unload
#   llama-router.sh           llama-server's router mode (/models/load, /models/unload)
#
# Copy this file, fill in stop_model and start_model, chmod +x it, and point
# [swap] command at the copy.  As shipped it changes nothing and fails (but an
# unload of nothing succeeds, as the contract wants).

set -eu

model=${1:-${JANO_MODEL:-}}
previous=${2-${JANO_PREVIOUS_MODEL:-}}

# An unload: JANO_ACTION=unload, or an empty model argument.  The model to
# unload is {previous}; under a "[swap] unload" command whose only argument is
# "{model}", JANO_PREVIOUS_MODEL (or that argument) names it.
unload=
if [ "${JANO_ACTION:-}" = unload ] || { [ -z "$model" ] && [ $# -gt 0 ]; }; then
    unload=yes
    previous=${previous:-${JANO_PREVIOUS_MODEL:-$model}}
    model=
elif [ -z "$model" ]; then
    echo "usage: $0 MODEL [PREVIOUS]  (to unload: $0 '' PREVIOUS)" >&2
    exit 2
fi

# Stop a model, or every model of yours when $1 is empty (previous unknown).
# Must not fail when the model is not running.  Return once it is stopped and
# its GPU memory free (an unload's exit 0 promises that).
stop_model() {
    echo "stop_model is not written yet (wanted to stop: ${1:-everything})" >&2
    return 1
}

# Start a model.  Return once it is starting; Jano waits for its health URL.
start_model() {
    echo "start_model is not written yet (wanted to start: $1)" >&2
    return 1
}

if [ -n "$unload" ]; then
    if [ -z "$previous" ]; then
        # Nothing is known to be loaded: succeed.  (A script that can find
        # its own running models may stop them here, best effort:
        #     stop_model "" || echo "warning: ..." >&2
        # but must exit 0 whatever happens.)
        echo "unload in group ${JANO_GROUP:-?}: nothing is known to be loaded, nothing to do"
        exit 0
    fi
    echo "unloading $previous from group ${JANO_GROUP:-?}"
    stop_model "$previous" || {
        echo "cannot unload $previous (this is the example script: edit it first)" >&2
        exit 1
    }
    echo "$previous unloaded"
    exit 0
fi

echo "switching group ${JANO_GROUP:-?} from ${previous:-(unknown)} to $model"

if [ "$previous" != "$model" ]; then
    stop_model "$previous" || {
        echo "cannot stop ${previous:-the running model}" >&2
        exit 1
    }
fi

start_model "$model" || {
    echo "cannot start $model (this is the example script: edit it first)" >&2
    exit 1
}

exit 0
