#!/bin/sh
# llama-server-systemd.sh: swap models run as systemd template units.
#
# Usage (Jano's [swap] command):
#     command = ["etc/swap-scripts/llama-server-systemd.sh", "{model}", "{previous}"]
#
# Contract: see etc/swap-model.example.sh.  $1 is the model to load, $2 the
# model to unload (empty: unknown); JANO_MODEL / JANO_PREVIOUS_MODEL are used
# when the arguments are missing.  Exit 0 once the new unit has been started;
# Jano then waits for its /health to answer 200.
#
# What it does: stops llama-server@<previous>.service (every instance of the
# template when the previous model is unknown), then restarts
# llama-server@<model>.service.  Stopping first frees the GPU memory.
#
# Unload ($1 empty, or JANO_ACTION=unload; the same [swap] command serves):
# stops llama-server@<previous>.service and starts nothing.  systemctl stop
# returns once the unit's processes are gone, so exit 0 means the GPU memory
# is free.  With no previous model either, it stops every instance of the
# template as a best effort and exits 0 even if that fails.
#
# A matching template unit, /etc/systemd/system/llama-server@.service:
#
#     [Unit]
#     Description=llama-server for %i
#     [Service]
#     EnvironmentFile=/etc/llama-server/%i.env
#     ExecStart=/usr/local/bin/llama-server --host 127.0.0.1 --port ${PORT} \
#               --model ${MODEL_PATH} $LLAMA_ARGS
#     Restart=no
#
# with one /etc/llama-server/<model>.env per model (MODEL_PATH=..., PORT=...,
# LLAMA_ARGS=...) (PORT must match the
# model's upstream in Jano's config; every model may share one port, since
# only one runs at a time).  Jano's user needs the right to start and stop
# these units: run Jano as root, use user units (SYSTEMCTL="systemctl --user"),
# or allow it with a polkit rule or a sudoers entry (SYSTEMCTL="sudo -n systemctl").
#
# Settings (environment):
#     SYSTEMCTL      the systemctl command             (default: systemctl)
#     LLAMA_UNIT     the template unit's name          (default: llama-server@.service)

set -eu

model=${1:-${JANO_MODEL:-}}
previous=${2-${JANO_PREVIOUS_MODEL:-}}
SYSTEMCTL=${SYSTEMCTL:-systemctl}
LLAMA_UNIT=${LLAMA_UNIT:-llama-server@.service}

# An unload: JANO_ACTION=unload, or an empty model argument.  The model to
# unload is $2, else JANO_PREVIOUS_MODEL (else $1, for a "[swap] unload"
# command that passes only "{model}").
unload=
if [ "${JANO_ACTION:-}" = unload ] || { [ -z "$model" ] && [ $# -gt 0 ]; }; then
    unload=yes
    previous=${previous:-${JANO_PREVIOUS_MODEL:-$model}}
    model=
elif [ -z "$model" ]; then
    echo "usage: $0 MODEL [PREVIOUS]  (to unload: $0 '' PREVIOUS)" >&2
    exit 2
fi

case $LLAMA_UNIT in
    *@.service) ;;
    *) echo "LLAMA_UNIT must be a template unit name like llama-server@.service" >&2; exit 2 ;;
esac

# The unit of a model: the model name is the instance name, verbatim, so the
# unit file's %i is the model name.  systemd allows only these characters
# there; rename a model that has others (Jano's model names are free-form).
unit_for() {
    case $1 in
        *[!A-Za-z0-9:_.-]*)
            echo "model name '$1' cannot be a systemd instance name (use only A-Z a-z 0-9 : _ . -)" >&2
            exit 2 ;;
    esac
    printf '%s@%s.service\n' "${LLAMA_UNIT%@.service}" "$1"
}

# Unload: stop $previous, start nothing.  ($SYSTEMCTL is unquoted: see below.)
if [ -n "$unload" ]; then
    if [ -z "$previous" ]; then
        # Nothing known to be loaded: stop every instance, best effort (an
        # unload of nothing must not fail).
        echo "unload: nothing known to be loaded; stopping all ${LLAMA_UNIT%@.service}@*.service instances"
        $SYSTEMCTL stop "${LLAMA_UNIT%@.service}@*.service" ||
            echo "warning: cannot stop the running ${LLAMA_UNIT%@.service} instances" >&2
        exit 0
    fi
    old=$(unit_for "$previous")
    echo "unloading $previous: stopping $old"
    $SYSTEMCTL stop "$old" || {
        echo "cannot stop $old (see: journalctl -u $old)" >&2
        exit 1
    }
    echo "$previous unloaded ($old stopped)"
    exit 0
fi

target=$(unit_for "$model")

# $SYSTEMCTL may hold several words ("systemctl --user"): leave it unquoted.
if [ -z "$previous" ]; then
    # Unknown: stop every running instance of the template (a glob matches
    # loaded units only, which is what "running" needs).
    echo "stopping all ${LLAMA_UNIT%@.service}@*.service instances"
    $SYSTEMCTL stop "${LLAMA_UNIT%@.service}@*.service" || {
        echo "cannot stop the running ${LLAMA_UNIT%@.service} instances" >&2
        exit 1
    }
elif [ "$previous" != "$model" ]; then
    old=$(unit_for "$previous")
    echo "stopping $old"
    # Stopping a unit that is not running succeeds; a failure here means the
    # old model may still hold the GPU, so do not start the new one.
    $SYSTEMCTL stop "$old" || {
        echo "cannot stop $old" >&2
        exit 1
    }
fi

echo "starting $target"
# restart (not start) so the target comes up fresh even if it was running.
if ! $SYSTEMCTL restart "$target"; then
    echo "cannot start $target (see: journalctl -u $target)" >&2
    exit 1
fi

exit 0
