#!/bin/sh
# llama-router.sh: swap models in llama-server's router mode.
#
# Usage (Jano's [swap] command):
#     command = ["etc/swap-scripts/llama-router.sh", "{model}", "{previous}"]
#
# Contract: see etc/swap-model.example.sh.  $1 is the model to load, $2 the
# model to unload (empty: unknown); JANO_MODEL / JANO_PREVIOUS_MODEL are used
# when the arguments are missing.  Exit 0 once the router reports the model
# loaded (or, without jq, once it accepted the load).
#
# Unload ($1 empty, or JANO_ACTION=unload; the same [swap] command serves):
# POST /models/unload for the previous model, then wait until GET /models no
# longer shows it loaded (status "unloaded", or not listed), so that its child
# llama-server is gone and its memory free; load nothing.  "model is not
# running" and an unknown model (404) mean it is not loaded: exit 0.  Without
# jq it cannot watch /models and exits 0 once the router accepted the unload.
# With no previous model either, it unloads every model the router holds
# (when jq is installed), as a best effort that exits 0 whatever happens.
#
# llama-server started with --models-dir (or --models-preset) and no --model
# is a router: it runs one child llama-server per loaded model and offers
#   POST /models/unload {"model": PREV}  -> 200 {"success":true}
#                                           400 "model is not running" (fine: nothing to do)
#   POST /models/load   {"model": NEXT}  -> 200 {"success":true}
#                                           400 "model is already running" (fine: done)
#                                           404 for a model it does not know
#   GET  /models    -> {"data":[{"id":..., "status":{"value":"unloaded|loading|loaded|sleeping"}}]}
# Model names are the router's ids (file names without .gguf, or preset names).
# Run it with --models-max 1 so it never holds two models, and without
# --models-autoload if only Jano should decide what is loaded.
#
# Settings (environment):
#     LLAMA_ROUTER_URL   the router's base URL (default: JANO_UPSTREAM, else http://127.0.0.1:8080)
#     CURL_OPTS          extra curl options, split on spaces (no quoting); for an API
#                        key use a curl config file: CURL_OPTS="-K /etc/jano/curlrc"
#     LLAMA_ROUTER_UNLOAD_TIMEOUT  seconds an unload waits for the model to be
#                        unloaded before it fails (default: 60)

set -eu

model=${1:-${JANO_MODEL:-}}
previous=${2-${JANO_PREVIOUS_MODEL:-}}

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

base=${LLAMA_ROUTER_URL:-${JANO_UPSTREAM:-http://127.0.0.1:8080}}
base=${base%/}
base=${base%/v1}

body=$(mktemp)
trap 'rm -f "$body"' EXIT

json_string() {
    printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"
}

# POST {"model": $2} to $base$1; body to $body, HTTP status to stdout
# ("000" when the router cannot be reached).
post_model() {
    # shellcheck disable=SC2086
    curl -sS ${CURL_OPTS:-} -o "$body" -w '%{http_code}' -X POST \
        -H 'Content-Type: application/json' --data "{\"model\":$(json_string "$2")}" \
        "$base$1" || true
}

# The "message" of a llama-server error body, else the body's start.
error_message() {
    message=$(sed -n -e 's/.*"message": *"\([^"]*\)".*/\1/p' "$body")
    printf '%s' "${message:-$(head -c 300 "$body")}"
}

# Unload model $1 and wait until the router no longer holds it.  Returns 1,
# the reason on stderr, when that fails.
unload_and_wait() {
    echo "unloading $1"
    status=$(post_model /models/unload "$1")
    case $status in
        200) ;;
        400)
            case $(error_message) in
                *"not running"*) echo "$1 was not running: nothing to unload"; return 0 ;;
                *) echo "router could not unload $1: $(error_message)" >&2; return 1 ;;
            esac ;;
        404) echo "the router does not know model $1: nothing to unload"; return 0 ;;
        000) echo "cannot reach the llama-server router at $base" >&2; return 1 ;;
        *) echo "router could not unload $1 (HTTP $status): $(error_message)" >&2; return 1 ;;
    esac
    if ! command -v jq >/dev/null 2>&1; then
        echo "jq not installed: not waiting for $1 to finish unloading"
        return 0
    fi
    tries=0
    while :; do
        # shellcheck disable=SC2086
        models=$(curl -sS -f ${CURL_OPTS:-} "$base/models" 2>/dev/null) || {
            echo "warning: cannot read $base/models: not waiting for $1 to finish unloading" >&2
            return 0
        }
        state=$(printf '%s' "$models" \
            | jq -r --arg id "$1" '.data[]? | select(.id == $id) | .status.value' 2>/dev/null || true)
        case $state in
            unloaded|'') echo "$1 unloaded"; return 0 ;;
        esac
        if [ "$tries" -ge $((${LLAMA_ROUTER_UNLOAD_TIMEOUT:-60} * 4)) ]; then
            echo "the router still shows $1 as $state ${LLAMA_ROUTER_UNLOAD_TIMEOUT:-60}s after unloading it" >&2
            return 1
        fi
        tries=$((tries + 1))
        sleep 0.25
    done
}

