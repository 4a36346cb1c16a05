#!/bin/sh
# swap-model.example.sh: the skeleton of a Jano swap script, and its contract.
#
# Jano holds one model per swap group (one GPU).  When a request needs another
# model of the same group, Jano runs the swap script configured in its TOML:
#
#     [swap]
#     command = ["etc/swap-model.sh", "{model}", "{previous}"]
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
# [swap] command at the copy.  As shipped it changes nothing and fails.

set -eu

model=${1:-${JANO_MODEL:-}}
previous=${2-${JANO_PREVIOUS_MODEL:-}}

if [ -z "$model" ]; then
    echo "usage: $0 MODEL [PREVIOUS]" >&2
    exit 2
fi

# Stop a model, or every model of yours when $1 is empty (previous unknown).
# Must not fail when the model is not running.
stop_model() {
    echo "stop_model is not written yet (wanted to stop: ${1:-everything})" >&2
    return 1
}

# Start a model.  Return once it is starting; Jano waits for its health URL.
start_model() {
    echo "start_model is not written yet (wanted to start: $1)" >&2
    return 1
}

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
