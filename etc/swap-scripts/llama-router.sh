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

set -eu

model=${1:-${JANO_MODEL:-}}
previous=${2-${JANO_PREVIOUS_MODEL:-}}

if [ -z "$model" ]; then
    echo "usage: $0 MODEL [PREVIOUS]" >&2
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