# Unload: unload the previous model, load nothing.
if [ -n "$unload" ]; then
    if [ -n "$previous" ]; then
        unload_and_wait "$previous" || exit 1
        exit 0
    fi
    # Nothing known to be loaded: unload whatever the router holds, best effort.
    if ! command -v jq >/dev/null 2>&1; then
        echo "unload: nothing known to be loaded and jq not installed: nothing to do"
        exit 0
    fi
    loaded=$(curl -sS ${CURL_OPTS:-} "$base/models" \
        | jq -r '.data[]? | select(.status.value != "unloaded") | .id' 2>/dev/null || true)
    if [ -z "$loaded" ]; then
        echo "unload: nothing known to be loaded, and the router at $base holds no model"
    fi
    for name in $loaded; do
        unload_and_wait "$name" || echo "warning: $name may still be loaded" >&2
    done
    exit 0
fi

# 1. Unload the previous model.
if [ -z "$previous" ]; then
    # Unknown: unload every loaded model but the target (needs jq).
    if command -v jq >/dev/null 2>&1; then
        loaded=$(curl -sS ${CURL_OPTS:-} "$base/models" \
            | jq -r '.data[]? | select(.status.value != "unloaded") | .id' 2>/dev/null || true)
        for name in $loaded; do
            if [ "$name" != "$model" ]; then
                echo "unloading $name"
                post_model /models/unload "$name" >/dev/null
            fi
        done
    else
        echo "previous model unknown and jq not installed: relying on --models-max 1"
    fi
elif [ "$previous" != "$model" ]; then
    echo "unloading $previous"
    status=$(post_model /models/unload "$previous")
    case $status in
        200) ;;
        400)
            case $(error_message) in
                *"not running"*) echo "$previous was not running" ;;
                *) echo "warning: unloading $previous: $(error_message)" >&2 ;;
            esac ;;
        000) echo "cannot reach the llama-server router at $base" >&2; exit 1 ;;
        # Not fatal: with --models-max 1 the router unloads it to load the next.
        *) echo "warning: unloading $previous answered $status: $(error_message)" >&2 ;;
    esac
fi

# 2. Load the target.
echo "loading $model"
status=$(post_model /models/load "$model")
case $status in
    200) ;;
    400)
        case $(error_message) in
            *"already running"*) echo "$model is already running" ;;
            *) echo "router could not load $model: $(error_message)" >&2; exit 1 ;;
        esac ;;
    404) echo "the router does not know model $model (HTTP 404)" >&2; exit 1 ;;
    000) echo "cannot reach the llama-server router at $base" >&2; exit 1 ;;
    *) echo "router could not load $model (HTTP $status): $(error_message)" >&2; exit 1 ;;
esac

# 3. Wait until the router says "loaded", so that exit 0 means the switch was
# made.  The router answers /health for itself, not for the model, so Jano's
# own readiness poll alone could not tell.
if ! command -v jq >/dev/null 2>&1; then
    echo "jq not installed: not waiting for $model to finish loading"
    exit 0
fi
gone=0
while :; do
    state=$(curl -sS ${CURL_OPTS:-} "$base/models" \
        | jq -r --arg id "$model" \
            '.data[]? | select(.id == $id) | .status | if .failed == true then "failed" else .value end' \
            2>/dev/null || true)
    case $state in
        loaded|sleeping)
            echo "$model loaded"
            exit 0 ;;
        failed)
            echo "router failed to load $model (see the router's log)" >&2
            exit 1 ;;
        unloaded)
            # Right after the load request it may not show "loading" yet; a
            # model that stays unloaded has failed to start.
            gone=$((gone + 1))
            if [ "$gone" -ge 20 ]; then
                echo "router failed to load $model (status stays unloaded; see the router's log)" >&2
                exit 1
            fi ;;
        *) gone=0 ;;
    esac
    sleep 0.25
done
